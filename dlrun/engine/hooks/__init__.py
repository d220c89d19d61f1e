"""Side effects the loop calls around steps, evaluations and checkpoints (`Hook`): the built-in
ones (builtin.py: weight averaging, profiling, top-k checkpoints, early stopping, sample grids)
and a user's own, from the `callbacks` config group (docs/hooks.md)."""

from dlrun.engine.hooks.base import Hook

__all__ = ["Hook"]
