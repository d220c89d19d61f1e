"""The study's pieces: its storage (SQLite, Optuna's journal file, memory), its sampler and
pruner by name, and which RUNNING trials belong to a search process that is gone."""

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from hydra.utils import instantiate
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from ._space import Space, grid
from .dlrun_optuna_sweeper import user_error

log = logging.getLogger(__name__)
SQLITE, JOURNAL = "sqlite:///", "journal:///"
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler",
            "gp": "GPSampler", "qmc": "QMCSampler"}  # fmt: skip
PRUNERS = {"median": "MedianPruner", "hyperband": "HyperbandPruner", "none": "NopPruner"}
# Trial user attributes: the search process that runs the trial and when it last said so.
OWNER, BEAT, INTERRUPTED = "dlrun:owner", "dlrun:beat", "dlrun:interrupted"
BEAT_S = 30.0  # how often a search process says its trials still run
GRACE_S = 300.0  # a trial of another machine whose process said nothing for this long is dead


def open_storage(url: str | None) -> BaseStorage | None:
    """`sqlite:///PATH` (a database), `journal:///PATH` (Optuna's journal file, appended under a
    lock: several processes or nodes on one file system), another SQLAlchemy URL; None: memory.
    PATH follows SQLite's rule: relative after three slashes, absolute after four."""
    if url is None:
        return None
    url = str(url)
    if url.startswith(JOURNAL):
        path = Path(url[len(JOURNAL) :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("journal:"):
        raise user_error(f"hydra.sweeper.storage={url}: write a journal file as journal:///PATH.")
    if url.startswith(SQLITE):  # SQLite makes the file, not its folder; waits on a busy file
        path = url[len(SQLITE) :].split("?")[0]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    return RDBStorage(url)


def _spec(node: Any, what: str, default: str) -> tuple[str, dict[str, Any]]:
    """A sampler or pruner setting: a name, or {name: ..., its arguments}."""
    if node is None:
        return default, {}
    if isinstance(node, str):
        return node.lower(), {}
    if not isinstance(node, Mapping):
        raise user_error(f"hydra.sweeper.{what} must be a name or {{name: ..., arguments}}.")
    args = dict(node)
    return str(args.pop("name", default)).lower(), args


def make_sampler(node: Any, seed: int | None, space: Space) -> optuna.samplers.BaseSampler:
    """hydra.sweeper.sampler: tpe | random | grid | gp | qmc with its seed (and any other
    argument of its Optuna class), or {_target_: a sampler class, ...}."""
    if isinstance(node, Mapping) and "_target_" in node:
        return instantiate(node)
    name, args = _spec(node, "sampler", "tpe")
    if name not in SAMPLERS:
        raise user_error(
            f"hydra.sweeper.sampler={name} is not a sampler; use one of {', '.join(SAMPLERS)}."
        )
    if isinstance(node, str):
        args["seed"] = seed  # hydra.sweeper.sampler=random: the run's seed
    if name == "grid":
        args["search_space"] = grid(space)
        return _build(Grid, args, "sampler=grid")
    return _build(getattr(optuna.samplers, SAMPLERS[name]), args, f"sampler={name}")


class Grid(optuna.samplers.GridSampler):
    """Optuna's grid, which the search stops itself once `is_exhausted` (Optuna's own would call
    study.stop(), which only study.optimize allows: the last tell would fail)."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        pass


def make_pruner(node: Any) -> optuna.pruners.BasePruner:
    """hydra.sweeper.pruner: none | median | hyperband (and their Optuna arguments)."""
    if isinstance(node, Mapping) and "_target_" in node:
        return instantiate(node)
    name, args = _spec(node, "pruner", "none")
    if name not in PRUNERS:
        raise user_error(
            f"hydra.sweeper.pruner={name} is not a pruner; use one of {', '.join(PRUNERS)}."
        )
    return _build(getattr(optuna.pruners, PRUNERS[name]), args, f"pruner={name}")


def _build(cls: type, args: dict[str, Any], what: str) -> Any:
    try:
        return cls(**args)
    except (TypeError, ValueError, ImportError) as err:
        raise user_error(f"hydra.sweeper.{what} could not be built: {err}") from None


# ----- which search process runs a trial ---------------------------------------------------------
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


MACHINE = f"{socket.gethostname()}/{_boot_id()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stale(trial: FrozenTrial, now: float) -> bool:
    """Whether a RUNNING trial's search process is gone: on this machine its process has ended;
    on another, it has not said it runs for GRACE_S seconds. A trial no dlrun process claims (an
    older sweeper's) is gone once a minute old."""
    owner = trial.user_attrs.get(OWNER)
    if not isinstance(owner, Mapping):
        started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
        return now - started > 60
    if owner.get("machine") == MACHINE:
        return not _alive(int(owner.get("pid", -1)))
    return now - float(trial.user_attrs.get(BEAT, 0.0)) > GRACE_S


def claim(study: optuna.Study, trial: optuna.Trial) -> None:
    trial.set_user_attr(OWNER, {"machine": MACHINE, "pid": os.getpid()})
    trial.set_user_attr(BEAT, time.time())


def fail_interrupted(study: optuna.Study) -> list[int]:
    """Mark FAIL the RUNNING trials of search processes that are gone (killed, lost nodes);
    returns their numbers. Those trials do not count towards n_trials."""
    now, numbers = time.time(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if stale(trial, now):
            mark_interrupted(study, trial.number)
            numbers.append(trial.number)
    return numbers


def mark_interrupted(study: optuna.Study, number: int) -> None:
    try:
        study._storage.set_trial_user_attr(  # the trial's own Trial object may be elsewhere
            study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number),
            INTERRUPTED, True,
        )  # fmt: skip
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    except (RuntimeError, ValueError):  # finished meanwhile (another process was quicker)
        pass


def counted(trial: FrozenTrial) -> bool:
    """Whether a trial counts towards n_trials: it ran to its end (complete, pruned, or failed
    in its job), or runs now; an interrupted trial does not."""
    if trial.state == TrialState.FAIL:
        return not trial.user_attrs.get(INTERRUPTED, False)
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


class Heartbeat:
    """While trials of this process run: their BEAT attribute, renewed every BEAT_S seconds (a
    search on another machine reads it to tell a running trial from a lost one)."""

    def __init__(self, study: optuna.Study) -> None:
        self.study, self.trials = study, list[optuna.Trial]()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="dlrun-optuna-beat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)

    def _beat(self) -> None:
        while not self.stopped.wait(BEAT_S):
            for trial in list(self.trials):
                try:
                    trial.set_user_attr(BEAT, time.time())
                except Exception:  # finished meanwhile, or a busy storage: the next beat
                    pass
