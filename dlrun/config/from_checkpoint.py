"""A checkpoint is enough: every mode but train builds its model, data set and task from `ckpt=`.

`dlrun mode=eval ckpt=<run>/checkpoints/best.pt` composes the default config (Hydra runs first);
`apply` then puts the checkpoint's stored config in its place, key by key, under today's names
(dlrun.config.migrations). What stays the command's: the mode's own options (`predict.*`,
`export.*`, ...), where and how it runs (device, threads, precision, progress), and where the data
lives (`data.root`, `DLRUN_DATA`). A key the command gives that contradicts the checkpoint
(`model=resnet18` for a LeNet) is refused in one line naming both values; a key it repeats with
the checkpoint's own value (the old `model=lenet data=mnist`) is no contradiction.
"""

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from dlrun.config.compose import command_line, override_key
from dlrun.config.migrations import migrate
from dlrun.engine import checkpoint
from dlrun.errors import UserError
from dlrun.models.cyclegan_authors import generator_settings, is_authors_generator

log = logging.getLogger("dlrun")

# Keys (and nodes) the command decides, whatever the checkpoint says: the mode and its options,
# the machine it runs on, how it reports, where the data files are.
COMMAND_KEYS = (
    "mode", "ckpt", "resume", "device", "seed", "hydra", "callbacks",
    "eval", "sample", "translate", "embed", "verify", "predict", "export", "units",
    "trainer.num_threads", "trainer.progress", "trainer.log_every_s", "trainer.profile",
    "data.download", "data.num_workers", "data.source.cache_dir", "data.source.workers",
)  # fmt: skip
# Keys the command may set otherwise than the checkpoint (how the mode runs, what it scores);
# not given, they keep the checkpoint's value.
MAY_CHANGE = (
    *COMMAND_KEYS, "data.root", "data.eval_subset", "data.eval_batch_size", "metrics",
    "trainer.precision", "trainer.channels_last", "trainer.compile", "trainer.deterministic",
    "style.content", "style.style", "teacher.ckpt",
)  # fmt: skip
GROUPS = ("model", "data", "loss", "optim", "sched", "trainer")  # compared by what they build
SKIPPED_GROUPS = ("callbacks", "hparams_search")  # training's alone: a mode composes neither
_SHOWN = 4  # contradictions listed before "and N more"


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def saved_config(state: Mapping[str, Any]) -> dict[str, Any] | None:
    """A checkpoint's config as dotted keys under today's names; None when it stores none."""
    saved = state.get("config")
    if not isinstance(saved, Mapping) or "model" not in saved or "data" not in saved:
        return None
    return migrate(checkpoint.flatten(saved))


def _identity(flat: Mapping[str, Any], node: str) -> tuple[Any, Any]:
    """What a config node builds: its `_target_` and, for data sets, its name."""
    return (flat.get(f"{node}._target_"), flat.get(f"{node}.name"))


def _short(flat: Mapping[str, Any], node: str, choice: str | None) -> str:
    target, name = _identity(flat, node)
    if choice:
        return str(choice)
    if name:
        return str(name)
    return str(target).rsplit(".", 1)[-1] if target else "none"


def command_with_checkpoint(args: Sequence[str]) -> list[str]:
    """`mode=M ckpt=X ...` with X's config groups put first (`model=resnet18 data=cifar10`, the
    command's own win), so that Hydra composes the checkpoint's model and data, as resume does;
    any other command as it is. `apply` then sets every value the checkpoint stores."""
    args = list(args)
    line = command_line(args)
    if line is None:  # Hydra's own usage error: Hydra reports it
        return args
    parsed, overrides, mine = line
    mode, ckpt = mine.get("mode", "train"), mine.get("ckpt", "").strip("'\"")
    if parsed.multirun or mode in ("", "train") or not ckpt or not overrides:
        return args
    path = Path(ckpt).expanduser()
    try:
        state = checkpoint.load(path)
    except UserError:  # no such file: the mode says so, after Hydra
        return args
    if is_authors_generator(state):  # their file names no config: CycleGAN's, and see apply
        first = [f"{g}={c}" for g, c in AUTHORS_GROUPS.items() if g not in mine]
        at = args.index(overrides[0])
        return [*args[:at], *first, *args[at:]]
    groups = {g: c for g, c in saved_choices(state, path).items() if g not in SKIPPED_GROUPS}
    first = [f"{g}={c}" for g, c in groups.items() if g not in mine]
    if "hydra.searchpath" not in mine:  # the config folders of one's own its groups came from
        from dlrun.config.resume import _saved_searchpath

        first += _saved_searchpath(run_folder(path))
    at = args.index(overrides[0])  # the overrides stay one positional run (argparse)
    return [*args[:at], *first, *args[at:]]


