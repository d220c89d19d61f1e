"""trainer.ema.decay: an exponential moving average of the weights, kept on the device (`EMA`).

After every optimizer step the average moves towards the weights: ema = ema + (1 - d)(w - ema),
one `torch._foreach_lerp_` over all parameters and floating-point buffers (BatchNorm's running
mean and variance are averaged too; integer buffers such as num_batches_tracked are copied).
With `warmup` the decay starts small and grows, d_t = min(decay, (1 + t) / (10 + t)) (the
TensorFlow / timm `num_updates` rule), so the average does not drag the random initial weights
along for thousands of steps. No host sync: the decay is a Python float of the step count.

Evaluating the average swaps it into the model in place (`swapped`), so every task's own
`evaluate` (compiled, DDP-wrapped or not) scores it unchanged, and the weights come back bit
for bit afterwards.
"""

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dlrun.engine import checkpoint
from dlrun.engine.hooks.base import Hook, Metrics
from dlrun.errors import UserError

if TYPE_CHECKING:
    from dlrun.engine.loop import Trainer


def check_decay(decay: float | None) -> None:
    if decay is not None and not (isinstance(decay, int | float) and 0.0 < decay < 1.0):
        raise UserError(
            f"trainer.ema.decay must be a number in (0, 1), e.g. trainer.ema.decay=0.999, or null "
            f"(no average), got {decay!r}."
        )


class WeightEMA:
    """The averaged copy of `model`'s parameters and buffers, in the model's state-dict order."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        check_decay(decay)
        self.decay, self.warmup = float(decay), bool(warmup)
        self.updates = 0  # optimizer steps averaged so far (the warmup's t)
        # The model's own tensors, fetched once: loading a checkpoint copies into them in place,
        # so they stay the model's (and the per-step update walks no modules).
        self.live = _live(model)
        self.shadow = {k: v.detach().clone() for k, v in self.live.items()}
        floats = [k for k, v in self.live.items() if v.is_floating_point()]
        self._src = [self.live[k].detach() for k in floats]
        self._dst = [self.shadow[k] for k in floats]
        self._other = [(self.shadow[k], self.live[k]) for k in self.live if k not in floats]

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        t = self.updates
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: move the average towards the model's current weights."""
        if self._dst:
            torch._foreach_lerp_(self._dst, self._src, 1.0 - self.current_decay())
        for shadow, live in self._other:
            shadow.copy_(live)
        self.updates += 1

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The average in the model's tensors for the duration; the weights restored afterwards."""
        live = self.live
        with torch.no_grad():
            saved = {k: v.detach().clone() for k, v in live.items()}
            for k, v in live.items():
                v.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in live.items():
                    v.copy_(saved[k])

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights under the model's keys (loadable into the model) and the count."""
        return {"weights": {k: v.detach().clone() for k, v in self.shadow.items()},
                "updates": self.updates, "decay": self.decay}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for k, v in state["weights"].items():
                if k in self.shadow:
                    self.shadow[k].copy_(v)
        self.updates = int(state.get("updates", 0))


def _live(model: nn.Module) -> dict[str, Tensor]:
    """The model's own parameter and buffer tensors (not copies), by state-dict key."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if v is not None}


def rename(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    """The averaged weights' top-level scalars: `val/acc` -> `val/acc_ema` (per-class and other
    nested tags are left to the raw weights' evaluation)."""
    out = {}
    for key, value in metrics.items():
        head, _, name = key.partition("/")
        if head == prefix and name and "/" not in name:
            out[f"{prefix}/{name}_ema"] = value
    return out


class EMA(Hook):
    """trainer.ema.decay / trainer.ema.warmup: the average, updated after every optimizer step and
    scored before each validation (`<prefix>/<metric>_ema`), so that what a task keeps of its last
    evaluation (images, per-class reports) is the raw weights'."""

    state_key = "ema"

    def __init__(self, decay: float, warmup: bool = True) -> None:
        check_decay(decay)
        self.decay, self.warmup = decay, warmup
        self.average: WeightEMA | None = None  # built in setup, beside the placed model

    def setup(self, trainer: "Trainer") -> None:
        if not trainer.opt.params.get("model"):
            trained = [r for r in trainer.roles() if r not in trainer.frozen_roles]
            raise UserError(
                f"trainer.ema averages the weights of a task's one trained network, which "
                f"{type(trainer).__name__} does not have (it trains {', '.join(trained)}); "
                "drop trainer.ema.decay."
            )
        self.average = WeightEMA(checkpoint.unwrap(trainer.model), self.decay, self.warmup)

    def after_step(self, trainer: "Trainer") -> None:
        self.average.update()

    def before_evaluation(self, trainer: "Trainer", prefix: str) -> Metrics | None:
        with self.average.swapped():
            trainer.scored_weights = "ema"  # a task's per-weights state (a threshold) follows
            try:
                return rename(trainer.evaluate(trainer.data.val_loader(), prefix), prefix)
            finally:
                trainer.scored_weights = "model"

    def state_dict(self) -> dict[str, Any]:
        # The checkpoint also holds the weights at its top level ("ema"): eval.weights=ema and
        # dlrun.load read them there (the same tensors: torch.save writes them once).
        return self.average.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state.get("weights"):
            raise UserError(
                "resume=true with trainer.ema.decay set, but the checkpoint holds no weight "
                "average (the run trained without one); resume without trainer.ema.decay."
            )
        self.average.load_state_dict(state)
