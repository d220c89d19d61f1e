"""trainer.precision: the autocast dtype a run computes in."""

import torch

from dlrun.errors import UserError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype; `auto` is bf16 where the hardware has it (CUDA), fp32 elsewhere."""
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else None
    if precision not in DTYPES:
        raise UserError(
            f"trainer.precision must be one of auto, {', '.join(DTYPES)}, got '{precision}'."
        )
    return DTYPES[precision]
