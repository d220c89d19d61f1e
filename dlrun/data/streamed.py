"""Image folders read from disk every epoch (data.in_memory=false), and what `auto` weighs.

The in-memory path (ClassificationData) decodes a set once and serves it from the device: the
fast path, as long as the decoded set fits. An ImageNet-sized folder does not (1.28 M images
at 224 px are 193 GB of uint8), so `StreamingClassificationData` reads it with a DataLoader's
worker processes instead, with the same splits, batches, metrics and resume
(dlrun.data.image_sets picks one of the two).
"""

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import v2

from dlrun.data.folder import list_images
from dlrun.data.in_memory import held_out, missing_data
from dlrun.data.labelled import LabelledImages
from dlrun.data.module import DeviceGenerators
from dlrun.data.samplers import Sampler, SequentialSampler
from dlrun.data.transforms import Normalize
from dlrun.data.worker_loader import ImageItems, StreamLoader, collate, refuse_bad
from dlrun.engine import dist

log = logging.getLogger(__name__)


def decoded_bytes(base: Path, channels: int, size: int) -> int:
    """uint8 bytes of every image under base/{train,val,test}: what the in-memory path holds."""
    count = 0
    for split in ("train", "val", "test"):
        if (base / split).is_dir():
            for cls in os.scandir(base / split):
                if cls.is_dir():
                    count += sum(1 for _ in os.scandir(cls.path))
    return count * channels * size * size


def memory_bytes() -> int:
    """Host memory, or the GPU's if smaller: the in-memory path fills both."""
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if torch.cuda.is_available():
        have = min(have, torch.cuda.get_device_properties(dist.local_rank()).total_memory)
    return have


def _shuffled(files: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
    perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))
    return [files[i] for i in perm.tolist()]


