"""What R-CNN and Fast R-CNN share: labelling proposals against the true boxes, sampling them for a
minibatch, and the box-regression parametrisation of the R-CNN paper (appendix C).

Proposals come padded (B, P, 4), unused rows -1 (dlrun/data/proposals.py); true boxes (B, M, 4)
with labels (B, M), -1 marking empty slots. Labels here count from 1: 0 is background.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_iou

from dlrun.errors import UserError

PROPOSAL_KEYS = ("upscale", "max_boxes", "strategy")  # dlrun.data.proposals.selective_search's


def proposal_settings(proposals: Mapping[str, Any] | None) -> dict[str, Any]:
    """`model.proposals` checked: the selective-search keywords a proposal detector hands the
    detection trainer (its `proposal_settings`), or one line naming the unknown ones."""
    settings = dict(proposals or {})
    unknown = sorted(set(settings) - set(PROPOSAL_KEYS))
    if unknown:
        raise UserError(
            f"model.proposals takes {', '.join(PROPOSAL_KEYS)}, not {', '.join(unknown)} "
            "(selective search's settings)."
        )
    return settings


# Fast R-CNN's: dx, dy, dw, dh targets scaled so each has about unit spread (torchvision's too).
BOX_SCALE = (10.0, 10.0, 5.0, 5.0)
MAX_LOG_SCALE = 4.135  # log(1000 / 16): exp() of a wild prediction stays finite


def encode(proposals: Tensor, truth: Tensor, scale: tuple[float, ...] = BOX_SCALE) -> Tensor:
    """R-CNN's targets (N, 4) that move xyxy proposals onto xyxy truth boxes:
    t_x = (G_x - P_x) / P_w, t_y = (G_y - P_y) / P_h (centres), t_w = log(G_w / P_w),
    t_h = log(G_h / P_h), each times `scale`."""
    pw, ph = (proposals[:, 2:] - proposals[:, :2]).clamp_min(1e-6).unbind(1)
    px, py = ((proposals[:, :2] + proposals[:, 2:]) / 2).unbind(1)
    gw, gh = (truth[:, 2:] - truth[:, :2]).clamp_min(1e-6).unbind(1)
    gx, gy = ((truth[:, :2] + truth[:, 2:]) / 2).unbind(1)
    t = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], 1)
    return t * t.new_tensor(scale)


def decode(proposals: Tensor, deltas: Tensor, scale: tuple[float, ...] = BOX_SCALE) -> Tensor:
    """The inverse of `encode`: xyxy boxes from proposals (N, 4) and deltas (N, ..., 4)."""
    d = deltas / deltas.new_tensor(scale)
    pw = (proposals[:, 2] - proposals[:, 0]).clamp_min(1e-6)
    ph = (proposals[:, 3] - proposals[:, 1]).clamp_min(1e-6)
    px, py = (proposals[:, 0] + proposals[:, 2]) / 2, (proposals[:, 1] + proposals[:, 3]) / 2
    shape = (-1,) + (1,) * (d.dim() - 2)
    pw, ph, px, py = (v.view(shape) for v in (pw, ph, px, py))
    cx, cy = px + d[..., 0] * pw, py + d[..., 1] * ph
    w = pw * d[..., 2].clamp(max=MAX_LOG_SCALE).exp()
    h = ph * d[..., 3].clamp(max=MAX_LOG_SCALE).exp()
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


@dataclass
class Regions:
    """Proposals of a batch, flattened: `image` (N,) which image each came from, `boxes` (N, 4),
    `labels` (N,) 0 background / 1 + class / -1 neither (between the thresholds), `truth`
    (N, 4) the matched true box (zeros where none), `iou` (N,) with it."""

    image: Tensor
    boxes: Tensor
    labels: Tensor
    truth: Tensor
    iou: Tensor


def label_regions(
    proposals: Tensor,
    boxes: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    fg_iou: float = 0.5,
    bg_iou: tuple[float, float] = (0.0, 0.5),
    add_truth: bool = False,
) -> Regions:
    """Each valid proposal's label by its best IoU with its image's true boxes: >= fg_iou the
    true box's class, in [bg_iou[0], bg_iou[1]) background, otherwise -1 (ignored). R-CNN's
    fine-tuning uses fg 0.5, bg [0, 0.5); Fast R-CNN's bg [0.1, 0.5). `add_truth` appends the
    true boxes themselves as proposals (both papers train on them). Without boxes (inference)
    every label is -1."""
    b, p = proposals.shape[:2]
    keep = proposals[..., 2] > proposals[..., 0]
    image = torch.arange(b, device=proposals.device)[:, None].expand(b, p)
    image, regions = image[keep], proposals[keep]
    if boxes is None or labels is None:
        n = len(regions)
        return Regions(image, regions, regions.new_full((n,), -1, dtype=torch.long),
                       torch.zeros_like(regions), regions.new_zeros(n))  # fmt: skip
    present = labels >= 0
    if add_truth:
        timg = torch.arange(b, device=boxes.device)[:, None].expand_as(labels)[present]
        image, regions = torch.cat([image, timg]), torch.cat([regions, boxes[present].float()])
    gimg, gbox, glab = (
        torch.arange(b, device=boxes.device)[:, None].expand_as(labels)[present],
        boxes[present].float(),
        labels[present],
    )
    n = len(regions)
    if len(gbox) == 0 or n == 0:
        out = regions.new_zeros(n, dtype=torch.long)
        return Regions(image, regions, out, torch.zeros_like(regions), regions.new_zeros(n))
    iou = box_iou(regions, gbox)  # (N, G): one call, pairs of other images masked out
    iou = torch.where(image[:, None] == gimg[None, :], iou, -1.0)
    best, match = iou.max(1)
    best = best.clamp_min(0)
    out = torch.full((n,), -1, dtype=torch.long, device=regions.device)
    out[(best >= bg_iou[0]) & (best < bg_iou[1])] = 0
    fg = best >= fg_iou
    out[fg] = glab[match[fg]] + 1
    truth = torch.where(fg[:, None], gbox[match], 0.0)
    return Regions(image, regions, out, truth, best)


def sample(labels: Tensor, per_batch: int, positive_fraction: float = 0.25) -> Tensor:
    """Indices of at most `per_batch` labelled regions, at most `positive_fraction` of them
    foreground (both papers: 25%), the rest background, drawn at random from torch's global
    generator (its state is in every checkpoint, so a resumed run draws the same)."""
    fg = (labels > 0).nonzero().squeeze(1)
    bg = (labels == 0).nonzero().squeeze(1)
    n_fg = min(len(fg), int(per_batch * positive_fraction))
    n_bg = min(len(bg), per_batch - n_fg)
    fg = fg[torch.randperm(len(fg), device=labels.device)[:n_fg]]
    bg = bg[torch.randperm(len(bg), device=labels.device)[:n_bg]]
    return torch.cat([fg, bg])
