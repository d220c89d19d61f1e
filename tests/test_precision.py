"""trainer.precision=auto on the CPU: bf16 where the CPU computes it natively and the task has
shown parity (docs/precision.md), recorded in the checkpoint, and a resume that would resolve
otherwise refused."""

import logging
from pathlib import Path

import pytest
import torch

from dlrun.cli import run
from dlrun.engine import checkpoint, precision
from dlrun.engine.precision import resolve_precision
from dlrun.errors import UserError
from dlrun.tasks.classification.trainer import ClassificationTrainer

QUICK = ("model=lenet", "model.activation=relu", "data.batch_size=50", "sched=none")
CPU = torch.device("cpu")


def test_the_cpu_probe_is_torch_s_own() -> None:
    # cpuinfo's flags, as torch reads them (not /proc): AMX or AVX512-BF16 means native bf16
    flags = torch._C._cpu._get_cpu_capability()
    native = flags.get("amx_bf16") or flags.get("avx512_bf16")
    assert (precision.cpu_bf16_units() is not None) == bool(native)


BIG = precision.CPU_BF16_MIN_FLOPS  # a network large enough for bf16 to pay on the CPU


@pytest.mark.parametrize(
    ("units", "task_allows", "flops", "why"),
    [
        ("AVX512-BF16", True, BIG, "bf16 (this CPU has AVX512-BF16"),
        ("AMX", False, BIG, "fp32 (GANTrainer keeps fp32 on the CPU"),
        ("AMX", True, BIG - 1, "fp32 (10.0 MFLOPs per item: too small for bf16 to pay"),
        (None, True, BIG, "fp32 (this CPU has no native bf16"),
    ],
)
def test_auto_on_the_cpu_needs_native_bf16_a_task_that_allows_it_and_a_large_network(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    units: str | None, task_allows: bool, flops: int, why: str,
) -> None:  # fmt: skip
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: units)
    with caplog.at_level(logging.INFO, logger="dlrun.engine.precision"):
        dtype = resolve_precision("auto", CPU, task_allows, flops, "GANTrainer")
    assert dtype is (torch.bfloat16 if why.startswith("bf16") else None)
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"trainer.precision=auto: {why}")
    # an explicit choice is taken as given, and logs nothing
    assert resolve_precision("fp32", CPU, True, BIG) is None
    assert resolve_precision("bf16", CPU, False, 0) is torch.bfloat16
    assert len(caplog.records) == 1


def test_a_run_records_its_precision_and_a_resume_that_resolves_otherwise_is_refused(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ClassificationTrainer, "cpu_bf16", True)
    monkeypatch.setattr(precision, "CPU_BF16_MIN_FLOPS", 0)  # the test's LeNet is small
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: "AMX")
    run(make_cfg(*QUICK, "trainer.max_steps=3", "trainer.precision=auto"), tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    assert checkpoint.load(last)["precision"] == "bf16"
    # the same machine continues it; one without native bf16 would compute in fp32: refused
    run(make_cfg(*QUICK, "trainer.max_steps=4", "trainer.precision=auto", "resume=true"),
        tmp_path)  # fmt: skip
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: None)
    with pytest.raises(UserError, match=r"computed in bf16, but trainer.precision resolves to fp32"):
        run(make_cfg(*QUICK, "trainer.max_steps=5", "trainer.precision=auto", "resume=true"),
            tmp_path)  # fmt: skip


class Killed(BaseException):
    pass


def test_exact_resume_holds_when_auto_resolves_to_bf16(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the README's exact-resume promise, per precision: here the one `auto` picks on a bf16 CPU
    monkeypatch.setattr(ClassificationTrainer, "cpu_bf16", True)
    monkeypatch.setattr(precision, "CPU_BF16_MIN_FLOPS", 0)
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: "AVX512-BF16")
    args = (*QUICK, "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=3",
            "trainer.precision=auto", "data.batch_size=25")  # fmt: skip
    whole = run(make_cfg(*args), tmp_path / "whole")
    save = checkpoint.save

    def save_then_die(path: Path, state: dict) -> None:  # dies right after the step-3 checkpoint
        save(path, state)
        raise Killed

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        run(make_cfg(*args), tmp_path / "split")
    monkeypatch.setattr(checkpoint, "save", save)
    assert checkpoint.load(tmp_path / "split" / "checkpoints" / "last.pt")["step"] == 3
    resumed = run(make_cfg(*args, "resume=true"), tmp_path / "split")
    timing = ("time", "images_per_s", "_s")
    assert {k: v for k, v in resumed.items() if not any(t in k for t in timing)} == {
        k: v for k, v in whole.items() if not any(t in k for t in timing)
    }
    assert checkpoint.load(tmp_path / "whole" / "checkpoints" / "last.pt")["precision"] == "bf16"
