"""SLURM through submitit (no SLURM here): the launcher config reaches sbatch, the warning signal
checkpoints and requeues, the requeued job resumes in its folder and ends like an uninterrupted
run; a stop signal cuts a long evaluation at once, and the resumed run evaluates again."""

import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dlrun.cli import run
from dlrun.engine.guards import Interrupted
from dlrun.launch.sweep import job_folder, job_folders
from dlrun.tasks.classification.trainer import ClassificationTrainer
from tests.conftest import need_extra
from tests.fixtures import write_idx
from tests.test_faults import QUICK, metrics_of
from tests.test_torchrun import assert_close

# 600 images in batches of 2: 300 steps an epoch, 900 in all (a few seconds): a signal sent 0.3 s
# after training starts lands mid-run.
ARGS = ("model=lenet", "data.batch_size=2", "trainer.max_epochs=3", "device=cpu",
        "trainer.progress=false", "trainer.num_threads=1")  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_extra("submitit", "sweep")
    return write_idx(tmp_path_factory.mktemp("slurm_data"), n_train=600, n_test=100)


def dlrun(*args: str, data: Path, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dlrun", *args], cwd=cwd, text=True,
        env=dict(os.environ, DLRUN_DATA=str(data), HYDRA_FULL_ERROR="0", **(env or {})),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def job_pid(sweep: Path) -> int | None:
    """The process submitit's local executor runs this sweep's job in: `python -u -m
    submitit.core._submit <sweep>/.submitit/%j` (another session's jobs name other folders)."""
    folder = str(sweep / ".submitit" / "%j").encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[1:5] == [b"-u", b"-m", b"submitit.core._submit", folder]:
            return int(cmdline.parent.name)
    return None


def settings(overrides: list[str]) -> list[tuple[str, object]]:
    """key=value overrides as (key, value) in order, values read as YAML (Hydra writes a false
    it was given back as False, and quotes a path)."""
    return [(k, yaml.safe_load(v)) for k, v in (o.split("=", 1) for o in overrides)]


def test_the_slurm_launcher_config_reaches_sbatch(data: Path, tmp_path: Path):
    """A fake sbatch records the script submitit writes from hydra.launcher.* and refuses it."""
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\ncat "$1" > {tmp_path / "script.sh"}\nexit 1\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    srun = fake.with_name("srun")  # submitit looks for it before it submits
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(fake.stat().st_mode)
    proc = dlrun(
        "-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
        "hydra.launcher.account=proj", "hydra.launcher.nodes=2",
        "hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=4",
        "hydra.launcher.timeout_min=90", f"hydra.sweep.dir={tmp_path / 'sweep'}", *ARGS,
        data=data, cwd=tmp_path, env={"PATH": f"{fake.parent}:{os.environ['PATH']}"},
    )  # fmt: skip
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0  # the fake sbatch refused: nothing ran
    script = (tmp_path / "script.sh").read_text()
    for line in ("--partition=gpu", "--account=proj", "--nodes=2", "--gpus-per-node=4",
                 "--ntasks-per-node=4", "--time=90", "--signal=USR2@120"):  # fmt: skip
        assert f"#SBATCH {line}" in script, (line, script)


@pytest.mark.slow
def test_the_warning_signal_checkpoints_requeues_and_the_job_resumes_where_it_was(
    data: Path, tmp_path: Path
):
    ref = dlrun(*ARGS, "hydra.run.dir=ref", data=data, cwd=tmp_path)
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    sweep = tmp_path / "sweep"
    proc = dlrun("-m", "hydra/launcher=slurm_local", f"hydra.sweep.dir={sweep}", *ARGS,
                 data=data, cwd=tmp_path)  # fmt: skip
    deadline = time.time() + 120
    while not list(sweep.glob("0_*/events.out.tfevents.*")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # mid-epoch 1
    pid = job_pid(sweep)
    assert isinstance(pid, int) and pid not in (os.getpid(), proc.pid), pid  # the job, not dlrun
    os.kill(pid, signal.SIGUSR2)  # what SLURM sends signal_delay_s before the time limit
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    log = "".join(p.read_text() for p in sorted(sweep.glob(".submitit/*/*_log.out")))
    assert "SIGUSR2 received: finishing this step" in log
    assert "Requeued job" in log  # submitit's requeue, after dlrun's checkpoint
    job = job_folder(sweep, 0)  # the same folder: resume=true is not part of its name
    assert f"resumed from {job}/checkpoints/last.pt at step " in log
    resumed_at = int(log.split("checkpoints/last.pt at step ")[1].split()[0])
    assert 0 < resumed_at < 900
    assert (job / "metrics.json").is_file() and len(job_folders(sweep)) == 1
    pickled = next(sweep.glob(".submitit/*/*_submitted.pkl")).read_bytes()
    # The requeued submission: dlrun's launcher called with this job's overrides, now ending in
    # resume=true, and the sweep folder pinned (a requeue must not name a new ${now:} folder).
    submission = pickle.loads(pickled)
    assert type(submission.function).__name__ == "DlrunLocalLauncher"
    overrides, key, number = submission.args[:3]
    assert settings(overrides) == settings(
        [*ARGS, f"hydra.sweep.dir={sweep.resolve()}", "resume=true"]
    )
    assert (key, number) == ("hydra.sweep.dir", 0)
    assert metrics_of(job) == metrics_of(tmp_path / "ref")


def test_the_slurm_launcher_without_slurm_is_a_clear_error(data: Path, tmp_path: Path):
    proc = dlrun("-m", "hydra/launcher=slurm", *ARGS, data=data, cwd=tmp_path,
                 env={"PATH": str(Path(sys.executable).parent)})  # fmt: skip
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "dlrun: error: hydra/launcher=slurm submits jobs with sbatch and srun" in out
    assert "hydra/launcher=slurm_local" in out and "Traceback" not in out


def test_a_stop_signal_cuts_a_long_evaluation_and_the_resumed_run_evaluates_again(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    cfg = make_cfg(*QUICK, "trainer.max_epochs=2", "sched=none")
    reference = run(cfg, tmp_path / "ref")
    real, cut = ClassificationTrainer.evaluate, []

    def long_evaluation(self: ClassificationTrainer, loader: object, prefix: str) -> dict:
        if prefix == "val" and self.epoch == 2 and not cut:  # the last epoch's evaluation
            cut.append(time.perf_counter())
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # minutes of a large network's evaluation, in short
        return real(self, loader, prefix)

    monkeypatch.setattr(ClassificationTrainer, "evaluate", long_evaluation)
    with pytest.raises(Interrupted, match="SIGTERM: stopped after step") as stopped:
        run(cfg, tmp_path / "run")
    assert time.perf_counter() - cut[0] < 5  # not the 60 s the evaluation would have taken
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert not (tmp_path / "run" / "metrics.json").exists()  # stopped before its end
    resumed = run(make_cfg(*QUICK, "trainer.max_epochs=2", "sched=none", "resume=true"),
                  tmp_path / "run")  # fmt: skip
    timing = ("time/", "images_per_s")
    same = lambda m: {k: v for k, v in m.items() if not any(t in k for t in timing)}  # noqa: E731
    assert same(resumed) == same(reference)
    assert (
        json.loads((tmp_path / "run" / "metrics.json").read_text())["val/acc"]
        == (reference["val/acc"])
    )


@pytest.mark.slow
def test_a_job_of_two_tasks_trains_ddp_like_one_process(data: Path, tmp_path: Path):
    """hydra.launcher.tasks_per_node=2: the job's tasks join one process group (rank, world size
    and address from the job's environment, as on SLURM) and train like torchrun's 2 processes."""
    args = ("model=lenet", "data.batch_size=32", "trainer.max_steps=6", "sched=none",
            "optim=sgd", "device=cpu", "trainer.progress=false")  # fmt: skip
    one = dlrun(*args, "trainer.num_threads=1", "hydra.run.dir=one", data=data, cwd=tmp_path)
    assert one.wait(timeout=300) == 0, one.stdout.read()
    sweep = tmp_path / "sweep"
    two = dlrun("-m", "hydra/launcher=slurm_local", "hydra.launcher.tasks_per_node=2",
                f"hydra.sweep.dir={sweep}", *args, data=data, cwd=tmp_path)  # fmt: skip
    out, _ = two.communicate(timeout=300)
    assert two.returncode == 0, out
    log = "".join(p.read_text() for p in sorted(sweep.glob(".submitit/*/*_log.out")))
    assert "threads: 1 (auto: " in log  # the 2 cores shared by the job's 2 tasks
    logs = [p.read_text() for p in sorted(sweep.glob(".submitit/*/*_log.out"))]
    assert (
        len(logs) == 2 and sum("run folder:" in t for t in logs) == 1
    )  # rank 0 logs, rank 1 warns
    assert_close(tmp_path / "one", job_folder(sweep, 0))
