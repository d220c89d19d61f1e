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


def nin_block(
    cin: int,
    cout: int,
    kernel: int,
    stride: int,
    padding: int,
    batch_norm: bool = False,
    logits: bool = False,
) -> nn.Sequential:
    """An mlpconv layer: a conv then two 1x1 convs (a per-pixel MLP), each followed by ReLU.

    `batch_norm` puts BatchNorm between each conv and its ReLU (the notes' 7.5: where it goes in
    a conv net), with no conv bias (BN's shift replaces it); the class block's last conv
    (`logits`) stays plain, so it is still the layer transfer learning replaces.
    """
    layers: list[nn.Module] = []
    specs = [(cin, kernel, stride, padding), (cout, 1, 1, 0), (cout, 1, 1, 0)]
    for i, (c_in, k, s, p) in enumerate(specs):
        norm = batch_norm and not (logits and i == len(specs) - 1)
        layers.append(nn.Conv2d(c_in, cout, k, s, p, bias=not norm))
        if norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


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
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        variant = resolve_variant(variant, image_size)
        if variant == "imagenet" and image_size < 67:
            raise ValueError(f"NiN's imagenet variant needs at least 67x67 px, got {image_size}")
        pad, blocks = POOL_PADDING[variant], BLOCKS[variant]
        cins = [in_channels] + [b[0] for b in blocks[:-1]]
        self.features = nn.Sequential(
            *(
                nn.Sequential(nin_block(c, *b, batch_norm=batch_norm), nn.MaxPool2d(3, 2, pad))
                for c, b in zip(cins, blocks, strict=True)
            )
        )
        # d2l keeps the ReLU after the class conv: the logits are non-negative channel means
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nin_block(blocks[-1][0], num_classes, 3, 1, 1, batch_norm=batch_norm, logits=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        init_weights(self, init)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, 224|32, ..) -> (B, 384, 5|4, ..) -> (B, K)
        return self.head(self.features(x))
