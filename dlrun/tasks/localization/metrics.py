"""The localisation targets in the notes' form and the scores of both tasks.

A box travels as xyxy pixels (the data's "box", exclusive ends) or as the notes' (bx, by, bh, bw):
its centre and its height and width, relative to the canvas. A split's scores come from sums over
all its batches (`add`), so they are the split's own, not a mean of batch means.
"""

import torch
from torch import Tensor

Sums = dict[str, Tensor]
WITHIN_PX = 3.0  # within_3px: a landmark at most this far (Euclidean, in pixels) from the truth


def relative_box(box: Tensor, height: int, width: int) -> Tensor:
    """(B, 4) xyxy pixels -> (B, 4) (bx, by, bh, bw) relative to a height x width canvas."""
    x0, y0, x1, y1 = box.unbind(-1)
    return torch.stack([(x0 + x1) / 2 / width, (y0 + y1) / 2 / height,
                        (y1 - y0) / height, (x1 - x0) / width], -1)  # fmt: skip


def pixel_box(rel: Tensor, height: int, width: int) -> Tensor:
    """(B, 4) (bx, by, bh, bw) relative -> (B, 4) xyxy pixels (a negative size: a point)."""
    bx, by, bh, bw = rel.unbind(-1)
    half_w, half_h = bw.clamp_min(0) * width / 2, bh.clamp_min(0) * height / 2
    cx, cy = bx * width, by * height
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], -1)


def paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """(B,) IoU of a[i] and b[i], xyxy boxes (torchvision's box_iou pairs every box with every
    other); two empty boxes score 0."""
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp_min(0).prod(1)
    area = lambda box: (box[:, 2:] - box[:, :2]).clamp_min(0).prod(1)  # noqa: E731
    union = area(a) + area(b) - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(union))


def add(total: Sums, part: Sums) -> Sums:
    """Running sums of a split, batch by batch (on the device: no synchronisation per batch)."""
    return {k: total[k] + v if k in total else v for k, v in part.items()}


def localization_sums(
    presence: Tensor, out: Tensor, present: Tensor, label: Tensor, box: Tensor,
    size: tuple[int, int],
) -> Sums:  # fmt: skip
    """Sums of one batch: `presence` (B,) the predicted Pc (read as present above 0.5), `out`
    (B, 5 + K) the net's outputs, and the truth: `present`, `label`, `box` (xyxy pixels) on a
    canvas of `size` (height, width). The box and the class are scored on the canvases that hold
    a digit, whatever Pc says of them."""
    h, w = size
    iou = paired_iou(pixel_box(out[:, 1:5].float(), h, w), box)
    present = present.bool()
    return {
        "canvases": torch.tensor(float(len(present)), device=out.device),
        "digits": present.float().sum(),
        "presence_right": ((presence > 0.5) == present).float().sum(),
        "class_right": ((out[:, 5:].argmax(1) == label) & present).float().sum(),
        "iou": torch.where(present, iou, torch.zeros_like(iou)).sum(),
    }


def localization_scores(sums: Sums) -> dict[str, float]:
    """presence_acc over every canvas; class_acc and box_iou over those with a digit."""
    digits = float(sums["digits"])
    per_digit = lambda k: float(sums[k]) / digits if digits else float("nan")  # noqa: E731
    return {
        "presence_acc": float(sums["presence_right"]) / max(float(sums["canvases"]), 1.0),
        "class_acc": per_digit("class_right"),
        "box_iou": per_digit("iou"),
    }


def landmark_sums(pred: Tensor, truth: Tensor) -> Sums:
    """Sums of one batch of (B, 5, 2) landmarks in pixels: distances and hits within WITHIN_PX."""
    distance = (pred.float() - truth.float()).norm(dim=-1)
    return {
        "points": torch.tensor(float(distance.numel()), device=pred.device),
        "distance": distance.sum(),
        "within": (distance <= WITHIN_PX).float().sum(),
    }


def landmark_scores(sums: Sums) -> dict[str, float]:
    """mean_px_error (mean Euclidean distance in pixels over every landmark) and within_3px."""
    points = max(float(sums["points"]), 1.0)
    return {
        "mean_px_error": float(sums["distance"]) / points,
        "within_3px": float(sums["within"]) / points,
    }
