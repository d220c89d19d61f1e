"""`hydra/launcher=slurm` (and `slurm_local`): Hydra's submitit launchers, made to requeue and resume.

The module name starts with `_`: Hydra's plugin scan skips it, so that without the `[sweep]`
extra (no hydra_submitit_launcher to import) no run prints an import warning; `launcher` holds
the classes Hydra finds, which build these.

Hydra's launcher pickles each sweep point as a submitit job. On SLURM's warning signal before
the time limit (or a preemption), submitit calls the job's `checkpoint()` and requeues the
pickle it returns. Two things make that requeued job continue rather than start over:

- `checkpoint()` adds `resume=true` once the run folder holds this run (dlrun committed it),
  so the new process continues from `checkpoints/last.pt`;
- `launch()` pins `hydra.sweep.dir` (a `${now:...}` folder would name a new folder on the
  requeue) so the new process finds that run folder.

dlrun itself (dlrun.launch.cluster) catches the signal first, finishes the step, writes the checkpoint,
and only then hands the signal back to submitit to requeue.
"""

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.errors import HydraException
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher


def _resumable(self: Any, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
    import submitit  # lazy, as Hydra's launcher: plugin discovery stays fast

    from dlrun.launch import rundir

    overrides = list(sweep_overrides)
    if rundir.committed() and "resume=true" not in overrides:
        overrides = [o for o in overrides if not o.startswith("resume=")] + ["resume=true"]
    return submitit.helpers.DelayedSubmission(self, overrides, *args, **kwargs)


def _pinned(self: Any, job_overrides: Sequence[Sequence[str]]) -> list[list[str]]:
    sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()  # ${now:} resolved once, here
    return [[*o, f"hydra.sweep.dir='{sweep_dir}'"] for o in job_overrides]


class _Resuming:
    """The two overrides both launchers share (Hydra's classes come after it in the MRO)."""

    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        return _resumable(self, sweep_overrides, *args, **kwargs)

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        return super().launch(_pinned(self, job_overrides), initial_job_idx)  # type: ignore[misc]


class DlrunSlurmLauncher(_Resuming, SlurmLauncher):
    """One SLURM job per sweep point (sbatch through submitit), requeued and resumed."""

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if missing:  # submitit's own message is a traceback ending in a RuntimeError
            raise HydraException(
                f"hydra/launcher=slurm submits jobs with sbatch and srun, and {' and '.join(missing)} "
                "is not on this machine's PATH. Run the sweep on the cluster's login node, or try "
                "it here first with hydra/launcher=slurm_local (the same jobs, signals and "
                "requeues, run by submitit on this machine)."
            )
        return super().launch(job_overrides, initial_job_idx)


class DlrunLocalLauncher(_Resuming, LocalLauncher):
    """The same on this machine (submitit's local executor): tries the requeue path without SLURM."""
