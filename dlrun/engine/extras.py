"""The optional parts of `Trainer`: weight averaging, profiling and top-k checkpoints.

Each is off by default and costs nothing then; the loop calls `ema.update()` and
`profiler.step()` after optimizer steps, `_validate` calls `_ema_metrics`, and the checkpoint
code calls `_top_k_consider` / `_top_k_commit` around writing last.pt.
"""

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from dlrun.engine import checkpoint, dist
from dlrun.engine.hooks import top_k
from dlrun.engine.hooks.ema import WeightEMA, check_decay, rename
from dlrun.engine.hooks.profile import StepProfiler, check_steps
from dlrun.engine.hooks.top_k import TopK
from dlrun.errors import UserError


class TrainingExtras:
    """trainer.ema, trainer.profile and trainer.save_top_k for every task."""

    def _init_extras(
        self, ema: Mapping[str, Any] | None, profile: int | None, save_top_k: int | None
    ) -> None:
        """In the constructor: check the settings; nothing is built before `setup`."""
        self.ema_spec = dict(ema or {})
        check_decay(self.ema_spec.get("decay"))
        check_steps(profile)
        self.profile_steps, self.save_top_k = profile, save_top_k
        self.ema: WeightEMA | None = None
        self.profiler: StepProfiler | None = None
        self.top_k: TopK | None = None
        # Which weights the model holds while a task evaluates: "model", or "ema" while the
        # average is swapped in (or under eval.weights=ema). A task that fits something on the
        # validation split (a threshold) keeps one per set of weights.
        self.scored_weights = "model"

    def _setup_extras(self, trainable: Mapping[str, list[nn.Parameter]]) -> None:
        """Built once the model is placed on its device (the average lives beside it)."""
        if self.ema_spec.get("decay") is not None:
            if not trainable.get("model"):
                raise UserError(
                    f"trainer.ema averages the weights of a task's one trained network, which "
                    f"{type(self).__name__} does not have (it trains {', '.join(trainable)}); "
                    "drop trainer.ema.decay."
                )
            warmup = self.ema_spec.get("warmup", True)
            self.ema = WeightEMA(checkpoint.unwrap(self.model), self.ema_spec["decay"], warmup)
        if self.profile_steps and dist.is_main():
            self.profiler = StepProfiler(self.profile_steps, self.run_dir / "profile", self.device)
        top_k.check(self.save_top_k, self.monitor.name)
        if self.save_top_k:
            folder = Path(self.last_path).parent / "top"
            self.top_k = TopK(self.save_top_k, folder, self.monitor.name, self.monitor.mode)

    @property
    def extras_on(self) -> bool:
        """Whether anything runs after each optimizer step (one attribute test when not)."""
        return self.ema is not None or self.profiler is not None

    def _after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.update()
        if self.profiler is not None:
            self.profiler.step()

    @contextlib.contextmanager
    def _profiling(self) -> Iterator[None]:
        """trainer.profile: the profiler runs from the first step until N are recorded."""
        if self.profiler is None:
            yield
            return
        self.profiler.start()
        try:
            yield
        finally:
            self.profiler.stop()

    def _ema_metrics(self, loader: Any, prefix: str) -> dict[str, float]:
        """The averaged weights scored by the task's own evaluate: `<prefix>/<metric>_ema`.

        Run before the raw weights' evaluation, so that whatever a task keeps of its last
        evaluation (images, per-class reports) is the raw weights'.
        """
        if self.ema is None:
            return {}
        with self.ema.swapped():
            self.scored_weights = "ema"
            try:
                return rename(self.evaluate(loader, prefix), prefix)
            finally:
                self.scored_weights = "model"

    def _top_k_consider(self) -> None:
        """Before last.pt is written: an evaluation at this step may enter the top k."""
        if self.top_k is not None and self.last_eval_step == self.step_count:
            self.top_k.consider(self.metrics.get(self.monitor.name), self.step_count)

    def _top_k_commit(self) -> None:
        """After last.pt is written: copy it into the top k, remove what fell out."""
        if self.top_k is not None and dist.is_main():
            self.top_k.commit(self.last_path)

    def extras_state(self) -> dict[str, Any]:
        # "ema": the averaged weights under the model's own keys (eval.weights=ema, dlrun.load).
        return {
            "ema": self.ema.state_dict()["weights"] if self.ema is not None else None,
            "ema_updates": self.ema.updates if self.ema is not None else None,
            "top_k": self.top_k.state_dict() if self.top_k is not None else None,
        }

    def load_extras_state(self, state: Mapping[str, Any]) -> None:
        if self.ema is not None:
            if not state.get("ema"):
                raise UserError(
                    "resume=true with trainer.ema.decay set, but the checkpoint holds no weight "
                    "average (the run trained without one); resume without trainer.ema.decay."
                )
            self.ema.load_state_dict(
                {"weights": state["ema"], "updates": state.get("ema_updates") or 0}
            )
        if self.top_k is not None and state.get("top_k"):
            self.top_k.load_state_dict(state["top_k"], self.last_path, state["step"])
