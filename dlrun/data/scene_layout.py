"""Scenes composed from real digits (or any small objects): segmentation masks and boxes.

Each scene is a black canvas holding a few objects at random positions and scales, placed so
that no two boxes overlap by more than `max_overlap` of the smaller one. Everything is drawn from
one generator in batched tensor ops (on the device), so a seed gives the same scenes anywhere the
generator gives the same numbers. An object's mask is its pasted pixels of intensity >= 0.5; where
two overlap, the one placed later (on top) owns the pixel; its box is the tight box of its own
pasted pixels, occluded or not.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dlrun.errors import UserError

CANDIDATES = 32  # positions tried per object; an object with no free one is left out


@dataclass
class Scenes:
    """uint8 images (S, C, H, W), int64 masks (S, H, W) (0 background, 1 + class), float boxes
    (S, M, 4) xyxy in pixels and int64 box_labels (S, M), -1 marking an empty slot."""

    images: Tensor
    masks: Tensor
    boxes: Tensor
    box_labels: Tensor


def pixel_boxes(on: Tensor) -> tuple[Tensor, Tensor]:
    """Boxes of the true pixels of (N, H, W) masks, xyxy with exclusive ends, and which masks
    have any: batched, where torchvision's masks_to_boxes loops over the masks in Python."""
    rows, cols = on.any(2), on.any(1)  # (N, H), (N, W)
    first = lambda m: m.float().argmax(1)  # noqa: E731
    end = lambda m: m.shape[1] - m.flip(1).float().argmax(1)  # noqa: E731
    return torch.stack([first(cols), first(rows), end(cols), end(rows)], 1).float(), rows.any(1)


def tight_boxes(objects: Tensor, threshold: float = 0.5) -> Tensor:
    """(N, 4) xyxy boxes of each object's pixels of intensity >= threshold, in its own pixels
    (the whole object where none reaches it)."""
    box, has = pixel_boxes(objects.amax(1) >= threshold * 255)
    h, w = objects.shape[-2:]
    whole = torch.tensor([0.0, 0.0, w, h], device=objects.device)
    return torch.where(has[:, None], box, whole)


