"""`hydra/sweeper=dlrun_optuna`: dlrun's Optuna (4 or newer) sweeper: ask-and-tell trials run
by Hydra's launcher, a study that a rerun continues, samplers and pruners by name, SQLite or
journal-file storage (several search processes on one study).

Hydra imports every module of `hydra_plugins` at start-up, in every dlrun run: this one imports
neither Optuna nor torch (Optuna is absent without the `sweep` extra); `_search` does, once a
search starts (modules named `_*` are not scanned). `_space`: params as distributions; `_study`:
storage, sampler, pruner, interrupted trials; `_pruning`: the hook each trial's job runs.
"""

import logging
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
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
    """hydra.sweeper.* (configs/hydra/sweeper/dlrun_optuna.yaml); the search is `_search.Search`."""

    def __init__(
        self,
        sampler: Any = "tpe",
        direction: str = "maximize",
        storage: str | None = None,
        study_name: str | None = None,
        n_trials: int = 20,
        n_jobs: int = 1,
        max_failure_rate: float = 0.0,
        search_space: DictConfig | None = None,
        custom_search_space: str | None = None,
        params: DictConfig | None = None,
        pruner: Any = "none",
    ) -> None:
        for key, value in (("n_trials", n_trials), ("n_jobs", n_jobs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise user_error(f"hydra.sweeper.{key} must be a positive integer, got {value}.")
        direction = str(getattr(direction, "name", direction)).lower()
        if direction not in DIRECTIONS.values():
            raise user_error(
                f"hydra.sweeper.direction must be maximize or minimize, got {direction}."
            )
        self.settings = dict(
            sampler=sampler, direction=direction, storage=storage, study_name=study_name,
            n_trials=n_trials, n_jobs=n_jobs, max_failure_rate=float(max_failure_rate),
            search_space=search_space, custom_search_space=custom_search_space, params=params,
            pruner=pruner,
        )  # fmt: skip
        self.search: Any = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.check(config)
        try:
            from ._search import Search
        except ImportError as err:
            raise user_error(
                f"hparams_search needs Optuna 4 or newer ({err}): install it with "
                "pip install -e '.[sweep]'."
            ) from None
        self.search = Search(self.settings, hydra_context, task_function, config)

    def check(self, config: DictConfig) -> None:
        """Before any trial: a direction that would seek the monitor's worst value is an error,
        and trials scored on the test split are a warning."""
        direction = self.settings["direction"]
        monitor, expected = monitor_direction(config)
        if monitor is None:
            raise user_error(
                "trainer.monitor is null, so the trials return nothing to optimise: set "
                "trainer.monitor (e.g. trainer.monitor=val/acc trainer.monitor_mode=max for a "
                "classifier, trainer.monitor=val/fid for a GAN or CycleGAN)."
            )
        given = direction
        if expected is not None and given != expected:
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
        self.search.run(arguments)


def test_split_hint(config: DictConfig) -> tuple[str, str] | None:
    """(why the trials score the test split, what to do) or None when they score held-out data.

    Each kind of data holds out its own way: data.val_split (labelled image sets; metric
    learning holds 10% out itself), data.val_scenes (detection and segmentation scenes); a set
    with neither (CycleGAN's unpaired domains) has no validation split at all.
    """
    data = config.get("data") or {}
    if "val_split" in data:
        metric = str(OmegaConf.select(config, "trainer._target_", default="")).endswith(
            "MetricTrainer"
        )
        if data.val_split or metric:
            return None
        return (
            "data.val_split is 0",
            "set data.val_split=0.1 (or a count) to score them on images held out of training",
        )
    if "val_scenes" in data:
        if data.val_scenes:
            return None
        return (
            "data.val_scenes is 0",
            "set data.val_scenes=1000 to score them on scenes of held-out training digits",
        )
    name = data.get("name", "this data set")
    return (
        f"{name} has no validation split",
        "tune on a data set that holds images out (data=unpaired_folder with test folders cut from training)",
    )
