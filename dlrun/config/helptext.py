"""`dlrun [overrides] --help`: the config groups, and the composed config with a one-line
description beside every key (from configs/keys.md), the `_target_` plumbing left out.

Light on purpose: Hydra's compose API and OmegaConf only. Hydra's own help runs from inside
`@hydra.main`, whose module imports torch and the trainers (seconds); this takes a fraction of
one, and a test checks that torch is never imported on the way.
"""

import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from dlrun.config.compose import CONFIG_DIR, composed

KEYS_FILE = Path(CONFIG_DIR) / "keys.md"
KEY_LINE = re.compile(r"^- `([^`]+)`: (.+)$")
COMMENT_COLUMN = 40  # descriptions start here (or two spaces after a longer `key: value`)


def is_internal(key: object) -> bool:
    """Hydra's instantiation keys (`_target_`, `_partial_`, `_convert_`, ...): not the user's."""
    return isinstance(key, str) and key.startswith("_") and key.endswith("_")


def descriptions(path: Path = KEYS_FILE) -> dict[str, str]:
    """configs/keys.md's `- \\`dotted.key\\`: what it does` lines; `a.b.*` covers any key of a.b."""
    found = (KEY_LINE.match(line) for line in path.read_text(encoding="utf-8").splitlines())
    return {m.group(1): m.group(2).strip() for m in found if m}


def describe(key: str, known: Mapping[str, str]) -> str | None:
    """The description of a dotted key: its own line, else its parent's `.*` line."""
    return known.get(key) or known.get(f"{key.rpartition('.')[0]}.*")


def help_text(overrides: list[str], resolve: bool = False) -> str:
    """The whole help screen for `dlrun <overrides> --help` (template: configs/hydra/help/)."""
    return render(*composed(overrides), resolve=resolve)


def render(cfg: DictConfig, groups: Mapping[str, list[str]], resolve: bool = False) -> str:
    """The help screen of a composed config (with its `hydra` node, which is left out)."""
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    template = cfg.hydra.help.template
    chosen = " ".join(f"{g}={choices[g]}" for g in groups if choices.get(g) is not None)
    app = cfg.copy()
    with open_dict(app):  # what Hydra's help shows too: the app's config, not Hydra's own
        del app["hydra"]
    config = OmegaConf.to_container(app, resolve=resolve)
    lines = [f"# options chosen: {chosen}", *annotated(config, descriptions())]  # type: ignore[arg-type]
    return string.Template(template).safe_substitute(
        APP_CONFIG_GROUPS="".join(f"{g}: {', '.join(opts)}\n" for g, opts in groups.items()),
        CONFIG="\n".join(lines) + "\n",
    )


def annotated(node: Mapping[str, Any], known: Mapping[str, str], prefix: str = "") -> list[str]:
    """The config as YAML, one key a line (lists and maps of values inline), each line followed
    by `# its description`; the instantiation keys left out (a node of only those: left out)."""
    lines: list[str] = []
    indent = "  " * prefix.count(".")
    for key, value in node.items():
        if is_internal(key):
            continue
        path = f"{prefix}{key}"
        note = describe(path, known)
        public = isinstance(value, Mapping) and any(not is_internal(k) for k in value)
        if isinstance(value, Mapping) and value and not public:
            continue  # only `_target_` and friends: nothing the user sets
        text = f"{indent}{key}:" if public else f"{indent}{key}: {inline(value)}"
        lines.append(f"{text.ljust(COMMENT_COLUMN - 2)}  # {note}" if note else text)
        if public:
            lines.extend(annotated(value, known, f"{path}."))
    return lines


def inline(value: Any) -> str:
    """A value in YAML flow style, as it would be typed after `key=` (strings unquoted when they
    read back as the same string)."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(inline(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if not isinstance(value, str):
        return str(value)
    try:
        plain = value != "" and yaml.safe_load(value) == value
    except yaml.YAMLError:
        plain = False
    return value if plain else repr(value)
