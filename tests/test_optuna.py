"""Optuna searches (`dlrun -m hparams_search=...`): scored on held-out images, stored in SQLite,
and continued by rerunning the same command after a kill."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
from hydra import compose, initialize_config_dir

from dlrun.cli import CONFIG_DIR
from dlrun.launch.sweep import job_folder
from tests.conftest import need_extra
from tests.test_cli import dlrun

TINY = ("hydra.sweeper.n_trials=4", "trainer.max_steps=10", "data.train_subset=120", "device=cpu")


@pytest.fixture(scope="module")
def optuna() -> ModuleType:
    # Optuna 2.10 under SQLAlchemy 1.4 (the pinned pair): its "not 2.0-ready" notice is not ours.
    os.environ.setdefault("SQLALCHEMY_SILENCE_UBER_WARNING", "1")
    need_extra("hydra_plugins.hydra_optuna_sweeper.optuna_sweeper", "sweep")
    return need_extra("optuna", "sweep")


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until `path` (a glob pattern) exists; the process ending first, or the time running out,
    fails the test."""
    end = time.monotonic() + timeout
    while not list(path.parent.glob(path.name)):
        if proc.poll() is not None:
            tail = log.read_text()[-2000:]
            pytest.fail(f"dlrun ended (exit {proc.returncode}) before {path} appeared:\n{tail}")
        assert time.monotonic() < end, f"{path} did not appear within {timeout} s"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_killed_search_ends_with_n_trials_finished(
    optuna: ModuleType, data_root: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "search"
    args = ("-m", "hparams_search=lenet_mnist", *TINY, f"hydra.sweep.dir={sweep}")
    env = dict(os.environ, DLRUN_DATA=str(data_root), DLRUN_CACHE=str(tmp_path / "cache"))
    log = tmp_path / "first.log"
    with log.open("w") as out:  # a file, not a pipe: nobody reads it while dlrun runs
        first = subprocess.Popen(
            [sys.executable, "-m", "dlrun", *args], cwd=tmp_path, env=env, stdout=out, stderr=out
        )
    try:
        wait_for(sweep / "2_*", first, log)  # the third trial's job folder: it has started
    finally:
        first.send_signal(signal.SIGKILL)  # no handler runs: as the OOM killer or a lost node
        first.wait()
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    states = [t.state.name for t in optuna.load_study("lenet_mnist", storage).trials]
    assert states == ["COMPLETE", "COMPLETE", "RUNNING"], log.read_text()[-2000:]  # killed in #3
    before = {job: (job_folder(sweep, job) / "metrics.json").read_bytes() for job in (0, 1)}

    done = dlrun(*args, data=data_root, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Resuming study lenet_mnist" in done.stdout and "2 of 4 trials finished" in done.stdout
    trials = optuna.load_study("lenet_mnist", storage).trials
    assert [t.state.name for t in trials] == [
        "COMPLETE",
        "COMPLETE",
        "FAIL",
        "COMPLETE",
        "COMPLETE",
    ]
    # The first run's job folders are kept; each new job folder is named by its trial's number.
    assert {job: (job_folder(sweep, job) / "metrics.json").read_bytes() for job in (0, 1)} == before
    assert not (job_folder(sweep, 2) / "metrics.json").exists()
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert [r["status"] for r in rows] == ["ok", "ok", "incomplete", "ok", "ok"]
    for trial in (trials[3], trials[4]):
        row = rows[trial.number]
        assert f"optim.lr={trial.params['optim.lr']}" in row["overrides"]
        assert float(row["val/acc"]) == pytest.approx(trial.value)

    again = dlrun(*args, data=data_root, cwd=tmp_path)  # finished: nothing more runs
    assert again.returncode == 0, again.stderr
    assert "already has 4 finished trials" in again.stdout
    assert len(optuna.load_study("lenet_mnist", storage).trials) == 5


def test_a_direction_against_the_monitor_is_refused(
    optuna: ModuleType, data_root: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "search"
    done = dlrun(
        "-m", "hparams_search=lenet_mnist", "hydra.sweeper.direction=minimize", "device=cpu",
        f"hydra.sweep.dir={sweep}", data=data_root, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    error = done.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("dlrun: error: hydra.sweeper.direction=minimize")
    assert "trainer.monitor_mode=max" in error[0] and "hydra.sweeper.direction=maximize" in error[0]
    assert not sweep.exists()  # refused before any trial


@pytest.mark.parametrize(
    ("recipe", "direction", "mode"),
    [("lenet_mnist", "maximize", "max"), ("dcgan_mnist", "minimize", "min")],
)
def test_a_recipe_scores_held_out_images_in_a_fixed_study(
    recipe: str, direction: str, mode: str
) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", [f"hparams_search={recipe}"], return_hydra_config=True)
    assert cfg.data.val_split > 0  # held out of the training set: never the test split
    assert cfg.trainer.monitor_mode == mode and cfg.hydra.sweeper.direction == direction
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.startswith("hydra_plugins.dlrun_optuna_sweeper.")
    assert cfg.hydra.sweep.dir == f"outputs/hparams_search/{recipe}"  # no date: a rerun finds it
    assert sweeper.storage == f"sqlite:///outputs/hparams_search/{recipe}/optuna.db"
    assert sweeper.study_name == recipe and sweeper.n_trials >= 10 and sweeper.params
