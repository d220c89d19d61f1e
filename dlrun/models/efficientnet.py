"""EfficientNet B0-B7 (Tan & Le, 2019): MBConv blocks with squeeze-and-excitation, compound scaling."""

import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation, SqueezeExcitation, StochasticDepth

from dlrun.models.layers import init_weights, make_divisible, resolve_variant


class Scaling(NamedTuple):
    width: float
    depth: float
    resolution: int
    dropout: float


# Compound scaling: depth d = alpha^phi, width w = beta^phi, resolution r = gamma^phi with
# alpha=1.2, beta=1.1, gamma=1.15 from the grid search on B0 (alpha * beta^2 * gamma^2 ~ 2, so
# FLOPs ~ 2^phi). The released B1-B7 are hand-rounded, not the exact powers:
#   phi  alpha^phi  beta^phi  224*gamma^phi   released (width, depth, resolution)
#    1     1.20      1.10        258           (1.0, 1.1, 240)
#    3     1.73      1.33        341           (1.2, 1.4, 300)
#    5     2.49      1.61        451           (1.6, 2.2, 456)
#    7     3.58      1.95        596           (2.0, 3.1, 600)
# These released values (the official TF code's, and torchvision's) are what we use.
SCALING: dict[int, Scaling] = {
    0: Scaling(1.0, 1.0, 224, 0.2),
    1: Scaling(1.0, 1.1, 240, 0.2),
    2: Scaling(1.1, 1.2, 260, 0.3),
    3: Scaling(1.2, 1.4, 300, 0.3),
    4: Scaling(1.4, 1.8, 380, 0.4),
    5: Scaling(1.6, 2.2, 456, 0.4),
    6: Scaling(1.8, 2.6, 528, 0.5),
    7: Scaling(2.0, 3.1, 600, 0.5),
}
# B0's Table 1: (expansion, kernel, stride of the first block, out channels, blocks)
B0_STAGES: list[tuple[int, int, int, int, int]] = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]


def scale_width(channels: int, width_mult: float) -> int:
    """Channels x width, rounded to a multiple of 8 (torchvision's adjust_channels)."""
    return make_divisible(channels * width_mult, 8)


def scale_depth(blocks: int, depth_mult: float) -> int:
    """Blocks x depth, rounded up (torchvision's adjust_depth)."""
    return int(math.ceil(blocks * depth_mult))


