"""The one-paragraph messages of a run that stops: NaN/inf loss, a stop signal, out of memory."""

import logging
import signal
from pathlib import Path
from typing import Any

import torch

from dlrun.engine.guards import Interrupted, NonFiniteGuard
from dlrun.engine.loop_state import LoopState
from dlrun.engine.optimize import Optimization
from dlrun.engine.run_folder import RunFolder, saved_step
from dlrun.engine.run_logger import RunLogger
from dlrun.errors import OutOfMemory, TrainingDiverged

log = logging.getLogger("dlrun.engine.loop")


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
    device: str, step: int, phase: str, key: str, size: int, last: Path
) -> OutOfMemory:
    """Out of memory at `step` in `phase` (train | eval), naming the batch size `key` to lower."""
    saved = saved_step(last)
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


class Stops:
    """The loop's early ends, as one-paragraph errors naming what to do: a NaN/inf loss (stop,
    or count the skipped steps), a stop signal (after its checkpoint), out of memory."""

    def __init__(
        self,
        guard: NonFiniteGuard,
        opt: Optimization,
        folder: RunFolder,
        logger: RunLogger,
        data: Any,
        device: torch.device,
        fp16: bool,
    ) -> None:
        self.guard, self.opt, self.folder, self.logger = guard, opt, folder, logger
        self.data, self.device, self.fp16 = data, device, fp16

    def check_finite(self, state: LoopState) -> None:
        """After the steps up to `state.step`: stop where a loss was NaN/inf, naming the step, or
        (trainer.on_nonfinite=skip) count the skipped updates."""
        bad = self.guard.bad_steps(state.step)
        if not bad:
            return
        if self.guard.policy == "skip":
            self.guard.skipped += len({s for s, _ in bad})
            log.warning(
                "non-finite loss at step %d: %d update(s) skipped so far "
                "(trainer.on_nonfinite=skip)", bad[0][0], self.guard.skipped,
            )  # fmt: skip
            return
        group = next(iter(self.opt.optimizers.values())).param_groups[0]
        last = self.folder.last_path
        lr = group.get("initial_lr", group["lr"])
        raise diverged(bad, state.epoch + 1, last, saved_step(last), lr, self.fp16)

    def interrupted(self, signum: int | None, state: LoopState, mid_epoch: bool) -> Interrupted:
        """A stop signal, after the checkpoint at `state.step`; TensorBoard flushed first."""
        self.logger.flush()
        signum = signum or signal.SIGTERM
        where = (
            f"epoch {state.epoch + 1}, mid-epoch" if mid_epoch else f"end of epoch {state.epoch}"
        )
        return Interrupted(
            f"{signal.Signals(signum).name}: stopped after step {state.step} ({where}) with a "
            f"checkpoint in {self.folder.last_path}. Continue with: dlrun resume=true "
            f"hydra.run.dir={self.folder.run_dir} (the run's own options come from its folder)",
            signum,
        )

    def out_of_memory(self, step: int, phase: str) -> OutOfMemory:
        """Out of memory at `step` in `phase` (train | eval): names the batch size to lower."""
        evaluating = phase == "eval"
        key = "data.eval_batch_size" if evaluating else "data.batch_size"
        size = self.data.eval_batch_size if evaluating else self.data.batch_size
        return out_of_memory(str(self.device), step, phase, key, size, self.folder.last_path)
