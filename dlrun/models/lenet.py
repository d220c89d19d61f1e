"""LeNet-5 (LeCun et al., 1998), as in the notes: sigmoid activations and average pooling."""

from torch import Tensor, nn

from dlrun.models.layers import ACTIVATIONS, POOLS, choose, init_weights


class LeNet5(nn.Module):
    """conv5(6) - pool - conv5(16) - pool - fc120 - fc84 - fc K (widths and BN optional).

    The original takes 32x32 inputs; smaller images (MNIST's 28x28) are zero-padded in the
    first convolution, as d2l does, so the feature maps keep the paper's 28/14/10/5 sizes.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        activation: str = "sigmoid",
        pool: str = "avg",
        batchnorm: bool = False,
        widths: tuple[int, int] = (6, 16),
        init: str = "default",
    ) -> None:
        super().__init__()
        act, pool_layer = choose(ACTIVATIONS, activation, "activation"), choose(POOLS, pool, "pool")
        pad = max(0, (32 - image_size) // 2)
        size = ((image_size + 2 * pad - 4) // 2 - 4) // 2  # spatial size after the conv blocks
        if size < 1:
            raise ValueError(f"LeNet-5 needs images of at least 14x14 pixels, got {image_size}")
        c1, c2 = widths
        bias = not batchnorm  # a BatchNorm right after a layer makes its bias redundant

        def norm(layer: type[nn.Module], n: int) -> list[nn.Module]:
            # d2l's "LeNet with batch normalization": BN between each layer and its activation.
            # Without it nothing is inserted, so the plain LeNet's weight names stay the paper's.
            return [layer(n)] if batchnorm else []

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=pad, bias=bias),
            *norm(nn.BatchNorm2d, c1),
            act(),
            pool_layer(2, 2),
            nn.Conv2d(c1, c2, 5, bias=bias),
            *norm(nn.BatchNorm2d, c2),
            act(),
            pool_layer(2, 2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * size * size, 120, bias=bias),
            *norm(nn.BatchNorm1d, 120),
            act(),
            nn.Linear(120, 84, bias=bias),
            *norm(nn.BatchNorm1d, 84),
            act(),
            nn.Linear(84, num_classes),
        )
        init_weights(self, init)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, 28|32, 28|32) -> (B, K)
        return self.head(self.features(x))
