"""VGG (Simonyan & Zisserman, 2014): very deep networks of stacked 3x3 convolutions."""

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from dlrun.models.layers import init_weights, resolve_variant

WIDTHS = (64, 128, 256, 512, 512)  # output channels of the five stages


def vgg_stage(
    cin: int,
    cout: int,
    convs: int,
    norm_layer: Callable[[int], nn.Module] | None,
    ceil_mode: bool = False,
) -> nn.Sequential:
    """`convs` 3x3 conv(-norm)-ReLU layers, then a 2x2 max pool that halves the size."""
    layers: list[nn.Module] = []
    for i in range(convs):
        layers.append(nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1))
        if norm_layer is not None:
            layers.append(norm_layer(cout))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.MaxPool2d(2, 2, ceil_mode=ceil_mode))
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """Five stages of 3x3 convs with max pooling, then a dropout MLP classifier."""

    def __init__(
        self,
        *,
        layers: Sequence[int] = (2, 2, 3, 3, 3),
        in_channels: int = 3,
        num_classes: int = 1000,
        image_size: int = 224,
        variant: str = "auto",
        init: str = "auto",
        dropout: float = 0.5,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        variant = resolve_variant(variant, image_size)
        if len(layers) != len(WIDTHS) or min(layers) < 1:
            raise ValueError(f"VGG needs five stages of at least one conv each, got {layers}")
        if variant == "imagenet" and image_size < 32:
            raise ValueError(f"VGG's imagenet variant needs at least 32x32 px, got {image_size}")
        norm = nn.BatchNorm2d if batch_norm else None
        # CIFAR: ceil-mode pools take 28 px (28->14->7->4->2->1) as well as 32 px down to 1x1
        cifar = variant == "cifar"
        cins = (in_channels, *WIDTHS[:-1])
        self.features = nn.Sequential(
            *(vgg_stage(i, o, n, norm, cifar) for i, o, n in zip(cins, WIDTHS, layers, strict=True))
        )
        if cifar:  # a 1x1x512 map needs no 25088-wide MLP
            self.head: nn.Module = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(512, 512),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(512, num_classes),
            )
        else:
            self.head = nn.Sequential(
                nn.AdaptiveAvgPool2d(7),
                nn.Flatten(),
                nn.Linear(512 * 7 * 7, 4096),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(4096, 4096),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(4096, num_classes),
            )
        self._init_like_torchvision()
        # auto: He's init keeps a plain deep stack trainable; BatchNorm does that itself, and
        # there torchvision's small head trains far better (configs/model/vgg11.yaml)
        init_weights(self, ("default" if batch_norm else "kaiming") if init == "auto" else init)

    def _init_like_torchvision(self) -> None:
        # He init keeps the deep plain (no-BN) stacks trainable from scratch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, 224|32, ..) -> (B, 512, 7|1, ..) -> (B, K)
        return self.head(self.features(x))


def vgg11(**kwargs: Any) -> VGG:
    """VGG-11 (configuration A): 1-1-2-2-2 convs per stage."""
    return VGG(layers=(1, 1, 2, 2, 2), **kwargs)


def vgg13(**kwargs: Any) -> VGG:
    """VGG-13 (configuration B): 2-2-2-2-2 convs per stage."""
    return VGG(layers=(2, 2, 2, 2, 2), **kwargs)


def vgg16(**kwargs: Any) -> VGG:
    """VGG-16 (configuration D): 2-2-3-3-3 convs per stage."""
    return VGG(layers=(2, 2, 3, 3, 3), **kwargs)


def vgg19(**kwargs: Any) -> VGG:
    """VGG-19 (configuration E): 2-2-4-4-4 convs per stage."""
    return VGG(layers=(2, 2, 4, 4, 4), **kwargs)