def run_folder(ckpt: Path) -> Path:
    """The run a checkpoint belongs to: `<run>` of `<run>/checkpoints/x.pt`, else its folder."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def saved_choices(state: Mapping[str, Any], ckpt: Path) -> dict[str, str]:
    """The checkpoint's config groups (model, data, ...): stored since this change, else the ones
    its run folder's .hydra/hydra.yaml recorded, else none (messages name the `_target_`)."""
    stored = state.get("choices")
    if isinstance(stored, Mapping):
        return {str(k): str(v) for k, v in stored.items() if v is not None}
    from dlrun.config.resume import _saved_choices  # the run folder's record

    return {k: v for k, v in _saved_choices(run_folder(ckpt)).items() if v is not None}


def contradictions(
    saved: Mapping[str, Any],
    now: Mapping[str, Any],
    overrides: Sequence[str],
    choices: Mapping[str, Any],
    saved_groups: Mapping[str, str],
) -> list[str]:
    """`key: <command's> (this command) vs <checkpoint's> (checkpoint)` for each override that
    asks for something else than the checkpoint holds."""
    found: list[str] = []
    for override in overrides:
        key = override_key(override)
        if key.startswith("hydra") or override.startswith("~") or _under(key, MAY_CHANGE):
            continue
        if key in GROUPS:  # model=resnet18: compare what the two configs build
            if _identity(saved, key) != _identity(now, key):
                found.append(
                    f"{key}: {_short(saved, key, saved_groups.get(key))} (checkpoint) vs "
                    f"{choices.get(key)} (this command)"
                )
            continue
        under = [k for k in saved if _under(k, [key])]
        for k in under:
            if k in now and not checkpoint.same(saved[k], now[k]):
                found += checkpoint.describe_diff(
                    _nest(saved), _nest(now), [k], ("checkpoint", "this command")
                )
    return found


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def _data_root(now_raw: Any, now: Any, saved: Any, given: bool, same_set: bool) -> Any:
    """data.root for a checkpoint's data set: the command's, or DLRUN_DATA's for the same data
    set, else the checkpoint's folder where it still exists, else today's default."""
    env_based = isinstance(now_raw, str) and "DLRUN_DATA" in now_raw
    if given or (same_set and env_based and os.environ.get("DLRUN_DATA")):
        return now
    if saved is not None and Path(str(saved)).expanduser().exists():
        return saved
    return now if env_based or same_set else saved


def merged(
    saved: Mapping[str, Any],
    now_raw: Mapping[str, Any],
    now: Mapping[str, Any],
    given: Sequence[str],
) -> dict[str, Any]:
    """The mode's config, dotted: the checkpoint's values, the command's COMMAND_KEYS and the
    MAY_CHANGE keys it gives, and today's defaults for keys added since (in a node that builds
    the same thing as the checkpoint's)."""

    def set_here(key: str) -> bool:
        return any(key == g or key.startswith(g + ".") for g in given)

    # Nodes that build another thing than the checkpoint's (lenet composed, resnet18 saved):
    # none of today's keys under them is the checkpoint's, so none is kept.
    nodes = {k.rsplit(".", 1)[0] for k in [*saved, *now] if k.endswith("._target_")}
    other = [n for n in nodes if _identity(saved, n) != _identity(now, n)]
    out: dict[str, Any] = {}
    for key, value in now.items():
        if _under(key, COMMAND_KEYS) or (set_here(key) and _under(key, MAY_CHANGE)):
            out[key] = value
        elif key not in saved and not _under(key, other):
            out[key] = value  # added since the checkpoint was written: today's default
    top = {k.split(".", 1)[0] for k in now}
    same_data = _identity(saved, "data") == _identity(now, "data")
    for key, value in saved.items():
        if key in out or _under(key, COMMAND_KEYS) or key.split(".", 1)[0] not in top:
            continue  # a node today's dlrun no longer has is nothing it would read
        if key == "data.num_classes" and same_data and key not in now:
            continue  # dlrun's own record of it (cli.build_trainer), not an argument of this data
        if set_here(key) and _under(key, MAY_CHANGE):
            continue
        out[key] = value
    if "data.root" in now:
        out["data.root"] = _data_root(
            now_raw.get("data.root"), now["data.root"], saved.get("data.root"),
            set_here("data.root"), _identity(saved, "data") == _identity(now, "data"),
        )  # fmt: skip
    return out


