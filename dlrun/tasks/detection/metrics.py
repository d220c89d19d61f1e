"""Mean average precision of box detections, as COCO computes it (our own code, checked against
pycocotools' COCOeval on hand-made cases in tests/test_detection_metrics.py).

Per class and IoU threshold: every detection of the split in descending score (at most
`max_dets` per image) is matched greedily to the unmatched ground-truth box of its image with
the highest IoU, a true positive when that IoU reaches the threshold; precision is made
non-increasing from the right and read at the 101 recall points 0, 0.01, ..., 1. AP averages
the classes that have ground truth; mAP@[.5:.95] averages the thresholds 0.5, 0.55, ..., 0.95.
"""

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou


def _linspace(start: float, stop: float, num: int) -> list[float]:
    """numpy.linspace's values bit for bit (i * step + start, the last one `stop`): COCOeval's
    thresholds, so that an IoU or a recall that equals one falls on the same side."""
    step = (stop - start) / (num - 1)
    return [i * step + start for i in range(num - 1)] + [stop]


THRESHOLDS = tuple(_linspace(0.5, 0.95, 10))
RECALLS = torch.tensor(_linspace(0.0, 1.0, 101), dtype=torch.float64)


def _class_ap(
    preds: Sequence[tuple[Tensor, Tensor]], truths: Sequence[Tensor], threshold: float
) -> float | None:
    """AP of one class: preds[i] = (boxes (P, 4), scores (P,)), truths[i] = boxes (G, 4)."""
    n_truth = sum(len(t) for t in truths)
    if n_truth == 0:
        return None
    entries = []  # (score, image, index) of every detection
    for i, (_, scores) in enumerate(preds):
        entries += [(float(s), i, j) for j, s in enumerate(scores)]
    entries.sort(key=lambda e: -e[0])  # stable: ties keep their image order, as COCOeval does
    ious = [
        box_iou(p[0].double(), t.double()) if len(p[0]) and len(t) else None
        for p, t in zip(preds, truths, strict=True)
    ]
    taken = [torch.zeros(len(t), dtype=torch.bool) for t in truths]
    hits = []
    for _, i, j in entries:
        hit = False
        if ious[i] is not None:
            row = ious[i][j].masked_fill(taken[i], -1.0)
            best = int(row.argmax())
            if row[best] >= min(threshold, 1 - 1e-10):  # as COCOeval compares
                taken[i][best] = hit = True
        hits.append(hit)
    if not hits:
        return 0.0
    tp = torch.tensor(hits, dtype=torch.float64).cumsum(0)
    fp = torch.arange(1, len(hits) + 1, dtype=torch.float64) - tp
    recall, precision = tp / n_truth, tp / (tp + fp)
    precision = precision.flip(0).cummax(0).values.flip(0)  # non-increasing from the right
    idx = torch.searchsorted(recall, RECALLS, right=False)
    read = torch.where(idx < len(precision), precision[idx.clamp_max(len(precision) - 1)], 0.0)
    return float(read.mean())


def mean_average_precision(
    preds: Sequence[dict[str, Tensor]],
    targets: Sequence[dict[str, Tensor]],
    num_classes: int,
    max_dets: int = 100,
) -> dict[str, float]:
    """{"map_50", "map"} over images: preds[i] has "boxes" (P, 4) xyxy, "scores", "labels";
    targets[i] has "boxes" and "labels"."""
    per_threshold = {t: [] for t in THRESHOLDS}
    for c in range(num_classes):
        mine, truth = [], []
        for p, t in zip(preds, targets, strict=True):
            ours = p["labels"].cpu() == c
            boxes, scores = p["boxes"].cpu()[ours], p["scores"].cpu()[ours]
            # COCOeval keeps the max_dets best of each image and class, in a stable sort.
            keep = torch.sort(scores, descending=True, stable=True).indices[:max_dets]
            mine.append((boxes[keep], scores[keep]))
            truth.append(t["boxes"].cpu()[t["labels"].cpu() == c])
        for t in THRESHOLDS:
            ap = _class_ap(mine, truth, t)
            if ap is not None:
                per_threshold[t].append(ap)
    means = {t: sum(v) / len(v) if v else float("nan") for t, v in per_threshold.items()}
    return {"map_50": means[THRESHOLDS[0]], "map": sum(means.values()) / len(means)}
