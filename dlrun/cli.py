"""The `dlrun` command: compose the configs, build the task's pieces, hand the mode to its trainer."""

import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from dlrun.config import checks, from_checkpoint, migrations, resume
from dlrun.config.compose import CONFIG_DIR
from dlrun.config.explain import error_line
from dlrun.data import described
from dlrun.data.described import DescribedData
from dlrun.engine import checkpoint, dist, loggers, progress
from dlrun.engine.guards import Interrupted
from dlrun.engine.hooks import Hook, builtin
from dlrun.engine.loop import Trainer
from dlrun.engine.tb import hparams_of
from dlrun.errors import UserError
from dlrun.launch import cluster, mode_dir, process, rundir, sweep
from dlrun.models import without_pretrained

log = logging.getLogger("dlrun")
SPLITS = ("train", "val", "test")
OmegaConf.register_new_resolver("unique_dir", rundir.unique_dir, replace=True)


def resolve_device(name: str) -> torch.device:
    """The run's device; under torchrun `auto` and `cuda` mean this process's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.initialized():
        name = f"cuda:{dist.local_rank()}"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"device='{name}' is not a device; use auto, cpu, cuda or cuda:N.") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"device='{name}' asks for CUDA but none is available here; use device=cpu or auto."
        )
    return device


def build(node: DictConfig | dict, what: str, **kwargs: Any) -> Any:
    """instantiate(), with a failing constructor reported as a user error naming the config group."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        reason = f"{type(cause).__name__}: {cause}" if cause else str(err)
        loading = re.search(r"Error loading '([\w.]+)'", f"{err} {reason}")
        moved = migrations.moved_target(loading.group(1)) if loading else None
        if loading and moved != loading.group(1):  # a config of one's own, written before a move
            raise UserError(
                f"{loading.group(1)} has moved to {moved}: use _target_: {moved} in the {what} "
                "config (docs/migration.md lists what moved)."
            ) from err
        raise UserError(
            f"The {what} config could not be built ({reason}). Check the {what}.* values."
        ) from err


def build_trainer(
    cfg: DictConfig, run_dir: str | Path, choices: Mapping[str, str | None] | None = None
) -> Trainer:
    """Check the config, build data, model and trainer, and set the trainer up: no writes yet."""
    checks.check_config(cfg)
    missing = [key for key in cfg.data if OmegaConf.is_missing(cfg.data, key)]
    if missing:
        data = (choices or {}).get("data") or cfg.data.get("name")
        raise UserError(
            f"data.{missing[0]} must be set for data={data}, e.g. data.{missing[0]}=PATH."
        )
    device = resolve_device(cfg.device)
    # Before any tensor work, for the whole process; the trainer takes both keys as arguments.
    process.configure(
        cfg.trainer.get("num_threads"), bool(cfg.trainer.get("deterministic", False)), device
    )
    # The data's preparation says how far it is, as the trainer will (dlrun.engine.progress).
    progress.configure(cfg.trainer.get("log_every_s", 30), cfg.trainer.get("progress"))
    torch.manual_seed(cfg.seed)
    data = mode_data(cfg) or build(cfg.data, "data")
    with open_dict(cfg):  # image folders know their class count only once read
        cfg.data.num_classes = data.describe()["num_classes"]
    data.setup(device, cfg.seed, dist.rank())
    model_node: Any = cfg.model
    if cfg.resume not in (False, None) or cfg.mode != "train":  # a checkpoint's weights follow
        model_node = without_pretrained(OmegaConf.to_container(cfg.model, resolve=True))
    # The keys of the built-in hooks (trainer.ema, trainer.profile, ...) build those hooks.
    node, hooks = builtin.split(OmegaConf.to_container(cfg.trainer, resolve=True))
    # Partial first, then call: instantiate() would copy these live objects into the config.
    factory = build(node, "trainer", _partial_=True)
    record: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    trainer = factory(
        model=build(model_node, "model"),
        data=data,
        loss=build(cfg.loss, "loss"),
        optim=build(cfg.optim, "optim"),
        sched=build(cfg.sched, "sched"),
        run_dir=Path(run_dir),
        device=device,
        config_record=record,  # what the run folder stores in checkpoints and compares on resume
        hparams=hparams_of(cfg, choices or {}),
        mode=cfg.mode,
        seed=cfg.seed,
        model_spec=record["model"],
        freeze=cfg.get("freeze"),
        hooks=[*hooks, *callbacks(cfg), *sweep.trial_hooks(),  # a sweeper's (Optuna: pruning)
               *loggers.build(cfg.get("logger"), Path(run_dir), choices or {}, cfg.mode)],
    )
    trainer.check_mode(cfg.mode, cfg.ckpt, mode_options(cfg))
    resuming = cfg.resume not in (False, None)
    trainer.setup(start_from=cfg.ckpt if cfg.mode == "train" and not resuming else None)
    return trainer


