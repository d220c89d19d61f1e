"""A single-stage grid detector in the YOLO v2/v3 manner: one S x S grid, A anchor boxes per cell.

Each cell predicts, per anchor, an offset of the box centre inside the cell (sigmoid), the box's
size as a log-scale of the anchor, an objectness logit and K class logits. A ground-truth box is
the responsibility of the cell holding its centre and of the anchor whose shape fits it best (IoU
of sizes); every other prediction learns "no object", except those already overlapping a true
box by more than `ignore_iou` (YOLOv3's ignore rule). Decoding keeps score = objectness x class
probability and runs `torchvision.ops.batched_nms` per image and class in one call.

The detector contract (shared with `faster_rcnn`): `model(images, boxes, labels)` in train mode
returns a dict of named loss terms; `model(images)` in eval mode returns one dict per image with
"boxes" (xyxy pixels), "scores" and "labels" (0..K-1). Boxes come padded (B, M, 4) with labels
(B, M), -1 marking empty slots, as the scene data sets make them.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, generalized_box_iou_loss

from dlrun.models.anchors import wh_iou

Detections = list[dict[str, Tensor]]


def conv_bn(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.1, inplace=True),
    )


class YOLO(nn.Module):
    """Darknet-style conv backbone down to stride `stride`, one 1x1 prediction conv."""

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        anchors: Sequence[Sequence[float]] | None = None,
        num_anchors: int = 3,
        width: int = 16,
        stride: int = 8,
        box_weight: float = 5.0,
        obj_weight: float = 1.0,
        noobj_weight: float = 0.5,
        cls_weight: float = 1.0,
        ignore_iou: float = 0.5,
        score_threshold: float = 0.01,
        nms_iou: float = 0.5,
        max_detections: int = 100,
    ) -> None:
        super().__init__()
        if stride not in (4, 8, 16, 32) or image_size % stride:
            raise ValueError(
                f"model.stride must be 4, 8, 16 or 32 and divide the image size {image_size}, "
                f"got {stride}"
            )
        if anchors is not None:
            num_anchors = len(anchors)
        if num_anchors < 1:
            raise ValueError(f"model.num_anchors must be >= 1, got {num_anchors}")
        self.k, self.a, self.stride, self.size = num_classes, num_anchors, stride, image_size
        self.weights = {"box": box_weight, "obj": obj_weight, "noobj": noobj_weight,
                        "cls": cls_weight}  # fmt: skip
        self.ignore_iou, self.score_threshold = ignore_iou, score_threshold
        self.nms_iou, self.max_detections = nms_iou, max_detections
        # Anchor sizes in pixels, (A, 2) w, h: a buffer so checkpoints carry them; zeros until
        # the trainer fits them to the training boxes (k-means) when none are configured.
        given = torch.tensor(anchors, dtype=torch.float32) if anchors is not None else None
        self.register_buffer("anchors", given if given is not None else torch.zeros(self.a, 2))
        layers, cin, w = [], in_channels, width
        for _ in range(int(math.log2(stride))):  # one conv + pool per halving
            layers += [conv_bn(cin, w), nn.MaxPool2d(2)]
            cin, w = w, w * 2
        self.features = nn.Sequential(
            *layers, conv_bn(cin, cin * 2), conv_bn(cin * 2, cin, 1), conv_bn(cin, cin * 2)
        )
        self.head = nn.Conv2d(cin * 2, self.a * (5 + self.k), 1)
        with torch.no_grad():  # objectness starts at p = 0.01: "no object" is the usual answer
            bias = self.head.bias.view(self.a, 5 + self.k)
            bias.zero_()
            bias[:, 4] = math.log(0.01 / 0.99)

    def needs_anchors(self) -> bool:
        return bool((self.anchors == 0).all())

    def set_anchors(self, anchors: Tensor) -> None:
        self.anchors.copy_(anchors.to(self.anchors))

    def raw(self, images: Tensor) -> Tensor:
        """(B, A, S, S, 5 + K) predictions."""
        out = self.head(self.features(images)).float()
        b, _, s, t = out.shape
        return out.view(b, self.a, 5 + self.k, s, t).permute(0, 1, 3, 4, 2)

    def decode_boxes(self, raw: Tensor) -> Tensor:
        """(B, A, S, S, 4) xyxy pixel boxes from the raw predictions."""
        s = raw.shape[2]
        grid = torch.arange(s, device=raw.device, dtype=raw.dtype)
        cx = (raw[..., 0].sigmoid() + grid.view(1, 1, 1, s)) * self.stride
        cy = (raw[..., 1].sigmoid() + grid.view(1, 1, s, 1)) * self.stride
        wh = raw[..., 2:4].clamp(max=4.0).exp() * self.anchors.view(1, self.a, 1, 1, 2)
        centre = torch.stack([cx, cy], -1)
        return torch.cat([centre - wh / 2, centre + wh / 2], -1)

    def forward(
        self, images: Tensor, boxes: Tensor | None = None, labels: Tensor | None = None
    ) -> dict[str, Tensor] | Detections:
        raw = self.raw(images)
        if boxes is not None and labels is not None:
            return self.loss(raw, boxes, labels)
        return self.detect(raw)

    def loss(self, raw: Tensor, boxes: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The weighted loss terms: box (GIoU), obj / noobj (BCE), cls (cross-entropy)."""
        b, a, s = raw.shape[:3]
        pred = self.decode_boxes(raw)  # (B, A, S, S, 4)
        valid = labels >= 0
        img, slot = valid.nonzero(as_tuple=True)
        gt, cls = boxes[img, slot].float(), labels[img, slot]
        centre = (gt[:, :2] + gt[:, 2:]) / 2
        gx, gy = (centre / self.stride).long().clamp(0, s - 1).unbind(1)
        best = wh_iou(gt[:, 2:] - gt[:, :2], self.anchors).argmax(1)
        positive = torch.zeros(b, a, s, s, dtype=torch.bool, device=raw.device)
        positive[img, best, gy, gx] = True
        # Ignore rule: a prediction overlapping any true box of its image by > ignore_iou is
        # neither pushed to "object" nor to "no object". One box_iou over the batch, then only
        # the pairs of the same image count.
        overlap = torch.zeros(b, a, s, s, device=raw.device)
        if len(gt):
            flat = pred.detach().reshape(b, -1, 4)
            iou = box_iou(flat.reshape(-1, 4), gt)  # (B * A * S * S, G)
            same = torch.arange(b, device=raw.device).repeat_interleave(flat.shape[1])[:, None]
            overlap = torch.where(same == img[None], iou, 0.0).amax(1).view(b, a, s, s)
        negative = ~positive & (overlap <= self.ignore_iou)
        n = max(len(gt), 1)
        obj = raw[..., 4]
        # Two boxes claiming one cell and anchor both pull on that prediction (rare: their
        # centres would be < 8 px apart with at most 20% overlap).
        hit = pred[img, best, gy, gx]
        terms = {
            "box": generalized_box_iou_loss(hit, gt, reduction="sum") / n,
            "obj": F.binary_cross_entropy_with_logits(
                obj[img, best, gy, gx], torch.ones_like(cls, dtype=obj.dtype), reduction="sum"
            ) / n,
            "noobj": F.binary_cross_entropy_with_logits(
                obj[negative], torch.zeros_like(obj[negative]), reduction="sum"
            ) / n,
            "cls": F.cross_entropy(raw[img, best, gy, gx, 5:], cls, reduction="sum") / n,
        }  # fmt: skip
        return {k: self.weights[k] * v for k, v in terms.items()}

    @torch.no_grad()
    def detect(self, raw: Tensor) -> Detections:
        """Per image: boxes above the score threshold after per-class NMS, best first."""
        b = raw.shape[0]
        boxes = clip_boxes_to_image(self.decode_boxes(raw).reshape(b, -1, 4), (self.size,) * 2)
        probs = raw[..., 5:].softmax(-1) * raw[..., 4:5].sigmoid()
        scores, labels = probs.reshape(b, -1, self.k).max(-1)
        keep = scores > self.score_threshold
        img = torch.arange(b, device=raw.device)[:, None].expand_as(scores)[keep]
        box, score, label = boxes[keep], scores[keep], labels[keep]
        # One NMS call for the whole batch: the group is (image, class).
        kept = batched_nms(box, score, img * self.k + label, self.nms_iou)
        out: Detections = []
        for i in range(b):
            mine = kept[img[kept] == i][: self.max_detections]  # batched_nms sorts by score
            out.append({"boxes": box[mine], "scores": score[mine], "labels": label[mine]})
        return out
