"""The logger protocol, the hook that feeds every configured logger, and the config group's
builder. TensorBoard itself stays the run logger's (run_logger.py): it is always written."""

import importlib
import logging
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate

import dlrun
from dlrun.engine import dist
from dlrun.engine.hooks.base import Hook
from dlrun.errors import UserError

if TYPE_CHECKING:
    from dlrun.engine.loop import Trainer

log = logging.getLogger("dlrun")
STATE_KEY = "loggers"  # checkpoint["hooks"]["loggers"]: {logger name: its state}


@dataclass
class RunInfo:
    """What every logger may need to know about the run, settled when the hook is built."""

    run_dir: Path
    experiment: str  # the default experiment / group: <model>_<data>, or the sweep's name
    outputs: Path  # the folder that holds the runs (outputs/, a sweep's folder): mlflow.db
    sweep: str | None = None  # the sweep's name in a `dlrun -m` job
    commit: str = field(default_factory=lambda: source_commit())


class Logger:
    """One destination of the run's scalars. Every method runs on rank 0 only."""

    def start(self, run: RunInfo, step: int, state: Mapping[str, Any]) -> None:
        """As training starts (at `step`); `state`: what `state_dict` returned into the checkpoint
        resume=true continues ({} for a fresh run, or a logger added on resume)."""

    def log_params(self, config: Mapping[str, Any]) -> None:
        """Once, for a fresh run: the composed config (nested, resolved)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Scalars at optimizer step `step`, under their metrics.json names."""

    def finalize(self, metrics: Mapping[str, float], status: str) -> None:
        """Once, as `fit` ends: the final metrics (metrics.json's), status FINISHED or KILLED (a
        stop signal, an error: resume=true continues the run)."""

    def state_dict(self) -> dict[str, Any]:
        return {}


class Loggers(Hook):
    """The configured loggers as one hook: the run logger calls `start`, `log_params`,
    `log_metrics`; `on_fit_end` finalizes; the checkpoint keeps each logger's state."""

    state_key = STATE_KEY

    def __init__(self, loggers: Mapping[str, Logger], run: RunInfo) -> None:
        self.loggers, self.run = dict(loggers), run
        self.saved: dict[str, Any] = {}
        self.started = False

    def setup(self, trainer: "Trainer") -> None:
        trainer.logger.loggers = self  # the run logger feeds us where it feeds TensorBoard

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.saved = dict(state)

    def state_dict(self) -> dict[str, Any]:
        if not self.started:
            return dict(self.saved)
        return {name: lg.state_dict() for name, lg in self.loggers.items()}

    def start(self, step: int) -> None:
        if self.started or not dist.is_main():
            return
        for name, lg in self.loggers.items():
            lg.start(self.run, step, self.saved.get(name) or {})
        self.started = True

    def log_params(self, config: Mapping[str, Any]) -> None:
        for lg in self.loggers.values() if self.started else ():
            lg.log_params(config)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.started and metrics:
            for lg in self.loggers.values():
                lg.log_metrics(metrics, step)

    def on_fit_end(self, trainer: "Trainer") -> None:
        if not self.started:
            return
        final = dict(trainer.metrics) | {
            "params": trainer.params, "flops": trainer.flops, "epoch": trainer.epoch,
            "step": trainer.step_count, "time/train_s": trainer.train_time,
        }  # fmt: skip  (metrics.json's keys)
        status = "FINISHED" if trainer.finished() else "KILLED"
        for name, lg in self.loggers.items():
            try:
                lg.finalize(final, status)
            except Exception as err:  # one logger's failure must not hide the run's own error
                log.warning("logger.%s could not finish its run: %s", name, err)
        self.started = False
        self.saved = {name: lg.state_dict() for name, lg in self.loggers.items()}


def need(module: str, extra: str, key: str) -> ModuleType:
    """An optional library, or one UserError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(
            f"{key} needs {module.split('.')[0]}, which is not installed ({err}): "
            f"pip install 'dlrun[{extra}]'."
        ) from err


def source_commit() -> str:
    """The git revision of the dlrun checkout that runs, else
    dlrun's version (an installed wheel)."""
    here = Path(dlrun.__file__).parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return dlrun.__version__
    return rev or dlrun.__version__


def run_info(run_dir: Path, choices: Mapping[str, Any]) -> RunInfo:
    """The run's place: a sweep job's experiment is the sweep (its folder, from outputs/ down),
    else <model>_<data>; the outputs folder is the nearest `outputs` above the run, else the
    sweep's folder, else the run folder's parent."""
    run_dir = Path(run_dir).absolute()
    sweep_dir = None
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        sweep_dir = Path(HydraConfig.get().sweep.dir).absolute()
    outputs = next((p for p in run_dir.parents if p.name == "outputs"), None)
    outputs = outputs or sweep_dir or run_dir.parent
    sweep = None
    if sweep_dir is not None:
        inside = outputs in sweep_dir.parents
        sweep = sweep_dir.relative_to(outputs).as_posix() if inside else sweep_dir.name
    model, data = choices.get("model"), choices.get("data")
    name = f"{model}_{data}" if model and data else "dlrun"
    return RunInfo(run_dir, sweep or name, outputs, sweep)


def build(node: Any, run_dir: Path, choices: Mapping[str, Any], mode: str) -> list[Hook]:
    """The `logger` config node ({name: {_target_: a Logger, its keys}}) as one hook; none in a
    mode other than train, or with TensorBoard alone (logger=tensorboard adds no key: the run
    logger writes TensorBoard always)."""
    if mode != "train" or not node:
        return []
    loggers: dict[str, Logger] = {}
    for name, spec in node.items():
        if not spec or "_target_" not in spec:
            continue
        try:
            lg = instantiate(spec)
        except InstantiationException as err:
            if isinstance(err.__cause__, UserError):
                raise err.__cause__ from None
            raise UserError(f"logger.{name} could not be built ({err.__cause__ or err}).") from err
        if not isinstance(lg, Logger):
            raise UserError(
                f"logger.{name} built a {type(lg).__name__}, not a dlrun.engine.loggers.Logger."
            )
        loggers[str(name)] = lg
    return [Loggers(loggers, run_info(run_dir, choices))] if loggers else []
