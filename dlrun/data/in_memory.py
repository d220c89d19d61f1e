"""The in-memory image classification data set every loader module fills, and its splits."""

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dlrun.data.labelled import LabelledImages
from dlrun.data.module import DeviceGenerators
from dlrun.data.samplers import Sampler, SequentialSampler
from dlrun.data.tensor_loader import TensorLoader
from dlrun.data.transforms import RandomCrop, RandomHFlip, Transform
from dlrun.engine import dist
from dlrun.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Splits:
    """Decoded images as uint8 (N, C, H, W) and int64 labels, for the train and test splits."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]


def missing_data(name: str, looked: Sequence[Path], fix: str, reason: str = "") -> UserError:
    """The one-paragraph error for a data set that is neither on disk nor downloadable."""
    where = ", ".join(str(p) for p in looked)
    why = f" The download failed: {reason}." if reason else ""
    return UserError(
        f"Data set {name} was not found (looked in {where}).{why} To fix it: {fix}; "
        "or point data.root (or the DLRUN_DATA environment variable) at the folder that holds it."
    )


def held_out(n: int, val_split: float) -> tuple[Tensor, Tensor]:
    """data.val_split's (validation, training) indices of n training items.

    A fixed permutation (not the run seed), so every run of a sweep holds out the same images.
    """
    n_val = int(val_split * n) if val_split < 1 else int(val_split)
    if not 0 < n_val < n:
        raise UserError(
            f"data.val_split={val_split} leaves no training or no validation images "
            f"out of {n}; use a fraction in (0, 1) or a smaller count, or data.val_split=0 to "
            "train on every image (val/* is then the test split)."
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return perm[:n_val], perm[n_val:]


class ClassificationData(LabelledImages, DeviceGenerators):
    """A classification data set held in tensors (a `DataModule`): `setup` moves it to the device.

    Batches are {"image": normalised float (B, C, H, W), "label": int64 (B,)}; training shuffles
    (one randperm per epoch), random-crops with `crop_padding`, flips with `hflip`, and applies
    the per-image augmentation of dlrun.data.augment (RandAugment ... mixup: "target" (B, K)).
    It offers its tensors (split, normalize, loader) to what builds batches of its own on them,
    as metric learning's pairs (dlrun.data.pairs.PairBatches).
    """

    def __init__(
        self,
        *,
        source: Callable[[Path, bool], Splits],
        download: bool = True,
        **options: Any,  # the data.* keys both labelled modules take (dlrun.data.labelled)
    ) -> None:
        super().__init__(**options)
        name, channels, image_size = self.name, self.channels, self.image_size
        splits = source(self.root, download)
        self.classes = splits.classes
        self.num_classes = self.num_classes or len(splits.classes)
        if splits.train_x.shape[1] != channels:
            raise UserError(
                f"data.channels is {channels} but {name} images have {splits.train_x.shape[1]} channels."
            )
        train_x, train_y = splits.train_x, splits.train_y
        if self.train_subset is not None:
            train_x, train_y = train_x[: self.train_subset], train_y[: self.train_subset]
        self.val_x, self.val_y = splits.test_x, splits.test_y
        if self.val_split:
            held, kept = held_out(len(train_x), self.val_split)
            self.val_x, self.val_y = train_x[held], train_y[held]
            train_x, train_y = train_x[kept], train_y[kept]
            self.val_name = "held-out train"
        self.train_x, self.train_y = train_x, train_y
        self.test_x, self.test_y = splits.test_x, splits.test_y
        eval_subset = self.eval_subset
        if eval_subset is not None:  # quick looks on slow machines: the first N evaluation images
            self.val_x, self.val_y = self.val_x[:eval_subset], self.val_y[:eval_subset]
            self.test_x, self.test_y = self.test_x[:eval_subset], self.test_y[:eval_subset]
        self.offers["tensors"] = self
        log.info(
            "data %s: %d train, %d val (%s split), %d test images of %dx%dx%d, %d classes",
            name,
            len(train_x),
            len(self.val_x),
            self.val_name,
            len(self.test_x),
            channels,
            image_size,
            image_size,
            self.num_classes,
        )

    def hold_out_validation(self, fraction: float = 0.1, minimum: int = 1000) -> int:
        """Without data.val_split: move `fraction` of the training images (at least `minimum`,
        at most half) into the validation split, by `held_out`'s fixed permutation. For a task
        that must fit something on validation data (metric learning's threshold) and so can never
        use the test split for it. Returns how many images moved (0 when val is already held out).
        """
        if not self.val_is_test:
            return 0
        n = len(self.train_x)
        count = min(max(round(fraction * n), minimum), n // 2)
        held, kept = held_out(n, count)  # (a count, not a fraction: the `minimum` may decide)
        device = self.train_x.device  # setup() may have moved the data already
        held, kept = held.to(device), kept.to(device)
        self.val_x, self.val_y = self.train_x[held], self.train_y[held]
        self.train_x, self.train_y = self.train_x[kept], self.train_y[kept]
        if self.eval_subset is not None:
            self.val_x, self.val_y = self.val_x[: self.eval_subset], self.val_y[: self.eval_subset]
        self.val_name = "held-out train"
        return count

    def setup(
        self, device: torch.device, seed: int, rank: int = 0, world_size: int | None = None
    ) -> None:
        """Move every split to the device once and seed the generators (see `DataModule.setup`)."""
        world_size = dist.world_size() if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got rank={rank}")
        for attr in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
            tensor = getattr(self, attr)
            if device.type == "cuda":  # pinned pages: one DMA transfer, not a staged copy
                tensor = tensor.pin_memory()
            setattr(self, attr, tensor.to(device, non_blocking=True))
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the pinned buffers must outlive their copies
        self.rank, self.world_size = rank, world_size
        self.seed_generators(device, seed, rank, world_size)

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """The images (uint8 (N, C, H, W)) and labels of "train", "val" or "test", in order."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {name!r}")
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")

    def loader(
        self,
        tensors: dict[str, Tensor],
        sampler: Sampler,
        transforms: Sequence[Transform],
        groups: Mapping[str, str] | None = None,
    ) -> TensorLoader:
        """A TensorLoader of these tensors that draws from this module's generators."""
        gens = self._generators
        return TensorLoader(
            tensors,
            sampler,
            transforms=transforms,
            groups=groups,
            order_generator=gens.get("order"),
            aug_generator=gens.get("aug"),
        )

    def _loader(
        self, split: str, sampler: Sampler, transforms: Sequence[Transform]
    ) -> TensorLoader:
        x, y = self.split(split)
        return self.loader({"image": x, "label": y}, sampler, transforms)

    def train_loader(
        self,
        *,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        crop: bool = True,
    ) -> TensorLoader:
        sampler = self.train_sampler(len(self.train_x))
        transforms: list[Transform] = []
        if crop and self.crop_padding:
            transforms.append(RandomCrop(padding=self.crop_padding))
        if self.hflip:
            transforms.append(RandomHFlip())
        transforms += self.augment.before_normalize()  # on uint8, as torchvision's
        transforms.append(self.normalize(mean, std))
        transforms += self.augment.after_normalize(self.num_classes)  # erasing, then mixing
        return self._loader("train", sampler, transforms)

    def val_loader(self) -> TensorLoader:
        sampler = SequentialSampler(len(self.val_x), self.eval_batch_size)
        return self._loader("val", sampler, [self.normalize(None, None)])

    def test_loader(self) -> TensorLoader:
        sampler = SequentialSampler(len(self.test_x), self.eval_batch_size)
        return self._loader("test", sampler, [self.normalize(None, None)])

    def example_batch(
        self,
        n: int,
        split: str = "val",
        *,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
    ) -> dict[str, Tensor]:
        x, y = self.split(split)
        return {"image": self.normalize(mean, std).normalize(x[:n]), "label": y[:n]}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": tuple(self.train_x.shape[1:]),
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "sizes": {"train": len(self.train_x), "val": len(self.val_x), "test": len(self.test_x)},
            "val_is_test": self.val_is_test,
        }
