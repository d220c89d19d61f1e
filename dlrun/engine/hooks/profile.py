"""trainer.profile=N: N training steps recorded by torch.profiler into <run>/profile/.

The first steps of a run pay for allocation and kernel selection, so the profiler skips one step
and warms up on another before it records N (torch.profiler's schedule). It writes a Chrome
trace (`trace.json`: open it in https://ui.perfetto.dev or chrome://tracing) and the table of the
operators that took the most time (`top_ops.txt`, also in the log).
"""

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from dlrun.engine import dist
from dlrun.engine.hooks.base import Hook
from dlrun.errors import UserError

if TYPE_CHECKING:
    from dlrun.engine.loop import Trainer

log = logging.getLogger("dlrun.engine.loop")
WAIT, WARMUP = 1, 1  # steps skipped, then steps traced but discarded, before the N recorded
TOP = 20  # operators in the table


def check_steps(steps: int | None) -> None:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise UserError(
            f"trainer.profile must be a positive number of steps to record (e.g. "
            f"trainer.profile=10) or null, got {steps!r}."
        )


class StepProfiler:
    """Started at the run's first step, advanced after each optimizer step, done after N."""

    def __init__(self, steps: int, out_dir: Path, device: torch.device) -> None:
        check_steps(steps)
        self.steps, self.out_dir, self.device = steps, Path(out_dir), device
        self.done = False
        self._prof: profile | None = None
        self._left = WAIT + WARMUP + steps

    def start(self) -> None:
        if self.done or self._prof is not None:
            return
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._prof = profile(
            activities=activities,
            schedule=schedule(wait=WAIT, warmup=WARMUP, active=self.steps, repeat=1),
            on_trace_ready=self._write,
            record_shapes=True,
        )
        self._prof.__enter__()

    def step(self) -> None:
        """After an optimizer step; the profile is written once N steps are recorded."""
        if self._prof is None or self.done:
            return
        self._prof.step()
        self._left -= 1
        if self._left <= 0:
            self.stop()

    def stop(self) -> None:
        """End the profile (also when the run ends before N steps: what was recorded is kept)."""
        if self._prof is not None and not self.done:
            self.done = True
            self._prof.__exit__(None, None, None)
            self._prof = None

    def _write(self, prof: profile) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / "trace.json"
        prof.export_chrome_trace(str(trace))
        by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=by, row_limit=TOP)
        (self.out_dir / "top_ops.txt").write_text(table + "\n")
        log.info(
            "profile of %d steps: %s (open in https://ui.perfetto.dev); top operators by %s:\n%s",
            self.steps, trace, by, table,
        )  # fmt: skip


class Profile(Hook):
    """trainer.profile=N: the main process records from the run's first step until N are done
    (a resumed run records its first N again; the profile has nothing to resume)."""

    state_key = "profile"

    def __init__(self, steps: int) -> None:
        check_steps(steps)
        self.steps = steps
        self.profiler: StepProfiler | None = None

    def setup(self, trainer: "Trainer") -> None:
        if dist.is_main():
            self.profiler = StepProfiler(self.steps, trainer.run_dir / "profile", trainer.device)

    def on_fit_start(self, trainer: "Trainer") -> None:
        if self.profiler is not None:
            self.profiler.start()

    def after_step(self, trainer: "Trainer") -> None:
        if self.profiler is not None:
            self.profiler.step()

    def on_fit_end(self, trainer: "Trainer") -> None:
        if self.profiler is not None:
            self.profiler.stop()
