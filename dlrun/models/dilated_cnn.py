"""Dilated CNN (the notes' DCNN; Yu & Koltun, 2016): dilated 3x3 convs widen the view without pooling."""

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from dlrun.models.layers import init_weights, resolve_variant


def dilated_conv(
    cin: int, cout: int, dilation: int, norm_layer: Callable[[int], nn.Module]
) -> nn.Sequential:
    """3x3 conv with holes: it sees a (2d+1)^2 patch with 9 weights; padding d keeps the size."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False),
        norm_layer(cout),
        nn.ReLU(inplace=True),
    )


class DilatedCNN(nn.Module):
    """Full-resolution conv-BN-ReLU layers with growing dilation, global average pool, Linear.

    Dilations 1, 2, 4, 8 give a 31x31 receptive field with four 3x3 layers and no pooling.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 1000,
        image_size: int = 224,
        variant: str = "auto",
        init: str = "default",
        channels: int = 64,
        dilations: Sequence[int] = (1, 2, 4, 8),
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        resolve_variant(variant, image_size)  # one network for every size; only validated
        if len(dilations) == 0 or any(int(d) != d or d < 1 for d in dilations):
            raise ValueError(
                f"dilations must be a non-empty list of integers >= 1, got {dilations}"
            )
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        cins = [in_channels] + [channels] * (len(dilations) - 1)
        self.features = nn.Sequential(
            *(
                dilated_conv(c, channels, int(d), norm_layer)
                for c, d in zip(cins, dilations, strict=True)
            )
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)
        )
        init_weights(self, init)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, channels, H, W) -> (B, K)
        return self.head(self.features(x))
