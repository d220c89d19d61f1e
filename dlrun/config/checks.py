"""Checks of the composed config that run before anything is built or written.

`check_config` checks the type and range of every public key from one table (`RULES`) and reports
all the bad values in one message; `check_added_keys` refuses a `+key=value` that adds a key no
part of dlrun reads; `check_image_size` tries one forward pass so that an image size a network
cannot take is a one-paragraph user error, not a traceback from deep inside the model.
"""

import inspect
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from dlrun.config.compose import CONFIG_DIR, CONFIG_NAME
from dlrun.config.explain import closest_key, nested_key
from dlrun.errors import UserError

_ABSENT = object()  # OmegaConf.select's default: the key is not in the config


@dataclass(frozen=True)
class Rule:
    """What one config key must hold.

    kind: "int" (a whole number, not a bool), "number" (int or finite float, not a bool), "bool",
    or "choice" (one of `choices`). `low`/`high` bound ints and numbers; `*_open` makes the bound
    strict. `nullable`: null is allowed. `required`: an absent key is an error (else it is skipped:
    a trainer or data set without that setting). `example` is shown in the fix.
    """

    key: str
    kind: str
    example: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False
    choices: tuple[str, ...] = ()
    required: bool = False
    allow_inf: bool = False  # +inf is a value too (trainer.grad_clip=inf: measure, never clip)
    words: tuple[str, ...] = ()  # words accepted besides the kind (resume=latest)

    def describe(self) -> str:
        """The requirement as words: 'an integer >= 1 or null'."""
        if self.kind == "bool":
            text = "true or false"
        elif self.kind == "choice":
            text = "one of " + "|".join(self.choices)
        else:
            text = "an integer" if self.kind == "int" else "a number"
            if self.low is not None and self.high is not None:
                left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
                text += f" in {left}{_num(self.low)}, {_num(self.high)}{right}"
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {_num(self.low)}"
            elif self.high is not None:
                text += f" {'<' if self.high_open else '<='} {_num(self.high)}"
        text += " or inf" if self.allow_inf else ""
        text += "".join(f" or {w}" for w in self.words)
        return f"{text} or null" if self.nullable else text

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, str) and value in self.words:
            return True
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False  # True is an int to Python, not to a config
        if self.kind == "int" and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return self.allow_inf and value == math.inf
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _int(key: str, low: int, example: str, **kw: Any) -> Rule:
    return Rule(key, "int", example, low=low, **kw)


# Every public key dlrun checks before it builds anything. Keys a config may lack (a trainer without
# checkpoint_every_n_steps, an optimizer without momentum) are not `required`: absent, they pass.
RULES: tuple[Rule, ...] = (
    Rule("seed", "int", "seed=0", required=True),
    _int("trainer.max_epochs", 1, "trainer.max_epochs=10", required=True),
    _int("trainer.max_steps", 1, "trainer.max_steps=1000", nullable=True),
    _int("trainer.log_every_n_steps", 1, "trainer.log_every_n_steps=50"),
    _int("trainer.num_threads", 1, "trainer.num_threads=4", nullable=True),
    Rule("trainer.log_every_s", "number", "trainer.log_every_s=30", low=0, nullable=True),
    Rule("trainer.compile", "bool", "trainer.compile=false"),
    Rule("trainer.channels_last", "bool", "trainer.channels_last=false"),
    _int(
        "trainer.checkpoint_every_n_steps", 1, "trainer.checkpoint_every_n_steps=500", nullable=True
    ),
    Rule("trainer.on_nonfinite", "choice", "trainer.on_nonfinite=stop", choices=("stop", "skip")),
    _int("data.batch_size", 1, "data.batch_size=128", required=True),
    _int("data.eval_batch_size", 1, "data.eval_batch_size=1000"),
    _int("data.train_subset", 1, "data.train_subset=5000", nullable=True),
    _int("data.eval_subset", 1, "data.eval_subset=1000", nullable=True),
    _int("data.image_size", 1, "data.image_size=32"),
    _int("data.channels", 1, "data.channels=3"),
    _int("data.num_workers", 0, "data.num_workers=0"),
    Rule("data.val_split", "number", "data.val_split=0.1", low=0),
    # lr=0 stays allowed (torch allows it): a step that must not move the weights, as in the
    # transfer tests; a negative, NaN or infinite lr is refused.
    Rule("optim.lr", "number", "optim.lr=0.01", low=0, required=True),
    Rule("optim.weight_decay", "number", "optim.weight_decay=0.0005", low=0),
    Rule("optim.momentum", "number", "optim.momentum=0.9", low=0, high=1, high_open=True),
    Rule("resume", "bool", "resume=true", words=("latest",)),
    Rule("eval.weights", "choice", "eval.weights=ema", choices=("model", "ema")),
    Rule("trainer.deterministic", "bool", "trainer.deterministic=true"),
    _int("trainer.save_top_k", 1, "trainer.save_top_k=3", nullable=True),
    _int("trainer.profile", 1, "trainer.profile=10", nullable=True),
    Rule(
        "trainer.ema.decay",
        "number",
        "trainer.ema.decay=0.999",
        low=0,
        high=1,
        low_open=True,
        high_open=True,
        nullable=True,
    ),
    Rule("trainer.ema.warmup", "bool", "trainer.ema.warmup=true"),
    _int("sample.n", 1, "sample.n=64"),
    _int("metrics.n", 2, "metrics.n=2000"),
    Rule("distill.temperature", "number", "distill.temperature=4", low=0, low_open=True),
    Rule("distill.alpha", "number", "distill.alpha=0.9", low=0, high=1),
    _int("trainer.val_every_n_epochs", 1, "trainer.val_every_n_epochs=1"),
    _int("trainer.val_every_n_steps", 1, "trainer.val_every_n_steps=500", nullable=True),
    _int("trainer.accumulate_grad_batches", 1, "trainer.accumulate_grad_batches=4"),
    _int("trainer.early_stopping.patience", 1, "trainer.early_stopping.patience=5", nullable=True),
    Rule(
        "trainer.grad_clip",
        "number",
        "trainer.grad_clip=1.0",
        low=0,
        low_open=True,
        nullable=True,
        allow_inf=True,
    ),
    Rule(
        "trainer.monitor_mode", "choice", "trainer.monitor_mode=max", choices=("max", "min", "auto")
    ),
)


