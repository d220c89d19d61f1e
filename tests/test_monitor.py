"""The monitored metric (dlrun/engine/monitor.py) and the loop's evaluation cadence: best.pt,
early stopping, val_every_n_*, the test-split warning, the HParams declaration, bad values."""

import logging
import time
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2

from dlrun.cli import run
from dlrun.engine import checkpoint
from dlrun.errors import UserError
from dlrun.tasks.classification.trainer import ClassificationTrainer

TIMING = ("time/", "images_per_s")
# The linear classifier, plain SGD: 200 fixture images, 50 a batch, 4 steps an epoch.
LINEAR = ("model=linear", "optim=sgd", "optim.momentum=0", "optim.weight_decay=0", "sched=none",
          "data.batch_size=50")  # fmt: skip
TEST_SPLIT_WARNING = "is measured on the test split (data.val_split=0)"

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread each (conftest)


def stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}


def events(folder: Path) -> list[tuple[int, Any]]:
    return [
        (event.step, value)
        for f in sorted(folder.glob("events.out.tfevents.*"))
        for event in EventFileLoader(str(f)).Load()
        for value in event.summary.value
    ]


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run: tag -> [(step, value), ...] in logging order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for step, v in events(folder):
        if v.metadata.plugin_data.plugin_name == "scalars":
            out.setdefault(v.tag, []).append((step, v.tensor.float_val[0]))
    return out


def declared_metrics(folder: Path) -> list[str]:
    """The metric tags the HParams tab was told about (the `_hparams_/experiment` summary)."""
    found = [v for _, v in events(folder) if v.tag == "_hparams_/experiment"]
    assert len(found) == 1
    data = plugin_data_pb2.HParamsPluginData.FromString(found[0].metadata.plugin_data.content)
    return [info.name.tag for info in data.experiment.metric_infos]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if TEST_SPLIT_WARNING in r.getMessage()]


# ----- 1. best.pt follows trainer.monitor / trainer.monitor_mode ----------------------------------
# Scripted evaluation results, one per epoch: each tag and mode has its best at another epoch.
SCRIPT = {"val/loss": [0.9, 0.4, 0.6, 0.5], "val/acc": [0.5, 0.6, 0.9, 0.7]}


@pytest.fixture
def scripted_evaluation(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """evaluate() returns the SCRIPT's next values (the real evaluation still runs)."""
    calls: list[int] = []
    evaluate = ClassificationTrainer.evaluate

    def scripted(self: ClassificationTrainer, loader: Any, prefix: str) -> dict[str, float]:
        real = evaluate(self, loader, prefix)
        if prefix != "val":
            return real
        calls.append(self.step_count)
        return {tag: values[len(calls) - 1] for tag, values in SCRIPT.items()}

    monkeypatch.setattr(ClassificationTrainer, "evaluate", scripted)
    return calls


@pytest.mark.parametrize(
    ("monitor", "mode", "best_epoch"),
    [("val/loss", "min", 2), ("val/acc", "max", 3), ("val/acc", "min", 1), ("val/loss", "max", 1)],
)
def test_best_pt_holds_the_epoch_of_the_best_monitored_value(
    make_cfg, tmp_path: Path, scripted_evaluation: list[int], monitor: str, mode: str,
    best_epoch: int,
) -> None:  # fmt: skip
    args = (*LINEAR, "data.batch_size=100", "trainer.max_epochs=4", f"trainer.monitor={monitor}",
            f"trainer.monitor_mode={mode}")  # fmt: skip
    run(make_cfg(*args), tmp_path / "run")
    assert scripted_evaluation == [2, 4, 6, 8]
    logged = scalars(tmp_path / "run")[monitor]
    assert [v for _, v in logged] == pytest.approx(SCRIPT[monitor])
    pick = min if mode == "min" else max
    best_step, best_value = pick(logged, key=lambda sv: sv[1])
    best = checkpoint.load(tmp_path / "run" / "checkpoints" / "best.pt")
    assert (best["epoch"], best["step"]) == (best_epoch, best_step)
    assert best["metrics"][monitor] == pytest.approx(best_value)
    # And its weights are those the run had then: a run stopped there ends with the same ones.
    scripted_evaluation.clear()
    run(make_cfg(*args, f"trainer.max_epochs={best_epoch}"), tmp_path / "short")
    then = checkpoint.load(tmp_path / "short" / "checkpoints" / "last.pt")["model"]
    assert all((best["model"][k] == then[k]).all() for k in then)
    if best_epoch < 4:
        last = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
        assert any((best["model"][k] != last[k]).any() for k in last)


# ----- 2. early stopping --------------------------------------------------------------------------
@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_ends_the_run_and_resume_trains_no_further(
    make_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture, patience: int
) -> None:
    """lr 0: nothing improves after the first evaluation; patience N stops after N more."""
    caplog.set_level(logging.INFO)
    args = (*LINEAR, "optim.lr=0", "trainer.max_epochs=6",
            f"trainer.early_stopping.patience={patience}")  # fmt: skip
    metrics = run(make_cfg(*args), tmp_path)
    assert metrics["epoch"] == patience + 1 and metrics["step"] == 4 * (patience + 1)
    stops = [m for m in (r.getMessage() for r in caplog.records) if m.startswith("early stop")]
    assert len(stops) == 1 and f"early stopping at step {4 * (patience + 1)}: val/acc" in stops[0]
    assert f"for {patience} evaluations" in stops[0]
    assert [s for s, _ in scalars(tmp_path)["val/acc"]] == [4 * e for e in range(1, patience + 2)]
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["monitor"]["stopped_early"]
    steps = []
    step = ClassificationTrainer.step
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ClassificationTrainer, "step", lambda s, b: steps.append(1) or step(s, b))
        resumed = run(make_cfg(*args, "resume=true"), tmp_path)
    assert steps == [] and stable(resumed) == stable(metrics)


