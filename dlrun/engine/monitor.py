"""The monitored metric: what picks best.pt, stops early, fills HParams and answers a sweeper."""

import logging
from collections.abc import Mapping
from typing import Any

from dlrun.errors import UserError

log = logging.getLogger(__name__)
MODES = ("max", "min")
LOWER_IS_BETTER = ("loss", "fid", "kid", "error")  # monitor_mode=auto: min for tags naming these


class Monitor:
    """trainer.monitor (a logged tag, `auto` for the task's own, or null: no selection),
    trainer.monitor_mode (max | min | auto: min for a loss, FID or KID, else max) and trainer.early_stopping.patience (evaluations without
    improvement; null: off)."""

    def __init__(
        self, name: str | None, mode: str, early_stopping: Mapping[str, Any] | None
    ) -> None:
        if mode not in MODES + ("auto",):
            raise UserError(f"trainer.monitor_mode must be max, min or auto, got '{mode}'.")
        patience = (early_stopping or {}).get("patience")
        if patience is not None and (not isinstance(patience, int) or patience < 1):
            raise UserError(
                f"trainer.early_stopping.patience must be a positive integer or null, got {patience!r}."
            )
        if patience is not None and name is None:
            raise UserError(
                "trainer.early_stopping.patience needs a metric to watch: set trainer.monitor "
                "(e.g. trainer.monitor=val/loss trainer.monitor_mode=min)."
            )
        self.requested, self.mode, self.patience = name, mode, patience
        self.requested_mode = mode
        self.name: str | None = None
        self.best: float | None = None  # in the monitor's own sign
        self.improved = False  # since the last checkpoint: best.pt should be written
        self.bad_evals = 0
        self.stopped_early = False
        self.warned = False

    def resolve(self, task_default: str | None) -> None:
        self.name = task_default if self.requested == "auto" else self.requested
        if self.requested_mode == "auto":
            self.set_auto_mode()

    def set_auto_mode(self) -> None:
        """monitor_mode=auto: min for a loss, FID, KID or error tag, else max."""
        if self.requested_mode == "auto":
            lower = any(word in (self.name or "") for word in LOWER_IS_BETTER)
            self.mode = "min" if lower else "max"

    def better(self, score: float, than: float | None) -> bool:
        if than is None:
            return True
        return score > than if self.mode == "max" else score < than

    def update(
        self,
        metrics: Mapping[str, float],
        step: int,
        val_is_test: bool | None,
        holdout: tuple[str, str] | None = None,
    ) -> None:
        """After an evaluation: did the monitored value improve; is patience used up.

        `holdout`: the data's (setting that made val the test split, setting that fixes it).
        """
        holdout = holdout or ("data.val_split=0", "data.val_split=0.1 (or a count)")
        if self.name is None or self.name not in metrics:
            return
        if val_is_test and not self.warned:
            self.warned = True
            log.warning(
                "%s is measured on the test split (%s): best.pt%s select on the "
                "test set, which makes its score optimistic. Set %s "
                "to select on images held out of training.",
                self.name,
                holdout[0],
                ", early stopping and a sweep's objective"
                if self.patience
                else " and a sweep's objective",
                holdout[1],
            )
        score = metrics[self.name]
        if self.better(score, self.best):
            self.best, self.improved, self.bad_evals = score, True, 0
            return
        self.bad_evals += 1
        if self.patience is not None and self.bad_evals >= self.patience:
            self.stopped_early = True
            log.info(
                "early stopping at step %d: %s has not improved on %.4f for %d evaluations",
                step, self.name, self.best, self.bad_evals,
            )  # fmt: skip

    def objective(self, metrics: Mapping[str, float]) -> float | None:
        """The value returned to a Hydra sweeper: the monitored metric's last value."""
        return metrics.get(self.name) if self.name else None

    def worst(self) -> float:
        """What a failed trial reports to a sweeper."""
        return float("-inf") if self.mode == "max" else float("inf")

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "best": self.best, "bad_evals": self.bad_evals,
                "stopped_early": self.stopped_early, "warned": self.warned}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state.get("best")
        self.bad_evals = int(state.get("bad_evals", 0))
        self.stopped_early = bool(state.get("stopped_early", False))
        self.warned = bool(state.get("warned", False))  # the test-split warning: once per run
