"""Recurrent classifiers of images read as sequences (the notes' RNN / LSTM / GRU chapter).

`seq_mode=row` reads an image top to bottom, one row per step (MNIST: 28 steps of 28 x C
features); `pixel` one pixel per step (784 steps of C). The recurrent layers are torch's own;
the head classifies the last layer's final hidden state (both directions' when bidirectional).
"""

from torch import Tensor, nn

from dlrun.errors import UserError

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
SEQ_MODES = ("row", "pixel")


INITS = ("default", "orthogonal", "identity")


def init_recurrent(layer: nn.RNNBase, scheme: str) -> None:
    """The recurrent weights' start: torch's U(+-1/sqrt(hidden)), or one of two that keep a signal.

    `orthogonal` (Saxe et al. 2014): each gate's hidden-to-hidden matrix orthogonal, inputs
    Xavier. `identity` (Le et al. 2015, the IRNN, for nonlinearity=relu): hidden-to-hidden the
    identity, inputs N(0, 0.001), so the state carries over unchanged until the net learns to
    change it. Biases start at zero in both.
    """
    if scheme not in INITS:
        raise UserError(f"model.init must be one of {', '.join(INITS)}, got '{scheme}'.")
    if scheme == "default":
        return
    for name, weight in layer.named_parameters():
        if name.startswith("bias"):
            nn.init.zeros_(weight)
        elif name.startswith("weight_ih"):
            if scheme == "identity":
                nn.init.normal_(weight, 0.0, 1e-3)
            else:
                nn.init.xavier_uniform_(weight)
        else:  # weight_hh: (gates x hidden, hidden), one square block per gate
            for block in weight.data.split(layer.hidden_size):
                if scheme == "identity":
                    nn.init.eye_(block)
                else:
                    nn.init.orthogonal_(block)


class SequenceClassifier(nn.Module):
    def __init__(
        self,
        cell: str = "lstm",
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        hidden_size: int = 128,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        seq_mode: str = "row",
        nonlinearity: str = "tanh",
        init: str = "default",
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise UserError(f"model.cell must be one of {', '.join(CELLS)}, got '{cell}'.")
        if seq_mode not in SEQ_MODES:
            raise UserError(f"data.seq_mode must be row or pixel, got '{seq_mode}'.")
        self.seq_mode = seq_mode
        features = in_channels * image_size if seq_mode == "row" else in_channels
        extra = {"nonlinearity": nonlinearity} if cell == "rnn" else {}
        self.rnn = CELLS[cell](
            features,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,  # torch applies it between layers only
            **extra,
        )
        self.directions = 2 if bidirectional else 1
        self.head = nn.Linear(hidden_size * self.directions, num_classes)
        init_recurrent(self.rnn, init)

    def sequence(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, steps, features)."""
        b, c, h, w = x.shape
        if self.seq_mode == "row":
            return x.permute(0, 2, 1, 3).reshape(b, h, c * w)
        return x.reshape(b, c, h * w).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        _, hidden = self.rnn(self.sequence(x))
        h_n = hidden[0] if isinstance(hidden, tuple) else hidden  # the LSTM also returns c_n
        last = h_n[-self.directions :]  # the last layer's final state, each direction
        return self.head(last.transpose(0, 1).flatten(1))


def rnn(**kwargs: object) -> SequenceClassifier:
    return SequenceClassifier(cell="rnn", **kwargs)  # type: ignore[arg-type]


def lstm(**kwargs: object) -> SequenceClassifier:
    return SequenceClassifier(cell="lstm", **kwargs)  # type: ignore[arg-type]


def gru(**kwargs: object) -> SequenceClassifier:
    return SequenceClassifier(cell="gru", **kwargs)  # type: ignore[arg-type]