def check_config(cfg: DictConfig) -> None:
    """Raise one UserError naming every key of `RULES` whose value has the wrong type or range.

    Values that are `???` (missing; reported elsewhere, with the data set's own hint) or whose
    interpolation cannot be resolved here are skipped, not reported. Under `dlrun` (Hydra's
    config set) the command line's `+key=value` additions are checked first (`check_added_keys`).
    """
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        check_added_keys(cfg, list(hc.overrides.task), list(hc.runtime.choices))
    problems, examples = [], []
    for rule in RULES:
        try:
            value = OmegaConf.select(cfg, rule.key, default=_ABSENT, throw_on_missing=True)
        except OmegaConfBaseException:  # ??? or an interpolation that does not resolve
            continue
        if value is _ABSENT:
            if rule.required:
                problems.append(
                    f"{rule.key} must be set to {rule.describe()}, but it is not in the config"
                )
                examples.append(rule.example)
            continue
        if isinstance(value, DictConfig | ListConfig):
            try:
                value = OmegaConf.to_container(value, resolve=True)
            except OmegaConfBaseException:
                continue
        if not rule.accepts(value):
            problems.append(f"{rule.key} must be {rule.describe()}, got {_show(value)}")
            examples.append(rule.example)
    if not problems:
        return
    head = (
        "This config has a bad value"
        if len(problems) == 1
        else f"This config has {len(problems)} bad values"
    )
    raise UserError(
        f"{head}: {'; '.join(problems)}. Set {'it' if len(problems) == 1 else 'them'} on the "
        f"command line, e.g. dlrun {' '.join(examples)} (`dlrun --help` lists every key)."
    )


def _show(value: Any) -> str:
    """A value as the user wrote it on the command line, with its Python type: 'abc' (str)."""
    shown = ("true" if value else "false") if isinstance(value, bool) else repr(value)
    return f"{shown} ({type(value).__name__})"


def check_image_size(model: nn.Module, input_shape: tuple[int, ...], what: str) -> None:
    """One forward pass of 2 zero images of `input_shape` (C, H, W); a failure is a UserError.

    Runs in eval mode under no_grad on the model's device (the CPU, where the CLI calls it), and
    leaves the model's training mode and the global RNG as they were. Models without parameters
    (k-NN, whose forward needs its memorised training set) have no layer sizes to check: skipped.
    """
    first = next(model.parameters(), None)
    if first is None:
        return
    modes = {m: m.training for m in model.modules()}  # a frozen part may sit in eval mode
    x = torch.zeros((2, *input_shape), device=first.device)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            model(x)
    except (RuntimeError, ValueError) as err:
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        size = "x".join(str(s) for s in input_shape[1:])
        name = type(model).__name__
        who = f"model {name}" if what == name else f"model={what} ({name})"
        raise UserError(
            f"{who} cannot take images of {size} px with "
            f"{input_shape[0]} channel(s) (data.image_size={input_shape[-1]}, "
            f"data.channels={input_shape[0]}): a forward pass fails with '{line}'. Use a larger "
            "data.image_size (e.g. data.image_size=32) or another model=; if you set model.* sizes "
            "(model.image_size, model.in_channels) yourself, let them follow data.*."
        ) from err
    finally:
        for module, training in modes.items():
            module.training = training


