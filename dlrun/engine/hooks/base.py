"""The hook protocol: the side effects the loop calls at fixed points (DESIGN section 4).

A hook overrides only the methods it needs; the others are no-ops. With no hooks the loop does
no per-step work for them (one truthiness test), so an unused feature costs nothing.
"""

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlrun.errors import UserError

if TYPE_CHECKING:
    from dlrun.engine.loop import Trainer

Metrics = Mapping[str, float]


class Hook:
    """A side effect of training (weight averaging, profiling, extra checkpoints, early stopping,
    images, loggers), called by the loop with the trainer.

    `state_key` names its state in a checkpoint (`checkpoint["hooks"][state_key]`): a built-in
    hook's is fixed, a `callbacks:` entry's is its config key, else the class name.
    """

    state_key: str = ""

    def setup(self, trainer: "Trainer") -> None:
        """Once, at the end of `Trainer.setup`: the model is on its device, the optimizers and
        `trainer.monitor` are settled; before a resumed run's state is loaded. Check settings here
        (raise `dlrun.errors.UserError`: nothing has been written yet)."""

    def on_fit_start(self, trainer: "Trainer") -> None:
        """When `fit` starts, after a resumed run's state is loaded."""

    def on_fit_end(self, trainer: "Trainer") -> None:
        """When `fit` ends, also by an error or a stop signal (its checkpoint is written)."""

    def before_step(self, trainer: "Trainer") -> None:
        """Before the first batch of each optimizer step (`trainer.step_count` steps are done)."""

    def after_step(self, trainer: "Trainer") -> None:
        """After each optimizer step (at an accumulation boundary), before the step's logging and
        checkpoint; `trainer.step_count` counts it."""

    def before_evaluation(self, trainer: "Trainer", prefix: str) -> Metrics | None:
        """Before the task evaluates `prefix` ("val": `trainer.data.val_loader()`, at each of
        trainer.val_every_n_*). Metrics it returns join the evaluation's. A stop signal may cut
        the evaluation short, and the resumed run then runs it again: change no state here."""
        return None

    def after_evaluation(self, trainer: "Trainer", prefix: str, metrics: Metrics) -> Metrics | None:
        """After the task evaluated `prefix`, with its metrics (and earlier hooks'). Metrics it
        returns join them before they are logged and `trainer.monitor` sees them."""
        return None

    def before_save(self, trainer: "Trainer") -> None:
        """Before last.pt is written (on every process: each takes part in a checkpoint)."""

    def after_save(self, trainer: "Trainer", last_path: Path) -> None:
        """After last.pt is written, before best.pt is copied from it (main process only)."""

    def state_dict(self) -> dict[str, Any]:
        """What an exact resume needs, saved in every checkpoint: tensors, numbers, strings,
        lists and dicts (checkpoints are read with `weights_only=True`)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """On resume=true, after `setup`: what `state_dict` returned ({} when the checkpoint has
        none for this hook, e.g. one added on resume)."""


class Hooks(list[Hook]):
    """The trainer's hooks, in the order the loop calls them, each with its own checkpoint key.

    Each method calls that method of every hook with `owner`, the trainer they serve (what a
    hook is given: the loop's public state); the evaluation methods merge the hooks' metrics.
    """

    def __init__(self, hooks: Sequence[Hook], owner: "Trainer") -> None:
        super().__init__(checked(hooks))
        self.owner = owner

    def setup(self) -> None:
        for hook in self:
            hook.setup(self.owner)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """`on_fit_start` on entry; `on_fit_end` on exit, however `fit` ends, for each started."""
        started: list[Hook] = []
        try:
            for hook in self:
                hook.on_fit_start(self.owner)
                started.append(hook)
            yield
        finally:
            for hook in reversed(started):
                hook.on_fit_end(self.owner)

    def before_step(self) -> None:
        for hook in self:
            hook.before_step(self.owner)

    def after_step(self) -> None:
        for hook in self:
            hook.after_step(self.owner)

    def before_evaluation(self, prefix: str) -> dict[str, float]:
        extra: dict[str, float] = {}
        for hook in self:
            extra |= hook.before_evaluation(self.owner, prefix) or {}
        return extra

    def after_evaluation(self, prefix: str, metrics: Metrics) -> dict[str, float]:
        """`metrics` and what each hook adds (a hook sees the earlier hooks' too)."""
        merged = dict(metrics)
        for hook in self:
            merged |= hook.after_evaluation(self.owner, prefix, merged) or {}
        return merged

    def before_save(self) -> None:
        for hook in self:
            hook.before_save(self.owner)

    def after_save(self, last_path: Path) -> None:
        for hook in self:
            hook.after_save(self.owner, last_path)


def checked(hooks: Sequence[Hook]) -> list[Hook]:
    """The trainer's hooks, each a Hook with its own checkpoint key."""
    seen: set[str] = set()
    for hook in hooks:
        if not isinstance(hook, Hook):
            raise UserError(
                f"{type(hook).__module__}.{type(hook).__name__} is not a dlrun hook: subclass "
                "dlrun.engine.hooks.Hook (docs/hooks.md)."
            )
        hook.state_key = hook.state_key or type(hook).__name__
        if hook.state_key in seen:
            raise UserError(
                f"Two hooks save their state under '{hook.state_key}': give one callbacks: entry "
                "another name."
            )
        seen.add(hook.state_key)
    return list(hooks)
