"""The built-in hooks and the trainer.* keys that turn them on, each key an argument of its
hook's constructor. A key at its off value (null) builds no hook: an unused feature costs nothing.

    trainer.ema.decay, trainer.ema.warmup   -> EMA(decay=, warmup=)
    trainer.profile                         -> Profile(steps=)
    trainer.save_top_k                      -> TopK(k=)
    trainer.early_stopping.patience         -> EarlyStopping(patience=)

(The GAN's trainer.sample_every_n_steps is its trainer's own argument: it adds SampleGrids.)
"""

import inspect
from collections.abc import Mapping
from typing import Any

from dlrun.engine.hooks.base import Hook
from dlrun.engine.hooks.early_stopping import EarlyStopping
from dlrun.engine.hooks.ema import EMA
from dlrun.engine.hooks.profile import Profile
from dlrun.engine.hooks.samples import SampleGrids
from dlrun.engine.hooks.top_k import TopK
from dlrun.errors import UserError

# trainer.<key> -> (its hook, the argument that turns it on when the key holds a group of them;
# None: the key's value is the one argument). In the order the loop calls them: the average
# moves before the profiler's step, as before hooks.
KEYS: dict[str, tuple[type[Hook], str | None]] = {
    "ema": (EMA, "decay"),
    "profile": (Profile, None),
    "save_top_k": (TopK, None),
    "early_stopping": (EarlyStopping, "patience"),
}
# The checkpoint keys of the built-in hooks: a `callbacks:` entry may not take one.
RESERVED = frozenset({EMA.state_key, Profile.state_key, TopK.state_key,
                      EarlyStopping.state_key, SampleGrids.state_key})  # fmt: skip


def split(trainer: Mapping[str, Any]) -> tuple[dict[str, Any], list[Hook]]:
    """A (resolved) trainer config: the trainer's own arguments, and the hooks its keys turn on."""
    node, hooks = dict(trainer), []
    for key, (hook, on) in KEYS.items():
        if key not in node:  # a task's config that does not extend the base
            continue
        value = node.pop(key)
        if on is None:
            if value is not None:
                hooks.append(hook(value))
            continue
        args = dict(value or {})
        takes = list(inspect.signature(hook).parameters)
        unknown = sorted(set(args) - set(takes))
        if unknown:
            raise UserError(
                f"trainer.{key}.{unknown[0]} is not a key of trainer.{key}; its keys: "
                f"{', '.join(takes)}."
            )
        if args.get(on) is not None:
            hooks.append(hook(**args))
    return node, hooks
