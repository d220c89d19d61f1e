"""Metric learning (Siamese / triplet networks): embeddings compared by distance, verified in pairs.

Training batches follow the loss: balanced pairs for the contrastive and the head's BCE loss,
P x K batches for triplet mining. Evaluation embeds a whole split and scores its fixed pairs:
the threshold with the best accuracy on the validation pairs (always cut from the training
split: without data.val_split the trainer holds out 10% itself) is applied to the test pairs;
ROC AUC and leave-one-out k-NN accuracy need no threshold. Each set of weights (the model's, the
weight average's) gets its own threshold.
"""

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from dlrun.config import checks
from dlrun.data.folder import decode as decode_image
from dlrun.data.module import require
from dlrun.data.pairs import PairBatches
from dlrun.data.transforms import Normalize
from dlrun.engine import run_modes
from dlrun.engine.checkpoint import unwrap
from dlrun.engine.loop import Sums, Trainer
from dlrun.errors import UserError
from dlrun.models.siamese import Siamese
from dlrun.tasks.metric_learning import verification
from dlrun.tasks.metric_learning.losses import MetricObjective

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
HOLD_OUT_FRACTION, HOLD_OUT_MIN = 0.1, 1000  # without data.val_split: the threshold's images


class MetricTrainer(Trainer):
    """Trains `model=siamese` (one or two embedding branches, an optional pair head)."""

    modes = ("train", "eval", "embed", "verify")
    default_monitor = "val/verify_acc"
    scores_test_at_end = True  # the threshold of the validation pairs, on the test pairs
    cpu_bf16 = True  # Siamese LeNet on MNIST: bf16 as accurate, 0.85x the time (docs/precision.md)

    def __init__(
        self, *, loss: Any, knn_k: int = 5, projector_n: int = 2000, **kwargs: Any
    ) -> None:
        if not isinstance(loss, MetricObjective):
            raise UserError(
                f"model=siamese trains with loss=contrastive, loss=triplet or loss=pair_bce, not "
                f"loss={getattr(loss, 'name', type(loss).__name__)}."
            )
        model = kwargs["model"]
        if not isinstance(model, Siamese):
            raise UserError(
                f"The metric-learning trainer needs model=siamese or model=pseudo_siamese, not "
                f"{type(model).__name__}."
            )
        if loss.trains_head != (model.head is not None):
            raise UserError(
                "loss=pair_bce trains the Siamese head and needs model.head=true; the distance "
                "losses (contrastive, triplet) train no head: model.head=false."
            )
        if loss.batches == "pk" and model.branch_b is not None:
            raise UserError(
                "A pseudo-Siamese network (model.shared=false) has one branch per side of a pair; "
                "triplet batches have no sides: use loss=contrastive or loss=pair_bce with it."
            )
        if knn_k < 1:
            raise UserError(f"trainer.knn_k must be a positive integer, got {knn_k}.")
        super().__init__(**kwargs)
        self.pairs: PairBatches = require(self.data, "pairs", by="trainer=metric")
        self.loss, self.knn_k, self.projector_n = loss, knn_k, projector_n
        # The threshold is fitted on validation pairs, so they must never be test pairs: without
        # data.val_split, hold training images out (a fixed permutation, the same in every run).
        moved = self.pairs.hold_out_validation(HOLD_OUT_FRACTION, HOLD_OUT_MIN)
        if moved:
            log.info(
                "metric learning: data.val_split=0, so %d of the %d training images (%d%%, at "
                "least %d, a fixed draw) are held out to fit the verification threshold on (val/*); "
                "test/* scores the test pairs at the end (data.val_split chooses the hold-out)",
                moved, moved + self.data.describe()["sizes"]["train"],
                round(100 * HOLD_OUT_FRACTION), HOLD_OUT_MIN,
            )  # fmt: skip
        # On pair scores, per set of weights ("model", "ema"): fitted on the validation pairs.
        self.thresholds: dict[str, float] = {}

    @property
    def siamese(self) -> Siamese:
        return unwrap(self.model)

    @property
    def threshold(self) -> float | None:
        """The threshold of the weights the model holds now (`scored_weights`)."""
        return self.thresholds.get(self.scored_weights)

    # ----- set-up -------------------------------------------------------------------------------
    def check_model(self) -> None:
        info = self.data.describe()
        checks.check_image_size(self.model, tuple(info["input_shape"]), "siamese")

    def train_loader(self) -> Any:
        return self.loss.loader(self.pairs)  # pairs or P x K batches, as the loss needs

    def logged_metrics(self) -> list[str]:
        about = self.data.describe()
        prefixes = ["val"] if about["val_is_test"] else ["val", "test"]
        tags = ["train/loss"]
        tags += [f"{p}/{m}" for p in prefixes for m in ("verify_acc", "roc_auc", "knn_acc")]
        if self.pairs.holdout_classes:  # scored on the split that holds those classes
            tags.append(f"{prefixes[-1]}/verify_acc_unseen")
        return tags

    def extra_state(self) -> dict[str, Any]:
        # "threshold": the model's, as checkpoints before per-weights thresholds had it
        return {"threshold": self.thresholds.get("model"), "thresholds": dict(self.thresholds)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.thresholds = saved_thresholds(state)

    # ----- training -----------------------------------------------------------------------------
    def step(self, batch: Mapping[str, Tensor]) -> Sums:
        b = len(batch["label"])
        with self.autocast():
            loss, logged = self.loss(batch, self)  # the loss embeds its batch (embed_one ...)
        self.optimize(loss)
        return {"loss": (loss.detach() * b, b)} | logged

    # The network as the objective sees it (losses.Embedder): training embeddings, float.
    def embed_one(self, x: Tensor) -> Tensor:
        return self.net()(self.layout(x)).float()

    def embed_pair(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Both sides' embeddings; shared weights see the pair as one batch (one call)."""
        a, b = self.layout(a), self.layout(b)
        if self.siamese.branch_b is None:
            ea, eb = self.net()(torch.cat([a, b])).float().chunk(2)
            return ea, eb
        return self.net()(a).float(), self.siamese.branch_b(b).float()

    def same_logit(self, ea: Tensor, eb: Tensor) -> Tensor:
        return self.siamese.same_logit(ea, eb)

    # ----- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(first-branch, second-branch) embeddings of normalised images, in eval batches."""
        self.model.eval()
        a_parts, b_parts = [], []
        for chunk in images.split(self.data.eval_batch_size):
            chunk = self.layout(chunk.to(self.device))
            with self.autocast():
                a_parts.append(self.net()(chunk).float())
                if self.siamese.branch_b is not None:
                    b_parts.append(self.siamese.branch_b(chunk).float())
        ea = torch.cat(a_parts)
        return ea, torch.cat(b_parts) if b_parts else ea

    def scores(self, ea: Tensor, eb: Tensor) -> Tensor:
        """How alike each pair (ea[k], eb[k]) is: the head's logit, or minus the distance."""
        if self.siamese.head is not None:
            with torch.no_grad():
                return self.siamese.same_logit(ea, eb).float()
        return -(ea - eb).pow(2).sum(1).sqrt()

    @torch.no_grad()
    def evaluate(self, loader: Any, prefix: str) -> dict[str, float]:
        images, labels = [], []
        for batch in loader:
            images.append(batch["image"])
            labels.append(batch["label"])
        y = torch.cat(labels)
        ea, eb = self.embed(torch.cat(images))
        split = "val" if prefix == "val" else "test"
        i, j = (t.to(self.device) for t in self.pairs.eval_pairs(split))
        same, s = y[i] == y[j], self.scores(ea[i], eb[j])
        if prefix == "val":  # the threshold is chosen here, and only applied to the test pairs
            self.thresholds[self.scored_weights], _ = verification.best_threshold(s, same)
        elif self.threshold is None:
            raise RuntimeError("score the validation pairs first: they choose the threshold")
        threshold = float(self.threshold)  # type: ignore[arg-type]
        auc = verification.roc_auc(s, same)
        out = {
            f"{prefix}/verify_acc": verification.accuracy_at(s, same, threshold),
            f"{prefix}/roc_auc": auc,
            f"{prefix}/knn_acc": verification.knn_accuracy(ea, y, self.knn_k),
            f"{prefix}/threshold": threshold if self.siamese.head is not None else -threshold,
        }
        if self.writer is not None:
            fpr, tpr = verification.roc_curve(s, same)
            title = f"{prefix} pairs: ROC AUC {auc:.4f}"
            self.writer.add_image(
                f"{prefix}/roc", verification.roc_image(fpr, tpr, title), self.step_count
            )
        holdout = self.pairs.holdout_classes
        if holdout and (split == "test" or self.data.describe()["val_is_test"]):
            # One-shot verification: pairs of classes the network never saw.
            i, j = (t.to(self.device) for t in self.pairs.eval_pairs(split, holdout))
            same, s = y[i] == y[j], self.scores(ea[i], eb[j])
            out[f"{prefix}/verify_acc_unseen"] = verification.accuracy_at(s, same, threshold)
            out[f"{prefix}/roc_auc_unseen"] = verification.roc_auc(s, same)
        return out

    # ----- TensorBoard --------------------------------------------------------------------------
    def log_start(self, writer: SummaryWriter) -> None:
        # Eight validation pairs, one side above the other: the first four of one class.
        i, j = self.pairs.eval_pairs("val")
        half = len(i) // 2
        pick = torch.cat([torch.arange(4), torch.arange(half, half + 4)])
        i, j = i[pick], j[pick]
        n = int(torch.cat([i, j]).max()) + 1
        images = self.data.example_batch(n, "val", mean=[0.0], std=[1.0])["image"]
        grid = torch.cat([images[i.to(images.device)], images[j.to(images.device)]])
        writer.add_image("val/pairs", make_grid(grid, nrow=8), 0)

    def log_end(self, writer: SummaryWriter) -> None:
        n = min(self.projector_n, self.data.describe()["sizes"]["test"])
        if n < 1:
            return
        batch = self.data.example_batch(n, "test")
        emb, _ = self.embed(batch["image"])
        pictures = self.data.example_batch(n, "test", mean=[0.0], std=[1.0])["image"]
        if pictures.shape[1] == 1:
            pictures = pictures.expand(-1, 3, -1, -1)
        classes = self.data.describe()["classes"]
        writer.add_embedding(
            emb.cpu(),
            metadata=[
                classes[int(c)] if int(c) < len(classes) else str(int(c)) for c in batch["label"]
            ],
            label_img=pictures.cpu().clamp(0, 1),
            global_step=self.step_count,
            tag="test_embeddings",
        )

    # ----- modes --------------------------------------------------------------------------------
    def _threshold_from(self, state: Mapping[str, Any]) -> float:
        """The checkpoint's threshold for the weights in use (eval.weights); where it has none
        (the weight average of a checkpoint that kept only the model's), one fitted on the
        validation pairs now, never on test pairs."""
        task = state.get("task") or {}
        self.thresholds = saved_thresholds(task)
        saved_split = ((state.get("config") or {}).get("data") or {}).get("val_split")
        if "thresholds" not in task and not saved_split and self.thresholds:
            # Written before the hold-out: with data.val_split=0 its threshold was fitted on test
            # pairs, so scoring test pairs with it would be optimistic.
            log.warning(
                "the checkpoint's threshold was fitted on test pairs (it predates the automatic "
                "hold-out); fitting it again on the validation pairs"
            )
            self.thresholds = {}
        if self.threshold is None:
            log.info(
                "fitting the threshold of the %s weights on the validation pairs (the checkpoint "
                "has none for them)", self.scored_weights,
            )  # fmt: skip
            self.evaluate(self.data.val_loader(), "val")
        return float(self.threshold)  # type: ignore[arg-type]

    def mode_eval(self, state: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, float]:
        self._threshold_from(state)
        return super().mode_eval(state, options)

    def mode_embed(self, state: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, float]:
        """embed.input (a split, or a folder of images) -> <run>/embed/: embeddings.pt, and the
        projector's two TSV files (tensors.tsv, metadata.tsv: load both at projector.tensorflow.org)."""
        spec = str(options.get("input") or "test")
        names, raw = run_modes.mode_inputs(
            self.data, options
        )  # a split's images, or a folder's, as uint8
        images = Normalize(self.data.mean, self.data.std).normalize(raw)
        labels = (
            self.data.example_batch(len(names), spec)["label"].cpu() if spec in SPLITS else None
        )
        emb, _ = self.embed(images)
        emb = emb.cpu()
        out = self.output_dir("embed")
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"embeddings": emb, "labels": labels, "names": names}, out / "embeddings.pt")
        rows = ("\t".join(f"{v:.6g}" for v in row) for row in emb.tolist())
        (out / "tensors.tsv").write_text("\n".join(rows) + "\n")
        classes = self.data.describe()["classes"]
        meta = ["name\tlabel"] + [
            f"{name}\t{classes[int(labels[k])] if labels is not None else ''}"
            for k, name in enumerate(names)
        ]
        (out / "metadata.tsv").write_text("\n".join(meta) + "\n")
        log.info("embedded %d images of %s into %s", len(names), spec, out)
        return {"embed/items": float(len(names)), "embed/dim": float(emb.shape[1])}

    def mode_verify(self, state: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, float]:
        """verify.a / verify.b: two image files; prints their distance and same / different."""
        paths = [options.get("a"), options.get("b")]
        if not all(paths):
            raise UserError("mode=verify needs two images: verify.a=IMG verify.b=IMG.")
        c, h, w = self.data.describe()["input_shape"]
        norm = Normalize(self.data.mean, self.data.std)
        images = []
        for key, path in zip(("verify.a", "verify.b"), paths, strict=True):
            file = Path(str(path)).expanduser()
            if not file.is_file():
                raise UserError(f"{key}={path}: there is no such file.")
            try:
                images.append(decode_image(file, c, max(h, w), "bilinear"))
            except (OSError, ValueError) as err:
                raise UserError(f"{key}={path} is not an image that can be read ({err}).") from err
        threshold = self._threshold_from(state)
        x = norm.normalize(torch.stack(images))
        ea, _ = self.embed(x[:1])
        _, eb = self.embed(x[1:])
        score = float(self.scores(ea, eb)[0])
        distance = float((ea - eb).pow(2).sum().sqrt())
        same = score >= threshold
        result = {
            "a": str(paths[0]),
            "b": str(paths[1]),
            "distance": distance,
            "score": score,
            "threshold": threshold if self.siamese.head is not None else -threshold,
            "same": same,
        }
        out = self.output_dir("verify")
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        rule = (
            f"head logit {score:.4f} {'>=' if same else '<'} threshold {threshold:.4f}"
            if self.siamese.head is not None
            else f"distance {distance:.4f} {'<=' if same else '>'} threshold {-threshold:.4f}"
        )
        print(f"{'same' if same else 'different'}: {rule} ({paths[0]} vs {paths[1]})")
        return {"verify/distance": distance, "verify/same": float(same)}


def saved_thresholds(task_state: Mapping[str, Any]) -> dict[str, float]:
    """A checkpoint's thresholds by weights; older checkpoints saved the model's alone."""
    if task_state.get("thresholds") is not None:
        return {k: float(v) for k, v in task_state["thresholds"].items()}
    old = task_state.get("threshold")
    return {} if old is None else {"model": float(old)}
