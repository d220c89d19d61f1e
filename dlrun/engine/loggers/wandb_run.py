"""`logger=wandb` (pip install 'dlrun[wandb]'): one W&B run per dlrun run, offline unless asked
(mode: null reads WANDB_MODE, else offline: <run>/wandb/offline-run-*/run-<id>.wandb, uploaded
later with `wandb sync <run>/wandb/offline-run-*`). resume=true continues the same run id (kept in
the checkpoint); a sweep's jobs share its group.
"""

import os
import secrets
import string
from collections.abc import Mapping
from typing import Any

from dlrun.engine.loggers.fanout import Logger, RunInfo, need


class WandbLogger(Logger):
    def __init__(self, project: str = "dlrun", entity: str | None = None,
                 group: str | None = None, mode: str | None = None) -> None:  # fmt: skip
        need("wandb", "wandb", "logger=wandb")
        self.project, self.entity, self.group, self.mode = project, entity, group, mode
        self.run: Any = None
        self.run_id: str | None = None

    def start(self, run: RunInfo, step: int, state: Mapping[str, Any]) -> None:
        import wandb

        mode = self.mode or os.environ.get("WANDB_MODE") or "offline"
        self.run_id = str(state.get("run_id") or new_id())
        self.run = wandb.init(
            project=self.project, entity=self.entity, group=self.group or run.experiment,
            name=run.run_dir.name, id=self.run_id, resume="allow", dir=str(run.run_dir),
            mode=mode, config={"dlrun.run_dir": str(run.run_dir), "dlrun.commit": run.commit},
            settings=wandb.Settings(silent=True, console="off"),
        )  # fmt: skip

    def log_params(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=int(step))

    def finalize(self, metrics: Mapping[str, float], status: str) -> None:
        if self.run is not None:
            self.run.summary.update(dict(metrics))
            self.run.finish(exit_code=0 if status == "FINISHED" else 1)
            self.run = None

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id} if self.run_id else {}


def new_id() -> str:
    """A fresh W&B run id (8 lowercase letters and digits, as wandb makes them): from `secrets`,
    not `random`, which the run's seed makes repeat."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
