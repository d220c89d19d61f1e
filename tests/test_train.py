import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from dlrun.cli import CONFIG_DIR, run
from dlrun.engine import checkpoint
from dlrun.errors import UserError

QUICK = (
    "trainer.max_epochs=2",
    "data.batch_size=50",
    "trainer.log_every_n_steps=2",
    "model=lenet",
    "model.activation=relu",
)
TIMING = ("time/", "images_per_s")


def stable(metrics: dict) -> dict:
    """Everything in metrics.json but wall-clock times and throughput."""
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}


def test_train_writes_the_run_folder_contract(make_cfg, tmp_path: Path) -> None:
    metrics = run(make_cfg(*QUICK), tmp_path, {"model": "lenet", "data": "mnist"})
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for key in (
        "train/loss",
        "train/acc",
        "train/lr",
        "train/images_per_s",
        "val/loss",
        "val/acc",
        "params",
        "epoch",
        "step",
        "time/train_s",
    ):
        assert key in saved, key
    assert saved["epoch"] == 2 and saved["step"] == 8 and saved["params"] == 61706
    assert saved["val/acc"] > 0.3  # the fixture classes are separable: the loop does learn
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step", "config"} <= set(
        state
    )
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)  # no resume state
    assert {"model", "epoch", "step", "config"} <= set(best) and "optimizer" not in best
    tags = {
        v.tag
        for f in tmp_path.glob("events.out.tfevents.*")
        for e in EventFileLoader(str(f)).Load()
        for v in e.summary.value
    }
    assert {"train/loss", "val/acc", "train/lr", "train/loss_step", "train/images"} <= tags
    assert {"config/text_summary", "_hparams_/experiment", "_hparams_/session_start_info"} <= tags


def test_same_seed_same_metrics(make_cfg, tmp_path: Path) -> None:
    a = run(make_cfg(*QUICK, "data=cifar10", "data.batch_size=25"), tmp_path / "a")
    b = run(make_cfg(*QUICK, "data=cifar10", "data.batch_size=25"), tmp_path / "b")
    c = run(make_cfg(*QUICK, "data=cifar10", "data.batch_size=25", "seed=1"), tmp_path / "c")
    assert stable(a) == stable(b)
    assert stable(a) != stable(c)


class Killed(BaseException):
    pass


def test_resume_continues_to_the_same_result(make_cfg, tmp_path: Path, monkeypatch) -> None:
    whole = run(make_cfg(*QUICK, "trainer.max_epochs=3"), tmp_path / "whole")
    save = checkpoint.save

    def save_then_die(path: Path, state: dict) -> None:  # the process dies right after epoch 1
        save(path, state)
        raise Killed

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        run(make_cfg(*QUICK, "trainer.max_epochs=3"), tmp_path / "split")
    monkeypatch.setattr(checkpoint, "save", save)
    resumed = run(make_cfg(*QUICK, "trainer.max_epochs=3", "resume=true"), tmp_path / "split")
    assert stable(resumed) == stable(whole)
    assert resumed["epoch"] == 3
    with pytest.raises(UserError, match="the run planned 12 steps, this config 16"):
        run(make_cfg(*QUICK, "trainer.max_epochs=4", "resume=true"), tmp_path / "split")


def test_eval_mode_scores_a_checkpoint_on_the_test_split(make_cfg, tmp_path: Path) -> None:
    trained = run(make_cfg(*QUICK), tmp_path / "train")
    ckpt = tmp_path / "train" / "checkpoints" / "best.pt"
    metrics = run(make_cfg(*QUICK, "mode=eval", f"ckpt={ckpt}"), tmp_path / "eval")
    assert metrics["test/acc"] == pytest.approx(
        trained["val/acc"]
    )  # val is the test split by default
    assert (
        json.loads((tmp_path / "eval" / "metrics.json").read_text())["test/acc"]
        == metrics["test/acc"]
    )


def test_max_steps_and_hinge_loss_and_penalty(make_cfg, tmp_path: Path) -> None:
    metrics = run(
        make_cfg(
            "model=linear",
            "loss=hinge",
            "loss.l2=1e-4",
            "optim=sgd",
            "sched=cosine",
            "trainer.max_steps=3",
            "data.batch_size=32",
        ),
        tmp_path,
    )
    assert metrics["step"] == 3 and metrics["epoch"] == 1


