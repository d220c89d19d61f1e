"""Index samplers: which items make up each batch of an epoch, drawn on the device.

Every sampler draws all of an epoch's indices at the epoch's start, from the order generator
only. A mid-epoch resume therefore needs nothing but that generator's state at the epoch's start:
drawing the epoch again gives the same batches and leaves the generator where it was left.
A batch is a dict of index groups: "main" for ordinary data, "a" / "b" for two unpaired domains;
the loader maps each tensor key to its group.
"""

from typing import Protocol

import torch
from torch import Tensor

from dlrun.errors import UserError


class Sampler(Protocol):
    batch_size: int  # items per full batch (what this process sees), for messages

    def __len__(self) -> int:
        """Batches per epoch."""
        ...

    def epoch(
        self, generator: torch.Generator | None, device: torch.device
    ) -> list[dict[str, Tensor]]:
        """One dict per batch: index group name -> int64 index tensor on `device`."""
        ...


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UserError(f"data.batch_size must be a positive integer, got {batch_size}.")


class SequentialSampler:
    """0..n-1 in order, in slices of `batch_size` (the last may be short); draws nothing."""

    def __init__(self, n: int, batch_size: int) -> None:
        _check_batch_size(batch_size)
        self.n, self.batch_size = n, batch_size

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def epoch(
        self, generator: torch.Generator | None, device: torch.device
    ) -> list[dict[str, Tensor]]:
        order = torch.arange(self.n, device=device)
        return [{"main": idx} for idx in order.split(self.batch_size)]


class RandomSampler:
    """One `randperm` per epoch, cut into batches.

    The draw is exactly the one the loader made before samplers existed (randperm on the device
    with the same generator, consecutive slices), so earlier runs reproduce bit for bit.
    """

    def __init__(self, n: int, batch_size: int, drop_last: bool = False) -> None:
        _check_batch_size(batch_size)
        self.n, self.batch_size, self.drop_last = n, batch_size, drop_last

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def epoch(
        self, generator: torch.Generator | None, device: torch.device
    ) -> list[dict[str, Tensor]]:
        order = torch.randperm(self.n, device=device, generator=generator)
        return [{"main": idx} for idx in order.split(self.batch_size)[: len(self)]]


class ClassBalancedSampler:
    """P x K batches (metric learning): P distinct random classes, K items of each.

    Items are drawn without replacement inside a class that has at least K of them, with
    replacement from a smaller one. A batch lists its classes one after the other (K items each).
    An epoch has `batches_per_epoch` batches, by default as many as the data fills (at least one).
    """

    def __init__(
        self, labels: Tensor, p: int, k: int, batches_per_epoch: int | None = None
    ) -> None:
        if p < 1 or k < 1:
            raise UserError(f"A P x K batch needs p >= 1 and k >= 1, got p={p}, k={k}.")
        labels = labels.flatten()
        classes, counts = torch.unique(labels, return_counts=True)
        if p > len(classes):
            raise UserError(
                f"A P x K batch needs p={p} distinct classes but the data has only "
                f"{len(classes)}; lower p to at most {len(classes)}."
            )
        self.p, self.k, self.batch_size = p, k, p * k
        self.batches = (
            max(1, len(labels) // (p * k)) if batches_per_epoch is None else batches_per_epoch
        )
        # Items grouped by class: class c owns by_class[offsets[c] : offsets[c] + counts[c]].
        self.by_class = torch.sort(labels, stable=True).indices
        self.counts = counts
        self.offsets = torch.cumsum(counts, 0) - counts
        self.width = max(int(counts.max()), k)  # columns of the per-class random keys

    def __len__(self) -> int:
        return self.batches

    def epoch(
        self, generator: torch.Generator | None, device: torch.device
    ) -> list[dict[str, Tensor]]:
        by_class, counts = self.by_class.to(device), self.counts.to(device)
        offsets = self.offsets.to(device)
        column = torch.arange(self.width, device=device)
        batches = []
        for _ in range(self.batches):  # a few kernels per batch, once per epoch
            cls = torch.randperm(len(counts), device=device, generator=generator)[: self.p]
            n = counts[cls][:, None]  # (P, 1)
            # Without replacement: the K smallest of random keys, a class's unused columns pushed
            # past every key so they are never picked.
            keys = torch.rand(self.p, self.width, device=device, generator=generator)
            keys = keys.masked_fill(column >= n, 2.0)
            distinct = keys.topk(self.k, dim=1, largest=False).indices
            # With replacement, for classes with fewer than K items; min() guards float rounding.
            u = torch.rand(self.p, self.k, device=device, generator=generator)
            repeated = torch.minimum((u * n).long(), n - 1)
            pos = torch.where(n >= self.k, distinct, repeated)
            batches.append({"main": by_class[offsets[cls][:, None] + pos].flatten()})
        return batches


class UnpairedSampler:
    """Two unpaired domains (CycleGAN): groups "a" and "b", as many items of each per batch.

    An epoch is max(n_a, n_b) items: the larger domain (domain a on a tie) is a random
    permutation, each item of the other is drawn at random, so both domains fill every batch.
    """

    def __init__(self, n_a: int, n_b: int, batch_size: int) -> None:
        _check_batch_size(batch_size)
        if n_a < 1 or n_b < 1:
            raise UserError(f"Unpaired data needs images in both domains, got {n_a} and {n_b}.")
        self.n_a, self.n_b, self.batch_size = n_a, n_b, batch_size

    def __len__(self) -> int:
        return -(-max(self.n_a, self.n_b) // self.batch_size)

    def epoch(
        self, generator: torch.Generator | None, device: torch.device
    ) -> list[dict[str, Tensor]]:
        n = max(self.n_a, self.n_b)
        big = torch.randperm(n, device=device, generator=generator)
        small = torch.randint(0, min(self.n_a, self.n_b), (n,), device=device, generator=generator)
        a, b = (big, small) if self.n_a >= self.n_b else (small, big)
        return [
            {"a": ia, "b": ib}
            for ia, ib in zip(a.split(self.batch_size), b.split(self.batch_size), strict=True)
        ]


def shard_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's [start, end) of `size` items: contiguous, the first size % world_size ranks
    get one more."""
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class ShardedSampler:
    """Data-parallel shards: every rank draws the same global batches and keeps its own slice.

    All ranks must seed the order generator alike; `inner.batch_size` is the global batch. A
    global batch that world_size does not divide gives its first (size % world_size) ranks one
    item more; a last global batch shorter than world_size leaves some ranks an empty slice,
    so use drop_last with several ranks. Every rank sees len(inner) batches, so no rank waits.
    """

    def __init__(self, inner: Sampler, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.inner, self.rank, self.world_size = inner, rank, world_size
        start, end = shard_bounds(inner.batch_size, rank, world_size)
        self.batch_size = end - start

    def __len__(self) -> int:
        return len(self.inner)

    def epoch(
        self, generator: torch.Generator | None, device: torch.device
    ) -> list[dict[str, Tensor]]:
        out = []
        for batch in self.inner.epoch(generator, device):
            shard = {}
            for group, idx in batch.items():
                start, end = shard_bounds(len(idx), self.rank, self.world_size)
                shard[group] = idx[start:end]
            out.append(shard)
        return out
