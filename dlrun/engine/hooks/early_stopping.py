"""trainer.early_stopping.patience=N: end the run after N evaluations without improvement of
trainer.monitor (the run then ends normally, with its metrics; resume=true trains no further)."""

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dlrun.engine.hooks.base import Hook, Metrics
from dlrun.errors import UserError

if TYPE_CHECKING:
    from dlrun.engine.loop import Trainer

log = logging.getLogger(__name__)


class EarlyStopping(Hook):
    """Counts the evaluations since the monitored value last improved; at `patience` it sets
    `trainer.monitor.stopped_early`, which ends the loop after this evaluation."""

    state_key = "early_stopping"

    def __init__(self, patience: int) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise UserError(
                f"trainer.early_stopping.patience must be a positive integer or null, got "
                f"{patience!r}."
            )
        self.patience = patience
        self.best: float | None = None  # the monitored value's best so far
        self.bad_evals = 0

    def setup(self, trainer: "Trainer") -> None:
        if trainer.monitor.name is None:
            raise UserError(
                "trainer.early_stopping.patience needs a metric to watch: set trainer.monitor "
                "(e.g. trainer.monitor=val/loss trainer.monitor_mode=min)."
            )
        trainer.monitor.early_stopping = True  # its test-split warning names early stopping

    def after_evaluation(self, trainer: "Trainer", prefix: str, metrics: Metrics) -> None:
        monitor = trainer.monitor
        if monitor.name is None or monitor.name not in metrics:
            return
        score = metrics[monitor.name]
        if monitor.better(score, self.best):
            self.best, self.bad_evals = score, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            monitor.stopped_early = True
            log.info(
                "early stopping at step %d: %s has not improved on %.4f for %d evaluations",
                trainer.step_count, monitor.name, self.best, self.bad_evals,
            )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state.get("best")
        self.bad_evals = int(state.get("bad_evals", 0))
