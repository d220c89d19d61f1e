"""An epoch's batches as optimizer steps: accumulation boundaries, the hooks around each step,
the task's `step`, gradient norms, skipped steps' sums masked, the running sums and their step
scalars every log_every_n_steps, and the epoch's clock (evaluations and checkpoints paused)."""

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import Tensor

from dlrun.engine.guards import NonFiniteGuard
from dlrun.engine.hooks.base import Hooks
from dlrun.engine.loop_state import Cadence, EpochProgress, LoopState, Sums, batch_items
from dlrun.engine.optimize import Optimization
from dlrun.engine.placement import Placement
from dlrun.engine.run_logger import RunLogger
from dlrun.engine.stops import Stops

Step = Callable[[Mapping[str, Tensor]], Sums]  # the task's step(batch)


class OptimizerSteps:
    """Runs an epoch's batches through the task's `step`, one optimizer step per `accumulate`
    batches (and at the epoch's last), counted in `state.step`. A task that trains no weights
    (k-NN) takes none: its batches run, no step is counted and no hook is called."""

    def __init__(
        self,
        opt: Optimization,
        guard: NonFiniteGuard,
        hooks: Hooks,
        logger: RunLogger,
        placement: Placement,
        cadence: Cadence,
        stops: Stops,
        accumulate: int,
        trains_weights: bool = True,
    ) -> None:
        self.opt, self.guard, self.hooks, self.logger = opt, guard, hooks, logger
        self.placement, self.cadence, self.stops = placement, cadence, stops
        self.accumulate, self.trains_weights = accumulate, trains_weights
        self.start = 0.0  # perf_counter() at which this epoch's training time began

    def run(
        self,
        loader: Any,
        p: EpochProgress,
        state: LoopState,
        max_steps: int,
        desc: str,
        step: Step,
    ) -> Iterator[None]:
        """Yields after each optimizer step but the run's last, its sums in `p`, `state.step`
        counting it; at each log_every_n_steps after the NaN/inf check and the window's scalars."""
        self.placement.sync()
        self.start = time.perf_counter() - p.elapsed
        n_batches, skip = len(loader), self.guard.policy == "skip"
        hooked = self.trains_weights and bool(self.hooks)  # no hooks: no per-step work for them
        batches = loader.iterate(p.position if p.batch else None)
        self.logger.beat.peek = lambda: running_losses(p)  # a progress line before a window
        for batch in self.logger.bar(batches, n_batches, p.batch, desc):
            if state.step >= max_steps:
                return
            boundary = (p.batch + 1) % self.accumulate == 0 or p.batch + 1 == n_batches
            boundary = boundary and self.trains_weights
            if hooked and p.batch % self.accumulate == 0:  # an optimizer step's first batch
                self.hooks.before_step()
            self.opt.begin(boundary)
            out: Mapping[str, tuple[Tensor, Any]] = step(batch)
            self.opt.end()
            if self.opt.grad_norms:
                out = dict(out) | {
                    "grad_norm" if role == "model" else f"grad_norm_{role}": (norm, 1)
                    for role, norm in self.opt.grad_norms.items()
                }
            if skip:
                out = self.guard.masked(dict(out), state.step)
            p.batch += 1
            p.window_seen += batch_items(batch)
            p.add(out)
            if not boundary:
                continue
            state.step += 1
            if hooked:
                self.hooks.after_step()
            if self.cadence.logs_at(state.step, max_steps):  # the window's one host sync
                p.seen += p.window_seen
                self.stops.check_finite(state)
                rate = p.seen / (time.perf_counter() - self.start)
                means = p.means(p.window, p.window_counts)
                self.logger.window(means, state.step, self.opt.lr(), rate)
                p.fold()
            if state.step >= max_steps:  # the run's last step: no mid-epoch work after it
                return
            yield

    def elapsed(self) -> float:
        """Seconds of training in this epoch so far (the device waited for)."""
        self.placement.sync()
        return time.perf_counter() - self.start

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """An evaluation or a checkpoint mid-epoch: its time is not training time."""
        self.placement.sync()
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began

    def finish(self, p: EpochProgress) -> float:
        """The epoch's end: the last window into its sums; returns its seconds of training."""
        p.seen += p.window_seen
        p.fold()
        return self.elapsed()


def running_losses(p: EpochProgress) -> dict[str, float]:
    """This rank's mean of each loss term since the epoch's last logging point (the current
    window), read off the device: what a progress line shows before the first window's means
    (one host sync per line, every trainer.log_every_s seconds; no collective: rank 0 alone)."""
    out = {}
    for k, v in p.window.items():
        n = float(p.window_counts[k])
        if k.startswith("loss") and n > 0:
            out[k] = float(v) / n
    return out
