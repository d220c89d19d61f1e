"""What a run shows while it works, when no progress bar does (a log file, a cluster job): a log
line every `trainer.log_every_s` seconds of `time.monotonic()`, so the log shows the run is alive.

One rule everywhere: a tqdm bar where one shows (trainer.progress, or a terminal when it is
null), else the lines (0 or null: none). `Clock` is the cheap check the loops call per batch (one
`time.monotonic()`, no device sync); `Heartbeat` counts work towards a total (data preparation,
an evaluation's batches) and is the only code that writes such lines, besides the training line
the run's logger builds from its own numbers (run_logger.py).
"""

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm import tqdm

from dlrun.engine import dist
from dlrun.engine.loop_state import LoopState, RunLength, batch_items

log = logging.getLogger("dlrun")  # the console and <run>/dlrun.log
DEFAULT_EVERY_S = 30.0
# What `configure` set for this process (the command sets trainer.* before the data is built).
SETTINGS: dict[str, Any] = {"every_s": DEFAULT_EVERY_S, "bar": None}


def configure(every_s: float | None, bar: bool | None) -> None:
    """trainer.log_every_s and trainer.progress, for the heartbeats of code that does not get
    them as arguments (data preparation, before the trainer exists)."""
    SETTINGS["every_s"], SETTINGS["bar"] = float(every_s or 0), bar


