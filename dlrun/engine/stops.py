"""The one-paragraph messages of a run that stops: NaN/inf loss and out of memory."""

import logging
import signal
from pathlib import Path

import torch

from dlrun.engine.guards import Interrupted
from dlrun.engine.resumable import saved_step
from dlrun.errors import OutOfMemory, TrainingDiverged, UserError

log = logging.getLogger("dlrun.engine.trainer")


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


class Stops:
    """The loop's ways to end early: NaN/inf (stop or skip), a stop signal, out of memory."""

    def _check_finite(self) -> None:
        """Stop (or count the skipped steps) where a loss was NaN/inf, naming the step."""
        bad = self.guard.bad_steps(self.step_count)
        if not bad:
            return
        if self.guard.policy == "skip":
            self.guard.skipped += len({s for s, _ in bad})
            log.warning(
                "non-finite loss at step %d: %d update(s) skipped so far "
                "(trainer.on_nonfinite=skip)", bad[0][0], self.guard.skipped,
            )  # fmt: skip
            return
        group = self.optimizer.param_groups[0]
        raise diverged(
            bad,
            self.epoch + 1,
            self.last_path,
            saved_step(self.last_path),
            group.get("initial_lr", group["lr"]),
            self.dtype == torch.float16,
        )

    def _stop_now(self, mid_epoch: bool = True) -> None:
        name = signal.Signals(self.stop.received or signal.SIGTERM).name
        where = f"epoch {self.epoch + 1}, mid-epoch" if mid_epoch else f"end of epoch {self.epoch}"
        if self.writer is not None:
            self.writer.flush()
        raise Interrupted(
            f"{name}: stopped after step {self.step_count} ({where}) with a checkpoint in "
            f"{self.last_path}. Continue with: dlrun resume=true hydra.run.dir={self.run_dir} "
            "(the run's own options come from its folder)",
            self.stop.received or signal.SIGTERM,
        )

    def _out_of_memory(self) -> UserError:
        evaluating = self.phase == "eval"
        key = "data.eval_batch_size" if evaluating else "data.batch_size"
        size = self.data.eval_batch_size if evaluating else self.data.batch_size
        return out_of_memory(
            str(self.device), self.step_count, self.phase, key, size, self.last_path,
            saved_step(self.last_path),
        )  # fmt: skip
