"""`data=mnist_loc` / `mnist_landmarks`: canvases of at most one real digit, made on the device.

The notes' object localisation (one object: is there one, where is its box, which class) and
landmark detection (named points of the object) need canvases that hold one digit or none. They
are made as `data=mnist_det` makes its scenes (dlrun/data/scene_layout.py's `compose`, one object
per scene, in batched tensor ops from one generator): training canvases from training digits and
the run's `seed`; test canvases from test digits and validation canvases (`data.val_scenes` > 0)
from the last `data.val_objects` training digits, both from `data.scene_seed`, fixed whatever
`seed` is. With `kind=localization`, exactly round(n * `empty_share`) canvases of each split are
then blanked (which ones: a permutation drawn from the same generator, after the digits).

Batches hold "image" (B, C, H, W), "present" (B,) bool, "box" (B, 4) xyxy in pixels with
exclusive ends (the tight box of the digit's pixels >= 0.5, as mnist_det's), "label" (B,) int64
and "landmarks" (B, 5, 2): `ink_landmarks` of those pixels. A canvas without a digit has label -1
and a box and landmarks of zeros, which no loss or metric reads.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dlrun.data.digit_scenes import SceneData
from dlrun.data.in_memory import Splits
from dlrun.data.scene_layout import compose
from dlrun.engine import dist
from dlrun.engine.progress import Heartbeat
from dlrun.errors import UserError

log = logging.getLogger(__name__)
KINDS = ("localization", "landmarks")
LANDMARKS = ("top", "bottom", "left", "right", "centroid")  # the rows of "landmarks"
CHUNK = 2048  # canvases composed at once: bounds the (chunk, H, W) int64 masks compose makes


@dataclass
class Canvases:
    """uint8 images (S, C, H, W), bool present (S,), float boxes (S, 4) xyxy pixels, int64
    labels (S,) (-1: no digit) and float landmarks (S, 5, 2) (x, y) pixel indices."""

    images: Tensor
    present: Tensor
    boxes: Tensor
    labels: Tensor
    landmarks: Tensor


def ink_landmarks(on: Tensor) -> Tensor:
    """(N, 5, 2) landmarks (x, y) of the true pixels of (N, H, W) masks, in pixel indices
    (column, row: a pixel's centre is at its index): the topmost, bottommost, leftmost and
    rightmost ink pixel and the centroid, in the order of LANDMARKS.

    Ties (a flat top row, a straight left edge): the mean position of the tied pixels, so the
    top of a 2 px wide stroke lies between its two pixels. The centroid is the plain mean of the
    ink pixels (each pixel >= 0.5 counts once, whatever its intensity): the same pixels the other
    four landmarks and the box come from. A mask without ink gets zeros. Batched: no loop.
    """
    n, h, w = on.shape
    ink = on.float()
    rows = torch.arange(h, device=on.device, dtype=torch.float32)
    cols = torch.arange(w, device=on.device, dtype=torch.float32)
    in_row, in_col = on.any(2), on.any(1)  # (N, H), (N, W)
    first = lambda m: m.float().argmax(1)  # noqa: E731
    last = lambda m: m.shape[1] - 1 - m.flip(1).float().argmax(1)  # noqa: E731

    def along_row(r: Tensor) -> Tensor:  # mean column of row r's ink, per mask
        line = ink.gather(1, r[:, None, None].expand(n, 1, w)).squeeze(1)
        return (line * cols).sum(1) / line.sum(1).clamp_min(1)

    def along_col(c: Tensor) -> Tensor:  # mean row of column c's ink, per mask
        line = ink.gather(2, c[:, None, None].expand(n, h, 1)).squeeze(2)
        return (line * rows).sum(1) / line.sum(1).clamp_min(1)

    top, bottom, left, right = first(in_row), last(in_row), first(in_col), last(in_col)
    count = ink.sum((1, 2)).clamp_min(1)
    centroid = (
        torch.stack([(ink.sum(1) * cols).sum(1), (ink.sum(2) * rows).sum(1)], 1) / count[:, None]
    )
    points = torch.stack(
        [
            torch.stack([along_row(top), top.float()], 1),
            torch.stack([along_row(bottom), bottom.float()], 1),
            torch.stack([left.float(), along_col(left)], 1),
            torch.stack([right.float(), along_col(right)], 1),
            centroid,
        ],
        1,
    )
    return torch.where(in_row.any(1)[:, None, None], points, torch.zeros_like(points))


def make_canvases(
    objects: Tensor,
    labels: Tensor,
    n: int,
    generator: torch.Generator,
    *,
    canvas: int,
    scale: tuple[float, float],
    empty_share: float,
    tick: Callable[[int], None] | None = None,
) -> Canvases:
    """`n` canvases of one of `objects` each (uint8 (N, C, h, w), int64 `labels`), on their
    device, then round(n * empty_share) of them blanked."""
    parts = []
    for start in range(0, n, CHUNK):
        s = compose(objects, labels, min(CHUNK, n - start), generator, canvas=canvas,
                    per_scene=(1, 1), scale=scale, chunk=CHUNK, tick=tick)  # fmt: skip
        # One object: its mask (pasted pixels >= 0.5) is every labelled pixel of the scene.
        label = s.box_labels[:, 0]
        parts.append(
            Canvases(s.images, label >= 0, s.boxes[:, 0], label, ink_landmarks(s.masks > 0))
        )
    if parts:
        out = Canvases(*(torch.cat([getattr(p, f) for p in parts]) for f in vars(parts[0])))
    else:  # no canvases: compose's empty scenes, in this shape
        s = compose(objects, labels, 0, generator, canvas=canvas, per_scene=(1, 1), scale=scale)
        out = Canvases(s.images, s.box_labels[:, 0] >= 0, s.boxes[:, 0], s.box_labels[:, 0],
                       torch.zeros(0, 5, 2, device=objects.device))  # fmt: skip
    empty = torch.randperm(n, generator=generator, device=objects.device)[: round(n * empty_share)]
    out.images[empty] = 0
    out.present[empty] = False
    out.boxes[empty] = 0
    out.labels[empty] = -1
    out.landmarks[empty] = 0
    return out


class SingleDigitData(SceneData):
    """Canvases of one digit or none for localisation and landmarks (a `DataModule`).

    A SceneData whose scenes are `Canvases`: its loaders, normalisation, `example_batch` and
    `describe` serve them as they are (no flips: they would have to move the landmarks too).
    """

    def __init__(
        self,
        *,
        name: str,
        kind: str,
        source: str | Callable[[Path, bool], Splits],
        root: str,
        download: bool = True,
        canvas: int = 64,
        scale: Sequence[float] = (0.7, 1.3),
        empty_share: float = 0.25,
        train_scenes: int = 20000,
        test_scenes: int = 2000,
        val_scenes: int = 1000,
        val_objects: int = 5000,
        scene_seed: int = 0,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        batch_size: int = 64,
        eval_batch_size: int = 500,
        channels: int | None = None,
        image_size: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        if kind not in KINDS:
            raise UserError(f"data.kind must be localization or landmarks, got '{kind}'.")
        share = float(empty_share)
        if not 0 <= share < 1:
            raise UserError(
                f"data.empty_share must be in [0, 1) (the share of canvases without a digit), "
                f"got {empty_share}."
            )
        if kind == "landmarks" and share:
            raise UserError(
                f"data.kind=landmarks needs a digit on every canvas: data.empty_share must be 0, "
                f"got {empty_share}."
            )
        # SceneData checks and stores the rest; its own kinds are segmentation and detection.
        super().__init__(
            name=name, kind="detection", source=source, root=root, download=download,
            canvas=canvas, per_scene=(1, 1), scale=scale, train_scenes=train_scenes,
            test_scenes=test_scenes, val_scenes=val_scenes, val_objects=val_objects,
            scene_seed=scene_seed, mean=mean, std=std, batch_size=batch_size,
            eval_batch_size=eval_batch_size, channels=channels, image_size=image_size,
            num_classes=num_classes,
        )  # fmt: skip
        self.kind, self.empty_share = kind, share
        self.scenes: dict[str, Canvases] = {}  # type: ignore[assignment]
        self.offers = {"normalization": self}

    def setup(
        self, device: torch.device, seed: int, rank: int = 0, world_size: int | None = None
    ) -> None:
        """Make the canvases on `device`: training ones from `seed`, the others fixed."""
        world_size = dist.world_size() if world_size is None else world_size
        self.rank, self.world_size = rank, world_size
        fixed = torch.Generator(device=device).manual_seed(self.scene_seed)
        beat = Heartbeat(
            f"composing {self.name} canvases", sum(self.counts.values()), unit="scenes"
        )
        make = lambda x, y, n, g: make_canvases(  # noqa: E731
            x, y, n, g, canvas=self.canvas, scale=self.layout["scale"],
            empty_share=self.empty_share, tick=beat.tick,
        )  # fmt: skip
        test_x, test_y = (t.to(device) for t in self.objects["test"])
        self.scenes["test"] = make(test_x, test_y, self.counts["test"], fixed)
        train_x, train_y = (t.to(device) for t in self.objects["train"])
        keep = len(train_x) - self.val_objects
        if self.counts["val"]:  # the last data.val_objects training digits, never trained on
            self.scenes["val"] = make(train_x[keep:], train_y[keep:], self.counts["val"], fixed)
        else:
            self.scenes["val"] = self.scenes["test"]
        own = torch.Generator(device=device).manual_seed(seed)
        self.scenes["train"] = make(train_x[:keep], train_y[:keep], self.counts["train"], own)
        beat.close()
        self.seed_generators(device, seed, rank, world_size)
        log.info(
            "data %s: %d train, %d val, %d test canvases of %dx%d (%s, %.0f%% without a digit)",
            self.name, self.counts["train"], len(self.scenes["val"].images), self.counts["test"],
            self.canvas, self.canvas, self.kind, 100 * self.empty_share,
        )  # fmt: skip

    def _tensors(self, split: str) -> dict[str, Tensor]:
        if not self.scenes:
            raise RuntimeError("call setup() first: the canvases are made on the device")
        c = self.scenes[split]
        return {"image": c.images, "present": c.present, "box": c.boxes, "label": c.labels,
                "landmarks": c.landmarks}  # fmt: skip

    def box_sizes(self, split: str = "train") -> Tensor:
        """(N, 2) widths and heights of the split's boxes (canvases with a digit)."""
        c = self.scenes[split]
        boxes = c.boxes[c.present]
        return boxes[:, 2:] - boxes[:, :2]

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"landmarks": list(LANDMARKS)}