def mode_data(cfg: DictConfig) -> DescribedData | None:
    """For a mode that needs no data set (predict on a folder, export, sample: the trainer's
    `data_free_modes`), the checkpoint's description of its data; None: build the data set."""
    if cfg.mode == "train" or not cfg.ckpt:
        return None
    try:
        free = getattr(get_class(str(cfg.trainer._target_)), "data_free_modes", {})
    except Exception:  # a bad _target_: building the trainer says so
        return None
    if cfg.mode not in free:
        return None
    option = free[cfg.mode]
    if option is not None and str(cfg[cfg.mode].get(option) or "test") in SPLITS:
        return None  # predict.input=test (its default): the split's images are the input
    stand_in = described.from_checkpoint(checkpoint.load(cfg.ckpt))
    if stand_in is not None:
        log.info("mode=%s reads no data set: the checkpoint describes %s", cfg.mode, stand_in.name)
    return stand_in


def callbacks(cfg: DictConfig) -> list[Hook]:
    """The `callbacks` config group: `name: {_target_: a Hook subclass, its arguments}` each
    (null: left out), saved in checkpoints under its name (docs/hooks.md)."""
    node = cfg.get("callbacks")
    if node is None:
        return []
    if not OmegaConf.is_dict(node):
        raise UserError(
            "callbacks must map names to hook configs, e.g. "
            "+callbacks.lr_log._target_=mypkg.LrLog (docs/hooks.md)."
        )
    hooks = []
    for name, spec in node.items():
        if spec is None:
            continue
        if name in builtin.RESERVED:
            raise UserError(
                f"callbacks.{name}: '{name}' is a built-in hook's name (its checkpoint key); "
                "give the callback another name."
            )
        hook = build(spec, f"callbacks.{name}")
        if not isinstance(hook, Hook):
            raise UserError(
                f"callbacks.{name} built a {type(hook).__name__}, which is not a dlrun hook: "
                "subclass dlrun.engine.hooks.Hook (docs/hooks.md)."
            )
        hook.state_key = str(name)
        hooks.append(hook)
    return hooks


def mode_options(cfg: DictConfig) -> dict[str, Any]:
    """The options of `cfg.mode`: the config node of its name (`predict.*`, `export.*`), if any."""
    return OmegaConf.to_container(cfg[cfg.mode], resolve=True) if cfg.mode in cfg else {}  # type: ignore[return-value]


def _latest(cfg: DictConfig, run_dir: Path, choices: Mapping[str, str | None]) -> Path:
    """resume=latest: the newest run of the same model and data (the folder Hydra made for this
    one is removed, as long as it is empty); any other resume value keeps `run_dir`."""
    if cfg.resume != "latest":
        return run_dir
    if sweep.in_multirun():
        raise UserError(
            "resume=latest continues one run; in a sweep (-m) give each job its folder with "
            "resume=true, or rerun the sweep command with resume=true."
        )
    found = rundir.latest_run(choices.get("model"), choices.get("data"))
    rundir.drop(run_dir, None)
    return found


