"""Per-image augmentation of whole batches on the device: RandAugment, TrivialAugment, random
erasing, mixup and cutmix (data.randaugment, data.trivialaugment, data.random_erasing,
data.mixup, data.cutmix, data.mix_switch_prob).

Every image draws its own op and magnitude from the loader's augmentation generator, yet nothing
loops over images: each op kind runs once on the whole batch with per-image parameters that are
the identity for the images that did not draw it (a factor of 1, a threshold above 255, 8 bits),
and the geometric kinds share one grid_sample with per-image matrices. The draws have fixed
shapes whatever the images hold, so a resumed run that restores the generator replays them bit
for bit, and no value goes back to the host. Ops, magnitudes and their rounding follow
torchvision.transforms.v2's RandAugment and TrivialAugmentWide (nearest interpolation, fill 0);
tests compare each image with torchvision's own op.
"""

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from dlrun.data.transforms import Transform
from dlrun.errors import UserError

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
       "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")  # fmt: skip
(IDENTITY, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y, ROTATE, BRIGHTNESS, COLOR, CONTRAST,
 SHARPNESS, POSTERIZE, SOLARIZE, AUTOCONTRAST, EQUALIZE) = range(len(OPS))  # fmt: skip
BINS = 31  # torchvision's num_magnitude_bins: magnitudes 0..30


def magnitude_table(wide: bool, height: int, width: int) -> tuple[Tensor, Tensor]:
    """(len(OPS), BINS) float64 magnitudes and (len(OPS),) signed flags, torchvision's tables.

    wide: TrivialAugmentWide's wider ranges; else RandAugment's. Built from float32 linspace as
    torchvision builds them, so each magnitude is the very number its op receives.
    """
    shear, rot, color, post = (0.99, 135.0, 0.99, 6) if wide else (0.3, 30.0, 0.9, 4)
    tx, ty = (32.0, 32.0) if wide else (150.0 / 331.0 * width, 150.0 / 331.0 * height)

    def lin(top: float) -> Tensor:
        return torch.linspace(0.0, top, BINS)

    bits = (8 - (torch.arange(BINS) / ((BINS - 1) / post))).round().float()
    zero = torch.zeros(BINS)
    rows = [zero, lin(shear), lin(shear), lin(tx), lin(ty), lin(rot), lin(color), lin(color),
            lin(color), lin(color), bits, torch.linspace(1.0, 0.0, BINS), zero, zero]  # fmt: skip
    signed = torch.tensor([SHEAR_X <= k <= SHARPNESS for k in range(len(OPS))])
    return torch.stack(rows).double(), signed


def _per_image(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


# The ops work on float32 images holding the integers 0..255 and truncate after each op as
# torchvision's uint8 kernels do (clamp, then floor): the same numbers, without a uint8 round
# trip per op.


def _geometry(x: Tensor, op: Tensor, mag: Tensor) -> Tensor:
    """The shears, translations and rotations of the batch as one nearest-neighbour grid_sample.

    Each image's inverse matrix is torchvision's (`_get_inverse_affine_matrix`, in float64, then
    float32): shears about the top-left corner, rotations about the centre, whole-pixel shifts.
    """
    b, _, h, w = x.shape
    zero, one = torch.zeros_like(mag), torch.ones_like(mag)
    shift = -mag.trunc()
    rad = torch.deg2rad(-torch.remainder(mag, 360.0))
    cos, sin = torch.cos(rad), torch.sin(rad)
    rot, sx, sy = op == ROTATE, op == SHEAR_X, op == SHEAR_Y
    theta = torch.stack([
        torch.where(rot, cos, one),
        torch.where(rot, sin, torch.where(sx, mag, zero)),
        torch.where(sx, mag * (h / 2), torch.where(op == TRANSLATE_X, shift, zero)),
        torch.where(rot, -sin, torch.where(sy, mag, zero)),
        torch.where(rot, cos, one),
        torch.where(sy, mag * (w / 2), torch.where(op == TRANSLATE_Y, shift, zero)),
    ], 1).float().view(b, 2, 3)  # fmt: skip
    # torchvision's _affine_grid: pixel-centred base coordinates, normalised after the matrix;
    # one (H W, 3) x (3, 2 B) product for the batch.
    base = torch.empty(h, w, 3, device=x.device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=x.device))
    base[..., 1].copy_(
        torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=x.device)[:, None]
    )
    base[..., 2].fill_(1)
    scale = torch.tensor([0.5 * w, 0.5 * h], device=x.device)
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(theta.transpose(1, 2) / scale)
    grid = grid.view(b, h, w, 2)
    out = F.grid_sample(x, grid, "nearest", "zeros", align_corners=False)
    moved = (op >= SHEAR_X) & (op <= ROTATE)
    return torch.where(_per_image(moved), out, x)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """torchvision's _blend with a per-image float64 ratio f: x * f + other * (1 - f), clamped,
    truncated. 1 - f is taken in float64 (torchvision's Python floats), then float32."""
    f, rest = _per_image(factor.float()), _per_image((1.0 - factor).float())
    return torch.addcmul(x.mul(f), other, rest).clamp_(0, 255).floor_()


