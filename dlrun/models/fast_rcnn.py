"""Fast R-CNN (Girshick 2015) on selective-search proposals, sized for small grey canvases.

One convolutional pass per image (a small conv-BN-ReLU + max-pool backbone down to `stride`), then
RoI max pooling (`torchvision.ops.roi_pool`, the paper's operation, not Mask R-CNN's RoIAlign) of
every region of the batch in one call, two fully connected layers, and two sibling outputs: a
softmax over K + 1 classes (0 background) and a class-specific box regressor, 4 (K + 1) numbers.

Training (eq. 1 of the paper): L = L_cls(p, u) + lambda [u >= 1] L_loc(t^u, v). Regions are the
proposals plus the true boxes, labelled by IoU (foreground >= 0.5, background in [0.1, 0.5), the
rest unused) and sampled `rois_per_image` per image over the batch, 25% foreground at most
(dlrun/models/regions.py). Both terms are divided by the number of sampled regions: "cls" the
mean cross-entropy, "box" smooth L1 (beta 1, the paper's) summed over the 4 coordinates of the
foreground regions, then over the sampled count, as the paper's Caffe SmoothL1Loss and
torchvision's fastrcnn_loss normalise it (not by the foreground count).

The detector contract is yolo.py's, with proposals: `model(images, boxes, labels, proposals=P)` in
train mode -> {"cls", "box"}; `model(images, proposals=P)` in eval mode -> one dict per image with
"boxes" (xyxy pixels), "scores", "labels" 0..K-1. `proposal_settings` tells the detection trainer
which selective search to run (dlrun/data/proposals.py); it caches the proposals per split.
"""

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, clip_boxes_to_image, roi_pool

from dlrun.errors import UserError
from dlrun.models.regions import decode, encode, label_regions, proposal_settings, sample