def test_early_stopping_on_mid_epoch_evaluations_stops_mid_epoch(make_cfg, tmp_path: Path) -> None:
    args = (*LINEAR, "optim.lr=0", "trainer.max_epochs=3", "trainer.val_every_n_steps=1",
            "trainer.early_stopping.patience=1", "trainer.monitor=val/loss",
            "trainer.monitor_mode=min")  # fmt: skip
    metrics = run(make_cfg(*args), tmp_path)
    assert metrics["step"] == 2 and metrics["epoch"] == 1
    assert [s for s, _ in scalars(tmp_path)["val/loss"]] == [1, 2]


# ----- 3. evaluation cadence ----------------------------------------------------------------------
def test_val_every_n_steps_evaluates_mid_epoch(make_cfg, tmp_path: Path) -> None:
    # batches of 25: 8 steps an epoch; every 2 steps, the epoch ends included, never twice.
    metrics = run(make_cfg(*LINEAR, "data.batch_size=25", "trainer.max_epochs=2",
                           "trainer.val_every_n_steps=2"), tmp_path)  # fmt: skip
    assert metrics["step"] == 16
    logged = scalars(tmp_path)
    assert [s for s, _ in logged["val/acc"]] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert [s for s, _ in logged["val/loss"]] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert [s for s, _ in logged["train/loss"]] == [8, 16]  # epoch means stay per epoch


def test_val_every_n_epochs_evaluates_every_nth_epoch_and_at_the_end(
    make_cfg, tmp_path: Path
) -> None:
    run(make_cfg(*LINEAR, "trainer.max_epochs=3", "trainer.val_every_n_epochs=2"), tmp_path)
    assert [s for s, _ in scalars(tmp_path)["val/acc"]] == [8, 12]  # epochs 2 and 3 (the end)
    assert checkpoint.load(tmp_path / "checkpoints" / "best.pt")["step"] == 8


def test_mid_epoch_evaluation_time_is_not_training_time(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pause, calls = 0.3, []
    evaluate = ClassificationTrainer.evaluate

    def slow(self: ClassificationTrainer, loader: Any, prefix: str) -> dict[str, float]:
        calls.append(self.step_count)
        time.sleep(pause)
        return evaluate(self, loader, prefix)

    monkeypatch.setattr(ClassificationTrainer, "evaluate", slow)
    metrics = run(make_cfg(*LINEAR, "trainer.max_epochs=1", "trainer.val_every_n_steps=1"),
                  tmp_path)  # fmt: skip
    assert calls == [1, 2, 3, 4]  # three mid-epoch evaluations (0.9 s) and the epoch's end
    assert metrics["time/train_s"] < 2 * pause  # four linear steps take milliseconds
    assert metrics["time/epoch_s"] < 2 * pause


# ----- 4. the test-split warning, monitor=null ----------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "warned", "best"),
    [
        ((), 1, True),
        (("data.val_split=0.2",), 0, True),
        (("trainer.monitor=null",), 0, False),
    ],
)
def test_the_test_split_warning_comes_once_and_only_when_selecting_on_it(
    make_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture, overrides: tuple[str, ...],
    warned: int, best: bool,
) -> None:  # fmt: skip
    metrics = run(make_cfg(*LINEAR, "trainer.max_epochs=3", *overrides), tmp_path)
    assert len(warnings_of(caplog)) == warned
    assert "val/acc" in metrics and len(scalars(tmp_path)["val/acc"]) == 3  # evaluated 3 times
    assert (tmp_path / "checkpoints" / "best.pt").is_file() == best
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


