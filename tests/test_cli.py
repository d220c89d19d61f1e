"""The `dlrun` command as a user runs it: a subprocess, real Hydra, exit codes and messages."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlrun.cli import CONFIG_DIR
from tests.fixtures import write_idx


def dlrun(*args: str, data: Path, cwd: Path, **popen: object) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, DLRUN_DATA=str(data), DLRUN_CACHE=str(cwd / "cache"), HYDRA_FULL_ERROR="0"
    )
    return subprocess.run(
        [sys.executable, "-m", "dlrun", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **popen,
    )


def test_help_lists_every_group_and_option(tmp_path: Path) -> None:
    out = dlrun("--help", data=tmp_path, cwd=tmp_path).stdout
    out = out.split("== Config groups")[1].split("== The composed config")[0]
    groups = {
        line.split(":")[0]: line.split(": ")[1]
        for line in out.splitlines()
        if line.split(":")[0] in ("model", "data", "loss", "optim", "sched", "trainer")
    }
    for group in groups:
        options = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
        assert groups[group] == ", ".join(options)
    assert len(groups) == 6 and "resnet18" in groups["model"] and "knn" in groups["trainer"]


def test_a_run_makes_the_documented_run_folder(data_root: Path, tmp_path: Path) -> None:
    res = dlrun("trainer.max_epochs=1", "data.batch_size=100", data=data_root, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    run_dir = next((tmp_path / "outputs").glob("*/*_lenet_mnist"))
    assert (
        f"run folder: {run_dir}" in res.stdout and f"tensorboard --logdir {run_dir}" in res.stdout
    )
    assert (run_dir / ".hydra" / "config.yaml").is_file() and list(
        run_dir.glob("events.out.tfevents.*")
    )
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (
        run_dir / "checkpoints" / "best.pt"
    ).is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["epoch"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model=resnet999"], "Could not find 'model/resnet999'"),
        (["trainer.max_epohcs=3"], "Could not override 'trainer.max_epohcs'"),
        (
            ["data.download=false", "data.root=/nonexistent"],
            "Data set MNIST was not found (looked in /nonexistent/MNIST/raw)",
        ),
        (["trainer.precision=fp8"], "trainer.precision must be one of auto, fp32, bf16, fp16, got 'fp8'"),
        (["device=tpu0"], "device='tpu0' is not a device"),
        (["mode=predict"], "mode='predict' is not a mode of this task"),
        (["mode=eval"], "mode=eval needs ckpt=PATH"),
        (
            ["mode=eval", "ckpt=/nonexistent/last.pt"],
            "Checkpoint /nonexistent/last.pt does not exist",
        ),
        (["data=imagefolder"], "data.root must be set for data=imagefolder"),
        (["data.val_split=-1"], "data.val_split must be a number >= 0, got -1"),
        (["data.batch_size=0"], "data.batch_size must be an integer >= 1, got 0"),
        (
            ["model.activation=gelu"],
            "The model config could not be built (ValueError: unknown activation 'gelu'",
        ),
        (["resume=true", "hydra.run.dir=empty_run"], "resume=true found no checkpoint"),
    ],
)
def test_user_errors_end_in_a_message_not_a_traceback(
    data_root: Path, tmp_path: Path, args, message
) -> None:
    res = dlrun(*args, "trainer.max_epochs=1", data=data_root, cwd=tmp_path)
    assert res.returncode != 0
    assert message in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_sigkill_in_the_second_epoch_then_resume_gives_the_same_metrics(tmp_path: Path) -> None:
    data = write_idx(tmp_path / "data", n_train=3000, n_test=200)
    args = ("model=lenet", "model.activation=relu", "data.batch_size=20", "trainer.max_epochs=4")
    whole = dlrun(*args, "hydra.run.dir=whole", data=data, cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    env = dict(os.environ, DLRUN_DATA=str(data), DLRUN_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dlrun", *args, "hydra.run.dir=killed"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "metrics.json").exists(), "the run ended before it was killed"
    resumed = dlrun(*args, "hydra.run.dir=killed", "resume=true", data=data, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    b = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "epoch", "step"):
        assert a[key] == b[key], key
