"""Classification losses as pure functions, plus the weight-penalty objective that combines them."""

from collections.abc import Callable, Iterable

import torch.nn.functional as F
from hydra.utils import get_method
from torch import Tensor, nn

from dlrun.errors import UserError


def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Softmax cross-entropy, mean over the batch: -log softmax(s)_y.

    target: int64 class indices (B,), or class probabilities (B, K) float (data.mixup /
    data.cutmix's soft targets): -sum_k p_k log softmax(s)_k; label smoothing applies to both.
    """
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def multiclass_hinge(logits: Tensor, target: Tensor, margin: float = 1.0) -> Tensor:
    """The notes' multiclass SVM loss: sum_{j != y} max(0, s_j - s_y + margin), mean over the batch."""
    if target.is_floating_point():  # a dtype check: no device sync
        raise UserError(
            "loss=hinge scores one correct class per image, but data.mixup / data.cutmix give "
            "each image a mixture of two classes (soft targets). Use loss=cross_entropy with "
            "them, or set data.mixup=0 data.cutmix=0 to keep loss=hinge."
        )
    correct = logits.gather(1, target[:, None])  # (B, 1)
    margins = (logits - correct + margin).clamp_min(0)
    # The j == y term is exactly `margin`; remove it rather than masking (no extra kernel).
    return (margins.sum(1) - margin).mean()


def weight_penalty(params: Iterable[Tensor], l1: float = 0.0, l2: float = 0.0) -> Tensor | float:
    """l1 * sum|w| + l2 * sum w^2 over weight tensors (biases and norm scales are not penalised)."""
    if not l1 and not l2:
        return 0.0
    total: Tensor | float = 0.0
    for p in params:
        if p.ndim < 2:
            continue
        if l1:
            total = total + l1 * p.abs().sum()
        if l2:
            total = total + l2 * p.pow(2).sum()
    return total


class Objective:
    """A data loss (named by import path) plus an optional L1/L2 weight penalty."""

    def __init__(self, fn: str, l1: float = 0.0, l2: float = 0.0, **kwargs: float) -> None:
        self.fn: Callable[..., Tensor] = get_method(fn)
        self.name = fn.rsplit(".", 1)[-1]
        self.kwargs = kwargs
        self.l1, self.l2 = l1, l2

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.fn(logits, target, **self.kwargs)

    def penalty(self, model: nn.Module) -> Tensor | float:
        return weight_penalty(model.parameters(), self.l1, self.l2)