class MBConv(nn.Module):
    """1x1 expand, kxk depthwise, squeeze-and-excitation, 1x1 linear projection (SiLU).

    The residual branch is dropped per sample with probability `drop_prob` (stochastic depth).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expand_ratio: int,
        kernel: int,
        stride: int,
        drop_prob: float,
        norm_layer: Callable[..., nn.Module],
    ) -> None:
        super().__init__()
        self.use_residual = stride == 1 and in_channels == out_channels
        hidden = scale_width(in_channels, expand_ratio)
        layers: list[nn.Module] = []
        if hidden != in_channels:
            layers.append(
                Conv2dNormActivation(
                    in_channels, hidden, 1, norm_layer=norm_layer, activation_layer=nn.SiLU
                )
            )
        layers += [
            Conv2dNormActivation(
                hidden,
                hidden,
                kernel,
                stride,
                groups=hidden,
                norm_layer=norm_layer,
                activation_layer=nn.SiLU,
            ),
            # squeeze to a quarter of the block's *input* channels, as the paper's code does
            SqueezeExcitation(hidden, max(1, in_channels // 4), activation=nn.SiLU),
            Conv2dNormActivation(
                hidden, out_channels, 1, norm_layer=norm_layer, activation_layer=None
            ),
        ]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(drop_prob, "row")

    @property
    def project_norm(self) -> nn.Module:
        """The BatchNorm after the 1x1 projection: the last layer of the residual branch."""
        return self.block[-1][1]

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C', H/s, W/s)
        out = self.block(x)
        return x + self.stochastic_depth(out) if self.use_residual else out


class EfficientNet(nn.Module):
    """B0 scaled by phi: stem, 7 MBConv stages, 1x1 conv to 4x the last width, pool, dropout, FC.

    `phi` looks up the released (width, depth, dropout) of B<phi>; `width_mult` / `depth_mult` /
    `dropout` override them when given. The resolution of B<phi> (`Scaling.resolution`) is the
    data's `image_size`. The cifar variant runs the stem at stride 1 (total stride 16), so 32 px
    and 28 px inputs end at 2x2; also running the 24-channel stage at stride 1 (4x4) made B7 take
    ~3.5 s per CPU step, too slow for the model tests.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 1000,
        image_size: int = 224,
        variant: str = "auto",
        init: str = "default",
        phi: int = 0,
        width_mult: float | None = None,
        depth_mult: float | None = None,
        dropout: float | None = None,
        stochastic_depth: float = 0.2,
        norm_layer: Callable[..., nn.Module] | None = None,
        bn_momentum: float | None = None,
        bn_eps: float | None = None,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        variant = resolve_variant(variant, image_size)
        if phi not in SCALING:
            raise ValueError(f"unknown phi {phi}; choose one of: {', '.join(map(str, SCALING))}")
        scaling = SCALING[phi]
        width_mult = scaling.width if width_mult is None else width_mult
        depth_mult = scaling.depth if depth_mult is None else depth_mult
        dropout = scaling.dropout if dropout is None else dropout
        if width_mult <= 0 or depth_mult <= 0:
            raise ValueError(
                f"width_mult and depth_mult must be positive, got {width_mult}, {depth_mult}"
            )
        if norm_layer is None:  # torchvision's B5-B7 keep the TF port's BN settings
            norm_layer = (
                partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01) if phi >= 5 else nn.BatchNorm2d
            )
        if bn_momentum is not None:  # the running statistics' update rate, e.g. for short runs
            norm_layer = partial(norm_layer, momentum=bn_momentum)
        if bn_eps is not None:  # added to the batch variance; B5-B7's 1e-3 damps quiet channels
            norm_layer = partial(norm_layer, eps=bn_eps)
        self.resolution = scaling.resolution
        cifar = variant == "cifar"
        width = scale_width(32, width_mult)
        stages: list[nn.Module] = [
            Conv2dNormActivation(
                in_channels,
                width,
                3,
                1 if cifar else 2,
                norm_layer=norm_layer,
                activation_layer=nn.SiLU,
            )
        ]
        depths = [scale_depth(n, depth_mult) for *_, n in B0_STAGES]
        block_id, total = 0, sum(depths)
        for (t, k, s, c, _), n in zip(B0_STAGES, depths, strict=True):
            out = scale_width(c, width_mult)
            blocks = []
            for j in range(n):
                # drop probability grows linearly with depth, as in torchvision
                p = stochastic_depth * block_id / total
                blocks.append(MBConv(width, out, t, k, s if j == 0 else 1, p, norm_layer))
                width, block_id = out, block_id + 1
            stages.append(nn.Sequential(*blocks))
        last = 4 * width
        stages.append(
            Conv2dNormActivation(width, last, 1, norm_layer=norm_layer, activation_layer=nn.SiLU)
        )
        self.features = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(last, num_classes)
        )
        self._reset_parameters()
        init_weights(self, init)
        if zero_init_residual:  # each residual block starts as the identity (Goyal et al., 2017)
            for m in self.modules():
                if isinstance(m, MBConv) and m.use_residual:
                    nn.init.zeros_(m.project_norm.weight)

    @torch.no_grad()
    def _reset_parameters(self) -> None:
        """He (fan_out of one group, as the TF code) convs, unit BN, U(+-1/sqrt(fan_in)) head."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He (fan_out) with the fan-out of one group, as the official TF code counts it
                # (timm: fix_group_fanout). torch's (torchvision's) fan_out for a depthwise conv
                # is channels x k x k, which starts its weights sqrt(channels) below the TF
                # code's (B5's widest 5x5: std 0.008, not 0.28). Alone (with the classifier
                # bound below) it did not make B5 learn; the zero init did.
                fan_out = m.out_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                # torchvision's bound, 1/sqrt(out_features), is sized for ImageNet's 1000
                # classes: with 10 it starts B0-B5 at logits of std 3-5 (loss 4.5-5.9, not
                # ln 10 = 2.3). 1/sqrt(in_features) is within 12% of it at 1000 classes
                # (B0: 0.028 vs 0.032) and keeps the logits' std under 1 for any class count.
                bound = 1.0 / math.sqrt(m.in_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, 224, 224) -> (B, K); cifar (B, C, 32, 32)
        return self.head(self.features(x))
