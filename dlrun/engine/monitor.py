"""The monitored metric: what picks best.pt, fills HParams and answers a sweeper (and what
trainer.early_stopping watches: dlrun/engine/hooks/early_stopping.py)."""

import logging
from collections.abc import Mapping
from typing import Any

from dlrun.errors import UserError
from dlrun.launch import sweep

log = logging.getLogger(__name__)
MODES = ("max", "min")
LOWER_IS_BETTER = ("loss", "fid", "kid", "error")  # monitor_mode=auto: min for tags naming these


class Monitor:
    """trainer.monitor (a logged tag, `auto` for the task's own, or null: no selection) and
    trainer.monitor_mode (max | min | auto: min for a loss, FID or KID, else max)."""

    def __init__(self, name: str | None, mode: str) -> None:
        if mode not in MODES + ("auto",):
            raise UserError(f"trainer.monitor_mode must be max, min or auto, got '{mode}'.")
        self.requested, self.mode = name, mode
        self.requested_mode = mode
        self.name: str | None = None
        self.best: float | None = None  # in the monitor's own sign
        self.improved = False  # since the last checkpoint: best.pt should be written
        # Set by trainer.early_stopping's hook: its patience ran out, the loop ends here.
        self.stopped_early = False
        self.early_stopping = False  # whether that hook watches (the test-split warning says so)
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
        val_is_test: bool | None,
        holdout: tuple[str, str] | None = None,
    ) -> None:
        """After an evaluation: did the monitored value improve.

        `holdout`: the data's (setting that made val the test split, setting that fixes it).
        """
        holdout = holdout or ("data.val_split=0", "data.val_split=0.1 (or a count)")
        if self.name is None or self.name not in metrics:
            return
        if val_is_test and not self.warned:
            self.warned = True  # once per run (kept in the checkpoint), and once per sweep:
            what = " and a sweep's objective"
            what = f", early stopping{what}" if self.early_stopping else what
            text = (
                f"{self.name} is measured on the test split ({holdout[0]}): best.pt{what} select "
                "on the test set, which makes its score optimistic. Set "
                f"{holdout[1]} to select on images held out of training."
            )
            if sweep.first_in_sweep(text):
                log.warning(text)
            else:  # another job of this sweep gave the warning
                log.info("%s is measured on the test split (warned once for the sweep)", self.name)
        score = metrics[self.name]
        if self.better(score, self.best):
            self.best, self.improved = score, True

    def objective(self, metrics: Mapping[str, float]) -> float | None:
        """The value returned to a Hydra sweeper: the monitored metric's last value."""
        return metrics.get(self.name) if self.name else None

    def worst(self) -> float:
        """What a failed trial reports to a sweeper."""
        return float("-inf") if self.mode == "max" else float("inf")

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "best": self.best, "stopped_early": self.stopped_early,
                "warned": self.warned}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state.get("best")
        self.stopped_early = bool(state.get("stopped_early", False))
        self.warned = bool(state.get("warned", False))  # the test-split warning: once per run
