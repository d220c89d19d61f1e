"""Pairs and P x K batches for metric learning (Siamese / triplet networks), drawn on the device.

Training pairs: every image of the epoch is an anchor once (one randperm); every other anchor
gets a partner of its own class (a distinct image), the rest one of another class, so each batch
is half same, half different. Evaluation pairs are fixed: drawn once on the CPU with their own
seed (`data.pair_seed`), so every run of a sweep, whatever its `seed`, is scored on the same pairs.
`PairBatches` makes them of any labelled module held in tensors (dlrun.data.image_sets gives one
to each such module, as the module's "pairs" capability).
"""

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from dlrun.data.in_memory import Splits
from dlrun.data.module import DataModule, require
from dlrun.data.samplers import (
    ClassBalancedSampler,
    Sampler,
    ShardedSampler,
    _check_batch_size,
)
from dlrun.data.tensor_loader import TensorLoader
from dlrun.data.transforms import Normalize, RandomCrop, RandomHFlip, Transform
from dlrun.errors import UserError


class ClassIndex:
    """Items grouped by class, to draw a partner of the same or of another class in a few kernels.

    Class c (0..C-1, in label order) owns `by_class[offsets[c] : offsets[c] + counts[c]]`;
    `slot[i]` is item i's place inside its class, so "another item of my class" needs no search.
    """

    def __init__(self, labels: Tensor) -> None:
        labels = labels.flatten()
        self.classes, self.cls, self.counts = torch.unique(
            labels, return_inverse=True, return_counts=True
        )
        if len(self.classes) < 2:
            raise UserError(
                "Pairs of different classes need at least 2 classes; the data has "
                f"{len(self.classes)} (check data.holdout_classes)."
            )
        self.by_class = torch.sort(self.cls, stable=True).indices
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.slot = torch.empty_like(self.by_class)
        self.slot[self.by_class] = torch.arange(
            len(labels), device=labels.device
        ) - torch.repeat_interleave(self.offsets, self.counts)

    def to(self, device: torch.device) -> "ClassIndex":
        for name in ("classes", "cls", "counts", "by_class", "offsets", "slot"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def partners(self, anchors: Tensor, same: Tensor, generator: torch.Generator | None) -> Tensor:
        """For each anchor an item of its class (a different one where the class has two) where
        `same`, else one of a uniformly drawn other class. Three uniform draws, always made."""
        u = torch.rand(3, len(anchors), device=anchors.device, generator=generator)
        c = self.cls[anchors]
        n = self.counts[c]
        # Same class: a slot among the other n - 1, shifted past the anchor's own slot.
        r = torch.minimum((u[0] * (n - 1)).long(), (n - 2).clamp_min(0))
        r = r + (r >= self.slot[anchors]).long() * (n > 1).long()
        same_item = self.by_class[self.offsets[c] + r]
        # Another class: c + 1 .. c + C - 1 (mod C), then a uniform item of it.
        k = len(self.counts)
        other = (c + 1 + (u[1] * (k - 1)).long().clamp_max(k - 2)) % k
        m = self.counts[other]
        diff_item = self.by_class[self.offsets[other] + torch.minimum((u[2] * m).long(), m - 1)]
        return torch.where(same, same_item, diff_item)


class PairSampler:
    """Balanced pairs: groups "a" (every item once per epoch, shuffled) and "b" (its partner)."""

    def __init__(self, labels: Tensor, batch_size: int) -> None:
        _check_batch_size(batch_size)
        self.index = ClassIndex(labels)
        self.n, self.batch_size = len(labels), batch_size

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def epoch(
        self, generator: torch.Generator | None, device: torch.device
    ) -> list[dict[str, Tensor]]:
        index = self.index.to(device)
        anchors = torch.randperm(self.n, device=device, generator=generator)
        # Alternate same / different: half of every (even) batch each, exactly.
        same = torch.arange(self.n, device=device) % 2 == 0
        partners = index.partners(anchors, same, generator)
        return [
            {"a": a, "b": b}
            for a, b in zip(
                anchors.split(self.batch_size), partners.split(self.batch_size), strict=True
            )
        ]


def fixed_pairs(labels: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """`n` evaluation pairs (i, j) of `labels`' items, the first half of one class (distinct
    images), the rest of two; drawn on the CPU from a generator of their own (`seed`)."""
    labels = labels.cpu()
    index = ClassIndex(labels)
    g = torch.Generator().manual_seed(seed)
    anchors = torch.randint(0, len(labels), (n,), generator=g)
    same = torch.arange(n) < n // 2
    # Anchors of a one-item class cannot have a distinct same-class partner: draw among the others.
    movable = same & (index.counts[index.cls[anchors]] < 2)
    if movable.any():
        ok = torch.nonzero(index.counts[index.cls] >= 2).flatten()
        if len(ok) == 0:
            raise UserError("Same-class evaluation pairs need a class with at least 2 images.")
        anchors[movable] = ok[torch.randint(0, len(ok), (int(movable.sum()),), generator=g)]
    return anchors, index.partners(anchors, same, g)


class PairBatches:
    """Metric learning's batches of a labelled data module held in tensors: its "pairs" capability.

    Wraps the module (anything that offers "tensors": dlrun.data.module.CAPABILITIES) and reads
    its splits when a loader is asked for, after `setup` and any `hold_out_validation`: balanced
    pairs, P x K batches, the fixed evaluation pairs, and the classes held out of training
    (`without_classes` took them out of the module's source).
    """

    def __init__(
        self,
        labelled: DataModule,
        *,
        holdout_classes: Sequence[int] | None = None,
        classes_per_batch: int | None = None,
        verify_pairs: int = 10000,
        pair_seed: int = 0,
    ) -> None:
        self.labelled = require(labelled, "tensors", by="Metric learning")
        if verify_pairs < 2 or (classes_per_batch is not None and classes_per_batch < 2):
            raise UserError(
                "data.verify_pairs and data.classes_per_batch must be at least 2, got "
                f"{verify_pairs} and {classes_per_batch}."
            )
        # One-shot verification: classes never trained on (nor in the validation split, which is
        # cut from training); the test split keeps them.
        self.holdout_classes = [int(c) for c in holdout_classes or []]
        self.classes_per_batch, self.verify_pairs = classes_per_batch, verify_pairs
        self.pair_seed = pair_seed

    def hold_out_validation(self, fraction: float = 0.1, minimum: int = 1000) -> int:
        """The labelled module's: hold training images out for the threshold (see there)."""
        return self.labelled.hold_out_validation(fraction, minimum)

    def _augment(self, keys: Sequence[str]) -> list[Transform]:
        out: list[Transform] = []
        if self.labelled.crop_padding:
            out.append(RandomCrop(padding=self.labelled.crop_padding, keys=keys))
        if self.labelled.hflip:
            out.append(RandomHFlip(keys=keys))
        return out

    def _shard(self, sampler: Sampler) -> Sampler:
        """Every rank draws the same batches and keeps its slice of them."""
        world = self.labelled.world_size
        return ShardedSampler(sampler, self.labelled.rank, world) if world > 1 else sampler

    def pair_loader(self) -> TensorLoader:
        """Batches {"image", "label", "image_b", "label_b"}: half the pairs of one class. Each
        image of a pair is cropped and flipped on its own draw."""
        x, y = self.labelled.split("train")
        sampler = self._shard(PairSampler(y, self.labelled.batch_size))
        norm = self.labelled.normalize()
        transforms = self._augment(["image"]) + self._augment(["image_b"])
        transforms.append(Normalize(norm.mean, norm.std, keys=("image", "image_b")))
        return self.labelled.loader(
            {"image": x, "label": y, "image_b": x, "label_b": y},
            sampler,
            transforms,
            groups={"image": "a", "label": "a", "image_b": "b", "label_b": "b"},
        )

    def pk_loader(self) -> TensorLoader:
        """P x K batches {"image", "label"}: P = data.classes_per_batch random classes (null: all
        training classes), K = data.batch_size // P images of each (batch-hard / batch-all mining)."""
        x, y = self.labelled.split("train")
        batch_size = self.labelled.batch_size
        p = self.classes_per_batch or len(torch.unique(y))
        k = batch_size // p
        if k < 2:
            raise UserError(
                f"P x K batches need K >= 2 images per class for positives: data.batch_size="
                f"{batch_size} over data.classes_per_batch={p} classes gives K={k}; raise "
                "data.batch_size or lower data.classes_per_batch."
            )
        sampler = self._shard(ClassBalancedSampler(y, p, k))
        transforms = self._augment(["image"]) + [self.labelled.normalize()]
        return self.labelled.loader({"image": x, "label": y}, sampler, transforms)

    def eval_pairs(self, split: str, classes: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """The fixed pairs (i, j) of a split ("val" or "test"), indices into its items in order;
        `classes`: pairs among those classes only (one-shot verification on held-out classes).
        data.verify_pairs of them, as the split's items allow."""
        _, y = self.labelled.split(split)
        items = torch.arange(len(y))
        if classes is not None:
            keep = torch.isin(y.cpu(), torch.tensor(list(classes)))
            items, y = items[keep], y.cpu()[keep]
        seed = self.pair_seed + (1 if split == "test" else 0) + (2 if classes is not None else 0)
        i, j = fixed_pairs(y, self.verify_pairs, seed)
        return items[i], items[j]


def without_classes(
    source: Callable[[Path, bool], Splits],
    classes: Sequence[int],
    *,
    name: str,
    num_classes: int | None,
) -> Callable[[Path, bool], Splits]:
    """`source` (a labelled module's reader) with `classes` taken out of its training split,
    before the module cuts train_subset and val_split from it; the test split keeps them."""
    held = [int(c) for c in classes]

    def read(root: Path, download: bool) -> Splits:
        splits = source(root, download)
        n = num_classes or len(splits.classes)
        if not set(held) <= set(range(n)) or len(held) >= n:
            raise UserError(
                f"data.holdout_classes={held} must name some, not all, of the class indices "
                f"0..{n - 1} of {name}."
            )
        keep = ~torch.isin(splits.train_y, torch.tensor(held))
        return replace(splits, train_x=splits.train_x[keep], train_y=splits.train_y[keep])

    return read