def test_compiled_model_checkpoints_like_a_plain_one() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert checkpoint.unwrap(torch.compile(model)).state_dict().keys() == model.state_dict().keys()


def test_checkpoint_that_does_not_fit_is_a_user_error(make_cfg, tmp_path: Path) -> None:
    run(make_cfg(*QUICK, "trainer.max_epochs=1"), tmp_path / "lenet")
    ckpt = tmp_path / "lenet" / "checkpoints" / "last.pt"
    with pytest.raises(UserError, match="does not fit this model.*LeNet5 on data mnist"):
        run(make_cfg("model=mlp", "mode=eval", f"ckpt={ckpt}"), tmp_path / "mlp")


def test_resume_without_a_checkpoint_is_a_user_error(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="resume=true found no checkpoint.*hydra.run.dir="):
        run(make_cfg(*QUICK, "resume=true"), tmp_path)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu(make_cfg, tmp_path: Path, precision: str) -> None:
    metrics = run(
        make_cfg(*QUICK, f"trainer.precision={precision}", "trainer.max_steps=3"), tmp_path
    )
    assert metrics["step"] == 3 and metrics["val/loss"] == metrics["val/loss"]  # not NaN
    scaler = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["scaler"]
    assert bool(scaler) == (precision == "fp16")  # a grad scaler only where fp16 needs one


def test_compiled_run_checkpoint_loads_into_a_plain_model(make_cfg, tmp_path: Path) -> None:
    """compile changes nothing but speed: same losses as the plain run, a plain checkpoint."""
    same = ("model=linear", "trainer.max_steps=2", "data.batch_size=100")
    compiled = run(make_cfg(*same, "trainer.compile=true"), tmp_path / "compiled")
    plain = run(make_cfg(*same), tmp_path / "plain")
    for key in ("train/loss", "val/loss"):  # CPU inductor fuses differently: float rounding only
        assert compiled[key] == pytest.approx(plain[key], rel=1e-4), key
    assert compiled["val/acc"] == plain["val/acc"]
    ckpt = tmp_path / "compiled" / "checkpoints" / "last.pt"
    assert not any("_orig_mod" in k for k in torch.load(ckpt, weights_only=True)["model"])
    metrics = run(make_cfg("model=linear", "mode=eval", f"ckpt={ckpt}"), tmp_path / "eval")
    # val is the test split by default: the plain model scores the weights as the run did.
    assert metrics["test/loss"] == pytest.approx(compiled["val/loss"], rel=1e-4)
    assert metrics["test/acc"] == compiled["val/acc"]


# The distillation recipes need a teacher checkpoint of their data: tests/test_distill.py runs
# each of them with one. The metric-learning recipes hold 5,000 images out, more than the
# fixture sets have: they get a smaller validation split and fewer evaluation pairs.
FIXTURE_SIZED = {"siamese": ("data.val_split=50", "data.verify_pairs=50")}


@pytest.mark.parametrize(
    "experiment",
    sorted(
        p.stem
        for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml")
        if not p.stem.startswith("distill_")
    ),
)
def test_every_experiment_runs_two_steps(make_cfg, tmp_path: Path, experiment: str) -> None:
    extra = FIXTURE_SIZED["siamese"] if experiment.startswith(("siamese_", "triplet_")) else ()
    keys = (f"experiment={experiment}", "trainer.max_steps=2", "data.batch_size=32", *extra)
    metrics = run(make_cfg(*keys), tmp_path)
    assert metrics["step"] == 2


def test_resume_before_the_first_checkpoint_starts_over_and_still_refuses_changes(
    make_cfg, tmp_path: Path
) -> None:
    """Killed after .hydra/ was written but before last.pt: Hydra's config.yaml is unresolved
    (${data.channels}), and must compare equal to the same run's resolved config."""
    from omegaconf import OmegaConf

    cfg = make_cfg("trainer.max_steps=2")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    assert "${data.channels}" in (tmp_path / ".hydra" / "config.yaml").read_text()
    with pytest.raises(UserError, match="optim.lr"):
        run(make_cfg("trainer.max_steps=2", "resume=true", "optim.lr=0.5"), tmp_path)
    metrics = run(make_cfg("trainer.max_steps=2", "resume=true"), tmp_path)
    assert metrics["step"] == 2