Detections = list[dict[str, Tensor]]
STRIDES = (2, 4, 8, 16)


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class Backbone(nn.Sequential):
    """conv-BN-ReLU + 2x2 max-pool per halving down to `stride`, then two more conv-BN-ReLU at
    twice the last width (the map RoI pooling reads). `out_channels`: that width."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        layers, cin, w = [], in_channels, width
        for _ in range(int(math.log2(stride))):
            layers += [conv_bn_relu(cin, w), nn.MaxPool2d(2)]
            cin, w = w, w * 2
        super().__init__(*layers, conv_bn_relu(cin, cin * 2), conv_bn_relu(cin * 2, cin * 2))
        self.out_channels = cin * 2


def check_settings(image_size: int, stride: int, pool_size: int, **positive: float) -> None:
    """Each mistake of the model.* keys as one UserError line (the CLI shows it as it is)."""
    if stride not in STRIDES or image_size % stride:
        raise UserError(
            f"model.stride must be one of {', '.join(map(str, STRIDES))} and divide the image "
            f"size {image_size} (data.image_size), got {stride}."
        )
    if pool_size < 1:
        raise UserError(
            f"model.pool_size must be >= 1 (each region's side after RoI pooling), got {pool_size}."
        )
    for key, value in positive.items():
        if not value > 0:
            raise UserError(f"model.{key} must be > 0, got {value}.")


class FastRCNN(nn.Module):
    """Backbone, RoI max pooling, two FC layers, class scores and class-specific boxes."""

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        width: int = 16,
        stride: int = 4,
        pool_size: int = 7,
        representation: int = 256,
        rois_per_image: int = 64,
        box_weight: float = 1.0,
        score_threshold: float = 0.01,
        nms_iou: float = 0.5,
        max_detections: int = 100,
        proposals: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_settings(image_size, stride, pool_size, width=width, representation=representation,
                       rois_per_image=rois_per_image, nms_iou=nms_iou,
                       max_detections=max_detections)  # fmt: skip
        if box_weight < 0 or not 0 <= score_threshold <= 1:
            raise UserError(
                "model.box_weight must be >= 0 and model.score_threshold in [0, 1], got "
                f"{box_weight} and {score_threshold}."
            )
        # What the detection trainer hands selective search for every split (and mode=predict).
        self.proposal_settings = proposal_settings(proposals)
        self.k, self.size, self.stride, self.pool_size = num_classes, image_size, stride, pool_size
        self.rois_per_image, self.box_weight = rois_per_image, box_weight
        self.score_threshold, self.nms_iou, self.max_detections = (
            score_threshold, nms_iou, max_detections
        )  # fmt: skip
        self.features = Backbone(in_channels, width, stride)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(self.features.out_channels * pool_size**2, representation),
            nn.ReLU(inplace=True),
            nn.Linear(representation, representation),
            nn.ReLU(inplace=True),
        )
        self.cls = nn.Linear(representation, num_classes + 1)
        self.box = nn.Linear(representation, 4 * (num_classes + 1))
        # The paper's initialisation of the two sibling layers: N(0, 0.01) and N(0, 0.001), so
        # that the first scores are near uniform and the first boxes the proposals themselves.
        for layer, std in ((self.cls, 0.01), (self.box, 0.001)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    # The detection trainer's anchor protocol: Fast R-CNN has none to fit.
    def needs_anchors(self) -> bool:
        return False

    def set_anchors(self, anchors: Tensor) -> None:
        """No anchors: the proposals take their place."""

    def pool(self, features: Tensor, image: Tensor, boxes: Tensor) -> Tensor:
        """RoI max pooling of every region of the batch in one call: (N, C, pool, pool) from the
        (B, C, H/stride, W/stride) map, regions given by their image index (N,) and xyxy pixel
        boxes (N, 4), as roi_pool's (N, 5) [index, x1, y1, x2, y2] rows scaled by 1 / stride."""
        rois = torch.cat([image[:, None].to(boxes), boxes], 1).to(features.dtype)
        return roi_pool(features, rois, self.pool_size, spatial_scale=1.0 / self.stride)

    def predict(self, images: Tensor, image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits (N, K + 1) and class-specific deltas (N, K + 1, 4) of the regions."""
        hidden = self.head(self.pool(self.features(images), image, boxes))
        return self.cls(hidden).float(), self.box(hidden).float().view(-1, self.k + 1, 4)

    def forward(
        self,
        images: Tensor,
        boxes: Tensor | None = None,
        labels: Tensor | None = None,
        proposals: Tensor | None = None,
    ) -> dict[str, Tensor] | Detections:
        if boxes is not None and labels is not None:
            if proposals is None:
                raise ValueError("Fast R-CNN trains on region proposals: pass proposals=(B, P, 4)")
            return self.loss(images, proposals, boxes, labels)
        if proposals is None:
            # The whole canvas as each image's one region: what the run folder's FLOP count (a
            # blank image, no proposals) measures, the backbone and one region's head.
            b = len(images)
            whole = torch.tensor([0.0, 0.0, self.size, self.size], device=images.device)
            proposals = whole.expand(b, 1, 4)
        return self.detect(images, proposals)

    def loss(
        self, images: Tensor, proposals: Tensor, boxes: Tensor, labels: Tensor
    ) -> dict[str, Tensor]:
        """Eq. 1's two terms over the regions sampled from the whole batch."""
        regions = label_regions(
            proposals, boxes, labels, fg_iou=0.5, bg_iou=(0.1, 0.5), add_truth=True
        )
        picked = sample(regions.labels, self.rois_per_image * len(images), 0.25)
        logits, deltas = self.predict(images, regions.image[picked], regions.boxes[picked])
        return self.terms(logits, deltas, regions.labels[picked], regions.boxes[picked],
                          regions.truth[picked])  # fmt: skip

    def terms(
        self, logits: Tensor, deltas: Tensor, u: Tensor, boxes: Tensor, truth: Tensor
    ) -> dict[str, Tensor]:
        """Eq. 1's terms. "cls": cross-entropy of the true class u (0 background) over the R
        sampled regions; "box": box_weight x smooth L1 (beta 1) of the true class's deltas t^u
        against the encoded targets v, over foreground regions only ([u >= 1]), divided by R
        too. The other K rows of a region's deltas get no gradient: class-specific boxes."""
        n = max(len(u), 1)  # a batch with no region at all: zero terms, not 0 / 0
        fg = (u > 0).nonzero().squeeze(1)
        t = deltas[fg, u[fg]]
        v = encode(boxes[fg], truth[fg])
        loc = F.smooth_l1_loss(t, v, beta=1.0, reduction="sum")
        return {
            "cls": F.cross_entropy(logits, u, reduction="sum") / n,
            "box": self.box_weight * loc / n,
        }

    @torch.no_grad()
    def detect(self, images: Tensor, proposals: Tensor) -> Detections:
        """Per image, best first: every valid proposal scored for each class (softmax) with its
        class's decoded box, clipped; background dropped; per-class NMS for the whole batch in
        one call (groups image x K + class); at most `max_detections`."""
        b = len(images)
        regions = label_regions(proposals)  # flattened valid proposals, no labels
        logits, deltas = self.predict(images, regions.image, regions.boxes)
        scores = logits.softmax(1)[:, 1:]  # (N, K)
        boxes = clip_boxes_to_image(decode(regions.boxes, deltas[:, 1:]), (self.size,) * 2)
        keep = scores > self.score_threshold
        row, label = keep.nonzero(as_tuple=True)
        img, box, score = regions.image[row], boxes[row, label], scores[row, label]
        kept = batched_nms(box, score, img * self.k + label, self.nms_iou)  # sorted by score
        out: Detections = []
        for i in range(b):
            mine = kept[img[kept] == i][: self.max_detections]
            out.append({"boxes": box[mine], "scores": score[mine], "labels": label[mine]})
        return out
