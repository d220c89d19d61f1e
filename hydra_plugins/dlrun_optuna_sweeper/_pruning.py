"""In each trial's job: its evaluations reported to the study, and the pruner's stop.

The sweeper names this hook in the job's environment (hydra.job.env_set, so that it reaches a job
in another process or on a SLURM node: dlrun.launch.sweep.trial_hooks builds it) with the trial
in DLRUN_OPTUNA_TRIAL. After each validation the hook reports trainer.monitor's value at the
optimizer step (trial.report) and asks the pruner (trial.should_prune); a pruned trial ends as
early stopping ends a run: after this evaluation, with its last checkpoint and metrics.json, and
`pruned.json` in its folder, which tells the sweeper to record it PRUNED.
"""

import base64
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dlrun.engine import dist
from dlrun.engine.hooks.base import Hook, Metrics
from dlrun.launch.sweep import PRUNED

if TYPE_CHECKING:
    import optuna

    from dlrun.engine.loop import Trainer

log = logging.getLogger("dlrun")
TRIAL_ENV = "DLRUN_OPTUNA_TRIAL"
HOOK = f"{__name__}:TrialPruning"
# storage None (in memory): the sweeper's study, for jobs in its own process (basic launcher).
LIVE: dict[str, "optuna.Study"] = {}


def job_env(storage: str | None, study: str, trial: "optuna.Trial", pruner: Any) -> list[str]:
    """The overrides that hand one trial to its job: Hydra sets them as environment variables
    around the job (also in a launcher's worker process or a SLURM job)."""
    info = {"storage": storage, "study": study, "number": trial.number,
            "trial_id": trial._trial_id, "pruner": pruner}  # fmt: skip
    coded = json.dumps(info, separators=(",", ":"))  # readable in the launcher's log line
    if any(c in coded for c in "'\\$"):  # what Hydra's quoted strings would read otherwise
        coded = "b64:" + base64.urlsafe_b64encode(coded.encode()).decode()
    return [
        f"++hydra.job.env_set.DLRUN_TRIAL_HOOK='{HOOK}'",
        f"++hydra.job.env_set.{TRIAL_ENV}='{coded}'",
    ]


def trial_info() -> dict[str, Any]:
    coded = os.environ[TRIAL_ENV]
    if coded.startswith("b64:"):
        coded = base64.urlsafe_b64decode(coded[4:].encode()).decode()
    return json.loads(coded)


class TrialPruning(Hook):
    """Reports each validation's monitored value to the trial; stops the run when pruned."""

    state_key = "optuna_pruning"

    def __init__(self) -> None:
        self.info = trial_info()
        self.trial: Any = None
        self.pruned = False

    def setup(self, trainer: "Trainer") -> None:
        if trainer.monitor.name is None or not dist.is_main():
            return
        study = self._study()
        if study is not None:
            import optuna

            self.trial = optuna.trial.Trial(study, self.info["trial_id"])

    def _study(self) -> "optuna.Study | None":
        name, storage = self.info["study"], self.info["storage"]
        if storage is None:  # in memory: only a job in the sweeper's process reaches the study
            if name not in LIVE:
                log.warning("hydra.sweeper.storage is null: trials in other processes cannot "
                            "report to the study, so none is pruned")  # fmt: skip
            return LIVE.get(name)
        import optuna

        from ._study import make_pruner, open_storage

        pruner = make_pruner(self.info["pruner"])
        return optuna.load_study(study_name=name, storage=open_storage(storage), pruner=pruner)

    def after_evaluation(self, trainer: "Trainer", prefix: str, metrics: Metrics) -> None:
        name = trainer.monitor.name
        if prefix != "val" or name is None or name not in metrics or self.pruned:
            return
        value, step, prune = float(metrics[name]), trainer.step_count, False
        if self.trial is not None and math.isfinite(value):
            self.trial.report(value, step)
            prune = self.trial.should_prune()
        if dist.initialized():  # rank 0 asks; every rank stops at the same step
            prune = bool(dist.broadcast_object(prune))
        if not prune:
            return
        self.pruned = True
        trainer.monitor.stopped_early = True  # early stopping's path: last.pt, metrics.json
        number, pruner = self.info["number"], self.info["pruner"]
        if dist.is_main():
            record = {"trial": number, "step": step, name: value, "pruner": pruner}
            trainer.run_dir.mkdir(parents=True, exist_ok=True)
            (trainer.run_dir / PRUNED).write_text(json.dumps(record, indent=2) + "\n")
        log.info("trial %d pruned at step %d (%s=%.4f trails the other trials): it ends here, "
                 "with its checkpoint", number, step, name, value)  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"pruned": self.pruned}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pruned = bool(state.get("pruned", False))
