"""Image folders read from disk every epoch (data.in_memory=false), and `auto`'s choice of path.

The in-memory path (ClassificationData) decodes a set once and serves it from the device: the
fast path, as long as the decoded set fits. An ImageNet-sized folder does not (1.28 M images
at 224 px are 193 GB of uint8), so `StreamingClassificationData` reads it with a DataLoader's
worker processes instead, with the same splits, batches, metrics and resume.
"""

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import v2

from dlrun.data.augment import Augmentation
from dlrun.data.base import ClassificationData, Splits, held_out, missing_data
from dlrun.data.folder import list_images
from dlrun.data.module import DeviceGenerators
from dlrun.data.samplers import RandomSampler, Sampler, SequentialSampler, ShardedSampler
from dlrun.data.transforms import Normalize
from dlrun.data.worker_loader import ImageItems, StreamLoader, collate, refuse_bad
from dlrun.engine import dist
from dlrun.errors import UserError

log = logging.getLogger(__name__)
IN_MEMORY = ("auto", True, False)
STREAM_ONLY = ("persistent_workers", "prefetch_factor")  # DataLoader settings: the streamed path's


def image_classification(
    *,
    in_memory: bool | str = "auto",
    memory_share: float = 0.5,
    folder: str | None = None,
    **kwargs: Any,
) -> "ClassificationData | StreamingClassificationData":
    """data.in_memory: true decodes once into tensors on the device; false streams the folders;
    auto streams only when the decoded set exceeds memory_share of the memory it would fill."""
    if in_memory not in IN_MEMORY:
        raise UserError(f"data.in_memory must be auto, true or false, got {in_memory!r}.")
    if not 0 < memory_share <= 1:
        raise UserError(f"data.memory_share must be in (0, 1], got {memory_share}.")
    streaming = {k: kwargs.pop(k) for k in STREAM_ONLY if k in kwargs}
    if in_memory is True:
        return ClassificationData(**kwargs)
    base = Path(kwargs["root"]).expanduser() / (folder or "")
    if in_memory == "auto":
        if not (base / "train").is_dir():  # not an image folder (CIFAR-10's pickles): in memory
            return ClassificationData(**kwargs)
        need, have = decoded_bytes(base, kwargs["channels"], kwargs["image_size"]), memory_bytes()
        if need <= memory_share * have:
            return ClassificationData(**kwargs)
        log.info(
            "data.in_memory=auto: the decoded set (%.1f GB) exceeds %.0f%% of memory (%.1f GB): "
            "reading the folders with worker processes",
            need / 1e9,
            100 * memory_share,
            have / 1e9,
        )
    kwargs.pop("source", None)
    kwargs.pop("download", None)
    return StreamingClassificationData(folder=base, **kwargs, **streaming)


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


