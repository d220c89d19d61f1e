"""The loop is built from parts the trainer holds, not mixins it inherits: every task trainer's
MRO is (task, Trainer, object), or (task, ClassificationTrainer, Trainer, object) for the two
that extend classification; trainers get typed arguments, never the run config; k-NN, which has
nothing to optimise, runs through the same loop (hooks, checkpoint, resume) without its own fit."""

import json
from pathlib import Path
from typing import Any

import yaml
from hydra.utils import get_class

from dlrun.cli import CONFIG_DIR, build_trainer, run
from dlrun.engine.hooks import Hook
from dlrun.engine.loop import Trainer
from dlrun.tasks.classification.knn_trainer import KNNTrainer
from dlrun.tasks.classification.trainer import ClassificationTrainer

TRAINER_CONFIGS = sorted((Path(CONFIG_DIR) / "trainer").glob("*.yaml"))
EXTENDS_CLASSIFICATION = {"DistillTrainer", "KNNTrainer"}


def test_every_trainer_config_is_a_task_directly_on_the_one_trainer() -> None:
    assert len(TRAINER_CONFIGS) >= 9
    for path in TRAINER_CONFIGS:
        cls = get_class(yaml.safe_load(path.read_text())["_target_"])
        if cls.__name__ in EXTENDS_CLASSIFICATION:
            assert cls.__mro__ == (cls, ClassificationTrainer, Trainer, object), path.name
        else:
            assert cls.__mro__ == (cls, Trainer, object), path.name


def test_a_trainer_holds_no_run_config_and_reads_its_mode_and_seed_as_arguments(
    make_cfg, tmp_path: Path
) -> None:
    trainer = build_trainer(make_cfg("model=lenet", "seed=3"), tmp_path)
    assert not hasattr(trainer, "config") and not hasattr(trainer, "run_config")
    assert (trainer.mode, trainer.seed, trainer.model_spec["_target_"]) == (
        "train", 3, "dlrun.models.lenet.LeNet5",
    )  # fmt: skip
    # trainer.num_threads / trainer.deterministic are trainer arguments, not popped by the CLI
    assert trainer.num_threads is None and trainer.deterministic is False
    assert trainer.folder.record["seed"] == 3  # the run folder's opaque record: all it keeps


class FitCalls(Hook):
    """Records the fit-level calls (k-NN takes no optimizer step: no step calls)."""

    calls: list[str] = []

    def on_fit_start(self, trainer: Any) -> None:
        FitCalls.calls.append("start")

    def before_step(self, trainer: Any) -> None:
        FitCalls.calls.append("step")

    def on_fit_end(self, trainer: Any) -> None:
        FitCalls.calls.append(f"end at step {trainer.step_count}, epoch {trainer.epoch}")


def test_knn_memorises_inside_the_loop_with_hooks_and_resumes(make_cfg, tmp_path: Path) -> None:
    assert "fit" not in vars(KNNTrainer) and KNNTrainer.trains_weights is False
    FitCalls.calls = []
    hook = f"+callbacks.fit_calls._target_={__name__}.FitCalls"
    metrics = run(make_cfg("model=knn", hook), tmp_path)
    assert FitCalls.calls == ["start", "end at step 0, epoch 1"]
    assert metrics["step"] == 0 and metrics["epoch"] == 1 and "train/lr" not in metrics
    assert (tmp_path / "checkpoints" / "best.pt").is_file()  # from the loop's checkpointing
    # A resumed finished run trains no further; its metrics are the run's.
    again = run(make_cfg("model=knn", hook, "resume=true"), tmp_path)
    stable = {k: v for k, v in metrics.items() if not k.startswith("time/")}
    assert {k: again[k] for k in stable} == stable
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["val/acc"] == metrics["val/acc"]
