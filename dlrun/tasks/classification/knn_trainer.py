"""k-NN: no training steps; 'fitting' memorises the normalised training images on the device."""

from typing import Any

from dlrun.engine.checkpoint import unwrap
from dlrun.tasks.classification.trainer import ClassificationTrainer


class KNNTrainer(ClassificationTrainer):
    """Memorise, evaluate, write the run folder: the same contract as a trained classifier."""

    def prepare(self, resume: bool) -> None:
        if not resume:  # resume: memorising again is the whole "training"
            self.check_fresh_folder()
        self.prepared = True

    def fit(self, resume: bool = False) -> dict[str, float]:
        self._open_writer(resume=False)  # nothing to resume: memorising is the whole "training"
        self._memorize()
        self.epoch = 1
        self._validate()
        self._save_checkpoints()
        self._score_test_split()
        if self.writer is not None:
            self.writer.close()
        return self.write_metrics()

    def _memorize(self) -> None:
        # Normalised exactly as the evaluation batches are, without augmentation.
        batch = self.data.example_batch(self.data.describe()["sizes"]["train"], "train")
        unwrap(self.model).memorize(batch["image"], batch["label"])

    def evaluate(self, loader: Any, prefix: str) -> dict[str, float]:
        if unwrap(self.model).memory.numel() == 0:
            self._memorize()
        return super().evaluate(loader, prefix)
