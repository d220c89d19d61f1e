"""Linear score function (softmax / SVM classifier) and the multilayer perceptron of the notes."""

from collections.abc import Sequence

from torch import Tensor, nn

from dlrun.models.layers import ACTIVATIONS, choose, init_weights


class Linear(nn.Module):
    """s = W x + b on the flattened image: the softmax / SVM linear classifier."""

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        init: str = "default",
    ) -> None:
        super().__init__()
        self.features = nn.Flatten()
        self.head = nn.Linear(in_channels * image_size * image_size, num_classes)
        init_weights(self, init)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, K)
        return self.head(self.features(x))


class MLP(nn.Module):
    """The notes' MNISTNN: 784 -> 128 -> ReLU -> 10, hidden sizes and activation configurable."""

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        hidden: Sequence[int] = (128,),
        activation: str = "relu",
        dropout: float = 0.0,
        init: str = "default",
    ) -> None:
        super().__init__()
        act = choose(ACTIVATIONS, activation, "activation")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for h in hidden:
            layers += [nn.Linear(width, h), act()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)
        init_weights(self, init)

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, 28, 28) -> (B, 10)
        return self.head(self.features(x))
