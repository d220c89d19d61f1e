"""Checkpoints: atomic save, safe (`weights_only`) load, and the RNG states that make resume exact."""

import contextlib
import errno
import math
import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from dlrun.errors import UserError, WriteFailed
from dlrun.models import LEGACY_TRAINING_KEYS

_ABSENT = object()  # a dotted key that one of two configs does not have


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile's and DDP's wrappers, so every checkpoint has the same keys."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def rng_state(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    """The global RNGs (dropout, init) and the data module's generators (order, augmentation)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["data"] = {name: gen.get_state() for name, gen in generators.items()}
    return state


def set_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in generators.items():
        if name in state.get("data", {}):
            gen.set_state(state["data"][name])


def save(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file and rename it, so a kill mid-write never leaves a torn checkpoint.

    A write that fails (disk full, no permission, read-only file system) leaves the previous
    checkpoint at `path` as it was, removes the temporary file and raises WriteFailed.
    """
    _write_atomic(Path(path), lambda f: torch.save(state, f), "checkpoint")


def write_text_atomic(path: Path, text: str) -> None:
    """`path` holds either its old content or `text` (UTF-8), never a mix; WriteFailed as `save`."""
    data = text.encode("utf-8")
    _write_atomic(Path(path), lambda f: f.write(data), "file")


def _write_atomic(path: Path, write: Callable[[BinaryIO], object], what: str) -> None:
    """Write a temporary file beside `path`, fsync it, and rename it over `path`.

    The fsync comes before the rename: after a power loss the name points at the old bytes or the
    whole new ones, never at an empty file.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:  # never leave the temporary file behind, whatever stopped us
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise WriteFailed(_write_failed(path, err, what)) from err
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable where the OS allows it (best effort: not on every system)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_failed(path: Path, err: OSError, what: str) -> str:
    reason = err.strerror or str(err) or type(err).__name__
    code = errno.errorcode.get(err.errno or 0)
    reason = f"{reason} ({code})" if code else reason
    kept = (
        f"The previous {what} at {path} is intact. "
        if _is_file(path)
        else f"Nothing was written at {path}. "
    )
    folder = path.parent  # the folder that exists: the one to fix when mkdir failed
    while folder != folder.parent and not _is_dir(folder):
        folder = folder.parent
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = f"Free disk space on the drive of {folder}"
    elif err.errno == errno.EROFS:
        fix = f"Remount the file system of {folder} read-write"
    elif err.errno in (errno.EACCES, errno.EPERM):
        fix = f"Make {folder} writable for this user"
    else:
        fix = f"Check that {path.parent} is a writable folder with free space"
    return (
        f"Could not write the {what} {path}: {reason}. {kept}{fix}, or choose another run "
        "folder with hydra.run.dir=PATH."
    )


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a folder we may not even look into
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def load(path: str | Path) -> dict[str, Any]:
    """Load a dlrun checkpoint with `weights_only=True` (no arbitrary code from pickles)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"Checkpoint {path} does not exist. Pass ckpt= the path of a .pt file a dlrun run wrote "
            "(its run folder has checkpoints/last.pt and best.pt)."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, not a torch file, or unsafe pickle content
        raise UserError(
            f"Checkpoint {path} could not be read as a dlrun checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Pass a checkpoints/*.pt file of a dlrun run."
        ) from err


SHOWN = 5  # keys of each kind a mismatch message lists before "... and N more"
# The config keys that decide a network's tensors: the whole model.* subtree, and these of data.*.
SHAPE_KEYS = ("data.name", "data.channels", "data.image_size", "data.num_classes")


def load_model_state(
    model: nn.Module,
    state: Mapping[str, Any],
    path: str | Path,
    *,
    config: Mapping[str, Any] | None = None,
) -> None:
    """Load the `model` weights of a checkpoint, or say which keys and settings do not fit.

    `config` is the current run's resolved config (a plain dict): given, the message also names the
    model.* and data.* settings that differ from the checkpoint's own config.
    """
    net = unwrap(model)
    try:
        net.load_state_dict(state["model"])
        return
    except (RuntimeError, KeyError, TypeError, AttributeError) as err:
        saved_cfg = state.get("config") if isinstance(state, Mapping) else None
        saved_cfg = saved_cfg if isinstance(saved_cfg, Mapping) else {}
        model_cfg = saved_cfg.get("model") if isinstance(saved_cfg.get("model"), Mapping) else {}
        data_cfg = saved_cfg.get("data") if isinstance(saved_cfg.get("data"), Mapping) else {}
        made = f"model {model_cfg.get('_target_', '?')} on data {data_cfg.get('name', '?')}"
        weights = state.get("model") if isinstance(state, Mapping) else None
        if isinstance(weights, Mapping):
            details = _state_mismatch(weights, net.state_dict())
        else:
            details = ["it holds no model weights"]
        if not details:  # the keys and shapes agree; torch refused for another reason
            details = [str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__]
        if config is not None and saved_cfg:
            details += _shape_config_diff(saved_cfg, config)
        raise UserError(
            f"Checkpoint {path} does not fit this model: it was written for {made}. "
            f"{'. '.join(details)}. Use the same model= and data= (and model.* options) as the "
            "run that wrote it."
        ) from err


def _state_mismatch(saved: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """Sentences naming the missing, unexpected and shape-mismatched keys (at most SHOWN of each)."""
    missing = [k for k in ours if k not in saved]
    unexpected = [k for k in saved if k not in ours]
    shapes = [
        f"{k}: checkpoint {_shape(saved[k])} vs model {_shape(ours[k])}"
        for k in ours
        if k in saved and _shape(saved[k]) != _shape(ours[k])
    ]
    out = []
    for label, items in (
        ("Shapes differ", shapes),
        ("Missing from the checkpoint", missing),
        ("In the checkpoint but not in this model", unexpected),
    ):
        if items:
            out.append(f"{label} ({len(items)}): {_listed(items)}")
    return out


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    return None if shape is None else tuple(shape)


def _listed(items: list[str], limit: int = SHOWN) -> str:
    more = f"; ... and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def _shape_config_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """A sentence naming the model.* and SHAPE_KEYS settings that differ, with both values."""
    flat_saved, flat_now = _flatten(saved), _flatten(current)
    keys = sorted(
        k
        for k in set(flat_saved) | set(flat_now)
        if (_under(k, ("model",)) or k in SHAPE_KEYS)
        and not _under(k, [f"model.{t}" for t in LEGACY_TRAINING_KEYS])
        and not _same(flat_saved.get(k, _ABSENT), flat_now.get(k, _ABSENT))
    )
    if not keys:
        return []
    shown = describe_diff(saved, current, keys)
    return [f"Settings that differ ({len(keys)}): {_listed(shown, 2 * SHOWN)}"]


def describe_diff(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    keys: Collection[str],
    labels: tuple[str, str] = ("checkpoint", "this run"),
) -> list[str]:
    """`key: <saved> (<label>) vs <current> (<label>)` for each dotted key, as a message shows it."""
    flat_saved, flat_now = _flatten(saved), _flatten(current)
    return [
        f"{k}: {_value(flat_saved.get(k, _ABSENT))} ({labels[0]}) vs "
        f"{_value(flat_now.get(k, _ABSENT))} ({labels[1]})"
        for k in keys
    ]


def _value(value: Any) -> str:
    if value is _ABSENT:
        return "absent"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def config_diff(
    saved: Mapping[str, Any], current: Mapping[str, Any], allowed: Collection[str]
) -> list[str]:
    """The sorted dotted keys whose values differ between two nested configs.

    A key present in one config only differs. Keys equal to or under an `allowed` prefix
    (`trainer.max_epochs`, `hydra`) are ignored. Lists compare as whole values.
    """
    flat_saved, flat_now = _flatten(saved), _flatten(current)
    return sorted(
        key
        for key in set(flat_saved) | set(flat_now)
        if not _under(key, allowed)
        and not _same(flat_saved.get(key, _ABSENT), flat_now.get(key, _ABSENT))
    )


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A nested config as dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    return _flatten(tree)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; an empty mapping stays a value, so its presence counts."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out |= _flatten(value, dotted + ".")
        else:
            out[dotted] = value
    return out


def same(a: Any, b: Any) -> bool:
    """Two config values are equal as config_diff compares them (1 == 1.0, true is not 1)."""
    return _same(a, b)


def _under(key: str, prefixes: Collection[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _same(a: Any, b: Any) -> bool:
    """Config equality: 1 == 1.0, but true is not 1; NaN equals NaN; lists and tuples elementwise."""
    if a is _ABSENT or b is _ABSENT:
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        flat_a, flat_b = _flatten(a), _flatten(b)
        return flat_a.keys() == flat_b.keys() and all(
            _same(v, flat_b[k]) for k, v in flat_a.items()
        )
    try:
        return bool(a == b)
    except Exception:  # e.g. tensors, whose == is elementwise
        return a is b
