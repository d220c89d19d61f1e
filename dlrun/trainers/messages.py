"""The one-paragraph messages of a run that stops: NaN/inf loss and out of memory."""

from pathlib import Path

from dlrun.errors import OutOfMemory, TrainingDiverged


def kept_checkpoint(path: Path, saved: int | None, intact: str = "is untouched") -> str:
    if saved is None:
        return "No checkpoint had been written yet"
    return f"The last good checkpoint, {path} (step {saved}), {intact}"


def diverged(
    bad: list[tuple[int, str]], epoch: int, last: Path, saved: int | None, lr: float, fp16: bool
) -> TrainingDiverged:
    """NaN/inf at the first bad step of `bad` ((step, role) pairs), naming the network(s)."""
    step = bad[0][0]
    roles = [r for s, r in bad if s == step and r != "model"]
    which = f" ({', '.join(roles)})" if roles else ""
    later = sorted({s for s, _ in bad if s != step})
    more = f" and at {len(later)} later step(s) up to step {later[-1]}" if later else ""
    fp16_hint = " fp16 overflow (use trainer.precision=bf16 or fp32);" if fp16 else ""
    return TrainingDiverged(
        f"The loss{which} became NaN or infinite at step {step} (epoch {epoch}){more}; "
        f"training stopped. {kept_checkpoint(last, saved)}. Likely causes: a learning rate too "
        f"high (optim.lr={lr:g}: try 10x lower);{fp16_hint} a loss that takes log(0); NaN or inf "
        f"values in the data. Start again from the last good weights with ckpt={last} and a lower "
        "optim.lr, or set trainer.on_nonfinite=skip to skip such steps."
    )


def out_of_memory(
    device: str, step: int, phase: str, key: str, size: int, last: Path, saved: int | None
) -> OutOfMemory:
    kept = (
        f"The checkpoint {last} (step {saved}) is intact."
        if saved is not None
        else "No checkpoint had been written yet."
    )
    return OutOfMemory(
        f"{device} ran out of memory at step {step} ({phase}) with {key}={size}. Lower it (e.g. "
        f"{key}={max(1, size // 2)}), or use trainer.precision=bf16, or a smaller model. {kept} "
        "A smaller batch makes a different run: start it from those weights with ckpt=PATH."
    )
