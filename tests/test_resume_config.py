"""resume=true continues a run as it was configured (issue 28, defect 5).

tests/data/run_81f06b5 is a run folder written by commit 81f06b5 and stopped mid-epoch (its
README says how): `dlrun resume=true hydra.run.dir=<a copy>` alone must continue it to the
uninterrupted run's end. The other tests edit a copy to play an older run: a key it lacks (added
since), a key under its old name, a changed default; and a command that contradicts the run.
Each runs `dlrun` in this process (dlrun.cli.main), as test_augment's CLI test does.
"""

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from dlrun.config import migrations

FIXTURE = Path(__file__).parent / "data" / "run_81f06b5"
TIMING = ("time/", "images_per_s")  # wall-clock figures: never equal between two runs


# Metrics a classifier's evaluation gained after the fixture runs were saved (their reference
# metrics.json has none): the resumed run reports them too, beside the compared ones.
ADDED_SINCE = ("macro_precision", "macro_recall", "macro_f1")


def stable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v for k, v in metrics.items() if not any(t in k for t in TIMING + ADDED_SINCE)
    }


@pytest.fixture
def run(tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the fixture run folder, and the environment it was made in (its fake MNIST)."""
    monkeypatch.setenv("DLRUN_DATA", str(data_root))  # the fixture's data.root is ${oc.env:...}
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # main() sets it to 1: restored afterwards
    monkeypatch.setenv("TQDM_DISABLE", "1")
    threads = torch.get_num_threads()  # the run sets its own (trainer.num_threads=1)
    shutil.copytree(FIXTURE, tmp_path / "run")
    yield tmp_path / "run"
    torch.set_num_threads(threads)
    GlobalHydra.instance().clear()


def dlrun(
    *args: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, str]:
    """`dlrun <args>` in this process: its exit code, stdout (the log) and stderr (errors)."""
    from dlrun.cli import main

    monkeypatch.setattr("sys.argv", ["dlrun", *args])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def edit_run(run: Path, change: Callable[[dict], None]) -> None:
    """Apply `change` to the run's saved config, in .hydra/config.yaml and in last.pt alike."""
    path = run / ".hydra" / "config.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    change(cfg)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    change(state["config"])
    torch.save(state, last)


def pop(tree: dict, key: str) -> Any:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree[part]
    return tree.pop(leaf)


def put(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def finished_config(run: Path) -> dict[str, Any]:
    """The config the continued run ran with, as its last checkpoint records it."""
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["config"]


def test_a_run_of_81f06b5_continues_with_resume_alone_and_ends_as_if_uninterrupted(
    run: Path, capsys, monkeypatch
) -> None:
    code, out, err = dlrun(
        "resume=true", f"hydra.run.dir={run}", capsys=capsys, monkeypatch=monkeypatch
    )
    assert code == 0, err
    assert f"resumed from {run}/checkpoints/last.pt at step 14 (epoch 2, batch 4 of 10)" in out
    done = json.loads((run / "metrics.json").read_text())
    assert done["step"] == 30
    uninterrupted = json.loads((FIXTURE / "uninterrupted_metrics.json").read_text())
    assert stable(done) == stable(uninterrupted)  # the losses and accuracies, bit for bit
    # The run's own groups, not the defaults (onecycle, sigmoid), recorded for the next resume.
    assert {"sched=cosine", "model=lenet", "model.activation=relu"} <= set(
        yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    )


def test_a_key_added_since_the_run_was_saved_takes_its_default_and_the_log_names_it(
    run: Path, capsys, monkeypatch
) -> None:
    def older(cfg: dict) -> None:  # a run saved before these keys existed
        pop(cfg, "data.holdout_classes")
        pop(cfg, "trainer.grad_clip")

    edit_run(run, older)
    code, out, err = dlrun(
        "resume=true", f"hydra.run.dir={run}", capsys=capsys, monkeypatch=monkeypatch
    )
    assert code == 0, err
    lines = [line for line in out.splitlines() if "resume: " in line]
    assert len(lines) == 1, out
    head, _, names = lines[0].partition(" added since this run was saved take their defaults: ")
    assert names, lines[0]  # (any key dlrun adds later is named too: no exact count)
    assert {"data.holdout_classes", "trainer.grad_clip"} <= set(names.split(", ")), lines[0]
    cfg = finished_config(run)
    assert cfg["data"]["holdout_classes"] is None and cfg["trainer"]["grad_clip"] is None
    uninterrupted = json.loads((FIXTURE / "uninterrupted_metrics.json").read_text())
    assert stable(json.loads((run / "metrics.json").read_text())) == stable(uninterrupted)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["optim.lr=0.5"], "optim.lr: 0.01 (run) vs 0.5 (now)"),
        (["sched=onecycle"], "sched: cosine (run) vs onecycle (now)"),
        (["data.mixup=0.2"], "data.mixup: 0.0 (run) vs 0.2 (now)"),  # a key the run predates
    ],
    ids=["value", "group", "added-key"],
)
def test_an_override_that_contradicts_the_run_is_refused_in_one_line_naming_both_values(
    args: list[str], named: str, run: Path, capsys, monkeypatch
) -> None:
    if "data.mixup" in named:
        edit_run(run, lambda cfg: pop(cfg, "data.mixup"))  # saved before mixup existed
    before = snapshot(run)
    code, out, err = dlrun(
        "resume=true", f"hydra.run.dir={run}", *args, capsys=capsys, monkeypatch=monkeypatch
    )
    assert code == 2, out + err
    assert err.startswith("dlrun: error: resume=true continues the run in") and named in err, err
    assert "but this command changes it" in err, err  # dlrun.config.resume's refusal, not the last check
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in out + err
    assert snapshot(run) == before  # refused before anything was written


