"""The `dlrun` command as a user runs it: a subprocess, real Hydra, exit codes and messages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlrun.cli import CONFIG_DIR


def dlrun(
    *args: str, data: Path, cwd: Path, env_extra: dict | None = None, **popen: object
) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, DLRUN_DATA=str(data), DLRUN_CACHE=str(cwd / "cache"), HYDRA_FULL_ERROR="0"
    )
    env |= env_extra or {}
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
        (["mode=translate"], "mode='translate' is not a mode of this task"),
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