def duration(seconds: float) -> str:
    """2h05m, 2m31s, 42s: an ETA or an estimate, rounded to what a reader needs."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def open_bar(bar: bool | None, **kwargs: Any) -> Any:
    """A tqdm bar as trainer.progress says (null: tqdm decides by the terminal and TQDM_DISABLE);
    its `.disable` is whether it shows nothing, i.e. whether lines must speak instead."""
    return tqdm(disable=(not bar) if bar is not None else None, leave=False, **kwargs)


class Clock:
    """Due once every `every_s` seconds (0 or None: never). `due()` costs one time.monotonic()."""

    def __init__(self, every_s: float | None) -> None:
        self.every_s = float(every_s or 0)
        self.next = time.monotonic() + self.every_s

    def due(self) -> bool:
        if self.every_s <= 0:
            return False
        now = time.monotonic()
        if now < self.next:
            return False
        self.next = now + self.every_s
        return True


class Heartbeat:
    """`what` advancing towards `total` `unit`s: `tick(n)` after each piece of work. A bar where
    one shows; else, on rank 0, `what: done/total unit, rate unit/s, ETA` every `every_s` seconds
    (None: trainer.log_every_s as `configure` set it; 0: silent)."""

    def __init__(
        self,
        what: str,
        total: int | None,
        every_s: float | None = None,
        *,
        unit: str = "items",
        bar: bool | None | str = "configured",
    ) -> None:
        every_s = SETTINGS["every_s"] if every_s is None else every_s
        bar = SETTINGS["bar"] if bar == "configured" else bar
        self.what, self.total, self.unit = what, total, unit
        self.pbar = open_bar(bar, total=total, desc=what, unit=f" {unit}")  # type: ignore[arg-type]
        self.lines = bool(self.pbar.disable) and bool(every_s) and dist.is_main()
        self.clock = Clock(every_s if self.lines else 0)
        self.start, self.done = time.monotonic(), 0

    def tick(self, n: int = 1) -> None:
        self.done += n
        if not self.pbar.disable:
            self.pbar.update(n)
        elif self.clock.due():
            log.info(self.line())

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def eta(self) -> float:
        """Seconds left at the rate so far (inf before any work or without a total)."""
        if not self.done or not self.total:
            return math.inf
        return self.elapsed() / self.done * max(0, self.total - self.done)

    def line(self) -> str:
        rate = self.done / max(self.elapsed(), 1e-9)
        shown = f"{rate:.1f}" if rate >= 1 else f"{rate:.2g}"  # 0.077 batches/s, not 0.1
        of = f"/{self.total}" if self.total else ""
        return (
            f"{self.what}: {self.done}{of} {self.unit}, {shown} {self.unit}/s, "
            f"ETA {duration(self.eta())}"
        )

    def wrap(self, items: Iterable[Any]) -> Iterator[Any]:
        """`items`, ticking one per item as the next is asked for (the last one's work done)."""
        try:
            for item in items:
                yield item
                self.tick()
        finally:
            self.close()

    def close(self) -> None:
        self.pbar.close()

    def __enter__(self) -> "Heartbeat":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def round_down(x: float) -> int:
    """x to one significant digit, downwards (2734 -> 2000): a number to type."""
    if x < 1:
        return 1
    scale = 10 ** int(math.log10(x))
    return int(x // scale * scale)


class EvalBatches:
    """An evaluation's loader as the task iterates it (`for batch in loader`; every other
    attribute is the loader's): its batches through a `Heartbeat` ("evaluating test: 40/100
    batches, ..., ETA 1m05s"). On the CPU, where a batch's time is its wall time, the first
    batches are timed and one line says what the whole evaluation will take, when that is longer
    than `every_s` (with `hint`, the key that evaluates fewer images). On CUDA nothing is timed
    before the end: a line's numbers are what the host saw, and no sync is added."""

    FIRST_S = 2.0  # the estimate waits for this much work (or 3 batches) to be timed

    def __init__(
        self,
        loader: Any,
        prefix: str,
        every_s: float | None,
        bar: bool | None,
        hint: str | None = None,
        on_close: Any = None,
    ) -> None:
        self.loader, self.prefix, self.every_s, self.bar = loader, prefix, every_s, bar
        self.hint, self.on_close = hint, on_close

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loader"], name)

    def images(self, batches: int | None) -> int | None:
        n = getattr(getattr(self.loader, "sampler", None), "n", None)
        size = getattr(self.loader, "batch_size", None)
        return n if isinstance(n, int) else batches * size if batches and size else None

    def __iter__(self) -> Iterator[Any]:
        total = len(self.loader) if hasattr(self.loader, "__len__") else None
        beat = Heartbeat(
            f"evaluating {self.prefix}", total, self.every_s, unit="batches", bar=self.bar
        )
        on_cpu, estimated = None, not beat.lines or not total
        try:
            for batch in self.loader:
                if on_cpu is None:
                    tensors = batch.values() if isinstance(batch, dict) else ()
                    device = next((t.device for t in tensors if hasattr(t, "device")), None)
                    on_cpu = device is not None and device.type == "cpu"
                    estimated = estimated or not on_cpu
                yield batch
                beat.tick()
                if not estimated and (beat.elapsed() >= self.FIRST_S or beat.done >= 3):
                    estimated = True
                    self.estimate(beat)
        finally:
            beat.close()
            if self.on_close is not None:
                self.on_close(beat.elapsed())

    def estimate(self, beat: Heartbeat) -> None:
        whole = beat.elapsed() / beat.done * (beat.total or 0)
        if whole <= beat.clock.every_s or beat.done >= (beat.total or 0):
            return
        images = self.images(beat.total)
        what = f"{images} {self.prefix} images" if images else f"{beat.total} {self.prefix} batches"
        fewer = ""
        if self.hint and images:
            fit = round_down(images * beat.clock.every_s / whole)
            fewer = f" ({self.hint}={fit} evaluates fewer, about {duration(whole * fit / images)})"
        log.info("evaluating %s: about %s on cpu%s", what, duration(whole), fewer)


class TrainBeat:
    """The training line, when no bar shows: `step 1200/5000 (epoch 3/10): loss=0.4312, 1450
    img/s, ETA 2m31s`. Per batch it adds the batch's length and asks the clock (host work only);
    the loss is the last window's mean (run_logger.window, every log_every_n_steps: the values
    that window already brought to the host), never read off the device for this. The rate and
    the ETA are over the time since the last line, evaluations (`pause`) left out."""

    def __init__(
        self, every_s: float | None, state: LoopState | None, length: RunLength | None
    ) -> None:
        self.every_s = float(every_s or 0)
        self.clock = Clock(self.every_s)
        self.state, self.length = state, length  # the loop's step; its total once planned
        self.means: dict[str, float] = {}  # the last window's means, host floats
        # Before the first window (log_every_n_steps) has brought a loss to the host: this
        # rank's running loss, read off the device once per line (steps.py sets it per epoch).
        self.peek: Callable[[], dict[str, float]] | None = None
        self.mark: tuple[float, int, int] | None = None  # (time, step, items) of the last line
        self.items, self.paused = 0, 0.0

    def pause(self, seconds: float) -> None:
        """An evaluation took `seconds`: not training time."""
        self.paused += seconds

    def wrap(self, batches: Iterable[Any], desc: str) -> Iterator[Any]:
        if not self.every_s or self.state is None or not dist.is_main():
            yield from batches
            return
        if self.mark is None:
            self.mark = (time.monotonic(), self.state.step, self.items)
        for batch in batches:
            yield batch
            self.items += batch_items(batch)
            if self.clock.due():
                log.info(self.line(desc))

    def line(self, desc: str) -> str:
        assert self.state is not None and self.mark is not None
        now, step = time.monotonic(), self.state.step
        began, step0, items0 = self.mark
        span = max(now - began - self.paused, 1e-9)
        self.mark, self.paused = (now, step, self.items), 0.0
        steps = step - step0
        total = getattr(self.length, "total_steps", step)  # RunLength.plan sets it
        eta = (total - step) * span / steps if steps > 0 else math.inf
        means = self.means or (self.peek() if self.peek is not None else {})
        losses = {k: v for k, v in means.items() if k == "loss"} or {
            k: v for k, v in means.items() if k.startswith("loss")
        }
        shown = "".join(f"{k}={v:.4f}, " for k, v in losses.items())
        rate = (self.items - items0) / span
        head = f"step {step}/{total} ({desc})"
        return f"{head}: {shown}{rate:.0f} img/s, ETA {duration(eta)}"
