"""MobileNet v1 (Howard et al., 2017) and MobileNetV2 (Sandler et al., 2018)."""

from collections.abc import Callable

from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from dlrun.models.layers import init_weights, make_divisible, resolve_variant

# v1 stages grouped by resolution: (out channels, stride of the first layer, layers); 13 in all
V1_STAGES: list[tuple[int, int, int]] = [
    (64, 1, 1),
    (128, 2, 2),
    (256, 2, 2),
    (512, 2, 6),
    (1024, 2, 2),
]
# v2 Table 2: (expansion t, out channels c, blocks n, stride s of the first block)
V2_STAGES: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _check_width(width_mult: float) -> None:
    if width_mult <= 0:
        raise ValueError(f"width_mult must be positive, got {width_mult}")


def _mobile_init(model: nn.Module) -> None:
    """torchvision's MobileNet init: He (fan_out) convs, unit BN, N(0, 0.01) classifier."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _head(channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes)
    )


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise conv + BN + ReLU, then 1x1 pointwise conv + BN + ReLU (v1's Fig. 3)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__(
            Conv2dNormActivation(
                in_channels, in_channels, 3, stride, groups=in_channels, norm_layer=norm_layer
            ),
            Conv2dNormActivation(in_channels, out_channels, 1, norm_layer=norm_layer),
        )


class InvertedResidual(nn.Module):
    """1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 linear projection; skip when shapes agree."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        expand_ratio: int,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(
                Conv2dNormActivation(
                    in_channels, hidden, 1, norm_layer=norm_layer, activation_layer=nn.ReLU6
                )
            )
        layers += [
            Conv2dNormActivation(
                hidden,
                hidden,
                3,
                stride,
                groups=hidden,
                norm_layer=norm_layer,
                activation_layer=nn.ReLU6,
            ),
            # linear bottleneck: a ReLU here would destroy information in the narrow projection
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            norm_layer(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C', H/s, W/s)
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV1(nn.Module):
    """Stem conv + 13 depthwise separable layers + pool + dropout + FC, channels scaled by alpha.

    The resolution multiplier rho is the input size (`data.image_size`). The cifar variant runs
    the stem and the first strided stage (64 -> 128) at stride 1: 32 px ends at 4x4, not 1x1.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 1000,
        image_size: int = 224,
        variant: str = "auto",
        init: str = "default",
        dropout: float = 0.001,
        width_mult: float = 1.0,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        variant = resolve_variant(variant, image_size)
        _check_width(width_mult)
        cifar = variant == "cifar"
        width = max(1, int(32 * width_mult))  # the paper's alpha*M, no rounding
        stages: list[nn.Module] = [
            Conv2dNormActivation(in_channels, width, 3, 1 if cifar else 2, norm_layer=norm_layer)
        ]
        for i, (channels, stride, n) in enumerate(V1_STAGES):
            out = max(1, int(channels * width_mult))
            stride = 1 if cifar and i == 1 else stride
            layers = []
            for j in range(n):
                layers.append(DepthwiseSeparable(width, out, stride if j == 0 else 1, norm_layer))
                width = out
            stages.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*stages)
        self.head = _head(width, num_classes, dropout)
        _mobile_init(self)
        init_weights(self, init)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, 224, 224) -> (B, K); cifar (B, C, 32, 32)
        return self.head(self.features(x))


class MobileNetV2(nn.Module):
    """Stem + 17 inverted residual blocks (7 stages) + 1x1 conv to 1280 + pool, dropout, FC.

    features = [stem, stage1..stage7, last conv]: torchvision's flat `features` grouped into
    stages, which keeps its parameter and buffer order. The cifar variant runs the stem and the
    first strided stage (24 channels) at stride 1, as the common CIFAR ports do (32 px -> 4x4).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 1000,
        image_size: int = 224,
        variant: str = "auto",
        init: str = "default",
        dropout: float = 0.2,
        width_mult: float = 1.0,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        variant = resolve_variant(variant, image_size)
        _check_width(width_mult)
        cifar = variant == "cifar"
        width = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))  # the head never narrows below 1280
        stages: list[nn.Module] = [
            Conv2dNormActivation(
                in_channels,
                width,
                3,
                1 if cifar else 2,
                norm_layer=norm_layer,
                activation_layer=nn.ReLU6,
            )
        ]
        for i, (t, c, n, s) in enumerate(V2_STAGES):
            out = make_divisible(c * width_mult)
            s = 1 if cifar and i == 1 else s
            blocks = []
            for j in range(n):
                blocks.append(InvertedResidual(width, out, s if j == 0 else 1, t, norm_layer))
                width = out
            stages.append(nn.Sequential(*blocks))
        stages.append(
            Conv2dNormActivation(width, last, 1, norm_layer=norm_layer, activation_layer=nn.ReLU6)
        )
        self.features = nn.Sequential(*stages)
        self.head = _head(last, num_classes, dropout)
        _mobile_init(self)
        init_weights(self, init)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, 224, 224) -> (B, K); cifar (B, C, 32, 32)
        return self.head(self.features(x))