def _overlap(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over the smaller area of boxes a (..., 4) and b (..., 4), broadcast."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area = lambda box: (box[..., 2:] - box[..., :2]).clamp_min(0).prod(-1)  # noqa: E731
    return inter / torch.minimum(area(a), area(b)).clamp_min(1e-6)


def compose(
    objects: Tensor,
    labels: Tensor,
    n: int,
    generator: torch.Generator,
    *,
    canvas: int = 64,
    per_scene: tuple[int, int] = (2, 4),
    scale: tuple[float, float] = (0.7, 1.3),
    max_overlap: float = 0.2,
    threshold: float = 0.5,
    chunk: int = 2048,
    tick: Callable[[int], None] | None = None,
) -> Scenes:
    """`n` scenes of `objects` (uint8 (N, C, h, w) with int64 `labels`), on their device;
    `tick(k)` after each chunk of k scenes (a progress.Heartbeat's)."""
    lo, hi = per_scene
    if not 1 <= lo <= hi:
        raise UserError(f"data.per_scene must be [min, max] with 1 <= min <= max, got {per_scene}.")
    size = objects.shape[-1]
    if size * scale[1] > canvas:
        raise UserError(
            f"Objects of {size} px at scale up to {scale[1]} do not fit a {canvas} px canvas: "
            "raise data.canvas or lower data.scale."
        )
    device = objects.device
    own_boxes = tight_boxes(objects, threshold)  # each object's own box, found once
    parts = []
    for start in range(0, n, chunk):
        parts.append(_compose_chunk(objects, own_boxes, labels, min(chunk, n - start), generator,
                                    canvas, lo, hi, scale, max_overlap, threshold))  # fmt: skip
        if tick is not None:
            tick(len(parts[-1].images))
    if not parts:
        c = objects.shape[1]
        empty = torch.zeros(0, c, canvas, canvas, dtype=torch.uint8, device=device)
        return Scenes(empty, empty[:, 0].long(), torch.zeros(0, hi, 4, device=device),
                      torch.zeros(0, hi, dtype=torch.long, device=device))  # fmt: skip
    return Scenes(
        *(
            torch.cat(t)
            for t in zip(*((p.images, p.masks, p.boxes, p.box_labels) for p in parts), strict=True)
        )
    )


def _compose_chunk(
    objects: Tensor,
    own_boxes: Tensor,
    labels: Tensor,
    s: int,
    g: torch.Generator,
    canvas: int,
    lo: int,
    hi: int,
    scale: tuple[float, float],
    max_overlap: float,
    threshold: float,
) -> Scenes:
    device, (c, size) = objects.device, (objects.shape[1], objects.shape[-1])
    count = torch.randint(lo, hi + 1, (s,), device=device, generator=g)
    pick = torch.randint(0, len(objects), (s, hi), device=device, generator=g)
    scales = scale[0] + (scale[1] - scale[0]) * torch.rand(
        s, hi, CANDIDATES, device=device, generator=g
    )
    side = size * scales  # (S, M, K) pixels
    corner = (
        torch.rand(s, hi, CANDIDATES, 2, device=device, generator=g) * (canvas - side)[..., None]
    )
    square = torch.cat([corner, corner + side[..., None]], -1)  # (S, M, K, 4): where it could go
    # The overlap rule is on the objects' own boxes (a digit fills the middle of its 28 px square).
    own = own_boxes[pick]  # (S, M, 4) in the object's pixels
    cand = corner.repeat(1, 1, 1, 2) + own[:, :, None, :] * scales[..., None]
    # A pixel of slack each way: the pasted (resampled) object's box may come out a pixel larger.
    slack = torch.tensor([-1.0, -1.0, 1.0, 1.0], device=device)
    placed = torch.zeros(s, hi, 4, device=device)  # each object's own box, as placed
    squares = torch.zeros(s, hi, 4, device=device)  # and its whole square
    used = torch.zeros(s, hi, dtype=torch.bool, device=device)
    for j in range(hi):  # slot by slot: a candidate must clear every object already placed
        clash = _overlap(cand[:, j, :, None, :] + slack, placed[:, None, :, :] + slack)
        clash = clash > max_overlap  # (S, K, M)
        free = ~(clash & used[:, None, :]).any(-1)  # (S, K)
        first = free.float().argmax(1)  # the first free candidate
        ok = free.any(1) & (j < count)
        k = first[:, None, None].expand(-1, 1, 4)
        placed[:, j] = torch.where(ok[:, None], cand[:, j].gather(1, k).squeeze(1), placed[:, j])
        squares[:, j] = square[:, j].gather(1, k).squeeze(1)
        used[:, j] = ok
    # Paste: each object through an affine grid onto the whole canvas (one grid_sample per slot).
    image = torch.zeros(s, c, canvas, canvas, device=device)
    mask = torch.zeros(s, canvas, canvas, dtype=torch.long, device=device)
    boxes = torch.zeros(s, hi, 4, device=device)
    box_labels = torch.full((s, hi), -1, dtype=torch.long, device=device)
    for j in range(hi):
        box = squares[:, j] * 2 / canvas - 1  # in [-1, 1] canvas coordinates
        width = (box[:, 2] - box[:, 0]).clamp_min(1e-6)
        # Canvas coordinate u maps to object coordinate (u - centre) * 2 / width.
        theta = torch.zeros(s, 2, 3, device=device)
        theta[:, 0, 0] = theta[:, 1, 1] = 2 / width
        theta[:, 0, 2] = -(box[:, 0] + box[:, 2]) / width
        theta[:, 1, 2] = -(box[:, 1] + box[:, 3]) / width
        grid = F.affine_grid(theta, [s, c, canvas, canvas], align_corners=False)
        obj = objects[pick[:, j]].float() / 255
        pasted = F.grid_sample(
            obj, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        pasted = pasted * used[:, j, None, None, None]
        image = torch.maximum(image, pasted)
        on = pasted.amax(1) >= threshold  # (S, H, W): this object's pixels
        mask = torch.where(on, labels[pick[:, j]][:, None, None] + 1, mask)
        tight, has = pixel_boxes(on)
        boxes[:, j] = torch.where(has[:, None], tight, boxes[:, j])
        box_labels[:, j] = torch.where(has, labels[pick[:, j]], box_labels[:, j])
    return Scenes((image * 255).round().to(torch.uint8), mask, boxes, box_labels)
