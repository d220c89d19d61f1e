"""What a run reports: TensorBoard (rank 0 only), the progress bar, the scalars and the log lines."""

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter

from dlrun.engine import dist
from dlrun.engine.loop_state import LoopState, RunLength
from dlrun.engine.progress import TrainBeat, open_bar
from dlrun.engine.tb import Writer, log_config, log_hparams, log_layout

if TYPE_CHECKING:
    from dlrun.engine.loggers import Loggers

log = logging.getLogger("dlrun.engine.loop")  # the loop's lines, under the loop's name
TB_TAGS = {"epoch": "time/epoch"}  # metrics.json key -> TensorBoard tag, where they differ


class RunLogger:
    """The SummaryWriter of `run_dir` (None off rank 0, or before `open`), the epoch's progress
    bar (`progress`: true, false, or null: tqdm decides by the terminal) and the log lines; where
    no bar shows, a training line every `log_every_s` seconds (progress.py; 0 or None: none)."""

    def __init__(
        self,
        run_dir: str | Path,
        progress: bool | None,
        log_every_s: float | None = 30.0,
        state: LoopState | None = None,
        length: RunLength | None = None,
    ) -> None:
        self.run_dir, self.progress = Path(run_dir), progress
        self.log_every_s, self.beat = log_every_s, TrainBeat(log_every_s, state, length)
        self.writer: SummaryWriter | None = None
        self.pbar: Any = None
        self.size = "?"  # the model's parameters and FLOPs, as `open` was told
        # The `logger` group's other loggers (csv, mlflow, wandb: engine/loggers/), fed from the
        # places that feed TensorBoard; set by their hook's setup, None without any.
        self.loggers: Loggers | None = None

    def open(self, step: int, model: str, params: int, flops: int) -> SummaryWriter | None:
        """Say what trains; the writer (rank 0): at `step`, it drops the events a killed run
        logged after its last checkpoint (purge_step)."""
        log.info(
            "%s: %d trainable parameters, %s forward FLOPs per item", model, params, f"{flops:,}"
        )
        if not dist.is_main():  # one process writes TensorBoard
            return None
        old_events = any(self.run_dir.glob("events.out.tfevents.*"))
        # Writer: also writes the loss and the monitor under the groups TensorBoard opens first
        self.writer = Writer(str(self.run_dir), purge_step=step if old_events else None)
        if self.loggers is not None:
            self.loggers.start(step)
        return self.writer

    def header(
        self,
        record: Mapping[str, Any],
        hparams: Mapping[str, Any],
        declared: Sequence[str],
        monitor: str | None,
    ) -> None:
        """Once per fresh run: the config record as text, the HParams declaration (the monitor
        and the task's `declared` tags), the layout, the model's size."""
        if self.writer is None:
            return
        log_config(self.writer, OmegaConf.to_yaml(dict(record)))
        tags = [monitor] if monitor else []
        tags += [m for m in declared if m not in tags]
        log_hparams(self.writer, dict(hparams), tags)
        log_layout(self.writer, monitor)
        # Text, not scalars: two constant one-point charts would open TensorBoard's view.
        self.writer.add_text("model", self.size, 0)
        if self.loggers is not None:
            self.loggers.log_params(record)

    def bar(self, batches: Iterable[Any], total: int, initial: int, desc: str) -> Any:
        """The epoch's batches through the bar, or (no bar showing) through the timed lines."""
        self.pbar = open_bar(
            self.progress, iterable=batches, total=total, initial=initial, desc=desc
        )
        return self.beat.wrap(self.pbar, desc) if self.pbar.disable else self.pbar

    def window(self, means: Mapping[str, float], step: int, lr: float | None, rate: float) -> None:
        """Every log_every_n_steps: the window's step scalars, the lr, the bar's postfix (or the
        loss the next timed line shows: `means` are host floats already)."""
        self.beat.means = dict(means)
        if self.writer is not None:
            for k, v in means.items():
                self.writer.add_scalar(f"train/{k}_step", v, step)
            if lr is not None:
                self.writer.add_scalar("train/lr", lr, step)
        if self.loggers is not None:
            lr_tag = {} if lr is None else {"train/lr": lr}
            self.loggers.log_metrics({f"train/{k}_step": v for k, v in means.items()} | lr_tag, step)
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{means.get('loss', 0):.4f}", img_s=f"{rate:.0f}")

    def log(self, metrics: Mapping[str, float], state: LoopState) -> None:
        """Scalars at `state.step`, kept in `state.metrics`; after an evaluation, one log line."""
        if self.writer is not None:
            for tag, value in metrics.items():  # "epoch" as time/epoch: a chart among the times
                self.writer.add_scalar(TB_TAGS.get(tag, tag), value, state.step)
        if self.loggers is not None:  # under the metrics.json names
            self.loggers.log_metrics(metrics, state.step)
        state.metrics.update(metrics)
        if any(k.startswith("val/") for k in metrics):
            shown = ", ".join(
                f"{k}={v:.4f}"
                for k, v in state.metrics.items()
                if k.count("/") == 1 and "_s" not in k
            )
            log.info("epoch %d step %d: %s", state.epoch, state.step, shown)

    def hint_short_run(self, max_steps: int, max_epochs: int) -> None:
        """A run that evaluates once or twice draws its val/* curves as single dots: say how to
        get a curve (evaluating mid-epoch is not the default: it adds a checkpoint each time, and
        a GAN's FID costs minutes)."""
        if max_epochs > 2:
            return
        log.info(
            "a short run (%d steps) evaluates only at its epochs' ends (train/*_step has 10 "
            "points): add trainer.val_every_n_steps=%d for a validation curve of 10 points",
            max_steps,
            max(1, max_steps // 10),
        )

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