@pytest.mark.parametrize("moved", ["key", "target"])
def test_a_key_or_target_that_moved_is_no_difference(
    moved: str, run: Path, capsys, monkeypatch
) -> None:
    if moved == "key":  # saved under its old name (migrations.RENAMED) and at a non-default value

        def older(cfg: dict) -> None:
            pop(cfg, "trainer.val_every_n_epochs")
            put(cfg, "metrics.every_n_epochs", 2)

        overrides = run / ".hydra" / "overrides.yaml"
        overrides.write_text(overrides.read_text() + "- metrics.every_n_epochs=2\n")
        assert migrations.RENAMED["metrics.every_n_epochs"] == "trainer.val_every_n_epochs"
    else:  # a `_target_` under its module before the task packages (as the fixture saved it)
        assert migrations.moved_target("dlrun.sched.cosine") == "dlrun.engine.sched.cosine"

        def older(cfg: dict) -> None:
            put(cfg, "sched._target_", "dlrun.sched.cosine")
            put(cfg, "trainer._target_", "dlrun.trainers.classification.ClassificationTrainer")

    edit_run(run, older)
    code, out, err = dlrun(
        "resume=true", f"hydra.run.dir={run}", capsys=capsys, monkeypatch=monkeypatch
    )
    assert code == 0, err
    cfg = finished_config(run)
    if moved == "key":
        assert cfg["trainer"]["val_every_n_epochs"] == 2  # the run's value, not the default 1
        assert "every_n_epochs" not in cfg["metrics"]
    else:
        assert cfg["sched"]["_target_"] == "dlrun.engine.sched.cosine"
    # A moved key is not a new one (a key dlrun added later may be named: no exact list).
    added = [line for line in out.splitlines() if "added since" in line]
    assert not [line for line in added if "every_n_epochs" in line or "_target_" in line], added


def test_a_changed_default_is_no_difference_even_when_the_command_names_the_group(
    run: Path, capsys, monkeypatch
) -> None:
    # A run saved when data.eval_batch_size defaulted to 50 (today: 1000).
    def older(cfg: dict) -> None:
        put(cfg, "data.eval_batch_size", 50)

    edit_run(run, older)
    code, out, err = dlrun(
        "resume=true", f"hydra.run.dir={run}", "data=mnist", "model=lenet",
        capsys=capsys, monkeypatch=monkeypatch,
    )  # fmt: skip
    assert code == 0, err
    assert finished_config(run)["data"]["eval_batch_size"] == 50
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert saved.data.eval_batch_size == 50  # and the next resume reads it again


A15 = Path(__file__).parent / "data" / "run_a15ad21"


def test_a_run_of_a15ad21_with_a_weight_average_continues_through_the_hooks_and_evaluates(
    tmp_path: Path, data_root: Path, capsys, monkeypatch
) -> None:
    """The main before the task packages (old `_target_`s, the average at the top level of the
    checkpoint, no "hooks" key): resumed by today's code, it ends as its uninterrupted run did,
    and `eval.weights=ema` scores the average it saved."""
    monkeypatch.setenv("DLRUN_DATA", str(data_root))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    threads = torch.get_num_threads()
    run = tmp_path / "run"
    shutil.copytree(A15, run)
    try:
        code, out, err = dlrun(
            "resume=true", f"hydra.run.dir={run}", capsys=capsys, monkeypatch=monkeypatch
        )
        assert code == 0, err
        assert f"resumed from {run}/checkpoints/last.pt at step 14 (epoch 2, batch 5 of 9)" in out
        done = json.loads((run / "metrics.json").read_text())
        uninterrupted = json.loads((A15 / "uninterrupted_metrics.json").read_text())
        assert "val/acc_ema" in done and done["step"] == 27
        assert stable(done) == stable(uninterrupted)  # the average's scores too, bit for bit
        state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
        assert state["hooks"]["ema"]["updates"] == 27  # 14 carried over from the old key
        scored = {}  # test/loss of the average, of the weights, and of the average saved as weights
        swapped = tmp_path / "swapped.pt"
        torch.save({**state, "model": state["ema"]}, swapped)
        for name, ckpt, weights in (
            ("ema", run / "checkpoints" / "last.pt", "ema"),
            ("model", run / "checkpoints" / "last.pt", "model"),
            ("swapped", swapped, "model"),
        ):
            code, out, err = dlrun(
                "mode=eval", f"eval.weights={weights}", f"ckpt={ckpt}",
                f"hydra.run.dir={tmp_path / name}", capsys=capsys, monkeypatch=monkeypatch,
            )  # fmt: skip
            assert code == 0, err
            scored[name] = json.loads((tmp_path / name / "metrics.json").read_text())["test/loss"]
        assert scored["ema"] == scored["swapped"] != scored["model"], scored
    finally:
        torch.set_num_threads(threads)
        GlobalHydra.instance().clear()
