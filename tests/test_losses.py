import math

import pytest
import torch

from dlrun.tasks.classification.losses import (
    Objective,
    cross_entropy,
    multiclass_hinge,
    weight_penalty,
)


def test_cross_entropy_of_uniform_scores_is_log_k() -> None:
    assert cross_entropy(torch.zeros(4, 10), torch.arange(4)).item() == pytest.approx(math.log(10))


def test_cross_entropy_label_smoothing_known_answer() -> None:
    # Two classes, scores (2, 0), true class 0, eps = 0.1 spread over K = 2 classes: targets
    # (1 - eps + eps/K, eps/K) = (0.95, 0.05). -log softmax = (log(1 + e^-2), 2 + log(1 + e^-2))
    # = (0.126928011, 2.126928011), so the loss is 0.95 * 0.126928011 + 0.05 * 2.126928011
    # = log(1 + e^-2) + 0.1 = 0.226928011 (without smoothing: 0.126928011).
    logits, target = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    assert cross_entropy(logits, target, label_smoothing=0.1).item() == pytest.approx(
        0.226928011, abs=1e-6
    )
    assert cross_entropy(logits, target).item() == pytest.approx(0.126928011, abs=1e-6)


def test_hinge_matches_the_notes_worked_example() -> None:
    # The classic three-image example: losses 2.9, 0 and 12.9, mean 5.27.
    scores = torch.tensor([[3.2, 5.1, -1.7], [1.3, 4.9, 2.0], [2.2, 2.5, -3.1]])
    target = torch.tensor([0, 1, 2])
    assert multiclass_hinge(scores, target).item() == pytest.approx((2.9 + 0 + 12.9) / 3, abs=1e-5)


def test_weight_penalty_skips_biases() -> None:
    w, b = torch.tensor([[1.0, -2.0]]), torch.tensor([5.0])
    assert weight_penalty([w, b], l1=0.5, l2=0.25) == pytest.approx(0.5 * 3 + 0.25 * 5)
    assert weight_penalty([w, b]) == 0.0


def test_objective_resolves_the_loss_by_import_path() -> None:
    obj = Objective("dlrun.tasks.classification.losses.multiclass_hinge", l2=1.0, margin=1.0)
    model = torch.nn.Linear(2, 3, bias=False)
    torch.nn.init.ones_(model.weight)
    assert obj.name == "multiclass_hinge"
    assert obj.penalty(model).item() == pytest.approx(6.0)
