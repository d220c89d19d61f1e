"""Run folders: one per run even when two start in the same second, written only once a run is valid."""

import itertools
import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dlrun.engine import dist
from dlrun.errors import UserError, WriteFailed

FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's default job format
log = logging.getLogger("dlrun")  # the run's own lines, under the command's name
_MADE: dict[str, Path] = {}  # base name -> the folder this process claimed for it
_NEW_PARENTS: list[Path] = []  # the folders above it that did not exist before (outputs/<date>)
_COMMITTED: list[Path] = []  # run folders this process committed (a requeued job resumes them)


class RunDirError(ValueError):
    """unique_dir could not claim a run folder (the message is the user's)."""


def unique_dir(base: str) -> str:
    """`base`, or `base_1`, `base_2`, ...: the first that this process could create itself.

    `mkdir` without exist_ok is atomic, so of two runs started in the same second (same
    timestamp, same model and data) exactly one gets `base`. Memoized: Hydra may resolve the
    run folder more than once, and it must be the same folder every time.
    """
    if base not in _MADE and not dist.is_main():  # torchrun: rank 0 claims, the others agree
        _MADE[base] = Path(dist.broadcast_object(None))
    if base not in _MADE:
        path = Path(base)
        _NEW_PARENTS.extend(p.resolve() for p in path.parents if not p.exists())
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for n in itertools.count():
                candidate = path if n == 0 else path.with_name(f"{path.name}_{n}")
                try:
                    candidate.mkdir()
                    break
                except FileExistsError:
                    continue
        except OSError as err:
            raise RunDirError(cannot_create(path, err)) from None
        _MADE[base] = candidate.resolve()
        if dist.initialized():
            dist.broadcast_object(str(_MADE[base]))
    return str(_MADE[base])


class CheckRunDir(Callback):
    """Before Hydra makes the run folder: one that cannot be created is a message, not a traceback."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)
        try:
            path = Path(str(OmegaConf.select(config, "hydra.run.dir")))
            path.mkdir(parents=True, exist_ok=True)
            return
        except OSError as err:
            message = cannot_create(path, err)
        except OmegaConfBaseException as err:  # unique_dir's error, wrapped by OmegaConf
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, RunDirError):
                cause = cause.__context__  # OmegaConf re-raises; the original is in the chain
            message = str(cause or err).splitlines()[0]
        print(f"dlrun: error: {message}", file=sys.stderr)
        sys.exit(WriteFailed.exit_code)


def cannot_create(path: Path, err: OSError) -> str:
    """The one-paragraph message for a run folder that mkdir refused."""
    in_the_way = isinstance(err, FileExistsError | NotADirectoryError)
    reason = "a file stands where a folder must be" if in_the_way else err.strerror or str(err)
    return (
        f"cannot create the run folder {path} ({reason}). Run from a writable directory or set "
        "hydra.run.dir=<a writable folder>."
    )


def made_here(run_dir: Path) -> bool:
    return Path(run_dir).resolve() in _MADE.values()


def claimed(base: str, path: Path, new_parents: list[Path]) -> None:
    """Record a folder this process created for its run (dlrun.launch.mode_dir): a refused run
    removes it, and the parents it made, as it does Hydra's."""
    _MADE[base] = path.resolve()
    _NEW_PARENTS.extend(new_parents)


def buffer_logs() -> logging.handlers.MemoryHandler:
    """Hold log records until the run folder is committed (or dropped, on a user error)."""
    buffer = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
    logging.getLogger().addHandler(buffer)
    return buffer


def committed() -> bool:
    """Whether this process committed a run folder: a requeue then resumes it (resume=true)."""
    return bool(_COMMITTED)


def commit(run_dir: Path, cfg: DictConfig, buffer: logging.handlers.MemoryHandler | None) -> None:
    """The run passed every check: write Hydra's .hydra/ files and start <run>/<job>.log.

    Only now are the folder and the command to watch it shown: a refused run never names a folder
    that it did not keep. Under torchrun only rank 0 commits, so they are shown once.
    """
    _COMMITTED.append(Path(run_dir))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if HydraConfig.initialized():
            hc = HydraConfig.get()
            out = run_dir / ".hydra"
            out.mkdir(exist_ok=True)
            (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
            (out / "hydra.yaml").write_text(OmegaConf.to_yaml(HydraConfig.instance().cfg))
            (out / "overrides.yaml").write_text(OmegaConf.to_yaml(hc.overrides.task))
            if buffer is not None:
                handler = logging.FileHandler(run_dir / f"{hc.job.name}.log")
                handler.setFormatter(logging.Formatter(FORMAT))
                buffer.setTarget(handler)
                buffer.flush()
                logging.getLogger().addHandler(handler)
        if cfg.get("mode", "train") != "train":  # results, not a run to watch in TensorBoard
            log.info("results: %s", run_dir.resolve())
        else:
            log.info("run folder: %s", run_dir.resolve())
            log.info("TensorBoard: tensorboard --logdir %s", run_dir.resolve())
    except OSError as err:
        raise WriteFailed(
            f"Cannot write the run folder {run_dir} ({err.strerror or err}). Make it writable, "
            "free disk space, or choose another folder with hydra.run.dir=PATH."
        ) from err
    finally:
        if buffer is not None:
            logging.getLogger().removeHandler(buffer)


def drop(run_dir: Path, buffer: logging.handlers.MemoryHandler | None) -> None:
    """A run refused before its commit: forget its log lines, remove the empty folder made for it."""
    if buffer is not None:
        buffer.setTarget(None)
        buffer.buffer.clear()
        logging.getLogger().removeHandler(buffer)
    if made_here(run_dir):
        for folder in [Path(run_dir), *_NEW_PARENTS]:  # deepest first
            try:
                folder.rmdir()  # only if empty: never anything that holds files
            except OSError:
                break


def latest_run(model: str | None, data: str | None, root: Path = Path("outputs")) -> Path:
    """resume=latest: the run folder under `root` of this model and data whose last.pt is newest.

    A run's model and data are the choices Hydra recorded in its .hydra/hydra.yaml (sweep jobs
    included); runs without a checkpoint have nothing to continue and are passed over.
    """
    import yaml  # PyYAML: plain reads of many small files, faster than OmegaConf

    found: list[tuple[float, Path]] = []
    for last in Path(root).glob("**/checkpoints/last.pt"):
        run = last.parent.parent
        try:
            saved = yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text()) or {}
            choices = saved["hydra"]["runtime"]["choices"]
            if (choices.get("model"), choices.get("data")) == (model, data):
                found.append((last.stat().st_mtime, run))
        except (OSError, KeyError, TypeError, yaml.YAMLError):
            continue
    if not found:
        raise UserError(
            f"resume=latest found no run of model={model} data={data} with a checkpoint under "
            f"{Path(root).resolve()}. Start one (drop resume=latest), or continue a given run "
            "with resume=true hydra.run.dir=<its folder>."
        )
    newest = max(found)[1]
    log.info(
        "resume=latest: continuing %s, the newest of %d run(s) of model=%s data=%s",
        newest.resolve(), len(found), model, data,
    )  # fmt: skip
    return newest
