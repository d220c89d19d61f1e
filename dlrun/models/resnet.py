"""ResNet: Deep Residual Learning for Image Recognition (He et al., 2015)."""

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from dlrun.models.layers import init_weights, resolve_variant


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    # No bias: the BatchNorm that follows every conv has its own shift.
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs plus the shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        # Attribute order mirrors torchvision so parameters line up by position.
        self.conv1 = conv3x3(in_ch, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, planes, H/s, W/s)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) plus the shortcut (ResNet-50/101/152).

    The stride sits on the 3x3 conv (torchvision's "ResNet v1.5"), not on the first 1x1 as in
    the paper; the parameter count is the same.
    """

    expansion = 4

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_ch, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, 4 planes, H/s, W/s)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """Stem, four stages of residual blocks (64/128/256/512 planes), global pool, linear."""

    def __init__(
        self,
        *,
        block: Block = BasicBlock,
        layers: Sequence[int] = (2, 2, 2, 2),
        in_channels: int = 3,
        num_classes: int = 1000,
        image_size: int = 224,
        variant: str = "auto",
        init: str = "default",
        zero_init_residual: bool = False,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise ValueError(f"unknown block {block!r}; choose one of: BasicBlock, Bottleneck")
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {list(layers)}")
        variant = resolve_variant(variant, image_size)
        if variant == "imagenet":  # 224 px -> 56 px before layer1
            stem = [
                ("conv1", nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)),
                ("bn1", norm_layer(64)),
                ("relu", nn.ReLU(inplace=True)),
                ("maxpool", nn.MaxPool2d(3, stride=2, padding=1)),
            ]
        else:  # CIFAR ResNet: keep full resolution, a 7x7/2 conv + pool would leave 8 px at 32 px
            stem = [
                ("conv1", conv3x3(in_channels, 64)),
                ("bn1", norm_layer(64)),
                ("relu", nn.ReLU(inplace=True)),
            ]
        stages: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(OrderedDict(stem)))]
        in_ch = 64
        for i, (planes, n, stride) in enumerate(
            zip((64, 128, 256, 512), layers, (1, 2, 2, 2), strict=True)
        ):
            stage, in_ch = make_stage(block, in_ch, planes, n, stride, norm_layer)
            stages.append((f"layer{i + 1}", stage))
        self.features = nn.Sequential(OrderedDict(stages))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes)
        )

        # torchvision's init: He normal (fan_out) convs, BN scale 1 shift 0, Linear left as is.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each block starts as the identity (Goyal et al., 2017)
            for m in self.modules():
                if isinstance(m, BasicBlock | Bottleneck):
                    last_bn = m.bn3 if isinstance(m, Bottleneck) else m.bn2
                    nn.init.zeros_(last_bn.weight)
        init_weights(self, init)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, 32, 32) -> (B, 512 e, 4, 4) -> (B, K)
        return self.head(self.features(x))


def make_stage(
    block: Block, in_ch: int, planes: int, n: int, stride: int, norm_layer: type[nn.Module]
) -> tuple[nn.Sequential, int]:
    """n blocks; only the first may change the shape, so only it may need a projection."""
    out_ch = planes * block.expansion
    downsample = None
    if stride != 1 or in_ch != out_ch:  # option B of the paper: 1x1 conv + BN projection
        downsample = nn.Sequential(conv1x1(in_ch, out_ch, stride), norm_layer(out_ch))
    blocks = [block(in_ch, planes, stride, downsample, norm_layer)]
    blocks += [block(out_ch, planes, norm_layer=norm_layer) for _ in range(n - 1)]
    return nn.Sequential(*blocks), out_ch


def resnet18(**kwargs: Any) -> ResNet:
    return ResNet(block=BasicBlock, layers=(2, 2, 2, 2), **kwargs)


def resnet34(**kwargs: Any) -> ResNet:
    return ResNet(block=BasicBlock, layers=(3, 4, 6, 3), **kwargs)


def resnet50(**kwargs: Any) -> ResNet:
    return ResNet(block=Bottleneck, layers=(3, 4, 6, 3), **kwargs)


def resnet101(**kwargs: Any) -> ResNet:
    return ResNet(block=Bottleneck, layers=(3, 4, 23, 3), **kwargs)


def resnet152(**kwargs: Any) -> ResNet:
    return ResNet(block=Bottleneck, layers=(3, 8, 36, 3), **kwargs)
