"""Where a mode's results go: beside the run its checkpoint came from.

`dlrun mode=predict ckpt=<run>/checkpoints/best.pt ...` writes to `<run>/predict/001/` (then
002, ...: a new folder per call, never one overwritten), not to a new top-level folder that looks
like a training run. Decided before Hydra runs, as `hydra.run.dir=` on the command line; a command
that names hydra.run.dir itself, a sweep (-m), or a checkpoint outside a run's `checkpoints/`
keeps Hydra's folder. Where the run folder cannot be written, the results go to a folder of their
own under outputs/ and one line says so (`NOTES`, logged once logging is set up).
"""

import itertools
import time
from collections.abc import Sequence
from pathlib import Path

from dlrun.config.compose import command_line
from dlrun.engine import dist
from dlrun.launch import rundir

NOTES: list[str] = []  # lines for the run's log (the log is not set up before Hydra runs)
_MODE_DIRS: set[Path] = set()  # the folders claimed here: a mode writes into them directly


def is_mode_dir(path: Path) -> bool:
    """Whether `path` is a mode's own results folder (claimed by `command_with_mode_dir`)."""
    return Path(path).resolve() in _MODE_DIRS


def run_of(ckpt: Path) -> Path | None:
    """The run folder a checkpoint belongs to: `<run>` of `<run>/checkpoints/x.pt`."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def _number(folder: Path) -> int:
    """The next free call number in `folder` (001, 002, ...)."""
    taken = [int(p.name) for p in folder.glob("[0-9]*") if p.name.isdigit()]
    return max(taken, default=0) + 1


def claim(base: Path) -> Path:
    """`base/NNN`, the first free number, created by this process (mkdir is atomic: two calls
    at once get two folders). OSError when `base` cannot be written."""
    new_parents = [p.resolve() for p in [base, *base.parents] if not p.exists()]
    base.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(_number(base)):
        folder = base / f"{n:03d}"
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        rundir.claimed(str(folder), folder, new_parents)  # deepest first, as drop() wants
        return folder
    raise AssertionError("unreachable")


def results_dir(ckpt: Path, mode: str) -> Path | None:
    """The folder for `mode`'s results on `ckpt`, claimed; None where Hydra's default is kept (a
    checkpoint outside a run folder, or one that does not exist: the mode says so itself)."""
    run = run_of(ckpt)
    if run is None or not ckpt.is_file():
        return None
    try:
        folder = claim(run / mode)
    except OSError as err:
        stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
        fallback = Path(rundir.unique_dir(f"outputs/{stamp}_{mode}_{run.name}"))
        NOTES.append(
            f"cannot write in the run folder {run} ({err.strerror or err}); the {mode} results "
            f"go to {fallback}"
        )
        folder = fallback
    _MODE_DIRS.add(folder.resolve())
    return folder


def command_with_mode_dir(args: Sequence[str]) -> list[str]:
    """`mode=M ckpt=<run>/checkpoints/x.pt ...` with `hydra.run.dir=<run>/M/NNN` added; any
    other command as it is."""
    args = list(args)
    line = command_line(args)
    if line is None:  # Hydra's own usage error: Hydra reports it
        return args
    parsed, _, mine = line
    mode, ckpt = mine.get("mode", "train"), mine.get("ckpt", "")
    if parsed.multirun or parsed.help or mode in ("", "train") or not ckpt:
        return args
    if "hydra.run.dir" in mine or any(a.startswith("--") for a in args if "=" not in a):
        return args
    if dist.is_main():
        folder = results_dir(Path(ckpt.strip("'\"")).expanduser(), mode)
        if dist.initialized():
            dist.broadcast_object(None if folder is None else str(folder))
    else:  # torchrun: rank 0 claims, the others agree
        got = dist.broadcast_object(None)
        folder = None if got is None else Path(got)
        if folder is not None:
            _MODE_DIRS.add(folder.resolve())
    if folder is None:
        return args
    quoted = str(folder.resolve()).replace("\\", "\\\\").replace("'", "\\'")
    return [*args, f"hydra.run.dir='{quoted}'"]