def _grey(x: Tensor) -> Tensor:
    r, g, b = x.unbind(-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3).floor_()


def _sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision's adjust_sharpness with a per-image factor (the border rows are kept).

    Its blur, the 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, as sums of shifted views
    (a depthwise conv2d is several times slower on CPUs): the sums of integers are exact, and
    k / 13 is never within rounding error of a half, so the rounded blur is torchvision's.
    """
    h, w = x.shape[-2:]
    if h <= 2 or w <= 2:
        return x
    out = x.clone()
    rows = out[..., :-2, :] + out[..., 1:-1, :] + out[..., 2:, :]
    inner = out[..., 1:-1, 1:-1]
    blurred = (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]).add_(inner, alpha=4).div_(13)
    inner.addcmul_(blurred.round_().sub_(inner), _per_image((1.0 - factor).float()))
    return out.clamp_(0, 255).floor_()


def _autocontrast(x: Tensor) -> Tensor:
    """torchvision's autocontrast without its boolean-mask writes (no device-to-host sync)."""
    low, high = x.amin((-2, -1), keepdim=True), x.amax((-2, -1), keepdim=True)
    flat = high == low
    inv_scale = torch.where(flat, 1.0, (high - low).mul_(1.0 / 255))
    return (x - torch.where(flat, 0.0, low)).div_(inv_scale).clamp_(0, 255).floor_()


def apply_ops(x: Tensor, op: Tensor, mag: Tensor) -> Tensor:
    """Image i of uint8 (B, C, H, W) x gets op OPS[op[i]] at signed magnitude mag[i]; one pass."""
    return _apply(x.float(), op, mag).to(torch.uint8)


def _apply(x: Tensor, op: Tensor, mag: Tensor) -> Tensor:
    """apply_ops on a float32 image of integers 0..255 (see above)."""
    x = _geometry(x, op, mag)
    factor = 1.0 + mag  # float64, as torchvision's Python floats

    def only(kind: int, value: Tensor, rest: float) -> Tensor:
        return torch.where(op == kind, value, rest)

    x = x.mul(_per_image(only(BRIGHTNESS, factor, 1.0).float())).clamp_(0, 255).floor_()
    if x.shape[-3] == 3:  # saturation leaves grey images as they are (PIL's behaviour)
        x = _blend(x, _grey(x), only(COLOR, factor, 1.0))
    grey = _grey(x) if x.shape[-3] == 3 else x
    x = _blend(x, grey.mean((-3, -2, -1), keepdim=True), only(CONTRAST, factor, 1.0))
    x = _sharpness(x, only(SHARPNESS, factor, 1.0))
    # posterize to b bits: floor(x / 2^(8 - b)) * 2^(8 - b), the bit mask as arithmetic
    step = _per_image(torch.exp2(8.0 - only(POSTERIZE, mag, 8.0)).float())
    x = x.div(step).floor_().mul_(step)
    threshold = _per_image(only(SOLARIZE, 255.0 * mag, 256.0).float())
    x = torch.where(x >= threshold, 255.0 - x, x)
    x = torch.where(_per_image(op == AUTOCONTRAST), _autocontrast(x), x)
    equalized = TF.equalize(x.to(torch.uint8)).float()
    return torch.where(_per_image(op == EQUALIZE), equalized, x)


