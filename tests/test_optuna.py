"""Optuna searches (`dlrun -m hparams_search=...`, dlrun's own sweeper on Optuna 4+): scored on
held-out images, stored in SQLite or a journal file, continued by rerunning the same command after
a kill, samplers and pruners by name, a pruned trial's folder and checkpoint kept."""

import csv
import json
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
    module = need_extra("optuna", "sweep")
    assert int(module.__version__.split(".")[0]) >= 4, module.__version__
    return module


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
    states = [
        t.state.name for t in optuna.load_study(study_name="lenet_mnist", storage=storage).trials
    ]
    assert states == ["COMPLETE", "COMPLETE", "RUNNING"], log.read_text()[-2000:]  # killed in #3
    before = {job: (job_folder(sweep, job) / "metrics.json").read_bytes() for job in (0, 1)}

    done = dlrun(*args, data=data_root, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Resuming study lenet_mnist" in done.stdout and "2 of 4 trials finished" in done.stdout
    trials = optuna.load_study(study_name="lenet_mnist", storage=storage).trials
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
    assert len(optuna.load_study(study_name="lenet_mnist", storage=storage).trials) == 5


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


def test_params_become_optuna_distributions(optuna: ModuleType) -> None:
    from hydra_plugins.dlrun_optuna_sweeper._space import grid, search_space

    d = optuna.distributions
    space, fixed = search_space(
        {"optim.lr": "tag(log, interval(1e-4, 3e-2))", "a": "interval(0, 1)", "n": "tag(int, interval(1, 8))",
         "b": "choice(64, 128)", "c": "range(1, 10, 2)", "f": "range(0.1, 0.45, 0.1)", "x": "3"},
        ["trainer.max_steps=10", "model=lenet,mlp", "a=choice(relu,tanh)"],
    )  # fmt: skip
    assert space["optim.lr"] == d.FloatDistribution(1e-4, 3e-2, log=True)
    assert space["a"] == d.CategoricalDistribution(["relu", "tanh"])  # the command line wins
    assert space["n"] == d.IntDistribution(1, 8)
    assert space["b"] == d.CategoricalDistribution([64, 128])
    assert space["c"] == d.IntDistribution(1, 9, step=2)
    assert space["f"].step == pytest.approx(0.1) and space["f"].high == pytest.approx(0.4)
    assert space["model"] == d.CategoricalDistribution(["lenet", "mlp"])
    assert fixed == ["x=3", "trainer.max_steps=10"]
    assert grid({k: space[k] for k in ("b", "c")}) == {"b": [64, 128], "c": [1, 3, 5, 7, 9]}


@pytest.mark.parametrize("name", ["tpe", "random", "grid", "gp", "qmc"])
def test_each_sampler_builds_by_name_with_its_seed(optuna: ModuleType, name: str) -> None:
    from hydra_plugins.dlrun_optuna_sweeper._space import search_space
    from hydra_plugins.dlrun_optuna_sweeper._study import make_pruner, make_sampler

    space, _ = search_space({"b": "choice(64, 128)", "c": "range(1, 4, 1)"}, [])
    sampler = make_sampler({"name": name, "seed": 3}, None, space)
    assert type(sampler).__name__.lower().startswith(name)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    for _ in range(6):  # the grid's every point, and one more of the others
        trial = study.ask(space)
        study.tell(trial, float(trial.params["c"]))
        if name == "grid" and sampler.is_exhausted(study):
            break
    assert len(study.trials) == 6  # 2 x 3 grid points, each once
    assert name != "grid" or len({tuple(t.params.values()) for t in study.trials}) == 6
    again = make_sampler(name, 3, space)  # hydra.sweeper.sampler=NAME: the run's seed
    assert type(again) is type(sampler)
    assert type(make_pruner("median")).__name__ == "MedianPruner"
    assert type(make_pruner({"name": "hyperband"})).__name__ == "HyperbandPruner"
    assert type(make_pruner("none")).__name__ == "NopPruner"


def test_an_unknown_sampler_or_pruner_is_one_line(optuna: ModuleType) -> None:
    from dlrun.cli import Failed
    from hydra_plugins.dlrun_optuna_sweeper._study import make_pruner, make_sampler

    with pytest.raises(Failed, match=r"hydra.sweeper.sampler=cmaes is not a sampler; use one of"):
        make_sampler("cmaes", 0, {})
    with pytest.raises(Failed, match=r"hydra.sweeper.pruner=asha is not a pruner; use one of"):
        make_pruner({"name": "asha"})
    with pytest.raises(Failed, match=r"sampler=grid needs a finite set of values, but a is"):
        make_sampler("grid", 0, {"a": optuna.distributions.FloatDistribution(0, 1)})


LENET = {"optim.weight_decay": 1e-6, "data.batch_size": 64, "model.activation": "relu"}
SMALL = ("hydra.sweeper.n_jobs=1", "trainer.max_steps=12", "trainer.val_every_n_steps=4",
         "data.train_subset=256", "data.eval_subset=64", "device=cpu")  # fmt: skip


def test_the_median_pruner_stops_a_trial_that_trails(
    optuna: ModuleType, data_root: Path, tmp_path: Path
) -> None:
    """A trial that learns, then one whose learning rate is 1e-7: its loss trails the first's at
    the same step, so the median pruner stops it; it is PRUNED, with its folder, its last
    checkpoint and pruned.json, and the summary says so."""
    sweep = tmp_path / "search"
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    sweep.mkdir()
    study = optuna.create_study(study_name="prune", storage=storage, direction="minimize")
    for lr in (0.05, 1e-7):  # the sweeper asks them first, in this order
        study.enqueue_trial({"optim.lr": lr, **LENET})
    done = dlrun(
        "-m", "hparams_search=lenet_mnist", *SMALL, "hydra.sweeper.n_trials=2",
        "trainer.monitor=val/loss", "trainer.monitor_mode=min", "hydra.sweeper.direction=minimize",
        "hydra.sweeper.study_name=prune", "hydra.sweeper.pruner.name=median",
        "+hydra.sweeper.pruner.n_startup_trials=1", f"hydra.sweep.dir={sweep}",
        data=data_root, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    trials = optuna.load_study(study_name="prune", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"], done.stderr[-3000:]
    assert [t.params["optim.lr"] for t in trials] == [0.05, 1e-7]
    steps = sorted(trials[0].intermediate_values)  # every evaluation's, by optimizer step
    assert len(steps) >= 3 and steps[-1] == 12
    cut = sorted(trials[1].intermediate_values)  # the same steps, up to the one it was pruned at
    assert cut == steps[: len(cut)] and len(cut) < len(steps)
    assert trials[1].value == pytest.approx(trials[1].intermediate_values[cut[-1]])
    folder = job_folder(sweep, 1)
    assert (folder / "checkpoints" / "last.pt").is_file()
    assert json.loads((folder / "pruned.json").read_text())["step"] == cut[-1]
    assert json.loads((folder / "metrics.json").read_text())["step"] == cut[-1]
    with (sweep / "summary.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["ok", "pruned"]
    assert f"trial 1 pruned at step {cut[-1]}" in done.stdout + done.stderr


def test_two_searches_share_one_journal_study(
    optuna: ModuleType, data_root: Path, tmp_path: Path
) -> None:
    """Two processes on one journal file: each runs its own trials (no number twice, no folder
    twice), neither takes the other's running trial for an interrupted one, and together they
    run the study's n_trials (a late ask of each may add one)."""
    sweep = tmp_path / "search"
    args = ("-m", "hparams_search=lenet_mnist", *SMALL, "trainer.max_steps=8",
            "hydra.sweeper.n_trials=4", f"hydra.sweeper.storage=journal:///{sweep / 'study.log'}",
            f"hydra.sweep.dir={sweep}", "trainer.num_threads=1")  # fmt: skip
    env = dict(os.environ, DLRUN_DATA=str(data_root), DLRUN_CACHE=str(tmp_path / "cache"))
    logs = [tmp_path / f"{k}.log" for k in (0, 1)]
    procs = []
    for log in logs:
        with log.open("w") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "dlrun", *args], cwd=tmp_path,
                                          env=env, stdout=out, stderr=out))  # fmt: skip
    codes = [p.wait(timeout=240) for p in procs]
    text = "\n".join(log.read_text()[-2000:] for log in logs)
    assert codes == [0, 0], text
    from hydra_plugins.dlrun_optuna_sweeper._study import open_storage

    trials = optuna.load_study(study_name="lenet_mnist", storage=open_storage(
        f"journal:///{sweep / 'study.log'}")).trials  # fmt: skip
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials))) and 4 <= len(trials) <= 5, numbers
    assert [t.state.name for t in trials] == ["COMPLETE"] * len(trials), text
    folders = [p.name.split("_")[0] for p in sweep.iterdir() if p.name[0].isdigit()]
    assert sorted(folders, key=int) == [str(n) for n in numbers]
    owners = {t.user_attrs["dlrun:owner"]["pid"] for t in trials}
    assert owners == {p.pid for p in procs}, owners  # both took part
