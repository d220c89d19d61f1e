"""Image classification: cross-entropy / hinge training, accuracy and macro precision / recall /
F1, best.pt by val/acc."""

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from dlrun.config import checks
from dlrun.engine import checkpoint, introspect
from dlrun.engine.loop import Sums, Trainer
from dlrun.errors import UserError
from dlrun.tasks.classification import class_report, units
from dlrun.tasks.classification import modes as classify_modes
from dlrun.tasks.classification.class_report import EvalAccumulator
from dlrun.tasks.classification.losses import Objective

TTA = ("none", "flip")


def macro_scores(confusion: np.ndarray, prefix: str) -> dict[str, float]:
    """`<prefix>/macro_precision`, `macro_recall`, `macro_f1`: the unweighted means over the
    classes, from the evaluation's (K, K) confusion counts (rows true, columns predicted), which
    were summed on the device and reach the host once (class_report.EvalAccumulator).

    As scikit-learn's average="macro" with zero_division=0: the classes averaged over are those
    that occur as a label or a prediction (a class absent from both, e.g. under data.eval_subset,
    is left out rather than counted 0); a class never predicted has precision 0, a class
    predicted but never true recall 0; F1 is each class's 2 TP / (2 TP + FP + FN) (its precision
    and recall's harmonic mean, 0 where both are 0), then averaged: not the F1 of the two means.
    """
    counts = confusion.astype(np.float64)
    tp, true, predicted = np.diag(counts), counts.sum(1), counts.sum(0)
    seen = (true + predicted) > 0

    def ratio(num: np.ndarray, den: np.ndarray) -> float:
        per_class = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        return float(per_class[seen].mean()) if seen.any() else 0.0

    return {
        f"{prefix}/macro_precision": ratio(tp, predicted),
        f"{prefix}/macro_recall": ratio(tp, true),
        f"{prefix}/macro_f1": ratio(2 * tp, true + predicted),  # 2TP + FP + FN = true + predicted
    }