def run(
    cfg: DictConfig,
    run_dir: str | Path,
    choices: Mapping[str, str | None] | None = None,
    commit: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Everything `dlrun` does after Hydra composed the config; tests call it directly.

    Every check comes before `commit` (which writes .hydra/ and the log file); nothing is written
    to the run folder before it, so a refused run leaves an existing folder as it was.
    """
    run_dir = _latest(cfg, Path(run_dir), choices or {})
    trainer = build_trainer(cfg, run_dir, choices)
    return _run_mode(trainer, cfg, run_dir, commit)


def _run_mode(
    trainer: Trainer, cfg: DictConfig, run_dir: Path, commit: Callable[[], None] | None
) -> dict[str, float]:
    default = lambda: run_dir.mkdir(parents=True, exist_ok=True)  # noqa: E731
    try:
        metrics = trainer.run_mode(
            cfg.mode,
            ckpt=cfg.ckpt,
            resume=cfg.resume not in (False, None),
            options=mode_options(cfg),
            commit=(commit or default) if dist.is_main() else (lambda: None),
            weights=str(cfg.get("eval", {}).get("weights", "model")),  # eval.weights
        )
    except RuntimeError as err:  # trainer.deterministic=true and an op that has no such kernel
        if not torch.are_deterministic_algorithms_enabled() or "deterministic" not in str(err):
            raise
        line = str(err).strip().splitlines()[0]
        raise UserError(
            f"trainer.deterministic=true, but this run uses an operation without a deterministic "
            f"implementation on {trainer.device.type} ({line}). Drop trainer.deterministic, or "
            "run on another device; the last checkpoint (if any) is intact."
        ) from err
    shown = [  # top-level metrics; per-class figures are in metrics.json and TensorBoard
        f"{k}={v:.4f}"
        for k, v in metrics.items()
        if k.startswith(("val/", "test/")) and k.count("/") == 1
    ]
    if not shown and cfg.mode == "train":  # a GAN without FID: its final losses, not a bare "done"
        shown = [
            f"{k}={v:.4f}"
            for k, v in metrics.items()
            if k.startswith("train/") and k.count("/") == 1
            and k not in ("train/lr", "train/images_per_s", "train/skipped_steps")
        ]
    if shown:  # output modes (sample, translate, embed, verify) have said what they wrote
        log.info("done: %s", ", ".join(shown))
    else:
        log.info("done")
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if cluster.in_job() and not dist.initialized():  # a SLURM job of several tasks: their DDP
        cluster.export_torch_env()
        dist.init_from_env()
    if not dist.is_main():  # torchrun: one copy of the log on the console (rank 0's)
        logging.getLogger().setLevel(logging.WARNING)
    buffer = rundir.buffer_logs()
    committed = False

    def commit() -> None:
        nonlocal committed
        rundir.commit(run_dir, cfg, buffer)
        committed = True

    trainer = None
    choices = dict(hc.runtime.choices)
    for note in mode_dir.NOTES:  # e.g. a run folder that could not take a mode's results
        log.warning(note)
    try:
        run_dir = _latest(cfg, run_dir, choices)
        if cfg.resume not in (False, None):  # the run's saved values, not today's defaults
            resume.continue_config(cfg, run_dir, list(hc.overrides.task), hc.runtime.choices)
        elif cfg.mode != "train" and cfg.ckpt:  # the checkpoint's model, data and task
            choices |= from_checkpoint.apply(cfg, cfg.ckpt, list(hc.overrides.task), choices)
        trainer = build_trainer(cfg, run_dir, choices)
        metrics = _run_mode(trainer, cfg, run_dir, commit)
    except Interrupted as err:  # a stop signal: the checkpoint is written; a sweep stops too
        cluster.after_stop(err.signum)  # in a SLURM job: requeue it (it resumes by itself)
        raise Failed(err) from None
    except UserError as err:
        if not committed:
            rundir.drop(run_dir, buffer)
        if not sweep.in_multirun():
            raise Failed(err) from None
        sweep.record_failure(run_dir, err)  # the sweep goes on; the sweeper gets the worst value
        mode = trainer.monitor.mode if trainer else cfg.trainer.get("monitor_mode", "max")
        return float("-inf") if mode == "max" else float("inf")
    except KeyboardInterrupt:
        if not committed:
            rundir.drop(run_dir, buffer)
        raise KeyboardInterrupt(str(run_dir) if committed else "") from None
    return trainer.monitor.objective(metrics)  # what a Hydra sweeper (e.g. Optuna) optimises


class Failed(BaseException):
    """Carries a UserError past Hydra's job runner (which would print its own line) to main()."""

    def __init__(self, error: UserError) -> None:
        super().__init__(error)
        self.error = error


def main() -> None:
    """The run (dlrun.entry.main answers --help first): every failure ends here as one paragraph
    and its exit code.

    Hydra prints a config it cannot compose (a YAML error, an unknown option) itself, sometimes
    with a traceback; with HYDRA_FULL_ERROR=1 it raises instead, and we print the message (with
    a 'did you mean'). A user who set HYDRA_FULL_ERROR=1 gets Hydra's full traceback, as Hydra
    documents.
    """
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    dist.init_from_env()  # torchrun: before Hydra, so that rank 0 names the one run folder
    # resume=true hydra.run.dir=RUN: Hydra composes RUN's own config groups (model=, sched= ...),
    # not the defaults, and records them again in RUN/.hydra/ (dlrun.config.resume).
    sys.argv = [sys.argv[0], *resume.command_with_run(sys.argv[1:])]
    # mode=M ckpt=<run>/checkpoints/x.pt: the results go to <run>/M/NNN (dlrun.launch.mode_dir).
    sys.argv = [sys.argv[0], *mode_dir.command_with_mode_dir(sys.argv[1:])]
    # ... and Hydra composes the checkpoint's own config groups (dlrun.config.from_checkpoint).
    sys.argv = [sys.argv[0], *from_checkpoint.command_with_checkpoint(sys.argv[1:])]
    try:
        _hydra_main()
        dist.shutdown()
    except Failed as failed:
        err = failed.error
        prefix = "dlrun: " if isinstance(err, Interrupted) else "dlrun: error: "
        print(f"{prefix}{err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt as err:
        run_dir = err.args[0] if err.args else ""
        print(
            f"dlrun: interrupted; continue with resume=true hydra.run.dir={run_dir}"
            if run_dir
            else "dlrun: interrupted before training started; nothing was written.",
            file=sys.stderr,
        )
        sys.exit(130)
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as err:
        if full:
            raise
        print(error_line(err, sys.argv[1:]), file=sys.stderr)
        sys.exit(UserError.exit_code)
