"""`dlrun -m hydra/launcher=parallel ...`: a sweep's jobs side by side, one per GPU when there
are several, each with its share of the cores; failures recorded as the sequential launcher does."""

import csv
import json
import re
from dataclasses import astuple
from datetime import datetime
from pathlib import Path

import pytest
from hydra.errors import HydraException

from dlrun.launch import threads
from dlrun.launch.sweep import job_folder
from hydra_plugins.dlrun_parallel_launcher.parallel_launcher import Slot, plan
from tests.test_cli import dlrun
from tests.test_sweep import assert_four_hparams_entries

LINE = re.compile(r"^\[([\d-]+ [\d:,]+)\]\[dlrun\]\[INFO\] - (.*)$")


def job_log(job: Path) -> dict:
    """What a job's log says: its slot, CUDA_VISIBLE_DEVICES, threads line, start and end."""
    out: dict = {}
    for line in (job / "dlrun.log").read_text().splitlines():
        match = LINE.match(line)
        if not match:
            continue
        when, text = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f"), match[2]
        if text.startswith("parallel sweep: slot "):
            slot, gpu = re.match(
                r"parallel sweep: slot (\d+ of \d+), CUDA_VISIBLE_DEVICES=(.*)$", text
            ).groups()
            out |= {"slot": slot, "gpu": gpu, "start": when}
        elif text.startswith("threads: "):
            out["threads"] = text
        elif text.startswith("done"):
            out["end"] = when
    return out


def overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_a_parallel_sweep_runs_its_jobs_side_by_side(data_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    done = dlrun(
        "-m", "hydra/launcher=parallel", "model=mlp,lenet", "optim.lr=0.1,0.01",
        "trainer.max_steps=20", "device=cpu", f"hydra.sweep.dir={sweep}",
        data=data_root, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    cores = threads.cores()
    n = min(2, cores)  # jobs=auto without GPUs
    assert f"Launching 4 jobs, {n} at a time (no GPU" in done.stdout
    logs = {}
    for k in range(4):
        metrics = json.loads((job_folder(sweep, k) / "metrics.json").read_text())
        assert metrics["step"] == 20
        logs[k] = job_log(job_folder(sweep, k))
        assert (
            logs[k]["threads"]
            == f"threads: {cores // n} (auto: {cores} cores shared by {n} parallel jobs)"
        )
        assert logs[k]["gpu"] == "'' (no GPU)"  # gpus=auto found none: the jobs see none
    with (sweep / "summary.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["ok"] * 4
    assert (sweep / "summary.md").is_file()
    assert_four_hparams_entries(sweep)
    if n == 2:  # the first two jobs start together, one in each slot
        assert (logs[0]["slot"], logs[1]["slot"]) == ("0 of 2", "1 of 2")
        assert overlap(logs[0], logs[1])


def test_one_job_per_gpu_and_failures_recorded(data_root: Path, tmp_path: Path) -> None:
    """hydra.launcher.gpus=2 on the CPU: the device each job would see; a bad value's job fails
    alone, with failed.json and the sweep summary as under the sequential launcher."""
    sweep = tmp_path / "sweep"
    done = dlrun(
        "-m", "hydra/launcher=parallel", "hydra.launcher.gpus=2", "model=mlp",
        "data.batch_size=64,32,0", "trainer.max_steps=20", "device=cpu",
        f"hydra.sweep.dir={sweep}", data=data_root, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Launching 3 jobs, 2 at a time (one GPU each" in done.stdout
    first, second = job_log(job_folder(sweep, 0)), job_log(job_folder(sweep, 1))
    assert (first["slot"], first["gpu"]) == ("0 of 2", "0")
    assert (second["slot"], second["gpu"]) == ("1 of 2", "1")
    assert overlap(first, second)  # side by side, never on the same GPU
    failed = json.loads((job_folder(sweep, 2) / "failed.json").read_text())
    assert failed["exit_code"] == 2 and "data.batch_size must be" in failed["error"]
    assert (
        "1 of 3 job(s) failed" in done.stderr
        and "job 2 (model=mlp data.batch_size=0" in done.stderr
    )
    with (sweep / "summary.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["ok", "ok", "failed (exit 2)"]


def test_a_bad_launcher_setting_is_a_clear_error(tmp_path: Path) -> None:
    done = dlrun(
        "-m", "hydra/launcher=parallel", "hydra.launcher.jobs=0", data=tmp_path, cwd=tmp_path
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "hydra.launcher.jobs must be auto or an integer >= 1, got 0" in done.stderr


def no_gpu() -> int:
    return 0


@pytest.mark.parametrize(
    ("jobs", "gpus", "n_jobs", "visible", "expected"),
    [
        ("auto", no_gpu, 4, None, [Slot(0, 2, 4, ""), Slot(1, 2, 4, "")]),  # CPU: 2 processes
        ("auto", no_gpu, 1, None, [Slot(0, 1, 8, "")]),  # one job: no idle worker, every core
        ("auto", lambda: 4, 9, None, [Slot(k, 4, 2, str(k)) for k in range(4)]),  # one per GPU
        ("auto", lambda: 2, 9, "3,5", [Slot(0, 2, 4, "3"), Slot(1, 2, 4, "5")]),  # the visible ones
        (3, lambda: 1, 9, None, [Slot(k, 3, 2, None) for k in range(3)]),  # one GPU: shared
        (1, no_gpu, 9, None, [Slot(0, 1, 8, "")]),
    ],
)
def test_plan_gives_each_slot_its_gpu_and_threads(jobs, gpus, n_jobs, visible, expected) -> None:
    # Fields, not objects: Hydra's plugin scan re-runs the module (a new Slot class) mid-suite.
    slots = plan(jobs, "auto", n_jobs, 8, visible, gpu_count=gpus)
    assert [astuple(s) for s in slots] == [astuple(s) for s in expected]


def test_a_slot_environment_names_its_gpu_and_share() -> None:
    assert Slot(1, 2, 4, "5").env() == {
        "DLRUN_NUM_THREADS": "4", "DLRUN_SLOT": "1/2", "CUDA_VISIBLE_DEVICES": "5",
    }  # fmt: skip
    assert "CUDA_VISIBLE_DEVICES" not in Slot(0, 2, 4, None).env()


@pytest.mark.parametrize(
    ("jobs", "gpus", "message"),
    [
        (0, 0, "hydra.launcher.jobs must be auto or an integer >= 1, got 0"),
        ("many", 0, "hydra.launcher.jobs must be auto or an integer >= 1, got 'many'"),
        (2, -1, "hydra.launcher.gpus must be auto or an integer >= 0, got -1"),
        (3, 2, "hydra.launcher.jobs=3 with hydra.launcher.gpus=2: the parallel launcher runs one"),
    ],
)
def test_plan_refuses_bad_settings(jobs, gpus, message: str) -> None:
    with pytest.raises(HydraException, match=re.escape(message)):
        plan(jobs, gpus, 4, 8)
