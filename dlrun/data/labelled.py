"""What the two labelled image modules share: their data.* arguments, the checks and the members.

`ClassificationData` (decoded once, held in tensors on the device) and
`StreamingClassificationData` (read from disk by DataLoader workers) take the same keys, since
data.in_memory picks one for the same config (dlrun.data.image_sets): a key or a check is added
here, once, and both modules have it.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dlrun.data.augment import Augmentation
from dlrun.data.samplers import RandomSampler, Sampler, ShardedSampler
from dlrun.data.transforms import Normalize
from dlrun.errors import UserError

BAD_IMAGES = ("error", "skip")


class LabelledImages:
    """The shared part of a labelled image module (image, label batches); a subclass reads the
    images, then fills its train / val / test splits (train_subset, val_split, eval_subset)."""

    kind = "classification"  # what trainers check their batches against (Trainer.data_kinds)

    def __init__(
        self,
        *,
        name: str,
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
        bad_images: str = "error",
        seq_mode: str | None = None,
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
        # bad_images is read by the image-folder sources too (through data.source); checked here,
        # so a typo fails even where no image folder is read.
        if bad_images not in BAD_IMAGES:
            raise UserError(
                f"data.bad_images={bad_images!r} is not a policy; use one of: {', '.join(BAD_IMAGES)}."
            )
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise UserError(f"data.{key} must be a positive integer, got {value}.")
        if num_workers < 0:
            raise UserError(f"data.num_workers must be at least 0, got {num_workers}.")
        if not 0 <= val_split:
            raise UserError(
                f"data.val_split must be >= 0 (a fraction < 1 or a count), got {val_split}."
            )
        self.name, self.root, self.seq_mode = name, Path(root).expanduser(), seq_mode
        self.channels, self.image_size, self.mean, self.std = channels, image_size, mean, std
        self.num_classes = num_classes  # None: the subclass counts the classes it reads
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.train_subset, self.eval_subset, self.val_split = train_subset, eval_subset, val_split
        self.crop_padding, self.hflip = crop_padding, hflip
        self.num_workers, self.bad_images = num_workers, bad_images
        self.val_name = "test"  # "held-out train" once val_split (or a trainer) holds images out
        # Filled by setup(); until then loaders draw from torch's global generator.
        self._generators: dict[str, torch.Generator] = {}
        self.rank, self.world_size = 0, 1
        # What trainers may `require` (dlrun.data.module.CAPABILITIES); subclasses and the
        # wrappers of dlrun.data.image_sets add theirs.
        self.offers: dict[str, Any] = {"normalization": self}

    @property
    def val_is_test(self) -> bool:
        """True when val/* scores the test split (no val_split): the numbers papers report."""
        return self.val_name == "test"

    def normalize(
        self,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
    ) -> Normalize:
        """The data's normalisation; mean / std (a scalar: every channel) override it."""
        return Normalize(self.mean if mean is None else mean, self.std if std is None else std)

    def train_sampler(self, n: int) -> Sampler:
        """The training order of n items: one global batch of data.batch_size drawn alike on
        every rank, each rank keeping its slice (in memory and streamed alike)."""
        world = self.world_size
        if self.batch_size < world:
            raise UserError(
                f"data.batch_size={self.batch_size} is the global batch and must be at least the "
                f"number of processes ({world}), so that every process gets an image."
            )
        # A last global batch smaller than the number of processes would leave some empty: drop it.
        sampler: Sampler = RandomSampler(n, self.batch_size, drop_last=0 < n % self.batch_size < world)
        return ShardedSampler(sampler, self.rank, world) if world > 1 else sampler
