"""k-NN: no training steps; 'fitting' memorises the normalised training images on the device."""

from typing import Any

from dlrun.checkpoint import unwrap
from dlrun.trainers.classification import ClassificationTrainer


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
        self._log(self.evaluate(self.data.val_loader(), "val"))
        self._save_checkpoints()
        self.writer.close()
        return self.write_metrics()

    def _memorize(self) -> None:
        loader = self.data.train_loader()
        # Normalised exactly as the evaluation batches are, without augmentation.
        unwrap(self.model).memorize(loader.normalize(self.data.train_x), self.data.train_y)

    def evaluate(self, loader: Any, prefix: str) -> dict[str, float]:
        if unwrap(self.model).memory.numel() == 0:
            self._memorize()
        return super().evaluate(loader, prefix)