def test_the_test_split_warning_does_not_come_again_on_resume(
    make_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run(make_cfg(*LINEAR, "trainer.max_epochs=1"), tmp_path)
    assert len(warnings_of(caplog)) == 1
    caplog.clear()
    run(make_cfg(*LINEAR, "trainer.max_epochs=2", "resume=true"), tmp_path)
    assert warnings_of(caplog) == []  # the run was warned once; its checkpoint remembers


def test_the_warning_names_early_stopping_when_it_selects_on_the_test_split(
    make_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run(make_cfg(*LINEAR, "trainer.max_epochs=1", "trainer.early_stopping.patience=3"), tmp_path)
    (message,) = warnings_of(caplog)
    assert message.startswith("val/acc is measured") and "early stopping" in message


# ----- 5. the HParams declaration -----------------------------------------------------------------
@pytest.mark.parametrize("monitor", ["val/acc", "val/loss", "train/loss"])
def test_a_classifier_declares_only_tags_it_logs(make_cfg, tmp_path: Path, monitor: str) -> None:
    run(make_cfg(*LINEAR, "trainer.max_steps=2", f"trainer.monitor={monitor}",
                 "trainer.monitor_mode=min"), tmp_path)  # fmt: skip
    declared = declared_metrics(tmp_path)
    assert declared[0] == monitor  # the monitor comes first: the tab sorts by it
    assert set(declared) == {"val/acc", "val/loss", "train/loss", "train/acc"}
    assert set(declared) <= set(scalars(tmp_path)), set(declared) - set(scalars(tmp_path))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """A (briefly trained) LeNet-5 checkpoint on the MNIST fixture: an offline FID network."""
    from hydra import compose, initialize_config_dir

    from dlrun.cli import CONFIG_DIR

    out = tmp_path_factory.mktemp("classifier")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            f"data.root={data_root}", "device=cpu", "trainer.progress=false", "model=lenet",
            "model.activation=relu", "trainer.max_steps=2", "data.batch_size=50"])  # fmt: skip
    run(cfg, out)
    return out / "checkpoints" / "last.pt"



TINY_GAN = ("model=gan", "model.g_hidden=[32,64]", "model.d_hidden=[64,32]", "data.batch_size=50",
            "trainer.max_steps=4", "metrics.n=100")  # fmt: skip


@pytest.mark.parametrize(
    ("features", "with_ckpt", "fid"),
    [
        ("ckpt", True, {"val/fid_classifier", "val/kid_classifier"}),  # a classifier's features
        ("auto", True, {"val/fid_classifier", "val/kid_classifier"}),  # auto falls back to it
        ("auto", False, set()),  # no feature network at all: no FID, none declared
    ],
)
def test_a_gan_declares_only_tags_it_logs(
    make_cfg, tmp_path: Path, classifier: Path, no_fid: None, features: str,
    with_ckpt: bool, fid: set[str],
) -> None:  # fmt: skip
    ckpt = (f"metrics.fid.ckpt={classifier}",) if with_ckpt else ()
    metrics = run(make_cfg(*TINY_GAN, f"metrics.fid.features={features}", *ckpt), tmp_path)
    logged = set(scalars(tmp_path))
    assert {k for k in metrics if "fid" in k or "kid" in k} == fid  # what the run measured
    declared = declared_metrics(tmp_path)
    assert set(declared) - logged == set(), f"declared but never logged: {set(declared) - logged}"
    assert set(declared) == {"train/loss_d", "train/loss_g"} | fid
    if fid:
        assert declared[0] == "val/fid_classifier"  # the monitor first


# ----- 6. bad values ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.monitor_mode=up", "trainer.monitor_mode"),
        ("trainer.early_stopping.patience=0", "trainer.early_stopping.patience"),
        ("trainer.val_every_n_steps=0", "trainer.val_every_n_steps"),
        ("trainer.val_every_n_epochs=0", "trainer.val_every_n_epochs"),
    ],
)
def test_bad_monitor_and_cadence_values_are_user_errors_naming_the_key(
    make_cfg, tmp_path: Path, override: str, key: str
) -> None:
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        run(make_cfg(*LINEAR, "trainer.max_steps=1", override), tmp_path)
    assert not tmp_path.joinpath("checkpoints").exists()


def test_early_stopping_without_a_monitor_is_a_user_error(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="early_stopping.patience needs a metric.*trainer.monitor"):
        run(make_cfg(*LINEAR, "trainer.monitor=null", "trainer.early_stopping.patience=2"),
            tmp_path)  # fmt: skip
