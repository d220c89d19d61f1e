"""`dlrun [overrides] --help`: the config groups, and the keys the composed config reads, each with
a one-line description (from configs/keys.md), the `_target_` plumbing left out; `--help-all`
shows every key, the other tasks' blocks (`style.*`, `translate.*`, ...) too.

Which top-level blocks a config reads follows from the config itself: the chosen groups' nodes,
whatever their values interpolate (`trainer.metrics: ${metrics}`, `loss.style_weight:
${style.style_weight}`), and the options of the trainer's own modes (`predict.*` for a
classifier: `TRAINER_MODES`, which a test keeps equal to each trainer class's `modes`).

Light on purpose: Hydra's compose API and OmegaConf only. Hydra's own help runs from inside
`@hydra.main`, whose module imports torch and the trainers (seconds); this takes a fraction of
one, and a test checks that torch is never imported on the way.
"""

import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from dlrun.config.compose import CONFIG_DIR, composed

KEYS_FILE = Path(CONFIG_DIR) / "keys.md"
KEY_LINE = re.compile(r"^- `([^`]+)`: (.+)$")
# `- \`optim.lr\` (sched=onecycle|cosine): ...`: the line for those choices (keys.md, top)
WHEN_LINE = re.compile(r"^- `([^`]+)` \((\w+)=([\w|]+)\): (.+)$")
REFERENCE = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")  # ${style.pool}, not ${oc.env:X} or ${hydra:x}

# The `modes` of each trainer class (dlrun.engine.loop.Trainer.modes), by the config's
# `trainer._target_`: importing the classes would import torch, which --help must not. Kept equal
# to the classes by tests/test_help.py. A mode's options are the top-level node of its name.
CLASSIFIER_MODES = ("train", "eval", "predict", "export", "units")
TRAINER_MODES: dict[str, tuple[str, ...]] = {
    "dlrun.tasks.classification.trainer.ClassificationTrainer": CLASSIFIER_MODES,
    "dlrun.tasks.classification.knn_trainer.KNNTrainer": CLASSIFIER_MODES,
    "dlrun.tasks.distill.trainer.DistillTrainer": CLASSIFIER_MODES,
    "dlrun.tasks.gan.trainer.GANTrainer": ("train", "eval", "sample"),
    "dlrun.tasks.cyclegan.trainer.CycleGANTrainer": ("train", "eval", "translate"),
    "dlrun.tasks.localization.trainer.LocalizationTrainer": ("train", "eval", "predict"),
    "dlrun.tasks.metric_learning.trainer.MetricTrainer": ("train", "eval", "embed", "verify"),
    "dlrun.tasks.segmentation.trainer.SegmentationTrainer": ("train", "eval", "predict"),
    "dlrun.tasks.detection.trainer.DetectionTrainer": ("train", "eval", "predict"),
    "dlrun.tasks.style.trainer.StyleTrainer": ("train", "eval"),
}
# Read by dlrun.cli for every task (the weights the modes load), not through an interpolation.
ALWAYS_READ = ("eval.weights", "logger")  # logger: a multi-select group, not in the choices
ANY_MODE = "eval | the task's others (sample, translate, embed, verify, predict, export, units)"
COMMENT_COLUMN = 40  # descriptions start here (or two spaces after a longer `key: value`)


def is_internal(key: object) -> bool:
    """Hydra's instantiation keys (`_target_`, `_partial_`, `_convert_`, ...): not the user's."""
    return isinstance(key, str) and key.startswith("_") and key.endswith("_")


def descriptions(path: Path = KEYS_FILE) -> dict[str, str]:
    """configs/keys.md's `- \\`dotted.key\\`: what it does` lines; `a.b.*` covers any key of a.b."""
    found = (KEY_LINE.match(line) for line in path.read_text(encoding="utf-8").splitlines())
    return {m.group(1): m.group(2).strip() for m in found if m}


def chosen_descriptions(choices: Mapping[str, Any], path: Path = KEYS_FILE) -> dict[str, str]:
    """keys.md's lines with the choices of this config: the "- `key` (group=a|b): text" lines
    whose group has one of those options chosen replace the key's plain line."""
    known = descriptions(path)
    for line in path.read_text(encoding="utf-8").splitlines():
        found = WHEN_LINE.match(line)
        if found and str(choices.get(found.group(2))) in found.group(3).split("|"):
            known[found.group(1)] = found.group(4).strip()
    return known


