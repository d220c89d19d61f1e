"""The loop's evaluations of the task: a validation (the hooks around it, a stop signal cutting it
short, its scalars logged, the monitor updated) and the test split scored at the end."""

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from dlrun.engine import dist
from dlrun.engine.guards import StopSignals
from dlrun.engine.hooks.base import Hooks
from dlrun.engine.loop_state import Cadence, LoopState
from dlrun.engine.monitor import Monitor
from dlrun.engine.progress import EvalBatches
from dlrun.engine.result_files import ResultFiles
from dlrun.engine.run_logger import RunLogger

log = logging.getLogger("dlrun.engine.loop")
Evaluate = Callable[[Any, str], dict[str, float]]  # the task's evaluate(loader, prefix)
Show = Callable[[SummaryWriter, str], None]  # the task's log_evaluation(writer, prefix)


def shown(metrics: dict[str, float], prefix: str) -> str:
    """The top-level `prefix/*` metrics, as a log line shows them."""
    return ", ".join(
        f"{k}={v:.4f}"
        for k, v in metrics.items()
        if k.startswith(f"{prefix}/") and k.count("/") == 1
    )


class Evaluation:
    """Evaluations of `data`'s validation and test splits, with the task's `evaluate` and `show`.

    `phase` is "eval" while one runs (and after one failed): the batch size an out-of-memory
    message names (data.eval_batch_size, not data.batch_size).
    """

    def __init__(
        self,
        data: Any,
        cadence: Cadence,
        hooks: Hooks,
        logger: RunLogger,
        monitor: Monitor,
        stop: StopSignals,
    ) -> None:
        self.data, self.cadence, self.hooks, self.logger = data, cadence, hooks, logger
        self.monitor, self.stop = monitor, stop
        self.phase = "train"

    def batches(self, loader: Any, prefix: str) -> EvalBatches:
        """`loader` as the task iterates it, with its progress (progress.py): a bar, or lines and
        on the CPU an estimate of a long evaluation; its time is left out of the training rate."""
        hint = "data.eval_subset" if hasattr(self.data, "eval_subset") else None
        lg = self.logger
        return EvalBatches(loader, prefix, lg.log_every_s, lg.progress, hint, lg.beat.pause)

    def due(self, state: LoopState, at_epoch_end: bool, finished: bool) -> bool:
        """Whether a validation is due at `state.step`: at an epoch's end (every
        trainer.val_every_n_epochs, and the last), or mid-epoch (trainer.val_every_n_steps)."""
        if at_epoch_end:
            return self.cadence.validates_after_epoch(state.epoch, finished)
        return self.cadence.validates_at(state.step)

    def validate(self, evaluate: Evaluate, show: Show, state: LoopState) -> None:
        """Evaluate on the validation loader, log, update the monitor (unless a stop signal cut
        the evaluation short: the checkpoint comes next, and the resumed run evaluates again)."""
        self.phase = "eval"  # kept on an error: an out-of-memory message names the phase
        with self.stop.cuttable() as outcome:  # a stop signal now ends the evaluation at once
            # First the hooks' (trainer.ema's average), so that what a task keeps of its last
            # evaluation (images, per-class reports) is the raw weights'.
            with torch.inference_mode():  # no autograd bookkeeping at all (no_grad keeps some)
                extra = self.hooks.before_evaluation("val")
                metrics = evaluate(self.batches(self.data.val_loader(), "val"), "val") | extra
        self.phase = "train"
        if outcome["cut"]:
            return
        metrics = self.hooks.after_evaluation("val", metrics)  # early stopping, callbacks
        self.logger.log(metrics, state)
        if self.logger.writer is not None:  # images, PR curves: once, from what evaluate kept
            show(self.logger.writer, "val")
        state.last_eval_step = state.step
        about = self.data.describe()
        # Selecting on the test split warns on every data set; one that cannot hold images out
        # (CycleGAN's unpaired folders) says what to do instead in its "holdout_hint".
        self.monitor.update(metrics, bool(about.get("val_is_test")), about.get("holdout_hint"))

    def checkpoint(self, evaluate: Evaluate, show: Show, run_dir: Path) -> dict[str, float]:
        """mode=eval: a checkpoint's test/* said in the log, and what its evaluation shows (a
        confusion matrix) as files in `run_dir`, not TensorBoard events (result_files.py)."""
        with torch.inference_mode():
            metrics = evaluate(self.batches(self.data.test_loader(), "test"), "test")
        if dist.is_main():
            with ResultFiles(run_dir) as files:
                show(files, "test")  # type: ignore[arg-type]
            if files.written:
                log.info("wrote %s", ", ".join(p.name for p in files.written))
        # A task whose scores are all optional (CycleGAN without metrics.fid / metrics.domain)
        # may have none: say so rather than print an empty line.
        log.info(shown(metrics, "test") or "no test metrics: this checkpoint's task scores none "
                 "with its config (a GAN or CycleGAN: metrics.fid.features, metrics.domain.ckpt)")
        return metrics

    def test_split(self, evaluate: Evaluate, show: Show, state: LoopState) -> None:
        """With validation images held out of training, the test split is scored once, by the
        final weights, at the end (test/*): the number to report, selected on nothing. Every
        rank takes part (evaluations reduce over ranks); a resumed finished run scores it again."""
        if self.data.describe().get("val_is_test", True):
            return
        self.phase = "eval"
        with torch.inference_mode():
            metrics = evaluate(self.batches(self.data.test_loader(), "test"), "test")
        self.phase = "train"
        self.logger.log(metrics, state)
        if self.logger.writer is not None:
            show(self.logger.writer, "test")
        log.info("test split, final weights: %s", shown(metrics, "test"))
