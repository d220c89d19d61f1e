import math

import pytest
import torch

from dlrun.engine import sched


def lrs(build, steps: int, lr: float = 1.0, **kwargs) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    s = build(opt, total_steps=steps, steps_per_epoch=10, **kwargs)
    out = []
    for i in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if i + 1 < steps:  # as the trainer does: no scheduler step after the last batch
            s.step()
    return out


def test_constant_with_linear_warmup() -> None:
    out = lrs(sched.constant, 40, warmup_epochs=1)
    assert out[0] == pytest.approx(0.01)
    assert out[5] == pytest.approx(0.01 + 0.99 * 5 / 10)
    assert out[10:] == pytest.approx([1.0] * 30)


def test_cosine_decays_to_min_lr() -> None:
    out = lrs(sched.cosine, 100, min_lr=0.1)
    assert out[0] == pytest.approx(1.0)
    assert out[50] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 50 / 99)) / 2, abs=1e-9)
    assert out[-1] == pytest.approx(0.1, abs=1e-9)  # the last step, not one step short of it
    warm = lrs(sched.cosine, 100, min_lr=0.1, warmup_epochs=1)  # 10 warmup steps
    assert warm[10] == pytest.approx(1.0) and warm[-1] == pytest.approx(0.1, abs=1e-9)


def test_step_decays_every_step_epochs() -> None:
    out = lrs(sched.step, 30, step_epochs=1, gamma=0.5)
    assert out[9] == 1.0 and out[10] == 0.5 and out[20] == 0.25


def test_onecycle_peaks_at_the_optimizer_lr() -> None:
    out = lrs(sched.onecycle, 100, lr=0.5, pct_start=0.25)
    assert max(out) == pytest.approx(0.5)
    assert out.index(max(out)) in (24, 25)
    assert out[0] == pytest.approx(0.5 / 25)
    assert out[-1] < 1e-3


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5])
def test_onecycle_survives_very_short_runs(steps: int) -> None:
    assert len(lrs(sched.onecycle, steps)) == steps


def test_no_schedule_means_no_per_step_scheduler() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert sched.constant(opt, total_steps=10, steps_per_epoch=5) is None