def describe(key: str, known: Mapping[str, str]) -> str | None:
    """The description of a dotted key: its own line, else its parent's `.*` line."""
    return known.get(key) or known.get(f"{key.rpartition('.')[0]}.*")


def help_text(overrides: list[str], resolve: bool = False, everything: bool = False) -> str:
    """The whole help screen for `dlrun <overrides> --help` (template: configs/hydra/help/);
    `everything` (--help-all): the blocks this config does not read too."""
    return render(*composed(overrides), resolve=resolve, everything=everything)


def trainer_modes(config: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The modes of the config's trainer; None for a trainer of one's own (not in the table)."""
    trainer = config.get("trainer")
    return TRAINER_MODES.get(trainer.get("_target_")) if isinstance(trainer, Mapping) else None


def read_keys(config: Mapping[str, Any], chosen: Sequence[str]) -> set[str] | None:
    """The dotted keys an (unresolved) config's run reads, as far as the top-level blocks go: a
    chosen group's node (model, trainer, ...) and a top-level value are read whole; of the other
    blocks, what those interpolate, the trainer's modes' options and `ALWAYS_READ`. None when the
    trainer is not dlrun's (its modes unknown): then every key counts as read."""
    modes = trainer_modes(config)
    if modes is None:
        return None
    read = {str(k) for k, v in config.items() if k in chosen or not isinstance(v, Mapping)}
    read |= {m for m in modes if m not in ("train", "eval") and m in config}
    read |= set(ALWAYS_READ)
    todo = [config[k] for k in read if k in config]
    while todo:  # what the read values interpolate, and what those interpolate in turn
        value = todo.pop()
        if isinstance(value, Mapping):
            todo.extend(value.values())
        elif isinstance(value, list):
            todo.extend(value)
        elif isinstance(value, str):
            for ref in REFERENCE.findall(value):
                if ref not in read:
                    read.add(ref)
                    todo.append(lookup(config, ref))
    return read


def lookup(config: Mapping[str, Any], dotted: str) -> Any:
    """The (unresolved) value at a dotted key; None where there is none."""
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def pruned(node: Mapping[str, Any], read: set[str], prefix: str = "") -> dict[str, Any]:
    """`node` with the keys nothing reads left out: a key stays when it, a key above it or a key
    below it is read."""
    kept: dict[str, Any] = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if path in read or any(path.startswith(f"{r}.") for r in read):
            kept[key] = value
        elif isinstance(value, Mapping) and any(r.startswith(f"{path}.") for r in read):
            kept[key] = pruned(value, read, f"{path}.")
    return kept


def render(
    cfg: DictConfig,
    groups: Mapping[str, list[str]],
    resolve: bool = False,
    everything: bool = False,
) -> str:
    """The help screen of a composed config (with its `hydra` node, which is left out): the keys
    its run reads, or with `everything` every key."""
    choices: dict[str, Any] = OmegaConf.to_container(cfg.hydra.runtime.choices)  # type: ignore[assignment]
    template = cfg.hydra.help.template
    chosen = " ".join(f"{g}={choices[g]}" for g in groups if choices.get(g) is not None)
    app = cfg.copy()
    with open_dict(app):  # what Hydra's help shows too: the app's config, not Hydra's own
        del app["hydra"]
    config: dict[str, Any] = OmegaConf.to_container(app, resolve=resolve)  # type: ignore[assignment]
    raw: dict[str, Any] = OmegaConf.to_container(app, resolve=False)  # type: ignore[assignment]
    read = None if everything else read_keys(raw, list(choices))
    head = [f"# options chosen: {chosen}"]
    if read is not None:
        shown = pruned(config, read)
        left = [k for k in config if k not in shown] + [
            f"{k}.{kk}"
            for k, v in shown.items()
            if isinstance(v, Mapping)
            for kk in config[k]
            if kk not in v
        ]
        if left:
            head.append(
                f"# not read by trainer={choices.get('trainer')}, left out: {', '.join(left)}"
                " (dlrun ... --help-all shows them)"
            )
        config = shown
    known = chosen_descriptions(choices)
    if "mode" in known:  # keys.md's `{modes}`: this trainer's (--help-all too: the config's)
        modes = trainer_modes(raw)
        known["mode"] = known["mode"].replace(
            "{modes}", " | ".join(m for m in modes if m != "train") if modes else ANY_MODE
        )
    lines = [*head, *annotated(config, known)]
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
