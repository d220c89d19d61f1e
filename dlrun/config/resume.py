"""resume=true continues a run as it was configured, whatever dlrun added or moved since it was saved.

The effective config of a resumed run: the run's saved value for every key it has (under today's
names, through dlrun.config.explain' one migration table), today's default only for a key it lacks, and
the resume command's own overrides on top. An override that contradicts the run is refused, unless
it is one that resume may change (run_folder.RESUMABLE_CHANGES: the length, logging, data locations).

Two steps, because Hydra composes the config before dlrun sees it:
- `command_with_run` (before Hydra): the run's own config groups and overrides go first on the
  command line, so that `dlrun resume=true hydra.run.dir=RUN` alone composes the run's model, data,
  schedule ... and Hydra records them again in RUN/.hydra/ for the next resume.
- `continue_config` (after Hydra): every key the command does not set gets the run's saved value
  back (a changed default is no difference), contradictions are refused in one line, and one log
  line names the keys added since the run was saved.
"""

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from dlrun.config.compose import command_line, override_key
from dlrun.config.migrations import migrate, moved_target, new_name
from dlrun.engine import checkpoint
from dlrun.engine.run_folder import NEUTRAL, RESUMABLE_CHANGES
from dlrun.errors import UserError

log = logging.getLogger("dlrun")
_SHOWN = 6  # contradictions a refusal lists before "and N more"


def _saved_choices(run_dir: Path) -> dict[str, str | None]:
    """The run's top-level app config groups (model, data, sched ...; None: experiment=null) as
    Hydra recorded them; nested groups follow from their parent's own defaults."""
    try:
        saved = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text()) or {}
        choices = saved["hydra"]["runtime"]["choices"] or {}
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return {}
    return {
        str(g): None if c is None else str(c)
        for g, c in choices.items()
        if "/" not in str(g) and not str(g).startswith("hydra")
    }


def _saved_searchpath(run_dir: Path) -> list[str]:
    """The run's `hydra.searchpath=[...]` override, if it had one: the config folders of one's own
    (a task, a callback) its groups came from, which composing it again needs too."""
    try:
        saved = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text()) or {}
        hydra_overrides = saved["hydra"]["overrides"]["hydra"] or []
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return []
    return [str(o) for o in hydra_overrides if override_key(str(o)) == "hydra.searchpath"]


def _migrated_override(override: str) -> str:
    """A saved override under today's key and dotted path; `+key=` as `++key=`: a key the run had to
    add may be one that dlrun has since added itself."""
    prefix = override[: len(override) - len(override.lstrip("+~"))]
    key, sep, value = override[len(prefix) :].partition("=")
    value = moved_target(value)  # a `_target_`, or a function named by path (loss.fn)
    return f"{'++' if prefix == '+' else prefix}{new_name(key)}{sep}{value}"


def command_with_run(args: Sequence[str]) -> list[str]:
    """`resume=true hydra.run.dir=RUN ...` with RUN's config groups and overrides put first (the
    command's own win); any other command as it is. A sweep (-m) keeps its own: its jobs' folders
    are named only once Hydra runs them (continue_config then names a group that differs)."""
    args = list(args)
    line = command_line(args)
    if line is None:  # Hydra's own usage error: Hydra reports it
        return args
    parsed, overrides, mine = line
    if parsed.multirun or str(mine.get("resume", "")).lower() != "true":
        return args
    run_dir = Path(mine.get("hydra.run.dir", "") or "/nonexistent")
    if not (run_dir / ".hydra" / "config.yaml").is_file():
        return args  # a new folder: nothing to continue (prepare() says so if there is no run)
    try:
        saved = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    except (OSError, yaml.YAMLError):
        saved = []
    run = [f"{g}={c}" for g, c in _saved_choices(run_dir).items() if c is not None]
    run += [_migrated_override(str(o)) for o in saved] + _saved_searchpath(run_dir)
    first: dict[str, str] = {}
    for override in run:  # one per key: the last (overrides.yaml after the choices; they agree)
        first.pop(override_key(override), None)
        first[override_key(override)] = override
    # A key the command gives wins, over every key under it too (data=cifar10 drops the run's
    # data.batch_size=20: refused as a new data set, rather than as a key cifar10 lacks).
    prefix = [o for k, o in first.items() if not any(k == m or k.startswith(m + ".") for m in mine)]
    at = args.index(overrides[0])  # the overrides stay one positional run (argparse)
    return [*args[:at], *prefix, *args[at:]]


