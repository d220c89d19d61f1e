"""Image classification: cross-entropy / hinge training, accuracy, best.pt by val/acc."""

from typing import Any

import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from dlrun import introspect
from dlrun.errors import UserError
from dlrun.losses import Objective
from dlrun.trainers.base import Trainer


class ClassificationTrainer(Trainer):
    """Trains `model(x) -> logits` against integer labels."""

    def __init__(self, *, loss: Objective, **kwargs: Any) -> None:
        if not isinstance(loss, Objective):
            raise UserError(
                f"loss={getattr(loss, 'name', type(loss).__name__)} is not a classification loss; "
                "a classifier trains with loss=cross_entropy or loss=hinge."
            )
        super().__init__(**kwargs)
        self.loss = loss
        self.aux_weight = float(getattr(self.model, "aux_weight", 0.0))

    def step(self, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        x, y = batch
        with self.autocast():
            out = self.forward_model(
                self.layout(x)
            )  # (B, K), or GoogLeNet's (logits, aux1, aux2) in training
            logits, *aux = out if isinstance(out, tuple) else (out,)
            loss = self.loss(logits, y)
        total = loss + self.loss.penalty(self.model) if self.loss.l1 or self.loss.l2 else loss
        if aux:  # the auxiliary classifiers' losses, weighted as the model says (0.3 in the paper)
            total = total + self.aux_weight * sum(self.loss(a, y) for a in aux)
        self.optimize(total)
        # Sums, not means: the loop divides by the number of images once per epoch.
        return {"loss": loss.detach() * len(y), "acc": (logits.argmax(1) == y).sum()}

    @torch.no_grad()
    def evaluate(self, loader: Any, prefix: str) -> dict[str, float]:
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        n = 0
        for x, y in loader:
            with self.autocast():
                logits = self.predict(self.layout(x))
            loss_sum += self.loss(logits.float(), y) * len(y)
            correct += (logits.argmax(1) == y).sum()
            n += len(y)
        return {f"{prefix}/loss": loss_sum.item() / n, f"{prefix}/acc": correct.item() / n}

    def predict(self, x: Tensor) -> Tensor:
        """Evaluation logits; with eval.tta=flip, the mean over the image and its mirror."""
        logits = self.forward_model(x)
        if self.tta == "flip":
            logits = (logits + self.forward_model(x.flip(3))) / 2
        return logits

    def log_start(self, writer: SummaryWriter) -> None:
        # The stored uint8 images, not a loader batch: drawing one would advance the data RNG.
        images = self.data.train_x[:32].float() / 255
        writer.add_image("train/images", make_grid(images, nrow=8), 0)
        self.log_inside(writer)

    def log_end(self, writer: SummaryWriter) -> None:
        self.log_inside(writer)

    def log_inside(self, writer: SummaryWriter) -> None:
        """The notes' "what the network sees": first-layer filters, feature maps of one image."""
        filters = introspect.first_conv_filters(self.model)
        if filters is not None:
            writer.add_image("inside/filters", filters, self.step_count)
        image = self.data.train_loader().normalize(self.data.val_x[:1])[0]
        for name, fmap in introspect.stage_outputs(self.model, image):
            writer.add_image(
                f"inside/features_{name}", introspect.feature_grid(fmap), self.step_count
            )
