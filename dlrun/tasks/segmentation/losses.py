"""Losses of dense prediction as pure functions (known answers: tests/test_segmentation.py)."""

import torch.nn.functional as F
from torch import Tensor

from dlrun.errors import UserError


def pixel_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean per-pixel cross-entropy of (B, K, H, W) logits against (B, H, W) class indices."""
    return F.cross_entropy(logits, target)


def dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """1 - mean over classes of the soft Dice 2|P.T| / (|P| + |T|), P the softmax, T one-hot.

    `eps` smooths classes absent from both prediction and target (their Dice is then 1).
    """
    k = logits.shape[1]
    p = logits.float().softmax(1)
    t = F.one_hot(target, k).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    dice = (2 * (p * t).sum(dims) + eps) / (p.sum(dims) + t.sum(dims) + eps)
    return 1 - dice.mean()


class SegObjective:
    """`ce_weight` x pixel cross-entropy + `dice_weight` x Dice loss (configs/loss/seg_*.yaml)."""

    def __init__(self, name: str, ce_weight: float = 1.0, dice_weight: float = 0.0) -> None:
        if ce_weight < 0 or dice_weight < 0 or ce_weight + dice_weight == 0:
            raise UserError(
                "loss.ce_weight and loss.dice_weight must be >= 0, and not both 0, got "
                f"{ce_weight} and {dice_weight}."
            )
        self.name, self.ce_weight, self.dice_weight = name, ce_weight, dice_weight

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        loss = logits.new_zeros(())
        if self.ce_weight:
            loss = loss + self.ce_weight * pixel_cross_entropy(logits.float(), target)
        if self.dice_weight:
            loss = loss + self.dice_weight * dice_loss(logits, target)
        return loss
