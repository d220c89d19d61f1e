"""What a run reports: TensorBoard, the progress bar, the step scalars and the log lines."""

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from dlrun import checkpoint, dist
from dlrun.trainers.state import EpochProgress

log = logging.getLogger("dlrun.trainers.base")


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
            for tag, value in metrics.items():
                self.writer.add_scalar(tag, value, self.step_count)
        self.metrics.update(metrics)
        if any(k.startswith("val/") for k in metrics):
            shown = ", ".join(
                f"{k}={v:.4f}" for k, v in self.metrics.items() if "/" in k and "_s" not in k
            )
            log.info("epoch %d step %d: %s", self.epoch, self.step_count, shown)
