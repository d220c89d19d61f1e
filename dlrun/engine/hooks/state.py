"""Where hooks keep their state in a checkpoint, today's layout and the one before hooks.

Today: `"hooks": {state_key: state}` for every hook, and, for readers outside the loop
(eval.weights=ema, dlrun.load), trainer.ema's averaged weights also at the top level under
`"ema"` (the same tensors: torch.save writes them once). A checkpoint written before hooks has no
`"hooks"`: its `"ema"`, `"ema_updates"`, `"top_k"` and the monitor's `"best"` / `"bad_evals"`
are read instead.
"""

from collections.abc import Mapping, Sequence
from typing import Any

from dlrun.engine.hooks.base import Hook
from dlrun.engine.hooks.ema import EMA


def saved(hooks: Sequence[Hook]) -> dict[str, Any]:
    """The checkpoint's entries for `hooks`: "hooks" and the top-level "ema" (None without one)."""
    states = {hook.state_key: hook.state_dict() for hook in hooks}
    ema = next((states[h.state_key]["weights"] for h in hooks if isinstance(h, EMA)), None)
    return {"hooks": states, "ema": ema}


def restore(hooks: Sequence[Hook], state: Mapping[str, Any]) -> None:
    """Each hook's state from a checkpoint (either layout); {} for a hook it has none for."""
    states = state["hooks"] if "hooks" in state else before_hooks(state)
    for hook in hooks:
        hook.load_state_dict(states.get(hook.state_key) or {})


def before_hooks(state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The hook states of a checkpoint written before hooks, under today's keys."""
    monitor = state.get("monitor") or {}
    out: dict[str, dict[str, Any]] = {
        "early_stopping": {"best": monitor.get("best"), "bad_evals": monitor.get("bad_evals", 0)}
    }
    if state.get("ema"):
        out["ema"] = {"weights": state["ema"], "updates": state.get("ema_updates") or 0}
    if state.get("top_k"):
        out["top_k"] = {**state["top_k"], "step": state["step"]}
    return out