class ClassificationTrainer(Trainer):
    """Trains `model(image) -> logits` against integer labels."""

    modes = ("train", "eval", "predict", "export", "units")
    data_free_modes = {"predict": "input", "export": None}
    scores_test_at_end = True  # data.val_split > 0: test/* at the end, by the final weights
    cpu_bf16 = True  # ResNet-18 on CIFAR-10: bf16 as accurate, 0.49x the time (docs/precision.md)

    def __init__(self, *, loss: Objective, tta: str = "none", **kwargs: Any) -> None:
        if getattr(kwargs.get("model"), "embedding_dim", None) is not None:
            raise UserError(
                "model=siamese is an embedding network, not a classifier: it trains with "
                "trainer=metric (which model=siamese picks; drop trainer=classification)."
            )
        if not isinstance(loss, Objective):
            raise UserError(
                f"loss={getattr(loss, 'name', type(loss).__name__)} is not a classification loss; "
                "a classifier trains with loss=cross_entropy or loss=hinge."
            )
        if tta not in TTA:
            raise UserError(f"eval.tta must be one of {', '.join(TTA)}, got '{tta}'.")
        super().__init__(**kwargs)
        self.loss, self.tta = loss, tta
        self.aux_weight = float(getattr(self.model, "aux_weight", 0.0))

    def check_model(self) -> None:
        info = self.data.describe()
        name = self.hparams.get("model") or type(self.model).__name__
        checks.check_image_size(self.model, tuple(info["input_shape"]), str(name))
        if hasattr(self.model, "init_from_data"):  # a data-dependent init (airbench's whitening)
            self.model.init_from_data(self.data.example_batch(5000, "train")["image"].cpu())

    def logged_metrics(self) -> list[str]:
        return ["val/acc", "val/loss", "train/loss", "train/acc"]

    def step(self, batch: Mapping[str, Tensor]) -> Sums:
        x, y = batch["image"], batch["label"]
        # data.mixup / data.cutmix: soft (B, K) targets for the loss; y stays the dominant class
        target = batch.get("target", y)
        with self.autocast():
            # (B, K), or GoogLeNet's (logits, aux1, aux2) in training
            out = self.net()(self.layout(x))
            logits, *aux = out if isinstance(out, tuple) else (out,)
            loss = self.loss(logits, target)
        total = loss + self.loss.penalty(self.model) if self.loss.l1 or self.loss.l2 else loss
        if aux:  # the auxiliary classifiers' losses, weighted as the model says (0.3 in the paper)
            total = total + self.aux_weight * sum(self.loss(a, target) for a in aux)
        self.optimize(total)
        b = len(y)  # per image: the loop divides each sum by its count once per epoch
        return {"loss": (loss.detach() * b, b), "acc": ((logits.argmax(1) == y).sum(), b)}

    @torch.no_grad()
    def evaluate(self, loader: Any, prefix: str) -> dict[str, float]:
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        gathered = EvalAccumulator(self.device)  # confusion, PR histograms, worst examples
        for batch in loader:
            x, y = batch["image"], batch["label"]
            with self.autocast():
                logits = self.predict(self.layout(x))
            loss_sum += self.loss(logits.float(), y) * len(y)
            gathered.add(logits, y, x)
        loss, report = gathered.finish(loss_sum, self.data.describe()["classes"])
        # Kept for log_evaluation / log_end: images are not written here, as evaluate may run
        # more than once per evaluation (e.g. again with averaged weights, for scalars only).
        self.eval_reports = {**getattr(self, "eval_reports", {}), prefix: report}
        n = int(report.confusion.sum())
        return (
            {f"{prefix}/loss": loss / n, f"{prefix}/acc": float(report.confusion.trace()) / n}
            | macro_scores(report.confusion, prefix)
            | report.class_accuracy(prefix)
        )

    def predict(self, x: Tensor) -> Tensor:
        """Evaluation logits; with eval.tta=flip, the mean over the image and its mirror."""
        logits = self.net()(x)
        if self.tta == "flip":
            logits = (logits + self.net()(x.flip(3))) / 2
        return logits

    # ----- modes: predict, export (modes.py) ----------------------------------------------------
    def check_mode(
        self, mode: str, ckpt: str | None, options: Mapping[str, Any] | None = None
    ) -> None:
        """Also refuse a bad export.format or a missing export package before anything is written."""
        super().check_mode(mode, ckpt, options)
        if mode == "export":
            classify_modes.check_export(options or {})
        if mode == "units":  # layer names, units.count: before anything is written
            units.check_options(self.model, options or {})

    def mode_predict(
        self, state: Mapping[str, Any], options: Mapping[str, Any]
    ) -> dict[str, float]:
        """predict.input (a folder of images, or a split) -> <run>/predict/predictions.csv."""
        self.model.eval()

        def classify(x: Tensor) -> Tensor:  # normalised images -> logits, as evaluate sees them
            with self.autocast():
                return self.predict(self.layout(x))

        out = self.output_dir("predict")
        return classify_modes.predict(classify, self.data, self.device, options, out)

    def mode_export(self, state: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, float]:
        """export.format (onnx | torchscript | safetensors) -> <run>/export/model.* + its JSON."""
        return classify_modes.export_network(
            self.model, self.data, options, self.output_dir("export"), model_spec=self.model_spec,
            ckpt=self.checkpoint_path, state=state, tta=self.tta,
        )  # fmt: skip

    def mode_units(self, state: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, float]:
        """units.*: what each unit of a conv layer sees (Zeiler & Fergus) -> <run>/units/."""
        net = checkpoint.unwrap(self.model)

        def forward(x: Tensor) -> None:  # normalised images, as evaluate feeds them
            with self.autocast():
                net(self.layout(x))

        return units.show_units(net, forward, self.data, options, self.output_dir("units"),
                                ckpt=self.checkpoint_path, step=int(state.get("step", 0)))  # fmt: skip

    def log_start(self, writer: SummaryWriter) -> None:
        # Stored images, not a loader batch: drawing one would advance the data RNG.
        images = self.data.example_batch(32, "train", mean=[0.0], std=[1.0])["image"]
        writer.add_image("train/images", make_grid(images, nrow=8), 0)
        self.log_inside(writer)
        example = self.data.example_batch(2, "val")["image"].to(self.device)
        class_report.log_graph(writer, checkpoint.unwrap(self.model), self.layout(example))

    def log_end(self, writer: SummaryWriter) -> None:
        self.log_inside(writer)
        report = getattr(self, "eval_reports", {}).get("val")
        if report is not None and report.worst is not None:  # the last validation's
            class_report.log_worst(
                writer, "val/worst_examples", report.worst, self.data.describe()["classes"],
                self.data.mean, self.data.std, self.step_count,
            )  # fmt: skip

    def log_evaluation(self, writer: SummaryWriter, prefix: str) -> None:
        """The evaluation's confusion matrix and PR curves, from what `evaluate` kept."""
        report = getattr(self, "eval_reports", {}).get(prefix)
        if report is not None:
            report.write(writer, prefix, self.step_count)

    def log_inside(self, writer: SummaryWriter) -> None:
        """The notes' "what the network sees": first-layer filters, feature maps of one image."""
        filters = introspect.first_conv_filters(self.model)
        if filters is not None:
            writer.add_image("inside/filters", filters, self.step_count)
        image = self.data.example_batch(1, "val")["image"][0]
        for name, fmap in introspect.stage_outputs(self.model, image):
            writer.add_image(f"inside/{name}", introspect.feature_grid(fmap), self.step_count)
