"""A loader over device-resident tensors: index shuffling, whole-batch augmentation, normalization."""

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop(x: Tensor, padding: int, generator: torch.Generator | None) -> Tensor:
    """Zero-pad by `padding` and cut a random HxW window per image, for the whole batch at once."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4).permute(0, 2, 3, 1)  # (B, H+2p, W+2p, C)
    shift = torch.randint(0, 2 * padding + 1, (2, b), device=x.device, generator=generator)
    rows = shift[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = shift[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, C, H, W)


def random_hflip(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Mirror a random half of the batch left-right."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class TensorLoader:
    """Yields normalized float batches from uint8 tensors that already live on the device.

    No per-sample Python: one randperm per epoch, one gather per batch, augmentation and
    normalization as a handful of batched kernels.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        crop_padding: int = 0,
        hflip: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.crop_padding, self.hflip = shuffle, crop_padding, hflip
        self.generator = generator
        std_t = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
        # (x / 255 - mean) / std == x * scale + shift: one fused multiply-add per batch.
        self.scale, self.shift = 1.0 / (255.0 * std_t), -mean_t / std_t

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def normalize(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.shift, x.float(), self.scale)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iterate()

    def iterate(
        self, skip: int = 0, rng_state: Tensor | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The epoch's batches from batch `skip` on: how a run resumed mid-epoch picks up its place.

        The shuffle is drawn first, as in a fresh epoch (so the generator must be at the epoch's
        starting state); `rng_state` then puts the generator where the interrupted run left it,
        so the remaining batches get the same crops, flips (and GAN noise) as without the stop.
        """
        n = len(self.x)
        order = None
        if self.shuffle:
            order = torch.randperm(n, device=self.x.device, generator=self.generator)
        if rng_state is not None and self.generator is not None:
            self.generator.set_state(rng_state)
        for start in range(skip * self.batch_size, n, self.batch_size):
            idx = (
                slice(start, start + self.batch_size)
                if order is None
                else order[start : start + self.batch_size]
            )
            xb, yb = self.x[idx], self.y[idx]
            if self.crop_padding:
                xb = random_crop(xb, self.crop_padding, self.generator)
            if self.hflip:
                xb = random_hflip(xb, self.generator)
            yield self.normalize(xb), yb
