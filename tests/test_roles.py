"""Networks by role: a frozen role (a teacher) stays in eval mode, out of optimizers and checkpoints."""

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlrun.cli import build_trainer, run
from dlrun.tasks.classification.trainer import ClassificationTrainer


class WithTeacher(ClassificationTrainer):
    """A classifier beside a frozen network that it calls in every step (as distillation will)."""

    frozen_roles = frozenset({"teacher"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.teacher = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(784), nn.Linear(784, 10))
        self.teacher_modes: list[bool] = []

    def roles(self) -> dict[str, nn.Module]:
        return {"model": self.model, "teacher": self.teacher}

    def step(self, batch: dict) -> dict:
        self.teacher_modes.append(self.teacher.training)
        with torch.no_grad():
            self.net("teacher")(batch["image"])  # BatchNorm in eval mode: statistics unchanged
        return super().step(batch)


def test_a_frozen_role_is_not_trained_moved_or_saved(make_cfg, tmp_path: Path) -> None:
    target = f"trainer._target_={__name__}.WithTeacher"
    cfg = make_cfg("model=linear", target, "trainer.max_steps=3", "data.batch_size=50")
    trainer = build_trainer(cfg, tmp_path / "a")
    before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    assert list(trainer.optimizers) == ["model"] and trainer.params == 7850  # the linear model only
    trainer.run_mode("train", ckpt=None, resume=False, options={}, commit=lambda: None)
    assert trainer.teacher_modes == [False, False, False]
    after = trainer.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    state = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    assert set(state["model"]) == {"head.weight", "head.bias"}  # no teacher tensors
    assert run(make_cfg("model=linear", target, "trainer.max_steps=1"), tmp_path / "b")["step"] == 1
