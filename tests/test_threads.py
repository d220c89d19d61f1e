"""trainer.num_threads: the cores shared out among the processes started together, set before
anything is built, stored in the checkpoint and used again by resume=true."""

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dlrun.cli import run
from dlrun.config import checks
from dlrun.engine import checkpoint
from dlrun.errors import UserError
from dlrun.launch import threads

QUICK = ("model=lenet", "sched=none", "data.batch_size=50", "trainer.log_every_n_steps=2")


class Killed(Exception):
    """The process dying right after a checkpoint was written."""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No launcher's share in the environment; torch's thread count restored afterwards."""
    for name in (threads.SHARE, threads.SLOT, "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    count = torch.get_num_threads()
    yield
    torch.set_num_threads(count)


def test_auto_is_the_cores_shared_out_among_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "cores", lambda: 8)
    assert threads.auto() == (8, "auto: the 8 cores this process may use")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun: 3 processes on this node
    assert threads.auto() == (2, "auto: 8 cores / 3 processes (LOCAL_WORLD_SIZE)")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert threads.auto()[0] == 1  # never 0
    monkeypatch.setenv(threads.SHARE, "4")  # the parallel launcher's share wins
    monkeypatch.setenv(threads.SLOT, "1/2")
    assert threads.auto() == (4, "auto: 8 cores shared by 2 parallel jobs")
    monkeypatch.setenv(threads.SHARE, "many")
    with pytest.raises(UserError, match="DLRUN_NUM_THREADS='many' must be a whole number >= 1"):
        threads.auto()


def test_cores_are_those_this_process_may_use() -> None:
    assert threads.cores() == len(os.sched_getaffinity(0))


def test_apply_sets_and_logs_the_count(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="dlrun"):
        assert threads.apply(3) == 3
    assert torch.get_num_threads() == 3
    assert "threads: 3 (trainer.num_threads)" in caplog.text


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "true"])
def test_a_bad_num_threads_is_a_clear_error(make_cfg, value: str) -> None:
    with pytest.raises(UserError, match="trainer.num_threads must be an integer >= 1 or null, got"):
        checks.check_config(make_cfg(f"trainer.num_threads={value}"))


def test_resume_uses_the_stored_count(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(threads.SHARE, "1")
    whole = run(make_cfg(*QUICK, "trainer.max_epochs=2"), tmp_path / "whole")
    save = checkpoint.save

    def save_then_die(path: Path, state: dict) -> None:  # the process dies right after epoch 1
        save(path, state)
        raise Killed

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        run(make_cfg(*QUICK, "trainer.max_epochs=2"), tmp_path / "split")
    monkeypatch.setattr(checkpoint, "save", save)
    last = tmp_path / "split" / "checkpoints" / "last.pt"
    assert torch.load(last, weights_only=True)["num_threads"] == 1
    monkeypatch.setenv(threads.SHARE, "2")  # auto would now give 2: the run's 1 is used
    with caplog.at_level(logging.INFO, logger="dlrun"):
        resumed = run(make_cfg(*QUICK, "trainer.max_epochs=2", "resume=true"), tmp_path / "split")
    assert "threads: 1, as the run used (auto would give 2 here)" in caplog.text
    assert torch.get_num_threads() == 1
    assert {k: v for k, v in resumed.items() if "time/" not in k and "per_s" not in k} == {
        k: v for k, v in whole.items() if "time/" not in k and "per_s" not in k
    }
    # An explicit count wins, with a warning; the checkpoint then holds it.
    caplog.clear()
    run(make_cfg(*QUICK, "trainer.max_epochs=3", "resume=true", "trainer.num_threads=2"),
        tmp_path / "split")  # fmt: skip
    assert "trainer.num_threads=2, but the run used 1 threads" in caplog.text
    assert torch.load(last, weights_only=True)["num_threads"] == 2


def test_a_checkpoint_from_before_num_threads_still_resumes(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(threads.SHARE, "1")
    run(make_cfg(*QUICK, "trainer.max_epochs=1"), tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    del state["num_threads"], state["config"]["trainer"]["num_threads"]  # as an older dlrun wrote
    torch.save(state, last)
    monkeypatch.setenv(threads.SHARE, "2")
    resumed = run(make_cfg(*QUICK, "trainer.max_epochs=2", "resume=true"), tmp_path)
    assert resumed["epoch"] == 2 and torch.get_num_threads() == 2  # this process's own count
