"""Network in Network (Lin, Chen & Yan, 2013), as in d2l: mlpconv blocks and a global-average-pool head."""

from torch import Tensor, nn

from dlrun.models.layers import init_weights, resolve_variant

# (out_channels, kernel, stride, padding) of each block's first conv, then the max-pool padding.
# Padded CIFAR pools take 32 and 28 px both down to 4x4 (32->16->8->4, 28->14->7->4).
BLOCKS: dict[str, list[tuple[int, int, int, int]]] = {
    "imagenet": [(96, 11, 4, 0), (256, 5, 1, 2), (384, 3, 1, 1)],
    "cifar": [(96, 5, 1, 2), (256, 5, 1, 2), (384, 3, 1, 1)],
}
POOL_PADDING = {"imagenet": 0, "cifar": 1}


def nin_block(cin: int, cout: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    """An mlpconv layer: a conv then two 1x1 convs (a per-pixel MLP), each followed by ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 1),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 1),
        nn.ReLU(inplace=True),
    )


class NiN(nn.Module):
    """Three NiN blocks with max pooling, dropout, a class-wide NiN block, global average pool.

    There is no fully connected layer: the last block has one channel per class and its spatial
    mean is the logit, so the head's last 1x1 conv is the layer transfer learning replaces.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 1000,
        image_size: int = 224,
        variant: str = "auto",
        init: str = "default",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        variant = resolve_variant(variant, image_size)
        if variant == "imagenet" and image_size < 67:
            raise ValueError(f"NiN's imagenet variant needs at least 67x67 px, got {image_size}")
        pad, blocks = POOL_PADDING[variant], BLOCKS[variant]
        cins = [in_channels] + [b[0] for b in blocks[:-1]]
        self.features = nn.Sequential(
            *(
                nn.Sequential(nin_block(c, *b), nn.MaxPool2d(3, 2, pad))
                for c, b in zip(cins, blocks, strict=True)
            )
        )
        # d2l keeps the ReLU after the class conv: the logits are non-negative channel means
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nin_block(blocks[-1][0], num_classes, 3, 1, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        init_weights(self, init)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, 224|32, ..) -> (B, 384, 5|4, ..) -> (B, K)
        return self.head(self.features(x))
