"""The in-memory image classification data set every loader module fills, and its splits."""

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dlrun.data.augment import Augmentation
from dlrun.data.module import DeviceGenerators
from dlrun.data.pairs import MetricLoaders
from dlrun.data.samplers import RandomSampler, Sampler, SequentialSampler, ShardedSampler
from dlrun.data.tensor_loader import TensorLoader
from dlrun.data.transforms import Normalize, RandomCrop, RandomHFlip, Transform
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


class ClassificationData(MetricLoaders, DeviceGenerators):
    """A classification data set held in tensors (a `DataModule`): `setup` moves it to the device.

    Batches are {"image": normalised float (B, C, H, W), "label": int64 (B,)}; training shuffles
    (one randperm per epoch), random-crops with `crop_padding`, flips with `hflip`, and applies
    the per-image augmentation of dlrun.data.augment (RandAugment ... mixup: "target" (B, K)).
    """

    kind = "classification"  # what trainers check their batches against (Trainer.data_kinds)

    def __init__(
        self,
        *,
        name: str,
        source: Callable[[Path, bool], Splits],
        root: str,
        download: bool = True,
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
        bad_images: str = "error",
        seq_mode: str | None = None,
        holdout_classes: Sequence[int] | None = None,
        classes_per_batch: int | None = None,
        verify_pairs: int = 10000,
        pair_seed: int = 0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mix_switch_prob: float = 0.5,
        randaugment: Mapping[str, Any] | None = None,
        trivialaugment: bool = False,
        random_erasing: float = 0.0,
    ) -> None:
        # Checked before the data set is read: a bad value fails at once.
        self.augment = Augmentation(
            channels=channels, mixup=mixup, cutmix=cutmix, mix_switch_prob=mix_switch_prob,
            randaugment=randaugment, trivialaugment=trivialaugment, random_erasing=random_erasing,
        )  # fmt: skip
        # seq_mode (row | pixel): how sequence models (model=rnn/lstm/gru) read each image; the
        # model config takes it from here (${data.seq_mode}), the data itself is unchanged.
        if seq_mode not in (None, "row", "pixel"):
            raise UserError(f"data.seq_mode must be row or pixel, got '{seq_mode}'.")
        self.seq_mode = seq_mode
        # num_workers and bad_images are read by the image-folder sources (through data.source);
        # bad_images is checked here too, so a typo fails even where no image folder is read.
        if bad_images not in ("error", "skip"):
            raise UserError(
                f"data.bad_images={bad_images!r} is not a policy; use one of: error, skip."
            )
        if batch_size < 1 or eval_batch_size < 1:
            raise UserError(f"data.batch_size must be a positive integer, got {batch_size}.")
        if not 0 <= val_split:
            raise UserError(
                f"data.val_split must be >= 0 (a fraction < 1 or a count), got {val_split}."
            )
        self.name, self.root = name, Path(root).expanduser()
        self.channels, self.image_size, self.mean, self.std = channels, image_size, mean, std
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.crop_padding, self.hflip = crop_padding, hflip
        splits = source(self.root, download)
        self.classes = splits.classes
        self.num_classes = num_classes or len(splits.classes)
        if splits.train_x.shape[1] != channels:
            raise UserError(
                f"data.channels is {channels} but {name} images have {splits.train_x.shape[1]} channels."
            )
        train_x, train_y = splits.train_x, splits.train_y
        # Metric learning (Siamese / triplet): classes kept out of training (and of the validation
        # split, cut from training) to verify one-shot on classes never seen; the test split keeps them.
        self.holdout_classes = [int(c) for c in holdout_classes or []]
        if self.holdout_classes:
            known = set(range(self.num_classes))
            if (
                not set(self.holdout_classes) <= known
                or len(self.holdout_classes) >= self.num_classes
            ):
                raise UserError(
                    f"data.holdout_classes={self.holdout_classes} must name some, not all, of the "
                    f"class indices 0..{self.num_classes - 1} of {name}."
                )
            keep = ~torch.isin(train_y, torch.tensor(self.holdout_classes))
            train_x, train_y = train_x[keep], train_y[keep]
        if verify_pairs < 2 or (classes_per_batch is not None and classes_per_batch < 2):
            raise UserError(
                "data.verify_pairs and data.classes_per_batch must be at least 2, got "
                f"{verify_pairs} and {classes_per_batch}."
            )
        self.classes_per_batch, self.verify_pairs = classes_per_batch, verify_pairs
        self.pair_seed = pair_seed
        if train_subset is not None:
            train_x, train_y = train_x[:train_subset], train_y[:train_subset]
        self.val_name = "test"
        self.val_x, self.val_y = splits.test_x, splits.test_y
        if val_split:
            held, kept = held_out(len(train_x), val_split)
            self.val_x, self.val_y = train_x[held], train_y[held]
            train_x, train_y = train_x[kept], train_y[kept]
            self.val_name = "held-out train"
        self.train_x, self.train_y = train_x, train_y
        self.test_x, self.test_y = splits.test_x, splits.test_y
        self.eval_subset = eval_subset
        if eval_subset is not None:  # quick looks on slow machines: the first N evaluation images
            self.val_x, self.val_y = self.val_x[:eval_subset], self.val_y[:eval_subset]
            self.test_x, self.test_y = self.test_x[:eval_subset], self.test_y[:eval_subset]
        # Filled by setup(); until then loaders draw from torch's global generator.
        self._generators: dict[str, torch.Generator] = {}
        self.rank, self.world_size = 0, 1
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

    @property
    def val_is_test(self) -> bool:
        """True when val/* scores the test split (no val_split): the numbers papers report."""
        return self.val_name == "test"

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

    def _split(self, split: str) -> tuple[Tensor, Tensor]:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        return getattr(self, f"{split}_x"), getattr(self, f"{split}_y")

    def _normalize(
        self, mean: float | Sequence[float] | None, std: float | Sequence[float] | None
    ) -> Normalize:
        return Normalize(self.mean if mean is None else mean, self.std if std is None else std)

    def _loader(
        self, split: str, sampler: Sampler, transforms: Sequence[Transform]
    ) -> TensorLoader:
        x, y = self._split(split)
        gens = self._generators
        return TensorLoader(
            {"image": x, "label": y},
            sampler,
            transforms=transforms,
            order_generator=gens.get("order"),
            aug_generator=gens.get("aug"),
        )

    def train_loader(
        self,
        *,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        crop: bool = True,
    ) -> TensorLoader:
        n, world = len(self.train_x), self.world_size
        if self.batch_size < world:
            raise UserError(
                f"data.batch_size={self.batch_size} is the global batch and must be at least the "
                f"number of processes ({world}), so that every process gets an image."
            )
        # A last global batch smaller than the number of processes would leave some empty: drop it.
        sampler: Sampler = RandomSampler(
            n, self.batch_size, drop_last=0 < n % self.batch_size < world
        )
        if world > 1:  # every rank draws the same global batch and keeps its slice
            sampler = ShardedSampler(sampler, self.rank, world)
        transforms: list[Transform] = []
        if crop and self.crop_padding:
            transforms.append(RandomCrop(padding=self.crop_padding))
        if self.hflip:
            transforms.append(RandomHFlip())
        transforms += self.augment.before_normalize()  # on uint8, as torchvision's
        transforms.append(self._normalize(mean, std))
        transforms += self.augment.after_normalize(self.num_classes)  # erasing, then mixing
        return self._loader("train", sampler, transforms)

    def val_loader(self) -> TensorLoader:
        sampler = SequentialSampler(len(self.val_x), self.eval_batch_size)
        return self._loader("val", sampler, [self._normalize(None, None)])

    def test_loader(self) -> TensorLoader:
        sampler = SequentialSampler(len(self.test_x), self.eval_batch_size)
        return self._loader("test", sampler, [self._normalize(None, None)])

    def example_batch(
        self,
        n: int,
        split: str = "val",
        *,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
    ) -> dict[str, Tensor]:
        x, y = self._split(split)
        return {"image": self._normalize(mean, std).normalize(x[:n]), "label": y[:n]}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": tuple(self.train_x.shape[1:]),
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "sizes": {"train": len(self.train_x), "val": len(self.val_x), "test": len(self.test_x)},
            "val_is_test": self.val_is_test,
            "holdout_classes": list(self.holdout_classes),
        }
