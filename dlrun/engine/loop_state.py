"""The small typed objects the trainer hands its parts, instead of the parts reading the trainer:
the loop's counters (`LoopState`), where it is inside an epoch (`EpochProgress`), how long it
runs (`RunLength`) and when it evaluates, logs and checkpoints (`Cadence`); and the helpers that
give the trainer the attribute names tasks and hooks read (`state_field`, `delegated`)."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dlrun.engine import dist
from dlrun.errors import UserError

Sums = Mapping[str, tuple[Tensor, Tensor | int]]  # what a step returns: metric -> (sum, count)


def batch_items(batch: Mapping[str, Tensor]) -> int:
    """Items in a dict batch (its first tensor's length): what images/s counts."""
    return len(next(iter(batch.values())))


@dataclass
class LoopState:
    """Where the run is: what a checkpoint saves of the loop itself, and metrics.json reports."""

    epoch: int = 0  # epochs done
    step: int = 0  # optimizer steps done
    train_time: float = 0.0  # seconds of training (evaluation and checkpoints not counted)
    metrics: dict[str, float] = field(default_factory=dict)  # the last value of each scalar
    last_eval_step: int = -1  # the step of the last (complete) validation

    def load(self, state: Mapping[str, Any]) -> None:
        """A checkpoint's counters (it holds each field under its own name: "epoch", "step" ...)."""
        self.epoch, self.step, self.train_time = state["epoch"], state["step"], state["train_time"]
        self.metrics, self.last_eval_step = state["metrics"], state.get("last_eval_step", -1)


@dataclass
class EpochProgress:
    """Where a run is inside an epoch: what a mid-epoch checkpoint needs to continue exactly."""

    batch: int = 0  # batches of this epoch done
    position: dict[str, Any] | None = None  # the train loader's position() (order, aug RNGs)
    sums: dict[str, Tensor] = field(default_factory=dict)  # up to the last logging point
    counts: dict[str, Any] = field(default_factory=dict)  # items each sum covers (int or Tensor)
    window: dict[str, Tensor] = field(default_factory=dict)  # since the last logging point
    window_counts: dict[str, Any] = field(default_factory=dict)
    seen: int = 0  # items (images) trained on: images/s
    window_seen: int = 0
    elapsed: float = 0.0  # seconds of training in this epoch so far

    def add(self, out: Mapping[str, tuple[Tensor, Any]]) -> None:
        """One step's (sum, count) per metric; in-place adds: no host sync, no allocation."""
        for k, (value, count) in out.items():
            if k in self.window:
                self.window[k] += value
                self.window_counts[k] = self.window_counts[k] + count
            else:
                self.window[k] = value.clone()
                self.window_counts[k] = count.clone() if isinstance(count, Tensor) else count

    def fold(self) -> None:
        """The window into the epoch's sums (at each logging point and at the epoch's end)."""
        for k, v in self.window.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            n = self.window_counts[k]
            self.counts[k] = self.counts[k] + n if k in self.counts else n
        self.window, self.window_counts, self.window_seen = {}, {}, 0

    @staticmethod
    def means(sums: Mapping[str, Tensor], counts: Mapping[str, Any]) -> dict[str, float]:
        """Each metric's mean over the items it counted (the host sync); none for a zero count."""
        totals = {
            k: dist.all_reduce_sum(v.clone()) if dist.initialized() else v for k, v in sums.items()
        }
        out = {}
        for k, v in totals.items():
            n = counts[k]
            n = (
                float(dist.all_reduce_sum(torch.as_tensor(n, device=v.device).clone()))
                if dist.initialized()
                else n
            )
            n = n.item() if isinstance(n, Tensor) else n
            if n:
                out[k] = v.item() / n
        return out

    def summary(
        self, elapsed: float, lr: float | None, epoch: int, skipped: int
    ) -> dict[str, float]:
        """The epoch's scalars: each metric's mean (train/*), the lr (none without an optimizer),
        images/s, its time, and the 1-based `epoch`; train/skipped_steps once any was skipped."""
        metrics = {f"train/{k}": v for k, v in self.means(self.sums, self.counts).items()}
        if lr is not None:
            metrics["train/lr"] = lr
        metrics |= {
            "train/images_per_s": self.seen / max(elapsed, 1e-9),
            "time/epoch_s": elapsed,
            "epoch": float(epoch),
        }
        if skipped:
            metrics["train/skipped_steps"] = float(skipped)
        return metrics

    def on(self, device: Any) -> "EpochProgress":
        """A checkpoint's progress (`vars` of one) with its partial sums back on the device."""
        for part in ("sums", "window", "counts", "window_counts"):
            setattr(self, part, {
                k: v.to(device) if isinstance(v, Tensor) else v
                for k, v in getattr(self, part).items()
            })  # fmt: skip
        return self


def state_field(name: str) -> property:
    """A trainer attribute that is its `LoopState`'s `name`: the names tasks and hooks read
    (`trainer.epoch`, `trainer.step_count`, `trainer.metrics` ...)."""
    return property(
        lambda self: getattr(self.state, name),
        lambda self, value: setattr(self.state, name, value),
        doc=f"The loop's `{name}` (LoopState).",
    )


def delegated(part: str, name: str) -> property:
    """A trainer attribute that is its part's (`trainer.writer`: `trainer.logger.writer`)."""
    return property(lambda self: getattr(getattr(self, part), name), doc=f"`{part}.{name}`.")


@dataclass
class RunLength:
    """How long a run trains: trainer.max_epochs, or trainer.max_steps optimizer steps (which
    wins), an optimizer step every `accumulate` batches (and at an epoch's last)."""

    max_epochs: int = 10
    max_steps: int | None = None
    accumulate: int = 1

    def __post_init__(self) -> None:
        if self.max_epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise UserError("trainer.max_epochs and trainer.max_steps must be positive integers.")

    def plan(self, batches_per_epoch: int) -> tuple[int, int, int]:
        """(optimizer steps per epoch, max_steps, max_epochs) for epochs of so many batches."""
        per_epoch = -(-batches_per_epoch // self.accumulate)
        self.total_steps = self.max_steps or self.max_epochs * per_epoch
        self.total_epochs = -(-self.total_steps // per_epoch)
        return per_epoch, self.total_steps, self.total_epochs

    def done(self, state: LoopState) -> bool:
        """Whether `state` has trained the planned epochs or steps (after `plan`)."""
        return state.epoch >= self.total_epochs or state.step >= self.total_steps


@dataclass
class Cadence:
    """When the loop evaluates (trainer.val_every_n_epochs / val_every_n_steps), logs its step
    scalars (log_every_n_steps) and writes a mid-epoch checkpoint (checkpoint_every_n_steps)."""

    val_every_epochs: int = 1
    val_every_steps: int | None = None
    log_every: int = 50
    checkpoint_every: int | None = None

    def __post_init__(self) -> None:
        if self.val_every_epochs < 1 or (
            self.val_every_steps is not None and self.val_every_steps < 1
        ):
            raise UserError(
                "trainer.val_every_n_epochs and trainer.val_every_n_steps must be positive "
                "integers (val_every_n_steps may be null)."
            )
        self.log_every = max(1, self.log_every)

    def fit(self, max_steps: int) -> None:
        """A run shorter than one logging window logs 10 step points (a curve, not one dot); a
        longer one keeps the cadence asked for (each window ends in a host sync)."""
        if max_steps < self.log_every:
            self.log_every = max(1, max_steps // 10)

    def validates_after_epoch(self, epoch: int, finished: bool) -> bool:
        return epoch % self.val_every_epochs == 0 or finished

    def validates_at(self, step: int) -> bool:
        return bool(self.val_every_steps) and step % self.val_every_steps == 0

    def logs_at(self, step: int, max_steps: int) -> bool:
        return step % self.log_every == 0 or step >= max_steps

    def checkpoints_at(self, step: int) -> bool:
        return bool(self.checkpoint_every) and step % self.checkpoint_every == 0