class AutoAugment:
    """RandAugment (`num_ops` ops at a fixed `magnitude`) or TrivialAugmentWide (one op, a random
    magnitude), drawn per image on uint8 (B, C, H, W) "image" batches before Normalize."""

    def __init__(self, num_ops: int, magnitude: int | None, wide: bool) -> None:
        self.num_ops, self.magnitude, self.wide = num_ops, magnitude, wide
        self._tables: dict[tuple[torch.device, int, int], tuple[Tensor, Tensor]] = {}

    def draw(self, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """(num_ops, B) op indices and signed float64 magnitudes, all drawn whatever they are."""
        (b, _, h, w), device = x.shape, x.device
        key = (device, h, w)
        if key not in self._tables:
            self._tables[key] = tuple(t.to(device) for t in magnitude_table(self.wide, h, w))
        table, signed = self._tables[key]
        shape = (self.num_ops, b)
        op = torch.randint(len(OPS), shape, device=device, generator=generator)
        if self.magnitude is None:
            level = torch.randint(BINS, shape, device=device, generator=generator)
        else:
            level = torch.full(shape, self.magnitude, device=device)
        negate = torch.rand(shape, device=device, generator=generator) <= 0.5
        mag = table[op, level]
        return op, torch.where(signed[op] & negate, -mag, mag)

    def __call__(
        self, batch: dict[str, Tensor], generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        x = batch["image"]
        ops, mags = self.draw(x, generator)
        out = x.float()
        for op, mag in zip(ops, mags, strict=True):
            out = _apply(out, op, mag)
        return batch | {"image": out.to(x.dtype)}


class RandomErasing:
    """torchvision's RandomErasing per image (scale (0.02, 0.33), ratio (0.3, 3.3), up to 10
    tries for a rectangle that fits), batched; the rectangle gets N(0, 1) noise (value="random"),
    on the normalised image, after Normalize as torchvision places it."""

    TRIES = 10

    def __init__(self, p: float, scale: tuple[float, float] = (0.02, 0.33),
                 ratio: tuple[float, float] = (0.3, 3.3)) -> None:  # fmt: skip
        self.p, self.scale, self.log_ratio = p, scale, (math.log(ratio[0]), math.log(ratio[1]))

    def boxes(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """(B, H, W) bool: the pixels each image erases (none for an image left as it is)."""
        (b, _, h, w), device = x.shape, x.device

        def uniform(low: float, high: float) -> Tensor:
            u = torch.rand(b, self.TRIES, device=device, generator=generator)
            return u.mul_(high - low).add_(low)

        apply = torch.rand(b, device=device, generator=generator) < self.p
        area = uniform(*self.scale).mul_(h * w)
        ratio = uniform(*self.log_ratio).exp_()
        eh, ew = (area * ratio).sqrt_().round_(), (area / ratio).sqrt_().round_()
        top = uniform(0, 1).mul_(h - eh + 1).floor_()
        left = uniform(0, 1).mul_(w - ew + 1).floor_()
        fits = (eh < h) & (ew < w)
        first = fits.int().argmax(1, keepdim=True)  # the first try that fits, as torchvision's

        def pick(t: Tensor) -> Tensor:
            return t.gather(1, first)[:, :, None]  # (B, 1, 1)

        rows = torch.arange(h, device=device)[None, :, None]
        cols = torch.arange(w, device=device)[None, None, :]
        top, left = pick(top), pick(left)
        inside = (rows >= top) & (rows < top + pick(eh)) & (cols >= left) & (cols < left + pick(ew))
        return inside & (apply & fits.any(1))[:, None, None]

    def __call__(
        self, batch: dict[str, Tensor], generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        x = batch["image"]
        erase = self.boxes(x, generator)
        noise = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
        return batch | {"image": torch.where(erase[:, None], noise, x)}


def _beta(alpha: float, b: int, device: torch.device, gen: torch.Generator | None) -> Tensor:
    """b draws of Beta(alpha, alpha) from `gen` (torch.distributions takes no generator)."""
    concentration = torch.full((b, 2), float(alpha), device=device)
    return torch._sample_dirichlet(concentration, generator=gen)[:, 0]


class MixCut:
    """Mixup and/or cutmix per image, last (after Normalize), with image i's partner i - 1.

    Each image draws its own weight lam ~ Beta(alpha, alpha) and, with both on, cutmix with
    probability `switch_prob` (timm's elementwise mode). Cutmix pastes the partner's box of side
    sqrt(1 - lam) times the image's, centred uniformly and clipped, and lam becomes the share
    of pixels kept. The batch gains "target" (B, K) float: lam on the label, 1 - lam on the
    partner's; "label" becomes the larger share's class, so accuracy still means something.
    """

    def __init__(self, mixup: float, cutmix: float, switch_prob: float, num_classes: int) -> None:
        self.mixup, self.cutmix, self.switch_prob = mixup, cutmix, switch_prob
        self.num_classes = num_classes

    def __call__(
        self, batch: dict[str, Tensor], generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        x, y = batch["image"], batch["label"]
        (b, _, h, w), device = x.shape, x.device
        x2, y2 = x.roll(1, 0), y.roll(1, 0)
        mixed, lam = x, torch.ones(b, device=device)
        if self.mixup:
            lam = _beta(self.mixup, b, device, generator)
            mixed = torch.lerp(x2, x, _per_image(lam).to(x.dtype))
        if self.cutmix:
            keep = _beta(self.cutmix, b, device, generator)
            centre = torch.rand(2, b, device=device, generator=generator)
            side = (1.0 - keep).sqrt()
            ch, cw = (side * h).floor() // 2, (side * w).floor() // 2
            cy, cx = (centre[0] * h).floor(), (centre[1] * w).floor()
            y1, y2_ = (cy - ch).clamp(0, h), (cy + ch).clamp(0, h)
            x1, x2_ = (cx - cw).clamp(0, w), (cx + cw).clamp(0, w)
            rows = torch.arange(h, device=device)[None, :, None]
            cols = torch.arange(w, device=device)[None, None, :]
            box = ((rows >= y1[:, None, None]) & (rows < y2_[:, None, None])
                   & (cols >= x1[:, None, None]) & (cols < x2_[:, None, None]))  # fmt: skip
            cut = torch.where(box[:, None], x2, x)
            kept = 1.0 - (y2_ - y1) * (x2_ - x1) / (h * w)
            if self.mixup:
                use_cut = torch.rand(b, device=device, generator=generator) < self.switch_prob
                mixed = torch.where(_per_image(use_cut), cut, mixed)
                lam = torch.where(use_cut, kept, lam)
            else:
                mixed, lam = cut, kept
        target = torch.zeros(b, self.num_classes, device=device)
        target.scatter_add_(1, y[:, None], lam[:, None]).scatter_add_(
            1, y2[:, None], 1 - lam[:, None]
        )
        label = torch.where(lam >= 0.5, y, y2)
        return batch | {"image": mixed, "label": label, "target": target}


def _number(key: str, value: Any, high: float | None, example: str) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (high is not None and value > high):
        span = f"in [0, {high:g}]" if high is not None else ">= 0"
        raise UserError(f"{key} must be a number {span}, got {value!r}; e.g. {example}.")
    return float(value)


class Augmentation:
    """The data.* augmentation keys, checked; `before_normalize` / `after_normalize` build the
    transforms a training loader runs around its Normalize (crop and flip come before)."""

    def __init__(
        self,
        *,
        channels: int,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mix_switch_prob: float = 0.5,
        randaugment: Mapping[str, Any] | None = None,
        trivialaugment: bool = False,
        random_erasing: float = 0.0,
    ) -> None:
        self.mixup = _number("data.mixup", mixup, None, "data.mixup=0.2 (the Beta alpha; 0: off)")
        self.cutmix = _number("data.cutmix", cutmix, None, "data.cutmix=1.0 (0: off)")
        self.switch = _number(
            "data.mix_switch_prob", mix_switch_prob, 1, "data.mix_switch_prob=0.5"
        )
        self.erasing = _number("data.random_erasing", random_erasing, 1, "data.random_erasing=0.25")
        ra = dict(randaugment or {})
        unknown = set(ra) - {"num_ops", "magnitude"}
        if unknown:
            raise UserError(
                f"data.randaugment has unknown key(s) {sorted(unknown)}; it takes num_ops and "
                "magnitude, e.g. data.randaugment.num_ops=2 data.randaugment.magnitude=9."
            )
        self.num_ops, self.magnitude = ra.get("num_ops", 0), ra.get("magnitude", 9)
        if not isinstance(self.num_ops, int) or isinstance(self.num_ops, bool) or self.num_ops < 0:
            raise UserError(
                f"data.randaugment.num_ops must be a whole number >= 0 (0: off), got "
                f"{self.num_ops!r}; e.g. data.randaugment.num_ops=2."
            )
        if (not isinstance(self.magnitude, int) or isinstance(self.magnitude, bool)
                or not 0 <= self.magnitude < BINS):  # fmt: skip
            raise UserError(
                f"data.randaugment.magnitude must be a whole number in 0..{BINS - 1} "
                f"(torchvision's scale), got {self.magnitude!r}; e.g. data.randaugment.magnitude=9."
            )
        if not isinstance(trivialaugment, bool):
            raise UserError(f"data.trivialaugment must be true or false, got {trivialaugment!r}.")
        self.trivial = trivialaugment
        if self.trivial and self.num_ops:
            raise UserError(
                "data.trivialaugment=true and data.randaugment.num_ops="
                f"{self.num_ops} are two policies for the same step; keep one (set "
                "data.randaugment.num_ops=0 or data.trivialaugment=false)."
            )
        if (self.trivial or self.num_ops) and channels not in (1, 3):
            raise UserError(
                f"data.randaugment and data.trivialaugment take 1- or 3-channel images; these "
                f"have data.channels={channels}. Turn them off for this data set."
            )

    @property
    def mixes(self) -> bool:
        """Batches carry soft targets (mixup or cutmix on)."""
        return bool(self.mixup or self.cutmix)

    def before_normalize(self) -> list[Transform]:
        if self.trivial:
            return [AutoAugment(1, None, wide=True)]
        return [AutoAugment(self.num_ops, self.magnitude, wide=False)] if self.num_ops else []

    def after_normalize(self, num_classes: int) -> list[Transform]:
        out: list[Transform] = [RandomErasing(self.erasing)] if self.erasing else []
        if self.mixes:
            out.append(MixCut(self.mixup, self.cutmix, self.switch, num_classes))
        return out