def apply(
    cfg: DictConfig, ckpt: str, overrides: Sequence[str], choices: Mapping[str, Any]
) -> dict[str, str]:
    """Put checkpoint `ckpt`'s config into `cfg` (in place) for a mode other than train; returns
    the checkpoint's config groups (for the choices a run records). A checkpoint without a stored
    config leaves `cfg` as composed."""
    path = Path(ckpt).expanduser()
    state = checkpoint.load(path)
    if is_authors_generator(state):
        return authors_generator(cfg, state, ckpt, overrides)
    saved = saved_config(state)
    if saved is None:
        return {}
    groups = saved_choices(state, path)
    now_raw = checkpoint.flatten(OmegaConf.to_container(cfg, resolve=False))  # type: ignore[arg-type]
    now = checkpoint.flatten(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    found = contradictions(saved, now, overrides, choices, groups)
    if found:
        more = f" and {len(found) - _SHOWN} more" if len(found) > _SHOWN else ""
        raise UserError(
            f"mode={cfg.mode} takes the model, data and task from ckpt={ckpt}, but this command "
            f"asks for others: {'; '.join(found[:_SHOWN])}{more}. Leave "
            f"{'it' if len(found) == 1 else 'them'} out (the mode's own options, data.root, "
            "data.eval_subset and device may be given), or train a new run."
        )
    given = [override_key(o) for o in overrides if not override_key(o).startswith("hydra")]
    flat = merged(saved, now_raw, now, given)
    with open_dict(cfg):
        for top, node in _nest(flat).items():
            cfg[top] = node
    log.info(
        "mode=%s: model %s, data %s and task from %s",
        cfg.mode, _short(saved, "model", groups.get("model")),
        _short(saved, "data", groups.get("data")), path,
    )  # fmt: skip
    return groups


# A generator file of the CycleGAN authors' code (dlrun.models.cyclegan_authors) names no config:
# model=cyclegan builds its network, data=unpaired_folder names a data set (whose data.root the
# command gives for translate.input=test); with translate.input=DIR no data set is read.
AUTHORS_GROUPS = {"model": "cyclegan", "data": "unpaired_folder"}
# The image size their test.py translates at (its load_size defaults to the 256 px crop size).
AUTHORS_IMAGE_SIZE = 256
STAND_IN = "dlrun.tasks.cyclegan.authors.images_only"  # the data of a folder input: shapes only


def authors_generator(
    cfg: DictConfig, state: Mapping[str, Any], ckpt: str, overrides: Sequence[str]
) -> dict[str, str]:
    """`mode=translate ckpt=<their latest_net_G.pth>`: model=cyclegan of the file's in_channels,
    ngf and n_blocks; for translate.input=DIR a data stand-in of data.image_size (256 by default,
    as theirs) that reads no files; for a split, the data set the command names."""
    if cfg.mode != "translate":
        raise UserError(
            f"ckpt={ckpt} is a generator saved by the CycleGAN authors' code: it runs with "
            f"mode=translate, not mode={cfg.mode}."
        )
    given = {override_key(o): o.partition("=")[2] for o in overrides}
    if not str(cfg.model.get("_target_", "")).endswith("models.cyclegan.cyclegan"):
        raise UserError(
            f"ckpt={ckpt} is a generator saved by the CycleGAN authors' code: it runs with "
            f"model=cyclegan, not model={given.get('model', cfg.model.get('_target_'))}."
        )
    settings = generator_settings(state)
    for key, value in settings.items():
        said = given.get(f"model.{key}")
        if said is not None and said != str(value):
            raise UserError(
                f"ckpt={ckpt} holds a generator of model.{key}={value}, not model.{key}={said} "
                "as this command asks: leave it out."
            )
    spec = cfg.translate.get("input") if "translate" in cfg else None
    channels = settings["in_channels"]
    with open_dict(cfg):
        if spec in (None, "", "test", "train"):
            if OmegaConf.is_missing(cfg.data, "root"):
                raise UserError(
                    f"ckpt={ckpt} is a generator of the CycleGAN authors' code, with no data set: "
                    "give translate.input=DIR (a folder of images), or a data set for its "
                    "test split (data=horse2zebra, or data.root=DIR holding testA and testB)."
                )
            if int(cfg.data.channels) != channels:
                raise UserError(
                    f"ckpt={ckpt} translates {channels}-channel images, data.channels is "
                    f"{cfg.data.channels}."
                )
        else:  # a folder: only its images are read, at the data's size
            size = int(given.get("data.image_size") or AUTHORS_IMAGE_SIZE)
            cfg.data = {
                "_target_": STAND_IN, "name": str(cfg.data.get("name") or "images"),
                "channels": channels, "image_size": size, "batch_size": 1,
                "eval_batch_size": int(cfg.data.get("eval_batch_size") or 50), "num_workers": 0,
            }  # fmt: skip
        cfg.model.in_channels, cfg.model.image_size = channels, int(cfg.data.image_size)
        cfg.model.ngf, cfg.model.n_blocks = settings["ngf"], settings["n_blocks"]
    log.info(
        "mode=translate: %s is a generator of the CycleGAN authors' code (%d channels, ngf=%d, "
        "%d blocks)", ckpt, channels, settings["ngf"], settings["n_blocks"],
    )  # fmt: skip
    return {}
