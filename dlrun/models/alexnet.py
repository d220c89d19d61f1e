"""AlexNet (Krizhevsky, Sutskever & Hinton, 2012): ImageNet Classification with Deep CNNs."""

from torch import Tensor, nn

from dlrun.models.layers import init_weights, resolve_variant

# (out_channels, kernel, stride, padding) of the five convolutions, per variant. The ImageNet
# widths are torchvision's single-GPU ones (64/192/384/256/256), not the paper's two-GPU split.
CONVS: dict[str, list[tuple[int, int, int, int]]] = {
    "imagenet": [(64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1)],
    "cifar": [(64, 5, 1, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1)],
}
# (pool padding, adaptive pool size, hidden FC units). Padded CIFAR pools take 32 and 28 px
# both down to 4x4 (32->16->8->4, 28->14->7->4), so the adaptive pool is a no-op there.
HEAD: dict[str, tuple[int, int, int]] = {"imagenet": (0, 6, 4096), "cifar": (1, 4, 1024)}


def conv_relu(cin: int, cout: int, kernel: int, stride: int, padding: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, padding), nn.ReLU(inplace=True)]


def response_norm(enabled: bool) -> list[nn.Module]:
    """The paper's local response normalisation (n=5, alpha=1e-4, beta=0.75, k=2), if enabled."""
    return [nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0)] if enabled else []


class AlexNet(nn.Module):
    """5 conv (ReLU) + 3 FC with dropout, overlapping 3x3/2 max pools, optional LRN."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 1000,
        image_size: int = 224,
        variant: str = "auto",
        init: str = "default",
        dropout: float = 0.5,
        lrn: bool = False,
    ) -> None:
        super().__init__()
        variant = resolve_variant(variant, image_size)
        if variant == "imagenet" and image_size < 63:
            raise ValueError(
                f"AlexNet's imagenet variant needs at least 63x63 px, got {image_size}"
            )
        (c1, c2, c3, c4, c5), (pad, grid, hidden) = CONVS[variant], HEAD[variant]
        # LRN follows the ReLUs of conv1 and conv2 only, before their pools, as in the paper
        self.features = nn.Sequential(
            nn.Sequential(
                *conv_relu(in_channels, *c1), *response_norm(lrn), nn.MaxPool2d(3, 2, pad)
            ),
            nn.Sequential(*conv_relu(c1[0], *c2), *response_norm(lrn), nn.MaxPool2d(3, 2, pad)),
            nn.Sequential(
                *conv_relu(c2[0], *c3),
                *conv_relu(c3[0], *c4),
                *conv_relu(c4[0], *c5),
                nn.MaxPool2d(3, 2, pad),
            ),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(grid),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c5[0] * grid * grid, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        init_weights(self, init)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, 224|32, ..) -> (B, 256, 6|4, ..) -> (B, K)
        return self.head(self.features(x))
