"""Known answers of the metric-learning and distillation losses (dlrun/tasks/metric_learning/losses.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from dlrun.tasks.distill.losses import distillation_loss
from dlrun.tasks.metric_learning.losses import (
    MetricObjective,
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    contrastive_loss,
    pairwise_distances,
    triplet_loss,
)


def test_pairwise_distances_are_euclidean() -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    d = pairwise_distances(x)
    assert d[0, 1].item() == pytest.approx(5.0)
    assert d[1, 2].item() == pytest.approx(math.sqrt(9 + 9))
    assert d.diagonal().max().item() < 1e-5
    assert torch.allclose(d, d.T)


def test_contrastive_loss_pulls_pairs_of_a_class_and_pushes_others_past_the_margin() -> None:
    a = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[3.0, 4.0], [0.3, 0.4], [3.0, 4.0]])
    same = torch.tensor([1, 0, 0])
    # d = 5, 0.5, 5: same pair d^2 = 25; different at 0.5 < margin 2: (2 - 0.5)^2; beyond: 0
    expected = (25 + 1.5**2 + 0) / 3
    assert contrastive_loss(a, b, same, margin=2.0).item() == pytest.approx(expected, rel=1e-5)


def test_triplet_loss_is_zero_when_the_margin_is_met() -> None:
    anchor, positive = torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    negative = torch.tensor([[3.0, 0.0], [1.5, 0.0]])
    # d(A,P) = 1; d(A,N) = 3 (met with margin 1: 0) and 1.5 (1 - 1.5 + 1 = 0.5)
    assert triplet_loss(anchor, positive, negative, margin=1.0).item() == pytest.approx(0.25)
    assert triplet_loss(anchor[:1], positive[:1], negative[:1]).item() == 0.0


def test_batch_hard_picks_the_farthest_positive_and_the_nearest_negative() -> None:
    # On a line: class 0 at 0, 1 and 4; class 1 at 5 and 9.
    x = torch.tensor([[0.0], [1.0], [4.0], [5.0], [9.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    margin = 0.5
    # anchor 0: hardest pos 4, nearest neg 5 -> 4 - 5 + .5 = 0 (clamped: -0.5 -> 0)
    # anchor 1: hardest pos 3, nearest neg 4 -> 3 - 4 + .5 -> 0
    # anchor 4: hardest pos 4 (to 0), nearest neg 1 -> 4 - 1 + .5 = 3.5
    # anchor 5: hardest pos 4, nearest neg 1 (to 4) -> 4 - 1 + .5 = 3.5
    # anchor 9: hardest pos 4, nearest neg 5 (to 4) -> 4 - 5 + .5 -> 0
    expected = (0 + 0 + 3.5 + 3.5 + 0) / 5
    loss = batch_hard_triplet_loss(x, labels, margin=margin)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_batch_hard_ignores_anchors_without_a_positive() -> None:
    x = torch.tensor([[0.0], [1.0], [2.0]])
    labels = torch.tensor([0, 0, 1])  # the class-1 anchor has no positive
    # anchors 0 and 1: hardest pos 1, nearest neg 2 and 1 -> 1 - 2 + 1 = 0, 1 - 1 + 1 = 1
    assert batch_hard_triplet_loss(x, labels, margin=1.0).item() == pytest.approx(0.5, rel=1e-5)


def test_batch_all_averages_the_active_triplets_and_counts_them() -> None:
    x = torch.tensor([[0.0], [1.0], [10.0]])
    labels = torch.tensor([0, 0, 1])
    # valid triplets: (0,1,2): 1 - 10 + 1 < 0; (1,0,2): 1 - 9 + 1 < 0 -> none active
    loss, frac = batch_all_triplet_loss(x, labels, margin=1.0)
    assert loss.item() == 0.0 and frac.item() == 0.0
    x = torch.tensor([[0.0], [1.0], [1.5]])
    # (0,1,2): 1 - 1.5 + 1 = 0.5; (1,0,2): 1 - 0.5 + 1 = 1.5: both active
    loss, frac = batch_all_triplet_loss(x, labels, margin=1.0)
    assert loss.item() == pytest.approx(1.0, rel=1e-5) and frac.item() == 1.0


class LinearNet:
    """An Embedder (losses.Embedder) of known maps: a fixed linear embedding, an L1 head."""

    def __init__(self) -> None:
        self.w = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))

    def embed_one(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w

    def embed_pair(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed_one(a), self.embed_one(b)

    def same_logit(self, ea: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
        return 1 - (ea - eb).abs().sum(1)


class Loaders:
    def pair_loader(self) -> str:
        return "pairs"

    def pk_loader(self) -> str:
        return "pk"


def test_each_objective_names_its_batches_and_computes_its_loss_from_their_embeddings() -> None:
    g = torch.Generator().manual_seed(0)
    x, xb = torch.randn(6, 1, 2, 2, generator=g), torch.randn(6, 1, 2, 2, generator=g)
    y, yb = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 1, 0, 2, 0])
    batch = {"image": x, "label": y, "image_b": xb, "label_b": yb}
    net = LinearNet()
    ea, eb, e = net.embed_one(x), net.embed_one(xb), net.embed_one(x)
    same, d = y == yb, (net.embed_one(x) - net.embed_one(xb)).norm(dim=1)

    contrastive = MetricObjective("contrastive", margin=0.7)
    assert contrastive.batches == "pairs" and contrastive.loader(Loaders()) == "pairs"
    loss, logged = contrastive(batch, net)
    assert torch.equal(loss, contrastive_loss(ea, eb, same, 0.7))
    assert set(logged) == {"dist_pos", "dist_neg"} and int(logged["dist_pos"][1]) == 3
    assert torch.allclose(logged["dist_pos"][0], d[same].sum())
    assert torch.allclose(logged["dist_neg"][0], d[~same].sum())

    bce = MetricObjective("pair_bce", margin=0.0)
    assert bce.trains_head and not contrastive.trains_head and bce.batches == "pairs"
    loss, logged = bce(batch, net)
    logit = net.same_logit(ea, eb)
    assert torch.equal(loss, F.binary_cross_entropy_with_logits(logit, same.float()))
    assert int(logged["acc"][0]) == int(((logit > 0) == same).sum()) and logged["acc"][1] == 6

    hard = MetricObjective("triplet", margin=0.5)
    assert hard.batches == "pk" and hard.loader(Loaders()) == "pk"
    loss, logged = hard(batch, net)
    assert torch.equal(loss, batch_hard_triplet_loss(e, y, 0.5)) and logged == {}

    every = MetricObjective("triplet", margin=0.5, mining="batch_all")
    loss, logged = every(batch, net)
    expect, active = batch_all_triplet_loss(e, y, 0.5)
    assert torch.equal(loss, expect) and torch.equal(logged["active_triplets"][0], active)


def test_distillation_is_cross_entropy_at_alpha_0_and_minimal_at_the_teachers_logits() -> None:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(8, 10, generator=g)
    teacher = torch.randn(8, 10, generator=g)
    labels = torch.randint(0, 10, (8,), generator=g)
    ce = F.cross_entropy(student, labels)
    assert distillation_loss(student, teacher, labels, alpha=0.0).item() == pytest.approx(ce.item())
    # alpha = 1: the soft term alone, 0 where the student's logits equal the teacher's
    assert distillation_loss(teacher, teacher, labels, alpha=1.0).item() == pytest.approx(
        0, abs=1e-6
    )
    z = teacher.clone().requires_grad_(True)
    distillation_loss(z, teacher, labels, temperature=3.0, alpha=1.0).backward()
    assert z.grad.abs().max().item() < 1e-6  # a minimum: zero gradient there
    assert distillation_loss(student, teacher, labels, alpha=1.0).item() > 0.01


def test_distillation_soft_term_is_t_squared_kl() -> None:
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    temp = 2.0
    p_t = torch.softmax(t / temp, 1)
    p_s = torch.softmax(s / temp, 1)
    kl = (p_t * (p_t.log() - p_s.log())).sum()
    got = distillation_loss(s, t, torch.tensor([0]), temperature=temp, alpha=1.0)
    assert got.item() == pytest.approx(temp**2 * kl.item(), rel=1e-5)
