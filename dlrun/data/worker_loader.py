"""A `torch.utils.data.DataLoader` behind the `TensorLoader` interface: data larger than memory.

Worker processes read and augment the images (torchvision transforms); the main process draws
each epoch's order with the same samplers and generators as the in-memory path, so the
distributed contract (one global order on every rank, a distinct shard per rank) is the same
code. Each item's augmentation is seeded by (an epoch seed drawn from the augmentation
generator) + (its index), so an item is augmented the same way whichever worker reads it: a
run resumed in the middle of an epoch sees the same batches, augmented alike, bit for bit.
"""

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dlrun.data import folder
from dlrun.data.samplers import Sampler
from dlrun.data.transforms import Normalize, Transform
from dlrun.errors import UserError

log = logging.getLogger(__name__)
SEED_SPAN = 1 << 62  # epoch seeds are drawn below this, so seed + index stays an int64


class ImageItems(Dataset):
    """(path, label) items decoded on demand to uint8 (C, S, S); a key is (index, seed or None).

    A file that cannot be decoded comes back as (None, label, reason): the main process then
    stops naming it (data.bad_images=error) or leaves it out of its batch (skip), so the error
    is dlrun's one paragraph rather than a worker's traceback.
    """

    def __init__(
        self,
        files: Sequence[tuple[Path, int]],
        channels: int,
        image_size: int,
        augment: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.files, self.channels, self.image_size = list(files), channels, image_size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, index: int) -> Tensor:
        """One image as uint8 (C, S, S): the in-memory path's own decode, so the pixels match."""
        return folder.decode(self.files[index][0], self.channels, self.image_size)

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[Tensor | None, int, str]:
        index, seed = key
        label = self.files[index][1]
        try:
            image = self.decode(index)
        except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for a damaged file
            return None, label, f"{self.files[index][0]} ({type(err).__name__}: {err})"
        if self.augment is not None and seed is not None:
            # fork_rng: with num_workers=0 this runs in the training process, whose global RNG
            # (dropout, resume) must not move.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image = self.augment(image)
        return image, label, ""


def collate(items: list[tuple[Tensor | None, int, str]]) -> dict[str, Any]:
    good = [(x, y) for x, y, _ in items if x is not None]
    return {
        "image": torch.stack([x for x, _ in good]) if good else torch.empty(0, dtype=torch.uint8),
        "label": torch.tensor([y for _, y in good], dtype=torch.long),
        "bad": [why for x, _, why in items if x is None],
    }


def refuse_bad(bad: list[str], policy: str) -> None:
    """data.bad_images=error: undecodable files stop the run, named (skip: they are left out)."""
    if bad and policy == "error":
        raise UserError(
            f"Could not decode {len(bad)} image file(s) of this batch: {'; '.join(bad[:5])}. "
            "To fix it: replace or delete them, or set data.bad_images=skip to leave such "
            "files out."
        )


class _EpochBatches:
    """The DataLoader's batch sampler: the keys of the epoch now running, set before each iter()."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int | None]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int | None]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StreamLoader:
    """Dict batches {"image": normalised float, "label": int64} on `device`, read by workers.

    `iterate(resume)` and `position()` as TensorLoader's: the position is the batch count and
    the two generators' states at the epoch's start (both are drawn from only there).
    Batch transforms run on the device, `before` the Normalize (uint8) and `after` it, each
    batch with a device generator seeded (a second epoch seed) + (its number in the epoch), so
    a resumed epoch augments its remaining batches as the interrupted one would have.
    """

    def __init__(
        self,
        items: ImageItems,
        sampler: Sampler,
        *,
        device: torch.device,
        normalize: Normalize,
        bad_images: str,
        workers: int,
        persistent: bool = True,
        prefetch: int = 2,
        order_generator: torch.Generator | None = None,
        aug_generator: torch.Generator | None = None,
        before: Sequence[Transform] = (),
        after: Sequence[Transform] = (),
    ) -> None:
        self.items, self.sampler, self.device = items, sampler, device
        self.before, self.after = tuple(before), tuple(after)
        self._batch_seed = 0
        self._batch_gen = torch.Generator(device) if before or after else None
        self.normalize, self.bad_images = normalize, bad_images
        self.order_generator, self.aug_generator = order_generator, aug_generator
        self.batch_size = sampler.batch_size
        self.keys = _EpochBatches()
        self.loader = DataLoader(
            items,
            batch_sampler=self.keys,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=device.type == "cuda",  # pinned pages: the copy below runs asynchronously
            persistent_workers=persistent and workers > 0,  # no re-fork at every epoch
            prefetch_factor=prefetch if workers > 0 else None,
        )
        self._start: dict[str, Any] | None = None
        self._batch = 0
        self._warned = False

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self.iterate()

    def iterate(self, resume: Mapping[str, Any] | None = None) -> Iterator[dict[str, Tensor]]:
        order, aug = self.order_generator, self.aug_generator
        if resume is not None:
            if order is not None and resume["order"] is not None:
                order.set_state(resume["order"])
            if aug is not None and aug is not order and resume["aug"] is not None:
                aug.set_state(resume["aug"])
        self._start = {
            "order": order.get_state() if order is not None else None,
            "aug": aug.get_state() if aug is not None else None,
        }
        batches = self.sampler.epoch(order, torch.device("cpu"))
        seed = None
        if aug is not None:  # after the order: one generator may serve both
            seed = int(torch.randint(SEED_SPAN, (1,), generator=aug))
            if self._batch_gen is not None:  # drawn only then: earlier runs reproduce
                self._batch_seed = int(torch.randint(SEED_SPAN, (1,), generator=aug))
        skip = int(resume["batch"]) if resume is not None else 0
        self.keys.batches = [
            [(i, None if seed is None else seed + i) for i in b["main"].tolist()]
            for b in batches[skip:]
        ]
        self._batch = skip
        return self._batches()

    def _batches(self) -> Iterator[dict[str, Tensor]]:
        for raw in self.loader:
            if raw["bad"]:
                self._bad(raw["bad"])
            x = raw["image"].to(self.device, non_blocking=True)
            y = raw["label"].to(self.device, non_blocking=True)
            batch, gen = {"image": x, "label": y}, self._batch_gen
            if gen is not None:
                gen.manual_seed(self._batch_seed + self._batch)
            for transform in self.before:
                batch = transform(batch, gen)
            batch["image"] = self.normalize.normalize(batch["image"])
            for transform in self.after:
                batch = transform(batch, gen)
            self._batch += 1  # counted before the yield, as TensorLoader counts
            yield batch

    def _bad(self, bad: list[str]) -> None:
        refuse_bad(bad, self.bad_images)
        if not self._warned:  # one line per loader: the files are named once
            log.warning("data.bad_images=skip: leaving out undecodable file(s): %s", "; ".join(bad))
            self._warned = True

    def position(self) -> dict[str, Any]:
        """Batches done this epoch and the generators' states at its start (before any epoch:
        their states now, so the resumed run starts that epoch as this one would)."""
        start = self._start
        if start is None:
            order, aug = self.order_generator, self.aug_generator
            start = {
                "order": order.get_state() if order is not None else None,
                "aug": aug.get_state() if aug is not None else None,
            }
        return {"batch": self._batch, "order": start["order"], "aug": start["aug"]}
