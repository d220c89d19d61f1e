"""`hydra/sweeper=dlrun_optuna`: Hydra's Optuna sweeper, made to resume an interrupted search.

Hydra imports every module of `hydra_plugins` at start-up, in every dlrun run: this one imports
neither Optuna nor the Optuna sweeper (absent without the `sweep` extra), only `_resume` does,
once a search starts (modules named `_*` are not scanned).
"""

import logging
from collections.abc import Mapping
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
DIRECTIONS = {"max": "maximize", "min": "minimize"}


def user_error(message: str) -> BaseException:
    """A one-paragraph message and exit code 2 from `dlrun` (the carrier its main() catches)."""
    from dlrun.cli import Failed
    from dlrun.errors import UserError

    return Failed(UserError(message))


def monitor_direction(config: DictConfig) -> tuple[str | None, str | None]:
    """(trainer.monitor, the direction it improves in); the direction is None when only the
    built trainer knows it (monitor and monitor_mode both `auto`)."""
    from dlrun.engine.monitor import LOWER_IS_BETTER

    monitor = OmegaConf.select(config, "trainer.monitor")
    mode = OmegaConf.select(config, "trainer.monitor_mode", default="max")
    if mode == "auto":
        if monitor == "auto":
            return monitor, None
        mode = "min" if any(word in str(monitor) for word in LOWER_IS_BETTER) else "max"
    return monitor, DIRECTIONS.get(str(mode))


class DlrunOptunaSweeper(Sweeper):
    """The Optuna sweeper's settings (hydra.sweeper.*); see `_resume.ResumingOptunaSweeperImpl`."""

    def __init__(
        self,
        sampler: Any,
        direction: Any,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        search_space: DictConfig | None,
        custom_search_space: str | None,
        params: DictConfig | None,
    ) -> None:
        try:
            from ._resume import ResumingOptunaSweeperImpl
        except ImportError as err:
            raise user_error(
                f"hparams_search needs Optuna and Hydra's Optuna sweeper ({err}): install them "
                "with pip install -e '.[sweep]'."
            ) from None
        if not isinstance(n_trials, int) or n_trials < 1:
            raise user_error(f"hydra.sweeper.n_trials must be a positive integer, got {n_trials}.")
        # The config says _recursive_: false, so that a missing Optuna is the message above and
        # not a failed import of the sampler's class; the sampler is built here instead.
        if isinstance(sampler, Mapping):  # a DictConfig is one
            sampler = instantiate(sampler)
        self.sweeper = ResumingOptunaSweeperImpl(
            sampler,
            direction,
            storage,
            study_name,
            n_trials,
            n_jobs,
            max_failure_rate,
            search_space,
            custom_search_space,
            params,
        )

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.check(config)
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def check(self, config: DictConfig) -> None:
        """Before any trial: a direction that would seek the monitor's worst value is an error,
        and trials scored on the test split are a warning."""
        direction = self.sweeper.direction
        monitor, expected = monitor_direction(config)
        if monitor is None:
            raise user_error(
                "trainer.monitor is null, so the trials return nothing to optimise: set "
                "trainer.monitor (e.g. trainer.monitor=val/acc trainer.monitor_mode=max for a "
                "classifier, trainer.monitor=val/fid for a GAN or CycleGAN)."
            )
        given = getattr(
            direction, "name", direction
        )  # the Optuna sweeper's Direction enum, or a str
        if isinstance(given, str) and expected is not None and given != expected:
            mode = OmegaConf.select(config, "trainer.monitor_mode")
            raise user_error(
                f"hydra.sweeper.direction={given} disagrees with trainer.monitor_mode={mode} "
                f"(trainer.monitor={monitor}): the search would seek its worst value. Set "
                f"hydra.sweeper.direction={expected}, or trainer.monitor_mode to match."
            )
        on_test = test_split_hint(config)
        if on_test:
            log.warning(
                "%s: every trial is scored on the test split, which then no longer measures the "
                "chosen hyperparameters fairly; %s.", *on_test,
            )  # fmt: skip

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)


def test_split_hint(config: DictConfig) -> tuple[str, str] | None:
    """(why the trials score the test split, what to do) or None when they score held-out data.

    Each kind of data holds out its own way: data.val_split (labelled image sets; metric
    learning holds 10% out itself), data.val_scenes (detection and segmentation scenes); a set
    with neither (CycleGAN's unpaired domains) has no validation split at all.
    """
    data = config.get("data") or {}
    if "val_split" in data:
        metric = str(OmegaConf.select(config, "trainer._target_", default="")).endswith("MetricTrainer")
        if data.val_split or metric:
            return None
        return "data.val_split is 0", "set data.val_split=0.1 (or a count) to score them on images held out of training"
    if "val_scenes" in data:
        if data.val_scenes:
            return None
        return "data.val_scenes is 0", "set data.val_scenes=1000 to score them on scenes of held-out training digits"
    name = data.get("name", "this data set")
    return f"{name} has no validation split", "tune on a data set that holds images out (data=unpaired_folder with test folders cut from training)"
