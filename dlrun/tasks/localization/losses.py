"""`loss=localization` and `loss=landmarks`: the notes' squared errors on one object's description.

Each is per canvas, summed over its terms and averaged over the batch; `task` names the data kind
it is for (the trainer refuses a loss of the other task).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from dlrun.errors import UserError

CLASS_LOSSES = ("squared", "cross_entropy")


class LocalizationLoss:
    """The notes' loss of y = (Pc, bx, by, bh, bw, c1..cK) against the net's 5 + K outputs.

    class_loss=squared (the notes'): a canvas with a digit costs (Pc^ - 1)^2 + the squared error
    of the 4 box numbers + that of the K class outputs against the one-hot class; a canvas
    without one costs (Pc^ - 0)^2 only. Pc^ is the raw output, read as present above 0.5.
    class_loss=cross_entropy (the notes' alternative): Pc^ is a logit with a logistic loss
    (present above sigmoid 0.5), the classes a softmax cross-entropy; the box stays squared.
    """

    task = "localization"

    def __init__(
        self, name: str = "localization", class_loss: str = "squared", box_weight: float = 1.0
    ) -> None:
        if class_loss not in CLASS_LOSSES:
            raise UserError(
                f"loss.class_loss must be squared or cross_entropy, got '{class_loss}'."
            )
        if box_weight <= 0:
            raise UserError(f"loss.box_weight must be > 0, got {box_weight}.")
        self.name, self.class_loss, self.box_weight = name, class_loss, float(box_weight)

    def presence(self, out: Tensor) -> Tensor:
        """(B,) Pc as the metrics read it: above 0.5 is "a digit is there"."""
        pc = out[:, 0].float()
        return pc if self.class_loss == "squared" else torch.sigmoid(pc)

    def __call__(self, out: Tensor, present: Tensor, box: Tensor, label: Tensor) -> Tensor:
        """`out` (B, 5 + K); the truth: `present` (B,), `box` (B, 4) relative (bx, by, bh, bw),
        `label` (B,) (any value where absent: never read there)."""
        out, p = out.float(), present.float()
        k = out.shape[1] - 5
        safe = torch.where(present.bool(), label, torch.zeros_like(label))
        box_term = self.box_weight * ((out[:, 1:5] - box) ** 2).sum(1)
        if self.class_loss == "squared":
            pc_term = (out[:, 0] - p) ** 2
            class_term = ((out[:, 5:] - F.one_hot(safe, k).float()) ** 2).sum(1)
        else:
            pc_term = F.binary_cross_entropy_with_logits(out[:, 0], p, reduction="none")
            class_term = F.cross_entropy(out[:, 5:], safe, reduction="none")
        return (pc_term + p * (box_term + class_term)).mean()


class LandmarkLoss:
    """The squared error of the 10 landmark outputs against (x, y) of the five landmarks divided
    by the canvas's width and height, summed per canvas."""

    task = "landmarks"

    def __init__(self, name: str = "landmarks") -> None:
        self.name = name

    def __call__(self, out: Tensor, landmarks: Tensor) -> Tensor:
        """`out` (B, 10); `landmarks` (B, 5, 2) relative to the canvas."""
        return ((out.float() - landmarks.flatten(1)) ** 2).sum(1).mean()
