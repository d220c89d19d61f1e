"""Losses of metric learning (Siamese / triplet networks).

Pure functions of embeddings, labels and pair targets, so each has known answers (tests/test_metric_losses.py).
Distances are Euclidean, as the notes' face-verification chapter writes them: d(a, b) = ||a - b||.
"""

from collections.abc import Mapping
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
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
Batches = Literal["pairs", "pk"]
Logged = dict[str, tuple[Tensor, Tensor | int]]  # name -> (sum, count), as a trainer's step logs


class Embedder(Protocol):
    """The network as a metric-learning objective sees it (MetricTrainer is one): embeddings of
    normalised training images, float (B, D)."""

    def embed_one(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, D): the first (shared) branch."""
        ...

    def embed_pair(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Both sides of B pairs: (B, D) each, by the branch of each side."""
        ...

    def same_logit(self, ea: Tensor, eb: Tensor) -> Tensor:
        """(B,) the Siamese head's logit of "same class" for each pair."""
        ...


class PairSource(Protocol):
    """What an objective takes its batches from (dlrun.data.pairs.PairBatches)."""

    def pair_loader(self) -> Any: ...

    def pk_loader(self) -> Any: ...


class MetricObjective:
    """The loss of a Siamese / triplet run (configs/loss/{contrastive,triplet,pair_bce}.yaml).

    `batches` says which training batches it needs ("pairs" for the pair losses, "pk": P classes
    x K images, for triplet mining inside the batch) and `loader` takes them from the data's
    pairs; called with such a batch and the network, it embeds the batch and returns its loss.
    """

    def __init__(self, name: str, margin: float = 1.0, mining: str = "batch_hard") -> None:
        if name not in (*PAIR_LOSSES, "triplet"):
            raise UserError(f"loss.name must be contrastive, triplet or pair_bce, got '{name}'.")
        if mining not in TRIPLET_MINING:
            raise UserError(f"loss.mining must be batch_hard or batch_all, got '{mining}'.")
        if margin <= 0 and name != "pair_bce":
            raise UserError(f"loss.margin must be positive, got {margin}.")
        self.name, self.margin, self.mining = name, float(margin), mining
        self.batches: Batches = "pairs" if name in PAIR_LOSSES else "pk"
        self.trains_head = name == "pair_bce"  # the Siamese head's logit, against "same class"
        pair_terms = {"contrastive": self._contrastive, "pair_bce": self._pair_bce}
        self._terms = pair_terms.get(name)
        self._triplets = self._batch_hard if mining == "batch_hard" else self._batch_all

    def loader(self, pairs: PairSource) -> Any:
        """This loss's training batches, from the data's pairs (its "pairs" capability)."""
        return pairs.pk_loader() if self.batches == "pk" else pairs.pair_loader()

    def __call__(self, batch: Mapping[str, Tensor], net: Embedder) -> tuple[Tensor, Logged]:
        """The loss of one training batch of `loader`'s, and the figures logged beside it."""
        if self._terms is None:  # P x K: the triplets mined inside the batch
            return self._triplets(net.embed_one(batch["image"]), batch["label"])
        same = batch["label"] == batch["label_b"]
        ea, eb = net.embed_pair(batch["image"], batch["image_b"])
        d = (ea - eb).pow(2).sum(1).add(1e-12).sqrt().detach()
        logged: Logged = {
            "dist_pos": ((d * same).sum(), same.sum()),
            "dist_neg": ((d * ~same).sum(), (~same).sum()),
        }
        loss, extra = self._terms(ea, eb, same, net)
        return loss, logged | extra

    def _contrastive(
        self, ea: Tensor, eb: Tensor, same: Tensor, net: Embedder
    ) -> tuple[Tensor, Logged]:
        return contrastive_loss(ea, eb, same, self.margin), {}

    def _pair_bce(
        self, ea: Tensor, eb: Tensor, same: Tensor, net: Embedder
    ) -> tuple[Tensor, Logged]:
        logit = net.same_logit(ea, eb).float()
        loss = F.binary_cross_entropy_with_logits(logit, same.float())
        return loss, {"acc": (((logit > 0) == same).sum(), len(same))}

    def _batch_hard(self, e: Tensor, labels: Tensor) -> tuple[Tensor, Logged]:
        return batch_hard_triplet_loss(e, labels, self.margin), {}

    def _batch_all(self, e: Tensor, labels: Tensor) -> tuple[Tensor, Logged]:
        loss, active = batch_all_triplet_loss(e, labels, self.margin)
        return loss, {"active_triplets": (active.detach(), 1)}
