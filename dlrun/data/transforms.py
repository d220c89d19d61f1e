"""Key-aware augmentation of whole batches on the device: one draw per batch, every key alike.

A transform takes a batch dict and the augmentation generator and returns a new dict. Geometry
(crop offsets, flips) is drawn once per batch and applied to every key it names, so images,
masks and boxes stay aligned. Keys are recognised by shape: 4-D tensors are images (B, C, H, W),
3-D ones masks (B, H, W); "boxes" are (B, M, 4) xyxy pixel floats, with "box_labels" (B, M)
int64 where -1 marks padding or a box cropped away.
"""

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from dlrun.errors import UserError

BOX_KEYS = ("boxes", "box_labels")



def per_channel(value: Any, channels: int, default: float | None = None) -> list[float]:
    """A normalisation value as one float per channel: a scalar or a one-element list repeats,
    None gives `default` (an error without one)."""
    if value is None and default is not None:
        return [default] * channels
    values = [float(value)] if isinstance(value, int | float) else [float(v) for v in value]
    return values * channels if len(values) == 1 else values

class Transform(Protocol):
    def __call__(
        self, batch: dict[str, Tensor], generator: torch.Generator | None
    ) -> dict[str, Tensor]: ...


def _dense(batch: dict[str, Tensor], keys: Sequence[str]) -> list[str]:
    """The image and mask keys among `keys` that the batch holds."""
    found = [k for k in keys if k in batch and k not in BOX_KEYS]
    for k in found:
        if batch[k].dim() not in (3, 4):
            raise ValueError(
                f"{k!r} must be (B, C, H, W) or (B, H, W), got {tuple(batch[k].shape)}"
            )
    return found


def _has_boxes(batch: dict[str, Tensor], keys: Sequence[str]) -> bool:
    if "boxes" not in keys or "boxes" not in batch:
        return False
    if "box_labels" not in batch:  # without labels a box cropped away could not be marked
        raise ValueError("a batch with 'boxes' needs 'box_labels' (B, M), -1 marking padding")
    return True


def _image_size(batch: dict[str, Tensor], dense: list[str]) -> tuple[int, int]:
    if not dense:
        raise ValueError("boxes are transformed in the frame of an image or mask key; none given")
    h, w = batch[dense[0]].shape[-2:]
    return h, w


