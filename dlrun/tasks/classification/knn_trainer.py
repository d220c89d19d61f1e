"""k-NN: nothing to optimise; its one epoch memorises the normalised training images on the device."""

from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor

from dlrun.engine.checkpoint import unwrap
from dlrun.engine.loop import Sums
from dlrun.tasks.classification.trainer import ClassificationTrainer


class TrainingSet:
    """k-NN's training loader: one batch, the whole training set normalised exactly as the
    evaluation batches are, without augmentation (what the model memorises)."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return 1

    def iterate(self, position: Any = None) -> Iterator[dict[str, Tensor]]:
        yield self.data.example_batch(self.data.describe()["sizes"]["train"], "train")

    def position(self) -> None:  # never asked: an epoch of one batch has no middle
        return None


class KNNTrainer(ClassificationTrainer):
    """Memorise (the loop's one epoch, no optimizer step), evaluate, write the run folder: the
    same contract, checkpoint and metrics.json as a trained classifier."""

    trains_weights = False

    def train_loader(self) -> TrainingSet:
        return TrainingSet(self.data)

    def step(self, batch: Mapping[str, Tensor]) -> Sums:
        unwrap(self.model).memorize(batch["image"], batch["label"])
        return {}

    def evaluate(self, loader: Any, prefix: str) -> dict[str, float]:
        if unwrap(self.model).memory.numel() == 0:  # mode=eval, or a resumed finished run
            self.step(next(TrainingSet(self.data).iterate()))
        return super().evaluate(loader, prefix)
