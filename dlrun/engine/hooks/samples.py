"""Sample grids every N steps (the GAN's trainer.sample_every_n_steps): the task draws them."""

from typing import TYPE_CHECKING

from dlrun.engine.hooks.base import Hook

if TYPE_CHECKING:
    from dlrun.engine.loop import Trainer


class SampleGrids(Hook):
    """After every N-th optimizer step, the task's `log_samples(writer, step)` (rank 0 only: the
    one that writes TensorBoard). No state: which steps log follows from the step count."""

    state_key = "sample_grids"

    def __init__(self, every_n_steps: int) -> None:
        self.every = max(1, every_n_steps)

    def after_step(self, trainer: "Trainer") -> None:
        if trainer.step_count % self.every == 0 and trainer.writer is not None:
            trainer.log_samples(trainer.writer, trainer.step_count)
