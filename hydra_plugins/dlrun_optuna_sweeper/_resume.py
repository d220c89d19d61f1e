"""The Optuna sweeper's search, continued from the study its storage already holds.

Hydra's Optuna sweeper loads an existing study but then runs `n_trials` more whatever it holds,
numbers its jobs from 0 again (over the first run's job folders) and leaves the trial that a kill
interrupted RUNNING forever. Here a rerun of the same command marks that trial FAIL, counts the
COMPLETE trials, runs only the missing ones and numbers each job folder after its trial.
"""

import logging
from pathlib import Path
from typing import Any

import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
from optuna.trial import TrialState

from .dlrun_optuna_sweeper import user_error

log = logging.getLogger(__name__)
SQLITE = "sqlite:///"


class ResumingOptunaSweeperImpl(OptunaSweeperImpl):
    def sweep(self, arguments: list[str]) -> None:
        make_sqlite_folder(self.storage)
        study = self.existing_study()
        done = 0
        if study is not None:
            self.check_direction(study)
            trials = study.get_trials(deepcopy=False)
            # One search process per study: a trial still RUNNING is one a kill interrupted.
            interrupted = [t.number for t in trials if t.state == TrialState.RUNNING]
            for number in interrupted:
                study.tell(number, state=TrialState.FAIL)
            done = sum(t.state == TrialState.COMPLETE for t in trials)
            # Job folder = trial number: new trials come after every trial the study holds.
            self.job_idx = len(trials)
            log.info(
                "Resuming study %s (%s): %d of %d trials finished%s",
                self.study_name,
                self.storage,
                done,
                self.n_trials,
                f", interrupted trial(s) {interrupted} marked failed" if interrupted else "",
            )
            if trials and hasattr(self.sampler, "reseed_rng"):
                # A seeded sampler would otherwise draw the first run's parameters again.
                self.sampler.reseed_rng()
        remaining = max(self.n_trials - done, 0)
        if study is not None and remaining == 0:
            log.info(
                "Study %s already has %d finished trials (hydra.sweeper.n_trials=%d): nothing to "
                "run; raise hydra.sweeper.n_trials to search further.",
                self.study_name,
                done,
                self.n_trials,
            )
        self.n_trials = remaining
        try:
            super().sweep(arguments)
        except ValueError as err:  # study.best_trial, of a study without a finished trial
            if not self.nothing_finished(err):
                raise
            raise user_error(
                f"no trial of the study {self.study_name} finished with a value of "
                "trainer.monitor (is it logged? a GAN's FID needs an FID network); each job's "
                f"log in {self.sweep_dir} says why."
            ) from None

    def nothing_finished(self, err: ValueError) -> bool:
        if self.storage is None:  # in memory: only the message tells
            return "No trials are completed yet" in str(err)
        study = self.existing_study()
        return study is not None and not study.get_trials(states=(TrialState.COMPLETE,))

    def existing_study(self) -> Any:
        """The study `storage` holds under `study_name`, or None (a first run, no storage)."""
        if self.storage is None or self.study_name is None:
            if self.storage is not None:
                log.warning("hydra.sweeper.study_name is null: a rerun cannot resume this study")
            return None
        try:
            return optuna.load_study(study_name=self.study_name, storage=self.storage)
        except KeyError:  # Optuna's "no such study"
            return None

    def check_direction(self, study: Any) -> None:
        directions = [d.name.lower() for d in study.directions]
        wanted = [d.lower() for d in self._get_directions()]
        if directions != wanted:
            raise user_error(
                f"the study {self.study_name} in {self.storage} was made to "
                f"{' and '.join(directions)}, but hydra.sweeper.direction is "
                f"{' and '.join(wanted)}: set hydra.sweeper.study_name (or hydra.sweep.dir) to "
                "start another study."
            )


def make_sqlite_folder(storage: Any) -> None:
    """SQLite creates the database file but not its folder (the sweep folder, on a first run)."""
    if isinstance(storage, str) and storage.startswith(SQLITE):
        path = storage[len(SQLITE) :].split("?")[0]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
