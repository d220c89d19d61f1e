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
    from dlrun.engine.trainer import Trainer

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


@contextlib.contextmanager
def running(hooks: Sequence[Hook], trainer: "Trainer") -> Iterator[None]:
    """`on_fit_start` on entry; `on_fit_end` on exit, however `fit` ends, for each hook started."""
    started: list[Hook] = []
    try:
        for hook in hooks:
            hook.on_fit_start(trainer)
            started.append(hook)
        yield
    finally:
        for hook in reversed(started):
            hook.on_fit_end(trainer)