class RandomCrop:
    """A random `size` x `size` window per item, after zero padding by `padding` pixels.

    size None keeps the input's size (pad, then crop back: CIFAR's augmentation); a smaller size
    cuts a window from a larger image (load 286, train on 256). Masks are padded with
    `mask_fill`; boxes are shifted, clipped to the window, and one left without area gets
    label -1. For an image with padding only, this is exactly the crop dlrun made before
    transforms were key-aware (same draw, same gather), so earlier runs reproduce.
    """

    def __init__(
        self,
        size: int | None = None,
        padding: int = 0,
        keys: Sequence[str] = ("image", "mask", "boxes"),
        mask_fill: int = 0,
    ) -> None:
        if padding < 0 or (size is not None and size < 1):
            raise UserError(
                f"A random crop needs size >= 1 and padding >= 0, got {size}, {padding}."
            )
        self.size, self.padding, self.keys, self.mask_fill = size, padding, tuple(keys), mask_fill

    def __call__(
        self, batch: dict[str, Tensor], generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        dense, boxes = _dense(batch, self.keys), _has_boxes(batch, self.keys)
        if not dense and not boxes:
            return batch
        h, w = _image_size(batch, dense)
        p = self.padding
        out_h, out_w = (h, w) if self.size is None else (self.size, self.size)
        span_h, span_w = h + 2 * p - out_h, w + 2 * p - out_w
        if span_h < 0 or span_w < 0:
            raise UserError(
                f"A random crop of {out_h}x{out_w} does not fit in {h}x{w} images padded by {p}; "
                "lower the crop size or load the images larger."
            )
        b, device = batch[dense[0]].shape[0], batch[dense[0]].device
        if span_h == span_w:  # the one (2, B) draw of the original crop
            shift = torch.randint(0, span_h + 1, (2, b), device=device, generator=generator)
            top, left = shift[0], shift[1]
        else:
            top = torch.randint(0, span_h + 1, (b,), device=device, generator=generator)
            left = torch.randint(0, span_w + 1, (b,), device=device, generator=generator)
        rows = (top[:, None] + torch.arange(out_h, device=device))[:, :, None]  # (B, h, 1)
        cols = (left[:, None] + torch.arange(out_w, device=device))[:, None, :]  # (B, 1, w)
        items = torch.arange(b, device=device)[:, None, None]
        out = dict(batch)
        for k in dense:
            x = batch[k]
            if x.dim() == 4:  # channels last for the gather, as the original crop did
                padded = F.pad(x, (p,) * 4).permute(0, 2, 3, 1) if p else x.permute(0, 2, 3, 1)
                out[k] = padded[items, rows, cols].permute(0, 3, 1, 2)
            else:
                padded = F.pad(x, (p,) * 4, value=self.mask_fill) if p else x
                out[k] = padded[items, rows, cols]
        if boxes:
            out["boxes"], out["box_labels"] = self._boxes(batch, top - p, left - p, out_h, out_w)
        return out

    @staticmethod
    def _boxes(
        batch: dict[str, Tensor], top: Tensor, left: Tensor, out_h: int, out_w: int
    ) -> tuple[Tensor, Tensor]:
        """Boxes in the window whose corner is (left, top) in the unpadded image."""
        box = batch["boxes"]
        dx, dy = left.to(box.dtype)[:, None], top.to(box.dtype)[:, None]  # (B, 1)
        x1, y1 = (box[..., 0] - dx).clamp(0, out_w), (box[..., 1] - dy).clamp(0, out_h)
        x2, y2 = (box[..., 2] - dx).clamp(0, out_w), (box[..., 3] - dy).clamp(0, out_h)
        gone = (x2 <= x1) | (y2 <= y1)
        labels = batch["box_labels"].masked_fill(gone, -1)
        return torch.stack([x1, y1, x2, y2], dim=-1), labels


class RandomHFlip:
    """Mirror each item left-right with probability p: one draw, applied to every key.

    With images only this is exactly the flip dlrun made before (torch.rand(B) < p, then flip).
    """

    def __init__(self, p: float = 0.5, keys: Sequence[str] = ("image", "mask", "boxes")) -> None:
        self.p, self.keys = p, tuple(keys)

    def __call__(
        self, batch: dict[str, Tensor], generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        dense, boxes = _dense(batch, self.keys), _has_boxes(batch, self.keys)
        if not dense and not boxes:
            return batch
        first = batch[dense[0] if dense else "boxes"]
        flip = torch.rand(first.shape[0], device=first.device, generator=generator) < self.p
        out = dict(batch)
        for k in dense:
            x = batch[k]
            where = flip.view(-1, *([1] * (x.dim() - 1)))
            out[k] = torch.where(where, x.flip(x.dim() - 1), x)
        if boxes:
            _, w = _image_size(batch, dense)
            box = batch["boxes"]
            mirrored = torch.stack([w - box[..., 2], box[..., 1], w - box[..., 0], box[..., 3]], -1)
            out["boxes"] = torch.where(flip[:, None, None], mirrored, box)
        return out


class Normalize:
    """uint8 [0, 255] -> float (x / 255 - mean) / std per channel, as one fused multiply-add.

    Draws nothing; put it last, after the geometric transforms that move uint8 data cheaply.
    A scalar mean or std applies to every channel.
    """

    def __init__(
        self,
        mean: float | Sequence[float],
        std: float | Sequence[float],
        keys: Sequence[str] = ("image",),
    ) -> None:
        self.mean, self.std, self.keys = mean, std, tuple(keys)
        self._affine: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def affine(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(shift, scale), computed on the device itself so the float arithmetic never varies."""
        if device not in self._affine:
            std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
            mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
            # (x / 255 - mean) / std == x * scale + shift
            self._affine[device] = (-mean / std, 1.0 / (255.0 * std))
        return self._affine[device]

    def normalize(self, x: Tensor) -> Tensor:
        """One (B, C, H, W) tensor of uint8 values (any dtype) to normalised float32."""
        shift, scale = self.affine(x.device)
        return torch.addcmul(shift, x.float(), scale)

    def __call__(
        self, batch: dict[str, Tensor], generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        out = dict(batch)
        for k in self.keys:
            if k in batch:
                out[k] = self.normalize(batch[k])
        return out
