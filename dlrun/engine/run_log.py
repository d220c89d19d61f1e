"""What a run reports: TensorBoard, the progress bar, the step scalars and the log lines."""

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from dlrun.engine import checkpoint, dist
from dlrun.engine.guards import EvaluationCut
from dlrun.engine.resumable import EpochProgress

log = logging.getLogger("dlrun.engine.trainer")


TB_TAGS = {"epoch": "time/epoch"}  # metrics.json key -> TensorBoard tag, where they differ


class RunLog:
    """The reporting side of `Trainer`: only rank 0 writes TensorBoard."""

    def _open_writer(self, resume: bool) -> None:
        log.info(
            "%s: %d trainable parameters, %s forward FLOPs per item",
            type(checkpoint.unwrap(self.model)).__name__,
            self.params,
            f"{self.flops:,}",
        )
        if not dist.is_main():  # one process writes TensorBoard
            return
        # purge_step drops events a killed run logged after its last checkpoint.
        old_events = any(self.run_dir.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(
            str(self.run_dir), purge_step=self.step_count if old_events else None
        )
        if not resume:
            self.log_header(self.writer)
            self.log_start(self.writer)

    def _bar(self, batches: Iterable[Any], total: int, initial: int) -> Any:
        self._pbar = tqdm(
            batches,
            total=total,
            initial=initial,
            desc=f"epoch {self.epoch + 1}/{self.max_epochs}",
            disable=(not self.progress) if self.progress is not None else None,
            leave=False,
        )
        return self._pbar

    def _flush(self, p: EpochProgress, rate: float) -> None:
        """Every log_every_n_steps: the one host sync, step scalars to TensorBoard, the bar."""
        self._check_finite()
        means = p.means(p.window, p.window_counts)
        if self.writer is not None:
            for k, v in means.items():
                self.writer.add_scalar(f"train/{k}_step", v, self.step_count)
            lr = self.optimizer.param_groups[0]["lr"]
            self.writer.add_scalar("train/lr", lr, self.step_count)
        self._pbar.set_postfix(loss=f"{means.get('loss', 0):.4f}", img_s=f"{rate:.0f}")
        p.fold()

    def _log(self, metrics: Mapping[str, float]) -> None:
        if self.writer is not None:
            for tag, value in metrics.items():  # "epoch" as time/epoch: a chart among the times
                self.writer.add_scalar(TB_TAGS.get(tag, tag), value, self.step_count)
        self.metrics.update(metrics)
        if any(k.startswith("val/") for k in metrics):
            shown = ", ".join(
                f"{k}={v:.4f}" for k, v in self.metrics.items() if k.count("/") == 1 and "_s" not in k
            )
            log.info("epoch %d step %d: %s", self.epoch, self.step_count, shown)

    def _validate(self) -> float:
        """Evaluate on the validation loader, log, update the monitor; returns the seconds spent."""
        began = time.perf_counter()
        self.phase = "eval"
        try:
            try:
                self.stop.evaluating = True  # a stop signal now ends the evaluation at once
                # First the hooks' (trainer.ema's average), so that what a task keeps of its
                # last evaluation (images, per-class reports) is the raw weights'.
                extra: dict[str, float] = {}
                for hook in self.hooks:
                    extra |= hook.before_evaluation(self, "val") or {}
                metrics = self.evaluate(self.data.val_loader(), "val") | extra
            finally:
                self.stop.evaluating = False
        except EvaluationCut:  # the checkpoint comes next; the resumed run evaluates again
            self.phase = "train"
            return time.perf_counter() - began
        self.phase = "train"  # not on an error: an out-of-memory message names the phase
        for hook in self.hooks:  # trainer.early_stopping; a callback's own metrics
            metrics |= hook.after_evaluation(self, "val", metrics) or {}
        self._log(metrics)
        if self.writer is not None:  # images, PR curves: once, from what evaluate kept
            self.log_evaluation(self.writer, "val")
        self.last_eval_step = self.step_count
        about = self.data.describe()
        # Selecting on the test split warns on every data set; one that cannot hold images out
        # (CycleGAN's unpaired folders) says what to do instead in its "holdout_hint".
        self.monitor.update(
            metrics,
            bool(about.get("val_is_test")),
            about.get("holdout_hint"),
        )
        return time.perf_counter() - began

    def _score_test_split(self) -> None:
        """With validation images held out of training, the test split is scored once, by the
        final weights, at the end (test/*): the number to report, selected on nothing. Every
        rank takes part (evaluations reduce over ranks); a resumed finished run scores it again."""
        if not self.scores_test_at_end or self.data.describe().get("val_is_test", True):
            return
        self.phase = "eval"
        metrics = self.evaluate(self.data.test_loader(), "test")
        self.phase = "train"
        self._log(metrics)
        if self.writer is not None:
            self.log_evaluation(self.writer, "test")
        shown = [f"{k}={v:.4f}" for k, v in metrics.items() if k.count("/") == 1]
        log.info("test split, final weights: %s", ", ".join(shown))

    def _hint_short_run(self) -> None:
        """A run that evaluates once or twice draws its val/* curves as single dots: say how to
        get a curve (evaluating mid-epoch is not the default: it adds a checkpoint each time, and
        a GAN's FID costs minutes)."""
        if self.resumed or self.val_every_steps or self.max_epochs > 2:
            return
        every = max(1, self.max_steps // 10)
        log.info(
            "a short run (%d steps) evaluates only at its epochs' ends (train/*_step has 10 "
            "points): add trainer.val_every_n_steps=%d for a validation curve of 10 points",
            self.max_steps,
            every,
        )
