"""The launchers Hydra finds (`hydra/launcher=slurm`, `slurm_local`): thin, so that importing
this module needs no optional extra.

Hydra imports every hydra_plugins module whose name has no leading `_` on every run, and only
instantiates launcher classes it found that way. These two are found here; the work is done by
`_launcher` (Hydra's submitit launchers, subclassed), imported only when a sweep uses one, so a
plain install (no `[sweep]` extra) prints no import warning. Submitit pickles the inner launcher.
"""

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class _Delegating(Launcher):
    _inner = ""  # the _launcher class doing the work

    def __init__(self, **params: Any) -> None:
        try:
            from . import _launcher
        except ImportError as err:  # the [sweep] extra is missing
            from hydra.errors import HydraException

            raise HydraException(
                f"hydra/launcher=slurm and slurm_local need Hydra's submitit launcher ({err}): "
                "pip install -e '.[sweep]'."
            ) from None
        self.inner = getattr(_launcher, self._inner)(**params)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.inner.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        return self.inner.launch(job_overrides, initial_job_idx)


class DlrunSlurmLauncher(_Delegating):
    """One SLURM job per sweep point (sbatch through submitit), requeued and resumed."""

    _inner = "DlrunSlurmLauncher"


class DlrunLocalLauncher(_Delegating):
    """The same jobs run by submitit's local executor on this machine."""

    _inner = "DlrunLocalLauncher"
