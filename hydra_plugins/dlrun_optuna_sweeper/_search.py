"""The search: ask the study for trials, run each batch with Hydra's launcher (job folder = trial
number), tell the study how each ended; rerun, it continues the study to n_trials in total.

Several search processes may share one study (a journal file, or SQLite on one machine): each
asks its own trials (Optuna numbers them once), and a process marks FAIL only the RUNNING trials
of processes that are gone (_study.stale).
"""

import logging
import math
from collections.abc import Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from dlrun.launch.sweep import FAILED, PRUNED

from . import _pruning, _study
from ._space import search_space, trial_overrides
from .dlrun_optuna_sweeper import user_error

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)  # our lines say what happens, once


class Search:
    def __init__(
        self, settings: dict[str, Any], hydra_context: HydraContext, task_function: TaskFunction,
        config: DictConfig,
    ) -> None:  # fmt: skip
        self.s, self.config = settings, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.name = settings["study_name"]
        self.url = None if settings["storage"] is None else str(settings["storage"])

    def run(self, arguments: list[str]) -> None:
        s = self.s
        params = {**(s["search_space"] or {}), **(s["params"] or {})}
        space, fixed = search_space(params, arguments)
        storage = _study.open_storage(self.url)
        sampler = _study.make_sampler(s["sampler"], self.config.get("seed"), space)
        pruner_node = (
            OmegaConf.to_container(s["pruner"]) if OmegaConf.is_config(s["pruner"]) else s["pruner"]
        )
        pruner = _study.make_pruner(pruner_node)
        study = self.open_study(storage, sampler, pruner)
        _pruning.LIVE[study.study_name] = study
        extend = get_method(s["custom_search_space"]) if s["custom_search_space"] else None
        log.info("Study %s (%s), sampler %s, pruner %s, %s", study.study_name, self.url or "memory",
                 type(sampler).__name__, type(pruner).__name__, study.direction.name.lower())  # fmt: skip
        first, crashed, launched = True, [], 0
        target = s["n_trials"]
        with _study.Heartbeat(study) as beat:
            while True:
                interrupted = _study.fail_interrupted(study) if storage is not None else []
                trials = study.get_trials(deepcopy=False)
                done = sum(t.state != TrialState.RUNNING and _study.counted(t) for t in trials)
                running = sum(t.state == TrialState.RUNNING for t in trials)
                if first:
                    self.say_resumed(trials, done, interrupted, sampler)
                    first = False
                if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study):
                    log.info("Study %s: the grid's every point has been tried", study.study_name)
                    break
                want = min(s["n_jobs"], target - done - running)
                if want <= 0:
                    break
                batch = [study.ask(space) for _ in range(want)]
                for trial in batch:
                    if storage is not None:
                        _study.claim(study, trial)
                    if extend is not None:  # define-by-run parameters of one's own
                        extend(self.config, trial)
                beat.trials = batch
                try:
                    for returns, group in self.launch(study, batch, fixed, pruner_node):
                        crashed += [r for r in returns if r.status == JobStatus.FAILED]
                        for trial, ret in zip(group, returns, strict=True):
                            self.tell(study, trial, ret)
                except BaseException:  # a stop signal, Ctrl-C: the batch's unfinished trials
                    for trial in batch:
                        _study.mark_interrupted(study, trial.number)
                    raise
                beat.trials = []
                launched += len(batch)
                if crashed and len(crashed) / launched > s["max_failure_rate"]:
                    raise crashed[0]._return_value  # the first crashed job's exception
        self.finish(study)

    def open_study(self, storage: Any, sampler: Any, pruner: Any) -> optuna.Study:
        """The study `storage` holds under study_name (its direction checked), or a new one."""
        direction = self.s["direction"]
        if storage is not None and self.name is None:
            log.warning("hydra.sweeper.study_name is null: a rerun cannot resume this study")
        study = optuna.create_study(study_name=self.name, storage=storage, sampler=sampler,
                                    pruner=pruner, direction=direction, load_if_exists=True)  # fmt: skip
        have = [d.name.lower() for d in study.directions]
        if have != [direction]:
            raise user_error(
                f"the study {self.name} in {self.url} was made to {' and '.join(have)}, but "
                f"hydra.sweeper.direction is {direction}: set hydra.sweeper.study_name (or "
                "hydra.sweep.dir) to start another study."
            )
        return study

    def say_resumed(
        self, trials: Sequence[Any], done: int, interrupted: list[int], sampler: Any
    ) -> None:
        if not trials:
            return
        n = self.s["n_trials"]
        log.info("Resuming study %s (%s): %d of %d trials finished%s", self.name, self.url, done, n,
                 f", interrupted trial(s) {interrupted} marked failed" if interrupted else "")  # fmt: skip
        if done >= n:
            log.info("Study %s already has %d finished trials (hydra.sweeper.n_trials=%d): nothing "
                     "to run; raise hydra.sweeper.n_trials to search further.", self.name, done, n)  # fmt: skip
        if hasattr(sampler, "reseed_rng"):  # a seeded sampler would draw the first run's values
            sampler.reseed_rng()

    def launch(
        self, study: optuna.Study, batch: list[optuna.Trial], fixed: list[str], pruner: Any
    ) -> Any:
        """Each run of consecutive trial numbers in one launch (job number = trial number; a
        batch another process's trials interleave runs in parts)."""
        runs = groupby(enumerate(batch), key=lambda item: item[1].number - item[0])
        for _, items in runs:
            group = [trial for _, trial in items]
            jobs = [
                [*fixed, *trial_overrides(t.params),
                 *_pruning.job_env(self.url, study.study_name, t, pruner)]
                for t in group
            ]  # fmt: skip
            yield self.launcher.launch(jobs, initial_job_idx=group[0].number), group

    def tell(self, study: optuna.Study, trial: optuna.Trial, ret: JobReturn) -> None:
        """COMPLETE with the monitor's value; PRUNED (pruned.json); FAIL for a job that failed
        (failed.json, an exception) or returned no value of trainer.monitor."""
        out = Path(str(ret.hydra_cfg.hydra.runtime.output_dir)) if ret.hydra_cfg else None
        value = getattr(ret, "_return_value", None)
        if ret.status == JobStatus.FAILED:
            trial.set_user_attr("dlrun:error", f"{type(value).__name__}: {value}")
            study.tell(trial, state=TrialState.FAIL)
        elif out is not None and (out / PRUNED).exists():
            study.tell(trial, state=TrialState.PRUNED)
        elif out is not None and (out / FAILED).exists():
            trial.set_user_attr("dlrun:error", f"see {out / FAILED}")
            study.tell(trial, state=TrialState.FAIL)
        elif not isinstance(value, (int, float)) or math.isnan(value):
            trial.set_user_attr("dlrun:error", "no value of trainer.monitor")
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, float(value))

    def finish(self, study: optuna.Study) -> None:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            raise user_error(
                f"no trial of the study {study.study_name} finished with a value of "
                "trainer.monitor (is it logged? a GAN's FID needs an FID network); each job's "
                f"log in {self.sweep_dir} says why."
            )
        best = study.best_trial
        log.info("Best trial %d: %s = %s, %s", best.number, self.config.trainer.get("monitor"),
                 best.value, " ".join(trial_overrides(best.params)))  # fmt: skip
        if self.sweep_dir.is_dir():
            results = {"name": "optuna", "study": study.study_name, "best_trial": best.number,
                       "best_params": best.params, "best_value": best.value}  # fmt: skip
            OmegaConf.save(OmegaConf.create(results), self.sweep_dir / "optimization_results.yaml")
