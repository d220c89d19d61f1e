"""The in-memory image classification data set every loader module fills, and its splits."""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dlrun.data.tensor_loader import TensorLoader
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


class ClassificationData:
    """A classification data set held in tensors: `setup` moves it to the device once."""

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
    ) -> None:
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
        if train_subset is not None:
            train_x, train_y = train_x[:train_subset], train_y[:train_subset]
        self.val_name = "test"
        self.val_x, self.val_y = splits.test_x, splits.test_y
        if val_split:
            n_val = int(val_split * len(train_x)) if val_split < 1 else int(val_split)
            if not 0 < n_val < len(train_x):
                raise UserError(
                    f"data.val_split={val_split} leaves no training or no validation images "
                    f"out of {len(train_x)}; use a fraction in (0, 1) or a smaller count."
                )
            # A fixed permutation (not the run seed) so every run of a sweep holds out the same images.
            perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
            self.val_x, self.val_y = train_x[perm[:n_val]], train_y[perm[:n_val]]
            train_x, train_y = train_x[perm[n_val:]], train_y[perm[n_val:]]
            self.val_name = "held-out train"
        self.train_x, self.train_y = train_x, train_y
        self.test_x, self.test_y = splits.test_x, splits.test_y
        if eval_subset is not None:  # quick looks on slow machines: the first N evaluation images
            self.val_x, self.val_y = self.val_x[:eval_subset], self.val_y[:eval_subset]
            self.test_x, self.test_y = self.test_x[:eval_subset], self.test_y[:eval_subset]
        self.generator: torch.Generator | None = None
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

    def setup(self, device: torch.device, seed: int) -> None:
        """Move every split to the device once; the generator drives shuffling and augmentation."""
        for attr in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
            tensor = getattr(self, attr)
            if device.type == "cuda":  # pinned pages: one DMA transfer, not a staged copy
                tensor = tensor.pin_memory()
            setattr(self, attr, tensor.to(device, non_blocking=True))
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the pinned buffers must outlive their copies
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def _loader(self, x: Tensor, y: Tensor, train: bool) -> TensorLoader:
        return TensorLoader(
            x,
            y,
            batch_size=self.batch_size if train else self.eval_batch_size,
            mean=self.mean,
            std=self.std,
            shuffle=train,
            generator=self.generator,
            crop_padding=self.crop_padding if train else 0,
            hflip=self.hflip and train,
        )

    def train_loader(self) -> TensorLoader:
        return self._loader(self.train_x, self.train_y, train=True)

    def val_loader(self) -> TensorLoader:
        return self._loader(self.val_x, self.val_y, train=False)

    def test_loader(self) -> TensorLoader:
        return self._loader(self.test_x, self.test_y, train=False)
