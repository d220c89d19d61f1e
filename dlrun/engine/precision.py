"""trainer.precision: the autocast dtype a run computes in, and the checks that keep it fixed.

`auto` is bf16 where the hardware computes bf16 natively and the task has shown it trains as
well in bf16 (docs/precision.md), fp32 elsewhere. On CUDA that is any GPU with bf16; on the CPU
it is one with AVX512-BF16 or AMX, asked of torch's own CPU probe (cpuinfo, what oneDNN
dispatches its bf16 kernels on): elsewhere bf16 is emulated and slower than fp32.
"""

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dlrun.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


def cpu_bf16_units() -> str | None:
    """The CPU's native bf16 units ("AMX", "AVX512-BF16"), or None where bf16 would be emulated."""
    if not torch.backends.mkldnn.is_available():
        return None
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    return None


# Below this many forward FLOPs per item bf16's conversions cost more than its arithmetic saves
# on the CPU: LeNet-5 (0.8 MFLOPs) trained 1.2x slower in bf16 than in fp32, YOLO (41 MFLOPs) and
# every larger network faster (docs/precision.md).
CPU_BF16_MIN_FLOPS = 10_000_000


def check_precision(precision: str) -> str:
    """A valid trainer.precision name, refused in one line otherwise (before any work)."""
    if precision != "auto" and precision not in DTYPES:
        raise UserError(
            f"trainer.precision must be one of auto, {', '.join(DTYPES)}, got '{precision}'."
        )
    return precision


def resolve_precision(
    precision: str, device: torch.device, cpu_bf16: bool = False, flops: int = 0,
    task: str = "this task",
) -> torch.dtype | None:  # fmt: skip
    """The autocast dtype (None: fp32). On the CPU `auto` is bf16 only where the CPU computes
    bf16 natively, the task trains as well in it (`cpu_bf16`), and the network is large enough
    for bf16 to pay (`flops` per item); each `auto` logs what it chose and why, once."""
    if check_precision(precision) != "auto":
        return DTYPES[precision]
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        why = "this GPU computes bf16" if bf16 else "this GPU has no bf16"
    elif device.type == "cpu":
        units = cpu_bf16_units()
        small = flops < CPU_BF16_MIN_FLOPS
        bf16 = bool(units) and cpu_bf16 and not small
        why = (
            f"this CPU has {units}" if bf16
            else "this CPU has no native bf16 (AVX512-BF16 or AMX)" if not units
            else f"{task} keeps fp32 on the CPU" if not cpu_bf16
            else f"{flops / 1e6:.1f} MFLOPs per item: too small for bf16 to pay on the CPU"
        )  # fmt: skip
    else:
        bf16, why = False, f"{device.type} devices compute in fp32 here"
    log.info("trainer.precision=auto: %s (%s; docs/precision.md)", "bf16" if bf16 else "fp32", why)
    return torch.bfloat16 if bf16 else None


def precision_name(dtype: torch.dtype | None) -> str:
    return NAMES[dtype]


def check_resume(state: Mapping[str, Any], dtype: torch.dtype | None, path: str | Path) -> None:
    """resume=true computes in the precision the run computed in: bf16 and fp32 steps differ, so
    `auto` resolving otherwise here (another CPU or GPU) would break the exact continuation."""
    was = state.get("precision")  # absent before precision was recorded: nothing to compare
    now = precision_name(dtype)
    if was is not None and was != now:
        raise UserError(
            f"resume=true: the run in {path} computed in {was}, but trainer.precision resolves to "
            f"{now} on this machine; resume it where it ran, or start a new run from its weights "
            f"with ckpt={path}."
        )