class StreamingClassificationData(DeviceGenerators):
    """`<folder>/{train, val|test}/<class>/*` read by DataLoader workers (a `DataModule`).

    The same splits as the in-memory path (train shuffled by the fixed seed-0 permutation,
    then train_subset, then val_split's fixed hold-out), the same global batches (ShardedSampler
    over RandomSampler, order generator seeded alike on every rank) and torchvision's transforms
    (RandomCrop with padding, RandomHorizontalFlip) on uint8 images in the workers; the
    per-image augmentation of dlrun.data.augment (RandAugment ... mixup) runs on the device,
    once the batch is there, as on the in-memory path.
    """

    kind = "classification"

    def __init__(
        self,
        *,
        name: str,
        folder: Path,
        root: str,
        channels: int,
        image_size: int,
        num_classes: int | None,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        train_subset: int | None = None,
        eval_subset: int | None = None,
        val_split: float = 0.0,
        crop_padding: int = 0,
        hflip: bool = False,
        num_workers: int = 0,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        bad_images: str = "error",
        seq_mode: str | None = None,
        holdout_classes: Sequence[int] | None = None,
        classes_per_batch: int | None = None,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mix_switch_prob: float = 0.5,
        randaugment: Mapping[str, Any] | None = None,
        trivialaugment: bool = False,
        random_erasing: float = 0.0,
        **_metric: Any,  # verify_pairs, pair_seed: metric learning's, refused below if asked for
    ) -> None:
        self.augment = Augmentation(
            channels=channels, mixup=mixup, cutmix=cutmix, mix_switch_prob=mix_switch_prob,
            randaugment=randaugment, trivialaugment=trivialaugment, random_erasing=random_erasing,
        )  # fmt: skip
        if holdout_classes or classes_per_batch:
            raise UserError(
                "Metric learning (data.holdout_classes, data.classes_per_batch) needs its pairs "
                "in memory; use data.in_memory=true."
            )
        if bad_images not in ("error", "skip"):
            raise UserError(f"data.bad_images={bad_images!r} is not a policy; use error or skip.")
        if batch_size < 1 or eval_batch_size < 1 or num_workers < 0:
            raise UserError(
                "data.batch_size and data.eval_batch_size must be positive and data.num_workers "
                f"at least 0, got {batch_size}, {eval_batch_size} and {num_workers}."
            )
        test_dir = next((folder / s for s in ("val", "test") if (folder / s).is_dir()), None)
        if not (folder / "train").is_dir() or test_dir is None:
            raise missing_data(
                f"image folder {folder}",
                [folder / "train", folder / "val", folder / "test"],
                f"arrange the images as {folder}/train/<class>/* and {folder}/val/<class>/*",
            )
        self.name, self.root, self.seq_mode = name, Path(root), seq_mode
        self.channels, self.image_size, self.mean, self.std = channels, image_size, mean, std
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.crop_padding, self.hflip, self.bad_images = crop_padding, hflip, bad_images
        self.workers, self.persistent, self.prefetch = (
            num_workers,
            persistent_workers,
            prefetch_factor,
        )
        self.classes, train = list_images(folder / "train")
        test_classes, test = list_images(test_dir)
        if test_classes != self.classes or not train or not test:
            raise missing_data(
                f"image folder {folder}",
                [test_dir],
                f"give train/ and {test_dir.name}/ the same class folders, each with images",
            )
        self.num_classes = num_classes or len(self.classes)
        # The in-memory path's order: class after class, then a fixed shuffle of each split
        # (folder.read_split), so train_subset, val_split and eval_subset pick the same images.
        train, test = _shuffled(train), _shuffled(test)
        if train_subset is not None:
            train = train[:train_subset]
        self.val_name, val = "test", test
        if val_split:
            held, kept = held_out(len(train), val_split)
            val, train = [train[i] for i in held.tolist()], [train[i] for i in kept.tolist()]
            self.val_name = "held-out train"
        if eval_subset is not None:
            val, test = val[:eval_subset], test[:eval_subset]
        self.files = {"train": train, "val": val, "test": test}
        self.device = torch.device("cpu")
        self.rank, self.world_size = 0, 1
        self._loaders: dict[str, StreamLoader] = {}
        log.info(
            "data %s (streamed from %s, %d workers): %d train, %d val (%s split), %d test "
            "images of %dx%dx%d, %d classes",
            name, folder, num_workers, len(train), len(val), self.val_name, len(test),
            channels, image_size, image_size, self.num_classes,
        )  # fmt: skip

    @property
    def val_is_test(self) -> bool:
        return self.val_name == "test"

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
            workers=self.workers, persistent=self.persistent and split != "test",
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
            n, world = len(self.files["train"]), self.world_size
            if self.batch_size < world:
                raise UserError(
                    f"data.batch_size={self.batch_size} is the global batch and must be at least "
                    f"the number of processes ({world}), so that every process gets an image."
                )
            sampler: Sampler = RandomSampler(
                n, self.batch_size, drop_last=0 < n % self.batch_size < world
            )
            if world > 1:
                sampler = ShardedSampler(sampler, self.rank, world)
            normalize = Normalize(
                self.mean if mean is None else mean, self.std if std is None else std
            )
            gens = self._generators or {}
            self._loaders[key] = self._make("train", sampler, self._augment(crop), normalize, gens)
        return self._loaders[key]

    def _eval_loader(self, split: str) -> StreamLoader:
        if split not in self._loaders:
            sampler = SequentialSampler(len(self.files[split]), self.eval_batch_size)
            normalize = Normalize(self.mean, self.std)
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
        normalize = Normalize(self.mean if mean is None else mean, self.std if std is None else std)
        return {"image": normalize.normalize(x), "label": y}

    def pair_loader(self) -> None:
        raise UserError("Metric learning needs data.in_memory=true.")

    pk_loader = pair_loader

    def hold_out_validation(self, fraction: float = 0.1, minimum: int = 1000) -> int:
        raise UserError("Metric learning needs data.in_memory=true.")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": (self.channels, self.image_size, self.image_size),
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "sizes": {k: len(v) for k, v in self.files.items()},
            "val_is_test": self.val_is_test,
            "holdout_classes": [],
        }


__all__ = ["Splits", "StreamingClassificationData", "image_classification"]
