"""Knowledge distillation (trainer=distill): a frozen teacher, an ordinary student, clear refusals.

The loss itself has known-answer tests in tests/test_metric_losses.py.
"""

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dlrun.cli import CONFIG_DIR, build_trainer, run
from dlrun.engine import checkpoint
from dlrun.errors import UserError
from tests.test_monitor import scalars

pytestmark = pytest.mark.usefixtures("one_thread")
TEACHER_PARAMS = 784 * 10 + 10  # model=linear on 28x28x1


@pytest.fixture(scope="module")
def teacher(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A dlrun classifier checkpoint (a linear model, two steps on the fake MNIST): any will do."""
    folder = tmp_path_factory.mktemp("teacher")
    overrides = [f"data.root={data_root}", "device=cpu", "trainer.progress=false"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "model=linear", "trainer.max_steps=2"])
    run(cfg, folder)
    yield folder / "checkpoints" / "last.pt"


def distill(make_cfg: Callable[..., DictConfig], teacher: Path, *overrides: str) -> DictConfig:
    return make_cfg("experiment=distill_mnist", f"teacher.ckpt={teacher}", *overrides)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_the_teacher_is_frozen_sees_the_students_batches_and_stays_out_of_its_checkpoint(
    make_cfg: Callable[..., DictConfig], teacher: Path, tmp_path: Path
) -> None:
    cfg = distill(make_cfg, teacher, "trainer.max_steps=3", "data.batch_size=50")
    trainer = build_trainer(cfg, tmp_path)
    before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    calls: list[tuple[bool, bool, torch.Tensor]] = []
    trainer.teacher.register_forward_hook(
        lambda m, args, _out: calls.append((m.training, torch.is_grad_enabled(), args[0]))
    )
    steps: list[tuple[torch.Tensor, list[Any]]] = []
    task_step = trainer.step

    def step(batch: dict[str, torch.Tensor]) -> Any:
        first = len(calls)
        out = task_step(batch)
        steps.append((batch["image"], calls[first:]))
        return out

    trainer.step = step  # type: ignore[method-assign]
    metrics = trainer.run_mode("train", ckpt=None, resume=False, options={}, commit=lambda: None)

    assert len(steps) == 3
    for image, teacher_calls in steps:  # one teacher forward a step, eval mode, no graph
        assert [(training, grad) for training, grad, _ in teacher_calls] == [(False, False)]
        assert torch.equal(teacher_calls[0][2], image)  # the very batch the student sees
    after = trainer.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad and p.grad is None for p in trainer.teacher.parameters())
    assert list(trainer.optimizers) == ["model"]
    student = checkpoint.unwrap(trainer.model).state_dict()
    saved = weights(tmp_path)
    assert set(saved) == set(student)  # no teacher tensors beside the student's
    assert all(saved[k].shape == student[k].shape for k in saved)

    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == pytest.approx(metrics)
    # the teacher's own test accuracy, as mode=eval of its checkpoint scores it
    scored = run(make_cfg("model=linear", "mode=eval", f"ckpt={teacher}"), tmp_path / "teacher")
    assert metrics["teacher/test_acc"] == scored["test/acc"]
    assert metrics["teacher/params"] == TEACHER_PARAMS
    assert metrics["student/params"] == metrics["params"] == 784 * 32 + 32 + 32 * 10 + 10
    logged = scalars(tmp_path)
    for tag in ("teacher/test_acc", "teacher/params", "student/params"):
        assert logged[tag] == [(0, pytest.approx(metrics[tag]))]


def test_the_student_checkpoint_is_an_ordinary_classifier_checkpoint(
    make_cfg: Callable[..., DictConfig], teacher: Path, tmp_path: Path
) -> None:
    student = run(distill(make_cfg, teacher, "trainer.max_steps=2"), tmp_path / "s")
    ckpt = tmp_path / "s" / "checkpoints" / "last.pt"
    plain = make_cfg("model=mlp", "model.hidden=[32]", "mode=eval", f"ckpt={ckpt}")
    assert run(plain, tmp_path / "eval")["test/acc"] == student["val/acc"]  # val is the test split
    # mode=eval under the distillation config: the teacher is optional, reported when given.
    alone = run(make_cfg("experiment=distill_mnist", "mode=eval", f"ckpt={ckpt}"), tmp_path / "e1")
    assert alone["test/acc"] == student["val/acc"] and "teacher/test_acc" not in alone
    both = run(distill(make_cfg, teacher, "mode=eval", f"ckpt={ckpt}"), tmp_path / "e2")
    assert both["teacher/test_acc"] == student["teacher/test_acc"]
    # ... and it teaches the next student (trainer=distill, any model: a linear one here).
    cfg = make_cfg("trainer=distill", "model=linear", f"teacher.ckpt={ckpt}", "trainer.max_steps=1")
    second = run(cfg, tmp_path / "s2")
    assert second["teacher/test_acc"] == student["val/acc"]
    assert second["teacher/params"] == student["student/params"]
    assert second["student/params"] == TEACHER_PARAMS


@pytest.mark.parametrize("mix", [[], ["data.mixup=0.4", "data.cutmix=1.0"]], ids=["plain", "mixup"])
def test_alpha_0_trains_exactly_as_the_classification_trainer_and_alpha_0_9_does_not(
    make_cfg: Callable[..., DictConfig], teacher: Path, tmp_path: Path, mix: list[str]
) -> None:
    # With mixup / cutmix the hard term must learn the mixed targets, as classification does.
    steps = ("trainer.max_steps=3", "trainer.max_epochs=5", *mix)
    # optim=adam: the recipe's optimizer (a bare model=mlp takes its own, Adam at 1e-3)
    run(make_cfg("model=mlp", "model.hidden=[32]", "optim=adam", *steps), tmp_path / "plain")
    run(distill(make_cfg, teacher, "distill.alpha=0", *steps), tmp_path / "alpha0")
    run(distill(make_cfg, teacher, *steps), tmp_path / "alpha09")
    plain, alpha0, soft = (weights(tmp_path / d) for d in ("plain", "alpha0", "alpha09"))
    assert all(torch.equal(plain[k], alpha0[k]) for k in plain)
    assert not all(torch.equal(plain[k], soft[k]) for k in plain)


def test_resume_rebuilds_the_teacher_and_ends_as_an_uninterrupted_run(
    make_cfg: Callable[..., DictConfig], teacher: Path, tmp_path: Path
) -> None:
    args = ("sched=none",)  # a schedule that does not depend on the planned length
    run(distill(make_cfg, teacher, *args, "trainer.max_epochs=1"), tmp_path / "r")
    resumed = run(
        distill(make_cfg, teacher, *args, "trainer.max_epochs=2", "resume=true"), tmp_path / "r"
    )
    whole = run(distill(make_cfg, teacher, *args, "trainer.max_epochs=2"), tmp_path / "w")
    assert resumed["step"] == whole["step"] == 4
    assert resumed["teacher/test_acc"] == whole["teacher/test_acc"]
    a, b = weights(tmp_path / "r"), weights(tmp_path / "w")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("experiment", "data"), [("distill_mnist", "mnist"), ("distill_cifar10", "cifar10")]
)
def test_each_distill_experiment_runs_two_steps_with_a_teacher_of_its_data(
    make_cfg: Callable[..., DictConfig], tmp_path: Path, experiment: str, data: str
) -> None:
    taught = run(make_cfg("model=linear", f"data={data}", "trainer.max_steps=1"), tmp_path / "t")
    ckpt = tmp_path / "t" / "checkpoints" / "last.pt"
    cfg = make_cfg(f"experiment={experiment}", f"teacher.ckpt={ckpt}", "trainer.max_steps=2")
    metrics = run(cfg, tmp_path / "s")
    assert metrics["step"] == 2
    assert metrics["teacher/test_acc"] == taught["val/acc"]  # the teacher's val is the test split
    assert metrics["teacher/params"] == taught["params"]


def edited(teacher: Path, folder: Path, key: str, value: Any) -> Path:
    """A copy of the teacher checkpoint whose recorded `key` (dotted) says `value`."""
    state = torch.load(teacher, weights_only=True)
    *parents, last = key.split(".")
    node = state["config"]
    for part in parents:
        node = node[part]
    node[last] = value
    if key == "model":  # a network that does not score images (as a GAN's): no weights to load
        state["model"] = {}
    path = folder / f"teacher_{key}.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param(["experiment=distill_mnist"], r"trainer=distill needs a teacher: pass teacher.ckpt=PATH", id="no_teacher"),
        pytest.param(["{experiment}", "teacher.ckpt={tmp}/nope.pt"], r"teacher.ckpt=.*nope.pt: there is no such file", id="no_file"),
        pytest.param(["{experiment}", "teacher.ckpt={tmp}/junk.pt"], r"could not be read as a dlrun checkpoint", id="not_a_checkpoint"),
        pytest.param(["{experiment}", "teacher.ckpt={identity}"], r"does not map an image to 10 class scores: it is not a classifier", id="not_a_classifier"),
        pytest.param(["{distill}", "data=fashion_mnist"], r"a classifier of mnist, not of fashion_mnist", id="other_data"),
        pytest.param(["{experiment}", "teacher.ckpt={size}"], r"trained on 32 px images but these are 28 px", id="other_size"),
        pytest.param(["{experiment}", "teacher.ckpt={classes}"], r"a classifier of 5 classes but data=mnist here has 10", id="other_classes"),
        pytest.param(["{distill}", "data.mean=[0.5]"], r"trained with data.mean=\[0.1307\] but this run normalises with data.mean=\[0.5\].*run with data.mean=\[0.1307\] data.std=\[0.3081\]", id="other_mean"),
        pytest.param(["{distill}", "distill.alpha=1.5"], r"distill.alpha must be a number in \[0, 1\], got 1.5", id="alpha_above_1"),
        pytest.param(["{distill}", "distill.alpha=-0.1"], r"distill.alpha must be a number in \[0, 1\], got -0.1", id="alpha_below_0"),
        pytest.param(["{distill}", "trainer.alpha=2"], r"distill.alpha must be a number in \[0, 1\]", id="trainer_alpha"),
        pytest.param(["{distill}", "distill.temperature=0"], r"distill.temperature must be a number > 0, got 0", id="temperature_0"),
        pytest.param(["{distill}", "distill.temperature=-2.0"], r"distill.temperature must be a number > 0", id="temperature_negative"),
        pytest.param(["{distill}", "trainer.temperature=0"], r"distill.temperature must be a number > 0", id="trainer_temperature"),
        pytest.param(["{distill}", "loss=hinge"], r"hard term is plain cross-entropy", id="hinge_loss"),
    ],
)  # fmt: skip
def test_each_user_mistake_is_one_line_naming_the_fix(
    make_cfg: Callable[..., DictConfig],
    teacher: Path,
    tmp_path: Path,
    overrides: list[str],
    message: str,
) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    fill = {
        "experiment": "experiment=distill_mnist",
        "distill": f"experiment=distill_mnist teacher.ckpt={teacher}",
        "tmp": str(tmp_path),
        "size": str(edited(teacher, tmp_path, "data.image_size", 32)),
        "classes": str(edited(teacher, tmp_path, "data.num_classes", 5)),
        "identity": str(edited(teacher, tmp_path, "model", {"_target_": "torch.nn.Identity"})),
    }
    args = [a for o in overrides for a in o.format(**fill).split()]
    with pytest.raises(UserError, match=message) as err:
        run(make_cfg(*args), tmp_path / "run")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written