class StreamingClassificationData(LabelledImages, DeviceGenerators):
    """`<folder>/{train, val|test}/<class>/*` read by DataLoader workers (a `DataModule`).

    The same splits as the in-memory path (train shuffled by the fixed seed-0 permutation,
    then train_subset, then val_split's fixed hold-out), the same global batches (ShardedSampler
    over RandomSampler, order generator seeded alike on every rank) and torchvision's transforms
    (RandomCrop with padding, RandomHorizontalFlip) on uint8 images in the workers; the
    per-image augmentation of dlrun.data.augment (RandAugment ... mixup) runs on the device,
    once the batch is there, as on the in-memory path. Its images are never all in memory, so it
    offers no tensors (nor metric learning's pairs, which are built on them).
    """

    def __init__(
        self,
        *,
        folder: Path,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        **options: Any,  # the data.* keys both labelled modules take (dlrun.data.labelled)
    ) -> None:
        super().__init__(**options)
        test_dir = next((folder / s for s in ("val", "test") if (folder / s).is_dir()), None)
        if not (folder / "train").is_dir() or test_dir is None:
            raise missing_data(
                f"image folder {folder}",
                [folder / "train", folder / "val", folder / "test"],
                f"arrange the images as {folder}/train/<class>/* and {folder}/val/<class>/*",
            )
        self.persistent, self.prefetch = persistent_workers, prefetch_factor
        self.classes, train = list_images(folder / "train")
        test_classes, test = list_images(test_dir)
        if test_classes != self.classes or not train or not test:
            raise missing_data(
                f"image folder {folder}",
                [test_dir],
                f"give train/ and {test_dir.name}/ the same class folders, each with images",
            )
        self.num_classes = self.num_classes or len(self.classes)
        # The in-memory path's order: class after class, then a fixed shuffle of each split
        # (folder.read_split), so train_subset, val_split and eval_subset pick the same images.
        train, test = _shuffled(train), _shuffled(test)
        if self.train_subset is not None:
            train = train[: self.train_subset]
        val = test
        if self.val_split:
            held, kept = held_out(len(train), self.val_split)
            val, train = [train[i] for i in held.tolist()], [train[i] for i in kept.tolist()]
            self.val_name = "held-out train"
        if self.eval_subset is not None:
            val, test = val[: self.eval_subset], test[: self.eval_subset]
        self.files = {"train": train, "val": val, "test": test}
        self.device = torch.device("cpu")
        self._loaders: dict[str, StreamLoader] = {}
        log.info(
            "data %s (streamed from %s, %d workers): %d train, %d val (%s split), %d test "
            "images of %dx%dx%d, %d classes",
            self.name, folder, self.num_workers, len(train), len(val), self.val_name, len(test),
            self.channels, self.image_size, self.image_size, self.num_classes,
        )  # fmt: skip

    def setup(
        self, device: torch.device, seed: int, rank: int = 0, world_size: int | None = None
    ) -> None:
        """Remember the device; seed CPU generators (the DataLoader takes CPU indices)."""
        world_size = dist.world_size() if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got rank={rank}")
        self.device, self.rank, self.world_size = device, rank, world_size
        self.seed_generators(torch.device("cpu"), seed, rank, world_size)
        self._loaders.clear()

    def _augment(self, crop: bool) -> Callable[[Tensor], Tensor] | None:
        steps: list[Any] = []
        if crop and self.crop_padding:
            steps.append(v2.RandomCrop(self.image_size, padding=self.crop_padding))
        if self.hflip:
            steps.append(v2.RandomHorizontalFlip())
        return v2.Compose(steps) if steps else None

    def _make(
        self, split: str, sampler: Sampler, augment: Callable[[Tensor], Tensor] | None,
        normalize: Normalize, generators: dict[str, torch.Generator],
    ) -> StreamLoader:  # fmt: skip
        items = ImageItems(self.files[split], self.channels, self.image_size, augment)
        train = split == "train"
        before = self.augment.before_normalize() if train else []
        after = self.augment.after_normalize(self.num_classes) if train else []
        draws = augment is not None or before or after
        return StreamLoader(
            items, sampler, device=self.device, normalize=normalize, bad_images=self.bad_images,
            workers=self.num_workers, persistent=self.persistent and split != "test",
            prefetch=self.prefetch, order_generator=generators.get("order"),
            aug_generator=generators.get("aug") if draws else None, before=before, after=after,
        )  # fmt: skip

    def train_loader(
        self,
        *,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        crop: bool = True,
    ) -> StreamLoader:
        """Built once per (mean, std, crop): the trainer asks every epoch, the workers persist."""
        key = f"train|{mean}|{std}|{crop}"
        if key not in self._loaders:
            sampler = self.train_sampler(len(self.files["train"]))
            normalize = self.normalize(mean, std)
            gens = self._generators or {}
            self._loaders[key] = self._make("train", sampler, self._augment(crop), normalize, gens)
        return self._loaders[key]

    def _eval_loader(self, split: str) -> StreamLoader:
        if split not in self._loaders:
            sampler = SequentialSampler(len(self.files[split]), self.eval_batch_size)
            normalize = self.normalize()
            self._loaders[split] = self._make(split, sampler, None, normalize, {})
        return self._loaders[split]

    def val_loader(self) -> StreamLoader:
        return self._eval_loader("val")

    def test_loader(self) -> StreamLoader:
        return self._eval_loader("test")

    def example_batch(
        self,
        n: int,
        split: str = "val",
        *,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
    ) -> dict[str, Tensor]:
        """The split's first n images, decoded here (no workers, no generator draws)."""
        if split not in self.files:
            raise ValueError(f"split must be train, val or test, got {split!r}")
        items = ImageItems(self.files[split][:n], self.channels, self.image_size)
        batch = collate([items[(i, None)] for i in range(len(items))])
        refuse_bad(batch["bad"], self.bad_images)
        x, y = batch["image"].to(self.device), batch["label"].to(self.device)
        return {"image": self.normalize(mean, std).normalize(x), "label": y}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": (self.channels, self.image_size, self.image_size),
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "sizes": {k: len(v) for k, v in self.files.items()},
            "val_is_test": self.val_is_test,
        }


__all__ = ["StreamingClassificationData", "decoded_bytes", "memory_bytes"]
