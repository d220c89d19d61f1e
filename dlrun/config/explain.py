"""Hydra's and OmegaConf's errors as dlrun's one line: one paragraph, with a 'did you mean'.

Light on purpose (no torch): `dlrun --help` reports a mistyped option through this module too.
"""

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf

from dlrun.config.compose import composed

UNKNOWN_OPTION = re.compile(r"Could not find '((?:[^'/]+/)*[^'/]+)/([^'/]+)'")
UNKNOWN_KEY = re.compile(r"Could not override '([^']+)'\.?")


def error_line(err: BaseException, args: Sequence[str]) -> str:
    """The whole line `dlrun` prints for a config it cannot compose (no traceback)."""
    cause = err.__cause__
    detail = str(cause).strip().splitlines()[0] if isinstance(cause, Exception) else ""
    detail = f" ({type(cause).__name__}: {detail})" if detail else ""
    message = one_paragraph(str(err))
    hint = did_you_mean(str(err), args)
    if hint:  # right after the first sentence: before a list of 41 models, not after it
        first = UNKNOWN_OPTION.search(message) or UNKNOWN_KEY.search(message)
        end = first.end() if first else len(message)
        head = message[:end].rstrip(".")
        # Hydra's "To append to your config use +lr=0.1" would add a key nothing reads.
        rest = re.sub(r"\s*To append to your config use \+\S+", "", message[end:]).lstrip()
        message = f"{head}. Did you mean {hint}? {rest}".rstrip()
    return f"dlrun: error: {message}{detail}"


def one_paragraph(message: str) -> str:
    """Hydra's multi-line message as one paragraph: list items comma-separated, no search path."""
    out: list[str] = []
    for line in message.split("\nConfig search path:")[0].splitlines():
        if not line.strip():
            continue
        if line.startswith("\t") and out and not out[-1].endswith(":"):
            out[-1] += ","  # the previous line was an item of the same tab-indented list
        out.append(line.strip())
    return " ".join(out)


def did_you_mean(message: str, args: Sequence[str]) -> str | None:
    """The override the user probably meant, for an unknown option (`model=resnet19`) or an
    unknown key (`optim.lrr=0.1`, `modle=lenet`); None when nothing is close."""
    found = UNKNOWN_OPTION.search(message)
    if found:
        group, option = found.groups()
        listed = message.split(f"Available options in '{group}':", 1)[-1]
        options = [line.strip() for line in listed.splitlines() if line.startswith("\t")]
        named = [f"{group}={name}" for name in closest(option, options)]
        return " or ".join(filter(None, (", ".join(named[:-1]), named[-1]))) if named else None
    found = UNKNOWN_KEY.search(message)
    if not found:
        return None
    key = found.group(1)
    mine = [a for a in args if a.split("=", 1)[0] == key]
    value = mine[0].split("=", 1)[1] if mine and "=" in mine[0] else None
    config = composed_without([a for a in args if a not in mine and not a.startswith("-")])
    if config is None:
        return None
    cfg, groups = config
    fixed = None
    if "." not in key and value is not None:  # modle=lenet: the group that has that option
        fixed = next(iter(closest(key, [g for g in groups if value in groups[g]])), None)
    fixed = fixed or closest_key(key, cfg) or nested_key(key, cfg)
    if fixed is None:
        return None
    return fixed if value is None else f"{fixed}={value}"


def nested_key(key: str, cfg: Mapping[str, Any]) -> str | None:
    """A key given at the top level that lives one or more nodes down (`lr` -> `optim.lr`): the
    shortest dotted key whose last part is `key`; None when none is."""
    found: list[str] = []

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for name, value in node.items():
            dotted = f"{prefix}{name}"
            if str(name) == key and prefix:
                found.append(dotted)
            if isinstance(value, Mapping):
                walk(value, dotted + ".")

    if "." in key:
        return None
    walk(cfg, "")
    return min(found, key=lambda k: (k.count("."), k)) if found else None


def closest(word: str, names: Sequence[str]) -> list[str]:
    """The names nearest to `word`, ties kept (at most five, sorted): vgg -> vgg11 ... vgg19."""
    close = difflib.get_close_matches(word, names, n=5, cutoff=0.6)
    ratio = lambda name: difflib.SequenceMatcher(None, word, name).ratio()  # noqa: E731
    return sorted(name for name in close if ratio(name) == ratio(close[0]))


def composed_without(args: Sequence[str]) -> tuple[dict, dict[str, list[str]]] | None:
    """The config the other overrides compose (a model's keys depend on `model=`), unresolved,
    and the config groups; the default config when those overrides are wrong too."""
    for attempt in (list(args), []):
        try:
            cfg, groups = composed(attempt)
        except Exception:  # whatever else is wrong: try without, else no suggestion
            continue
        return OmegaConf.to_container(cfg, resolve=False), groups  # type: ignore[return-value]
    return None


def closest_key(key: str, cfg: Mapping[str, Any]) -> str | None:
    """`key` with each unknown part replaced by the nearest existing one; None when a part has no
    near match (or nothing was wrong)."""
    node: Any = cfg
    parts: list[str] = []
    for part in key.split("."):
        names = [str(k) for k in node] if isinstance(node, Mapping) else []
        if part not in names:
            close = closest(part, [n for n in names if not (n.startswith("_") and n.endswith("_"))])
            if not close:
                return None
            part = close[0]
        parts.append(part)
        node = node[part] if isinstance(node, Mapping) else None
    return ".".join(parts) if ".".join(parts) != key else None
