"""Losses of metric learning (Siamese / triplet networks).

Pure functions of embeddings, labels and pair targets, so each has known answers (tests/test_metric_losses.py).
Distances are Euclidean, as the notes' face-verification chapter writes them: d(a, b) = ||a - b||.
"""

import torch
from torch import Tensor

from dlrun.errors import UserError

EPS = 1e-12  # inside the square root: the gradient of ||x|| at x = 0 would be NaN


def pairwise_distances(x: Tensor, y: Tensor | None = None) -> Tensor:
    """(N, D) and (M, D) -> (N, M) Euclidean distances (x with itself when y is None).

    Exact differences rather than the |x|^2 - 2xy + |y|^2 expansion, whose cancellation leaves
    spurious small distances between equal embeddings: batches here are small (P x K).
    """
    y = x if y is None else y
    return ((x[:, None, :] - y[None, :, :]).pow(2).sum(-1) + EPS).sqrt()


def contrastive_loss(a: Tensor, b: Tensor, same: Tensor, margin: float = 1.0) -> Tensor:
    """Hadsell et al. (2006): mean of y d^2 + (1 - y) max(margin - d, 0)^2 over the pairs.

    `same` is 1 for a pair of one class (pulled together), 0 otherwise (pushed beyond margin).
    """
    d = ((a - b).pow(2).sum(-1) + EPS).sqrt()
    y = same.to(d.dtype)
    return (y * d.pow(2) + (1 - y) * (margin - d).clamp_min(0).pow(2)).mean()


def triplet_loss(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float = 1.0) -> Tensor:
    """The notes' triplet loss, mean of max(d(A, P) - d(A, N) + margin, 0) over the triplets."""
    d_ap = ((anchor - positive).pow(2).sum(-1) + EPS).sqrt()
    d_an = ((anchor - negative).pow(2).sum(-1) + EPS).sqrt()
    return (d_ap - d_an + margin).clamp_min(0).mean()


def _masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(positive, negative) masks of a batch: same label and not the item itself; other label."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def batch_all_triplet_loss(
    embeddings: Tensor, labels: Tensor, margin: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Every valid (anchor, positive, negative) of the batch: the mean loss over the triplets
    that violate the margin (loss > 0), and the share of valid triplets that do.

    Averaging over the active triplets only keeps the gradient from vanishing as most triplets
    become easy (Hermans et al. 2017); no valid or no active triplet gives a loss of 0.
    """
    d = pairwise_distances(embeddings)
    pos, neg = _masks(labels)
    valid = pos[:, :, None] & neg[:, None, :]  # [a, p, n]
    losses = (d[:, :, None] - d[:, None, :] + margin).clamp_min(0) * valid
    active = (losses > 1e-16).sum()
    loss = losses.sum() / active.clamp_min(1)
    fraction = active.float() / valid.sum().clamp_min(1)
    return loss, fraction


def batch_hard_triplet_loss(embeddings: Tensor, labels: Tensor, margin: float = 1.0) -> Tensor:
    """Batch-hard mining (Hermans et al. 2017): for each anchor the farthest positive and the
    nearest negative of the batch; the mean over anchors that have both."""
    d = pairwise_distances(embeddings)
    pos, neg = _masks(labels)
    hardest_pos = (d * pos).amax(1)
    # The nearest negative: non-negatives pushed past every distance before the min.
    hardest_neg = torch.where(neg, d, d.amax() + 1).amin(1)
    has_both = pos.any(1) & neg.any(1)
    losses = (hardest_pos - hardest_neg + margin).clamp_min(0)
    return (losses * has_both).sum() / has_both.sum().clamp_min(1)


PAIR_LOSSES, TRIPLET_MINING = ("contrastive", "pair_bce"), ("batch_hard", "batch_all")


class MetricObjective:
    """The loss of a Siamese / triplet run (configs/loss/{contrastive,triplet,pair_bce}.yaml).

    `sampling` tells the trainer which batches it needs: "pairs" for the pair losses, "pk"
    (P classes x K images) for triplet mining inside the batch.
    """

    def __init__(self, name: str, margin: float = 1.0, mining: str = "batch_hard") -> None:
        if name not in (*PAIR_LOSSES, "triplet"):
            raise UserError(f"loss.name must be contrastive, triplet or pair_bce, got '{name}'.")
        if mining not in TRIPLET_MINING:
            raise UserError(f"loss.mining must be batch_hard or batch_all, got '{mining}'.")
        if margin <= 0 and name != "pair_bce":
            raise UserError(f"loss.margin must be positive, got {margin}.")
        self.name, self.margin, self.mining = name, float(margin), mining
        self.sampling = "pairs" if name in PAIR_LOSSES else "pk"
