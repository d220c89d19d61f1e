"""Small conv nets that regress one object's description from a canvas (the notes' object
localisation and landmark detection): four conv-BN-ReLU + max-pool stages, an adaptive average
pool to 4 x 4 (any canvas size), and a two-layer fully connected head.

The head keeps the 4 x 4 grid's positions (flattened, not globally pooled): where the digit is,
is what these nets are asked. Outputs are raw numbers; the task's losses say what they mean.

- `Localizer`: 1 + 4 + K outputs, the notes' y = (Pc, bx, by, bh, bw, c1..cK): presence, the
  box centre and its height and width relative to the canvas, and K class scores.
- `LandmarkNet`: 10 outputs, (x, y) of five landmarks relative to the canvas.

`task` names the targets a net predicts (the localization trainer matches it to data.kind).
"""

from torch import Tensor, nn

from dlrun.errors import UserError

GRID = 4  # the feature map's side before the head


class _ConvRegressor(nn.Module):
    task = ""

    def __init__(self, *, in_channels: int, outputs: int, width: int = 16) -> None:
        super().__init__()
        if width < 1:
            raise UserError(f"model.width must be a positive integer, got {width}.")
        layers: list[nn.Module] = []
        cin = in_channels
        for i in range(4):  # 64 px: 32, 16, 8, 4
            cout = width * 2**i
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(GRID))
        hidden = 16 * width
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(cin * GRID * GRID, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, outputs),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class Localizer(_ConvRegressor):
    """(B, C, H, W) -> (B, 5 + K): Pc, bx, by, bh, bw, then K class scores."""

    task = "localization"

    def __init__(
        self, *, in_channels: int, image_size: int, num_classes: int, width: int = 16
    ) -> None:
        super().__init__(in_channels=in_channels, outputs=5 + num_classes, width=width)
        self.image_size, self.num_classes = image_size, num_classes


class LandmarkNet(_ConvRegressor):
    """(B, C, H, W) -> (B, 10): (x, y) of the five landmarks, relative to the canvas."""

    task = "landmarks"

    def __init__(self, *, in_channels: int, image_size: int, width: int = 16) -> None:
        super().__init__(in_channels=in_channels, outputs=10, width=width)
        self.image_size = image_size
        # Landmarks lie around the canvas's middle: start there rather than at its corner.
        nn.init.constant_(self.head[-1].bias, 0.5)
