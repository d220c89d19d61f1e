"""1-D convolution over an image read as a sequence (the notes' 1-D conv, on data=seq_mnist).

The image is read as the recurrent nets read it (models/rnn.py): `seq_mode=row`, one row per
step (MNIST: 28 steps of 28 x C features), or `pixel`, one pixel per step (784 steps of C). The
features of a step are the Conv1d's input channels, so each first-layer filter sees
`kernel_size` whole rows. Conv1d-BN-ReLU stages (zero padding keeps the length, stride 1), one
global pool over the steps (avg or max: where in the sequence a pattern sits does not matter),
dropout, a linear head. Any image set works (its rows are the sequence), not only seq_mnist.
"""

from collections.abc import Sequence

from torch import Tensor, nn

from dlrun.errors import UserError

SEQ_MODES = ("row", "pixel")
POOLS = ("avg", "max")


class CNN1d(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        widths: Sequence[int] = (32, 64, 64),
        kernel_size: int = 5,
        seq_mode: str = "row",
        pool: str = "avg",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if seq_mode not in SEQ_MODES:
            raise UserError(
                f"data.seq_mode must be row or pixel for model=cnn1d, got '{seq_mode}'."
            )
        if pool not in POOLS:
            raise UserError(f"model.pool must be avg or max for model=cnn1d, got '{pool}'.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise UserError(
                f"model.kernel_size must be odd (zero padding of (k-1)/2 on each side keeps the "
                f"sequence's length), got {kernel_size}."
            )
        if not widths or any(int(w) < 1 for w in widths):
            raise UserError(
                f"model.widths must list one channel count >= 1 per stage, got {widths}."
            )
        self.seq_mode, self.pool = seq_mode, pool
        c = in_channels * image_size if seq_mode == "row" else in_channels
        layers: list[nn.Module] = []
        for width in widths:
            layers += [  # no conv bias: the BatchNorm's shift takes its place
                nn.Conv1d(c, int(width), kernel_size, padding=kernel_size // 2, bias=False),
                nn.BatchNorm1d(int(width)),
                nn.ReLU(inplace=True),
            ]
            c = int(width)
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c, num_classes)

    def sequence(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, features, steps): Conv1d's (batch, channels, length)."""
        b, c, h, w = x.shape
        if self.seq_mode == "row":
            return x.permute(0, 1, 3, 2).reshape(b, c * w, h)  # step t: row t, all channels
        return x.reshape(b, c, h * w)

    def forward(self, x: Tensor) -> Tensor:
        y = self.features(self.sequence(x))  # (B, widths[-1], steps)
        y = y.mean(2) if self.pool == "avg" else y.amax(2)
        return self.head(self.dropout(y))


def cnn1d(**kwargs: object) -> CNN1d:
    return CNN1d(**kwargs)  # type: ignore[arg-type]