# Keys whose readers are not in the config files: Hydra's own, and the user's hooks (docs/hooks.md).
OPEN_NODES = ("hydra", "callbacks")


def check_added_keys(cfg: DictConfig, overrides: Sequence[str], groups: Collection[str]) -> None:
    """Refuse, in one line, a `+key=value` or `++key=value` that adds a key no part of dlrun reads.

    Read are: a config group (`+experiment=NAME`, `+callbacks=NAME`: `groups` holds the chosen
    ones), `hydra.*` and `callbacks.*`, a key the config files declare (`++seed=1`), and an
    argument of a `_target_` node that its target takes (`+model.dropout=0.1` where the model has
    that argument; a target taking `**kwargs` it does not pass on by name is given the benefit of
    the doubt). A key of a plain node (`+lr=0.1`, `+eval.foo=1`) that the files do not declare,
    or one a target does not take (`+trainer.foo=1`), is read by nothing: refused, with the key
    it resembles. An added key that is not in `cfg` (a config of another run) is not checked.
    """
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:  # Hydra composed this config from them: not expected
        return
    problems: list[str] = []
    for override in parsed:
        key = override.key_or_group
        if not (override.is_add() or override.is_force_add()) or override.package is not None:
            continue
        if "/" in key or key in groups or key.split(".")[0] in OPEN_NODES:
            continue  # a config group, or keys whose readers dlrun does not know
        if (
            OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False)
            is _ABSENT
        ):
            continue
        why = _unread(cfg, key, override.is_force_add())
        if why is not None:
            problems.append(_refusal(cfg, key, override.input_line, why))
    if problems:
        raise UserError(
            "; ".join(problems).rstrip("?") + ("?" if problems[-1].endswith("?") else ".")
        )


def _unread(cfg: DictConfig, key: str, forced: bool) -> str | None:
    """Why nothing reads the added `key` (a clause, maybe empty); None when something does."""
    parts = key.split(".")
    node: Any = cfg
    for depth, part in enumerate(parts[:-1]):
        node = node.get(part) if isinstance(node, DictConfig) else None
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        if isinstance(target, str):  # an instantiated node: its target's arguments are read
            if depth + 2 < len(parts):
                return None  # deeper than an argument: what reads an argument's dict is unknown
            takes = _arguments(target)
            if takes is None or parts[-1] in takes:
                return None
            return f"{target.rsplit('.', 1)[-1]} takes no argument {parts[-1]}"
    if forced and _declared(key):
        return None  # ++key=value on a key the config files have: an ordinary override
    return ""


def _arguments(target: str) -> set[str] | None:
    """The keyword arguments `target` (a class or function, by import path) takes; None when it
    cannot be told (not importable, or `**kwargs` that reach no named parameter)."""
    try:
        obj = get_object(target)
    except Exception:  # noqa: BLE001 - building the node reports it, with the config group's name
        return None
    chain = (
        [c.__init__ for c in obj.__mro__ if "__init__" in vars(c)]
        if inspect.isclass(obj)
        else [obj]
    )
    names: set[str] = set()
    for fn in chain:  # a class's **kwargs go to its base's __init__ (as the trainers' do)
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None


def _declared(key: str) -> bool:
    """Whether dlrun's root config file (configs/train.yaml) itself has `key`."""
    root = OmegaConf.load(Path(CONFIG_DIR) / f"{CONFIG_NAME}.yaml")
    return (
        OmegaConf.select(root, key, default=_ABSENT, throw_on_resolution_failure=False)
        is not _ABSENT
    )


def _refusal(cfg: DictConfig, key: str, given: str, why: str) -> str:
    """'no part of dlrun reads lr (+lr=0.1); did you mean optim.lr=0.1?'"""
    rest: Any = OmegaConf.to_container(cfg, resolve=False)
    parent = rest
    for part in key.split(".")[:-1]:
        parent = parent[part]
    parent.pop(key.split(".")[-1], None)  # the added key itself is not what was meant
    meant = closest_key(key, rest) or nested_key(key, rest)
    value = given.split("=", 1)[1] if "=" in given else ""
    line = f"no part of dlrun reads {key} ({given.strip()}{': ' + why if why else ''})"
    return f"{line}; did you mean {meant}={value}?" if meant else line
