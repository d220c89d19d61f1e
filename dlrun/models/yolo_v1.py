"""YOLO as the course notes describe it: YOLOv1 (Redmon et al., "You Only Look Once", 2016).

The image is an S x S grid (`grid`, 7 in the paper). Every cell predicts B boxes
(`boxes_per_cell`, 2), each as (x, y, w, h, confidence), and ONE class distribution over the K
classes, whatever its B boxes are: S * S * (5B + K) numbers for the whole image.

- x, y: the box centre's offset inside its cell, in [0, 1]; w, h: the box's size relative to the
  whole image, in [0, 1]. Cells are image_size / S pixels wide, a float (a 64 px canvas does not
  divide by 7); a box belongs to the cell floor(centre / cell) of its centre.
- Outputs: the paper's last layer is linear; here x, y, w, h and the confidence go through a
  sigmoid, a documented choice: it keeps sqrt(w), sqrt(h) defined and every value in the range
  its target lives in. The K class probabilities are linear outputs, as the paper's, regressed to
  the one-hot class by the squared error: a softmax under a squared error learns slowly (its
  gradient vanishes as the wrong class gets sure); with it the class term sat near chance for
  three epochs of 20,000 scenes (2.80, 2.65, 2.40; mAP@0.5 0.25). Detection clips them to [0, 1].
- Network: a small conv backbone (conv-BN-LeakyReLU(0.1) + 2x2 max-pool per stage, `width`
  channels at first, doubling), an adaptive average pool to S x S, then a head (`head`):
  conv (the default): the course notes' output volume, S x S x (5B + K) from 3x3 and 1x1
  convolutions, every cell read by the same weights (the notes build YOLO on the convolutional
  sliding window); fc: the paper's fully connected head, flatten -> `hidden` -> LeakyReLU(0.1)
  -> dropout (`dropout`, 0.5 as in the paper) -> S * S * (5B + K). Measured on mnist_det (20,000
  scenes, Adam 0.001): the fc head, softmax classes, reached val mAP@0.5 0.01, 0.10, 0.25 in its
  first three epochs: 49 cells' classifiers, no weight shared, learn from ~3 digits a scene.
- Loss: the paper's sum-squared error, summed over every cell and box of the batch, then divided
  by the batch size (a per-image loss whose scale does not follow the batch size):
    coord_weight (lambda_coord, 5) * sum over responsible boxes
        [(x - x^)^2 + (y - y^)^2 + (sqrt w - sqrt w^)^2 + (sqrt h - sqrt h^)^2]      "coord"
  + sum over responsible boxes (C - C^)^2, C^ = IoU(predicted box, truth), detached  "conf_obj"
  + noobj_weight (lambda_noobj, 0.5) * sum over all other boxes C^2                 "conf_noobj"
  + sum over cells holding a truth's centre sum_k (p_k - p^_k)^2, p^ one-hot         "cls"
  A cell holding a truth's centre makes the one of its B predictors whose decoded (detached) box
  has the highest IoU with that truth responsible (ties: the first). The grid holds one object
  per cell: where several truths' centres fall in one cell, the largest box (by area; ties: the
  first in the image's list) is the cell's truth and the others are not learned.
- Detection: the paper's class-specific confidence, score = confidence x class probability, for
  every box and class; pairs above `score_threshold` go through per-class NMS
  (`torchvision.ops.batched_nms`, one call per image, grouped by class): one box may
  come back under several classes, as in the paper's evaluation. At most `max_detections` per
  image, best first, boxes clipped to the image.

The detector contract of dlrun/models/yolo.py: `model(images, boxes, labels)` in train mode
returns the loss terms above, lambdas applied; `model(images)` in eval mode returns one dict per
image with "boxes" (xyxy pixels), "scores" and "labels" (0..K-1). Boxes come padded (B, M, 4)
with labels (B, M), -1 marking empty slots. No anchors: `needs_anchors()` is False, so the
detection trainer fits none.
"""

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, clip_boxes_to_image

Detections = list[dict[str, Tensor]]
MAX_STAGES = 5  # conv + pool stages at most (64 px: down to 2 x 2)
HEADS = ("conv", "fc")


def conv_bn(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.1, inplace=True),
    )


def paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of xyxy boxes a[..., 4] and b[..., 4], element by element (broadcast)."""
    low, high = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    wh = (high - low).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a + area_b - inter).clamp(min=1e-9)


class YOLOv1(nn.Module):
    """S x S grid, B boxes and one class distribution per cell; a conv or fully connected head."""

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        grid: int = 7,
        boxes_per_cell: int = 2,
        width: int = 16,
        hidden: int = 256,
        dropout: float = 0.5,
        head: str = "conv",
        coord_weight: float = 5.0,
        noobj_weight: float = 0.5,
        score_threshold: float = 0.01,
        nms_iou: float = 0.5,
        max_detections: int = 100,
    ) -> None:
        super().__init__()
        if not 1 <= grid <= image_size:
            raise ValueError(
                f"model.grid must be between 1 and the image size {image_size}, got {grid}"
            )
        if boxes_per_cell < 1:
            raise ValueError(f"model.boxes_per_cell must be >= 1, got {boxes_per_cell}")
        if width < 1 or hidden < 1:
            raise ValueError(f"model.width and model.hidden must be >= 1, got {width}, {hidden}")
        if not 0 <= dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
        self.s, self.b, self.k, self.size = grid, boxes_per_cell, num_classes, image_size
        self.cell = image_size / grid  # pixels, a float: 64 / 7 = 9.14
        self.coord_weight, self.noobj_weight = coord_weight, noobj_weight
        self.score_threshold, self.nms_iou = score_threshold, nms_iou
        self.max_detections = max_detections
        # Halve while the map stays at least as fine as the grid (64 px, S = 7: 64 -> 8).
        layers: list[nn.Module] = []
        cin, w, side = in_channels, width, image_size
        while side // 2 >= grid and len(layers) < 2 * MAX_STAGES:
            layers += [conv_bn(cin, w), nn.MaxPool2d(2)]
            cin, w, side = w, w * 2, side // 2
        self.features = nn.Sequential(*layers, conv_bn(cin, w), nn.AdaptiveAvgPool2d(grid))
        out = 5 * boxes_per_cell + num_classes
        if head not in HEADS:
            raise ValueError(f"model.head must be one of {', '.join(HEADS)}, got {head}")
        self.conv_head = head == "conv"
        if self.conv_head:  # the notes' output volume: every cell read by the same 1x1 weights
            self.head: nn.Module = nn.Sequential(conv_bn(w, 2 * w), conv_bn(2 * w, w, 1),
                                                 nn.Conv2d(w, out, 1))  # fmt: skip
        else:  # the paper's: fully connected over the whole grid
            self.head = nn.Sequential(
                nn.Flatten(),
                nn.Linear(w * grid * grid, hidden),
                nn.LeakyReLU(0.1, inplace=True),
                nn.Dropout(dropout),
                nn.Linear(hidden, grid * grid * out),
            )

    def needs_anchors(self) -> bool:
        return False  # YOLOv1 predicts sizes relative to the image, not to anchors

    def set_anchors(self, anchors: Tensor) -> None:
        """No anchors to set (the detection trainer's contract)."""

    def raw(self, images: Tensor) -> Tensor:
        """(N, S, S, 5B + K) outputs: row (y) cell, column (x) cell, then B x (x, y, w, h, C)
        and the K class logits."""
        out = self.head(self.features(images)).float()
        if self.conv_head:  # (N, 5B + K, S, S) -> (N, S, S, 5B + K)
            return out.permute(0, 2, 3, 1)
        return out.view(len(out), self.s, self.s, 5 * self.b + self.k)

    def split(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        """(N, S, S, B, 5) sigmoid box values (x, y, w, h, C) and (N, S, S, K) class
        probabilities, linear (the paper's last layer)."""
        n, s = raw.shape[:2]
        boxes = raw[..., : 5 * self.b].sigmoid().view(n, s, s, self.b, 5)
        return boxes, raw[..., 5 * self.b :]

    def decode(self, boxes: Tensor) -> Tensor:
        """(N, S, S, B, 4) xyxy pixel boxes from the sigmoid values of `split`."""
        s = boxes.shape[1]
        grid = torch.arange(s, device=boxes.device, dtype=boxes.dtype)
        cx = (boxes[..., 0] + grid.view(1, 1, s, 1)) * self.cell
        cy = (boxes[..., 1] + grid.view(1, s, 1, 1)) * self.cell
        wh = boxes[..., 2:4] * self.size
        centre = torch.stack([cx, cy], -1)
        return torch.cat([centre - wh / 2, centre + wh / 2], -1)

    def forward(
        self, images: Tensor, boxes: Tensor | None = None, labels: Tensor | None = None
    ) -> dict[str, Tensor] | Detections:
        raw = self.raw(images)
        if boxes is not None and labels is not None:
            return self.loss(raw, boxes, labels)
        return self.detect(raw)

    def cell_truths(self, boxes: Tensor, labels: Tensor) -> tuple[Tensor, ...]:
        """The truth of each cell that holds a centre: image, row, column, box (xyxy), class.
        Several centres in one cell: the largest box, the first of equal ones."""
        img, slot = (labels >= 0).nonzero(as_tuple=True)
        gt, cls = boxes[img, slot].float(), labels[img, slot]
        centre = (gt[:, :2] + gt[:, 2:]) / 2
        col, row = (centre / self.cell).floor().long().clamp(0, self.s - 1).unbind(1)
        area = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
        # Largest first (stable: the first of equal areas), then grouped by cell (stable again):
        # the first of each cell's group is its truth.
        by_area = torch.argsort(-area, stable=True)
        key = (img * self.s + row) * self.s + col
        order = by_area[torch.argsort(key[by_area], stable=True)]
        first = torch.ones_like(order, dtype=torch.bool)
        first[1:] = key[order][1:] != key[order][:-1]
        keep = order[first]
        return img[keep], row[keep], col[keep], gt[keep], cls[keep]

    def loss(self, raw: Tensor, boxes: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The four sum-squared terms, lambdas applied, summed over the batch / its size."""
        n = raw.shape[0]
        pred, probs = self.split(raw)
        img, row, col, gt, cls = self.cell_truths(boxes, labels)
        # The responsible predictor: the best IoU of the cell's B decoded boxes with its truth.
        with torch.no_grad():
            decoded = self.decode(pred)[img, row, col]  # (G, B, 4)
            iou = paired_iou(decoded, gt[:, None])  # (G, B)
            best = iou.argmax(1)
            target_conf = iou.gather(1, best[:, None]).squeeze(1)
        hit = pred[img, row, col, best]  # (G, 5)
        centre = (gt[:, :2] + gt[:, 2:]) / 2
        offset = centre / self.cell - torch.stack([col, row], 1).to(gt)
        size = (gt[:, 2:] - gt[:, :2]) / self.size
        centre_err = ((hit[:, :2] - offset) ** 2).sum()
        size_err = ((hit[:, 2:4].sqrt() - size.sqrt()) ** 2).sum()  # sqrt: small boxes weigh more
        responsible = torch.zeros(pred.shape[:4], dtype=torch.bool, device=raw.device)
        responsible[img, row, col, best] = True
        onehot = torch.nn.functional.one_hot(cls, self.k).to(probs)
        return {
            "coord": self.coord_weight * (centre_err + size_err) / n,
            "conf_obj": ((hit[:, 4] - target_conf) ** 2).sum() / n,
            "conf_noobj": self.noobj_weight * (pred[..., 4][~responsible] ** 2).sum() / n,
            "cls": ((probs[img, row, col] - onehot) ** 2).sum() / n,
        }

    @torch.no_grad()
    def detect(self, raw: Tensor) -> Detections:
        """Per image: (box, class) pairs scored confidence x class probability, above the score
        threshold, after per-class NMS, best first."""
        n = raw.shape[0]
        pred, probs = self.split(raw)
        boxes = clip_boxes_to_image(self.decode(pred).reshape(n, -1, 4), (self.size,) * 2)
        # (N, S, S, B, 1) x (N, S, S, 1, K): every box of a cell shares the cell's classes.
        scores = (pred[..., 4:5] * probs.clamp(0, 1)[..., None, :]).reshape(n, -1, self.k)
        img, index, label = (scores > self.score_threshold).nonzero(as_tuple=True)
        box, score = boxes[img, index], scores[img, index, label]
        # One NMS call per image, its classes the groups. One call for the whole batch (groups:
        # image and class) costs the square of the batch: past 1,000 boxes torchvision's
        # batched_nms loops over the groups, each time over every box of the batch. Untrained,
        # every (box, class) pair passes 0.01: 500 images took 72 s that way (2 loaded cores).
        out: Detections = []
        counts = torch.bincount(img, minlength=n).tolist()  # nonzero(): image by image
        for b, s, c in zip(
            box.split(counts), score.split(counts), label.split(counts), strict=True
        ):
            kept = batched_nms(b, s, c, self.nms_iou)[: self.max_detections]  # best first
            out.append({"boxes": b[kept], "scores": s[kept], "labels": c[kept]})
        return out
