"""`torchrun --nproc_per_node=2 -m dlrun ...` on the CPU (gloo): one run folder, rank 0 writes,
metrics equal to one process with the same global batch, and resume after kill -9 of both."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# LeNet-5 without BatchNorm (its default), no augmentation on MNIST: one process with the global
# batch and two with half each compute the same mean gradient. SGD, not Adam: Adam's first steps
# are nearly sign(gradient), so a gradient ~1e-9 from zero moves a weight by +-lr either way.
ARGS = ("model=lenet", "data=mnist", "data.batch_size=32", "trainer.max_steps=6",
        "trainer.log_every_n_steps=1", "sched=none", "optim=sgd")  # fmt: skip
TIMING = ("time/", "train/images_per_s")


def env(data: Path) -> dict[str, str]:
    return dict(os.environ, DLRUN_DATA=str(data), OMP_NUM_THREADS="1", TQDM_DISABLE="1",
                HYDRA_FULL_ERROR="0")  # fmt: skip


def launch(*args: str, data: Path, cwd: Path, procs: int) -> subprocess.Popen:
    runner = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={procs}", "-m", "dlrun"]
        if procs > 1 else [sys.executable, "-m", "dlrun"]
    )  # fmt: skip
    return subprocess.Popen(
        [*runner, *args], cwd=cwd, env=env(data), text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own, so a
    process-group kill would miss them), from /proc."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def stable(folder: Path) -> dict[str, float]:
    metrics = json.loads((folder / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if not k.startswith(TIMING)}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_close(a: Path, b: Path, exact: bool = False) -> None:
    """Float tolerance between world sizes: a sum over ranks adds in another order."""
    ma, mb = stable(a), stable(b)
    assert ma.keys() == mb.keys()
    for k in ma:
        assert ma[k] == (mb[k] if exact else pytest.approx(mb[k], rel=1e-4, abs=1e-5)), k
    wa, wb = weights(a), weights(b)
    for k in wa:
        assert torch.equal(wa[k], wb[k]) if exact else torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_two_processes_train_one_run_folder_like_one_process(
    data_root: Path, tmp_path: Path
) -> None:
    out = finish(launch(*ARGS, data=data_root, cwd=tmp_path / "", procs=2))
    assert out.count("run folder:") == 1  # rank 0 logs; the other rank only warns
    folders = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(folders) == 1, folders  # rank 0 named it, rank 1 agreed
    two = folders[0]
    assert len(list(two.glob("events.out.tfevents.*"))) == 1  # only rank 0 writes
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    finish(launch(*ARGS, "hydra.run.dir=one", data=data_root, cwd=tmp_path, procs=1))
    assert_close(two, tmp_path / "one")


def test_sync_batchnorm_under_two_processes_equals_one_process(
    data_root: Path, tmp_path: Path
) -> None:
    # LeNet-BN: BatchNorm after every layer; statistics over the global batch (gloo, on the CPU).
    args = (*ARGS, "model.batchnorm=true")
    finish(launch(*args, "trainer.sync_batchnorm=true", "hydra.run.dir=two", data=data_root,
                  cwd=tmp_path, procs=2))  # fmt: skip
    finish(launch(*args, "trainer.sync_batchnorm=true", "hydra.run.dir=one", data=data_root,
                  cwd=tmp_path, procs=1))  # fmt: skip
    assert_close(tmp_path / "two", tmp_path / "one")  # running statistics included
    # Without it each rank normalises by its own half: the runs part.
    finish(launch(*args, "hydra.run.dir=local", data=data_root, cwd=tmp_path, procs=2))
    wa, wb = weights(tmp_path / "local"), weights(tmp_path / "one")
    assert not all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-4) for k in wa)


def test_kill_9_of_both_ranks_then_resume_under_two_ends_like_an_uninterrupted_run(
    data_root: Path, tmp_path: Path
) -> None:
    args = (*ARGS, "trainer.checkpoint_every_n_steps=1", "trainer.max_steps=150")
    run = launch(*args, "hydra.run.dir=killed", data=data_root, cwd=tmp_path, procs=2)
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    for pid in [*descendants(run.pid), run.pid]:  # both ranks and torchrun, mid-run
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    run.communicate(timeout=60)
    assert last.exists()
    step = torch.load(last, weights_only=False)["step"]
    assert 0 < step < 150  # killed mid-run
    finish(launch(*args, "hydra.run.dir=killed", "resume=true", data=data_root, cwd=tmp_path,
                  procs=2))  # fmt: skip
    finish(launch(*args, "hydra.run.dir=whole", data=data_root, cwd=tmp_path, procs=2))
    assert_close(tmp_path / "killed", tmp_path / "whole", exact=True)  # same world size


def test_the_gan_trains_under_two_processes(make_cfg, data_root: Path, tmp_path: Path) -> None:
    from dlrun.cli import run

    # FID on a LeNet of the fixture (offline: nothing is downloaded in a test).
    run(make_cfg("model=lenet", "data=mnist", "trainer.max_steps=1"), tmp_path / "lenet")
    fid = f"metrics.fid.ckpt={tmp_path / 'lenet' / 'checkpoints' / 'last.pt'}"
    # Generator and discriminator are each wrapped on their own (one DDP per trained role).
    args = ("model=dcgan", "data=mnist", "trainer.max_steps=3", "metrics.n=50",
            "metrics.fid.features=ckpt", fid, "hydra.run.dir=gan")  # fmt: skip
    finish(launch(*args, data=data_root, cwd=tmp_path, procs=2))
    metrics = stable(tmp_path / "gan")
    assert metrics["step"] == 3 and {"train/loss_d", "train/loss_g", "val/fid_classifier"} <= set(
        metrics
    )


def test_resume_with_another_number_of_processes_continues_and_says_not_bit_exact(
    data_root: Path, tmp_path: Path
) -> None:
    finish(launch(*ARGS, "hydra.run.dir=r", data=data_root, cwd=tmp_path, procs=2))
    more = (*(a for a in ARGS if not a.startswith("trainer.max_steps")), "trainer.max_steps=10")
    out = finish(launch(*more, "hydra.run.dir=r", "resume=true", data=data_root, cwd=tmp_path,
                        procs=1))  # fmt: skip
    assert "resumed with 1 processes from a run of 2" in out and "not bit-exact" in out
    assert stable(tmp_path / "r")["step"] == 10