def _containers(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """A config's dotted keys unresolved (what is merged: interpolations stay interpolations) and
    resolved (what is compared: `${data.channels}` is 1 on both sides)."""
    raw = checkpoint.flatten(OmegaConf.to_container(cfg, resolve=False))  # type: ignore[arg-type]
    try:
        resolved = checkpoint.flatten(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    except Exception:  # an interpolation that no longer resolves: compare as written
        resolved = raw
    return raw, resolved


def continue_config(
    cfg: DictConfig, run_dir: Path, overrides: Sequence[str], choices: Mapping[str, Any]
) -> DictConfig:
    """The config that continues the run in `run_dir` (`cfg` itself, changed in place; as it is
    when the folder holds no run). `overrides`: the command's (after command_with_run); `choices`:
    the config groups Hydra composed. A contradiction is a UserError of one line."""
    saved_path = Path(run_dir) / ".hydra" / "config.yaml"
    if not saved_path.is_file():
        return cfg
    saved_raw, saved = (migrate(flat) for flat in _containers(OmegaConf.load(saved_path)))
    # The run as it ran: a key it predates that NEUTRAL knows had that value all along.
    was_raw = {k: v for k, v in NEUTRAL.items() if k not in saved_raw} | saved_raw
    was = {k: v for k, v in NEUTRAL.items() if k not in saved} | saved
    now_raw, now = _containers(cfg)
    given = [override_key(o) for o in overrides if not override_key(o).startswith("hydra")]
    groups = {k for k in given if "/" in k or k in choices}
    explicit = [k for k in given if k not in groups]

    def set_here(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in explicit)

    changes, missing = _group_changes(_saved_choices(Path(run_dir)), choices, groups, was, now)
    contradicted = [  # an added key (no old value known) is the command's to set
        k for k in checkpoint.config_diff(was, now, RESUMABLE_CHANGES) if set_here(k) and k in was
    ]
    changes += checkpoint.describe_diff(was, now, contradicted, ("run", "now"))
    if changes:
        raise UserError(_refusal(Path(run_dir), changes, missing))
    for key in checkpoint.config_diff(was_raw, now_raw, ("hydra",)):
        if key in was_raw and key in now_raw and not set_here(key):
            OmegaConf.update(cfg, key, was_raw[key], merge=False)  # a changed default: the run's
    added = [k for k in now_raw if k not in saved_raw and not set_here(k) and k != "hydra"]
    if added:
        one = len(added) == 1
        log.info(
            "resume: %d key%s added since this run was saved take%s %s default%s: %s",
            len(added), "" if one else "s", "s" if one else "", "its" if one else "their",
            "" if one else "s", ", ".join(added),
        )  # fmt: skip
    return cfg


def _group_changes(
    saved: Mapping[str, str | None],
    choices: Mapping[str, Any],
    given: set[str],
    was: Mapping[str, Any],
    now: Mapping[str, Any],
) -> tuple[list[str], list[str]]:
    """The config groups composed otherwise than the run's: `group: a (run) vs b (now)` (and the
    `_target_` that changes with it), and `group=a` for each the command did not name (resume=latest
    or a sweep job: the command's groups were composed, not the run's)."""
    changes, missing = [], []
    for group, chosen in saved.items():
        current = choices.get(group)
        if (None if current is None else str(current)) == chosen or group not in choices:
            continue
        changes.append(f"{group}: {chosen or 'null'} (run) vs {current or 'null'} (now)")
        target = f"{group}._target_"
        if target in was and target in now and not checkpoint.same(was[target], now[target]):
            changes += checkpoint.describe_diff(was, now, [target], ("run", "now"))
        if group not in given:
            missing.append(f"{group}={chosen or 'null'}")
    return changes, missing


def _refusal(run_dir: Path, changes: list[str], missing: list[str]) -> str:
    """One paragraph naming each contradiction as `key: <run's> (run) vs <command's> (now)`."""
    more = f" and {len(changes) - _SHOWN} more" if len(changes) > _SHOWN else ""
    fix = (
        f"Add {' '.join(missing)} (the run's own choice{'s' if len(missing) > 1 else ''})"
        if missing
        else f"Leave {'it' if len(changes) == 1 else 'them'} out (a setting the command does not "
        "give keeps the run's value)"
    )
    return (
        f"resume=true continues the run in {run_dir} as it was configured, but this command "
        f"changes it: {'; '.join(changes[:_SHOWN])}{more}. {fix}, or start a new run from its "
        f"weights with ckpt={run_dir / 'checkpoints' / 'last.pt'}. Only trainer.max_epochs/"
        "max_steps, logging and data locations may change on resume."
    )
