"""Object detection (`model=yolo`, `model=faster_rcnn`): one trainer for any detector that keeps
the contract of dlrun/models/yolo.py (train mode: loss terms; eval mode: per-image detections).

Evaluation collects every detection of the split and scores mAP@0.5 and COCO's mAP@[.5:.95]
(dlrun/tasks/detection/metrics.py, checked against pycocotools); predicted boxes on fixed test scenes go
to TensorBoard beside the true ones, and `mode=predict` writes annotated images and their boxes.
"""

import json
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import draw_bounding_boxes, make_grid, save_image

from dlrun.data import proposals
from dlrun.data.module import offered, require
from dlrun.engine import run_modes
from dlrun.engine.loop import Sums, Trainer
from dlrun.engine.tb import palette
from dlrun.errors import UserError
from dlrun.models.anchors import kmeans_anchors
from dlrun.tasks.detection.losses import DetectionObjective
from dlrun.tasks.detection.metrics import mean_average_precision

log = logging.getLogger(__name__)
DRAWN = 8  # fixed test scenes drawn with their boxes
SHOW_SCORE = 0.5  # TensorBoard draws detections at least this sure
DRAWN_PX = 256  # smallest side of a drawn image


def draw(images: Tensor, detections: list[dict[str, Tensor]], classes: list[str]) -> Tensor:
    """uint8 (B, 3, sH, sW): [0, 1] images with their boxes, coloured and named by class (and
    score, where the detections have one), enlarged s times when smaller than DRAWN_PX."""
    colors = palette(len(classes))
    short = [
        c.split(" - ")[0] for c in classes
    ]  # MNIST's "7 - seven": a 64 px scene has room for "7"
    out = []
    # Labels need room: a small image is drawn enlarged (nearest) to at least DRAWN_PX.
    scale = max(1, DRAWN_PX // min(images.shape[-2:]))
    for image, det in zip(images, detections, strict=True):
        rgb = (image.clamp(0, 1) * 255).to(torch.uint8).cpu()
        rgb = rgb.expand(3, -1, -1) if rgb.shape[0] == 1 else rgb
        rgb = rgb.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        labels = det["labels"].cpu().tolist()
        scores = det["scores"].cpu().tolist() if "scores" in det else None
        names = [
            short[c] + (f" {scores[i]:.2f}" if scores is not None else "")
            for i, c in enumerate(labels)
        ]
        if labels:  # (torchvision warns on an empty set of boxes)
            box = det["boxes"].cpu() * scale
            rgb = draw_bounding_boxes(rgb, box, names, [colors[c] for c in labels], width=2)
        out.append(rgb)
    return torch.stack(out)


def truth(boxes: Tensor, labels: Tensor) -> list[dict[str, Tensor]]:
    """Padded (B, M, 4) boxes and (B, M) labels (-1 empty) as one dict per image."""
    return [
        {"boxes": b[lab >= 0], "labels": lab[lab >= 0]}
        for b, lab in zip(boxes, labels, strict=True)
    ]


def confident(dets: list[dict[str, Tensor]], threshold: float) -> list[dict[str, Tensor]]:
    return [{k: v[d["scores"] >= threshold] for k, v in d.items()} for d in dets]


class DetectionTrainer(Trainer):
    """Trains a detector on batches with "image", "boxes" and "box_labels"."""

    modes = ("train", "eval", "predict")
    data_free_modes = {"predict": "input"}
    data_kinds = ("detection",)
    default_monitor = "val/map_50"
    scores_test_at_end = True  # data.val_scenes > 0 (the default): test/* by the final weights

    def __init__(self, *, loss: Any, **kwargs: Any) -> None:
        if not isinstance(loss, DetectionObjective):
            raise UserError(
                "Detection trains with the detector's own loss terms: loss=detection, not "
                f"loss={getattr(loss, 'name', type(loss).__name__)}."
            )
        super().__init__(**kwargs)
        self.loss = loss
        self.classes = list(self.data.describe()["classes"])

    def check_model(self) -> None:
        if not all(hasattr(self.model, a) for a in ("needs_anchors", "set_anchors")):
            raise UserError(
                f"{type(self.model).__name__} is not a detector: use model=yolo or "
                "model=faster_rcnn with data=mnist_det."
            )
        # None configured: k-means on the training boxes (a mode's come with its checkpoint).
        if self.model.needs_anchors() and self.mode == "train":
            wh = require(self.data, "boxes", by="trainer=detection").box_sizes("train").cpu()
            k = len(self.model.anchors)
            anchors = kmeans_anchors(wh, k, torch.Generator().manual_seed(0))
            self.model.set_anchors(anchors)
            log.info(
                "anchors (k-means of %d training boxes): %s", len(wh),
                ", ".join(f"{w:.0f}x{h:.0f}" for w, h in anchors.tolist()),
            )  # fmt: skip

        # R-CNN and Fast R-CNN classify region proposals: the data computes them once per split
        # (a data-free mode's inputs get theirs in mode_predict).
        settings = self.proposal_settings()
        if settings is not None and offered(self.data, "boxes") is not None:
            name = type(self.model).__name__
            require(self.data, "proposals", by=f"{name}").attach_proposals(**settings)

    def proposal_settings(self) -> dict[str, Any] | None:
        """The model's selective-search settings, None for a detector without proposals."""
        settings = getattr(self.model, "proposal_settings", None)
        return dict(settings) if settings is not None else None

    def proposals_of(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The keyword the model's call takes: {"proposals": ...} for a proposal detector."""
        if self.proposal_settings() is None:
            return {}
        return {"proposals": batch["proposals"]}

    def logged_metrics(self) -> list[str]:
        return ["val/map_50", "val/map", "train/loss"]

    def step(self, batch: Mapping[str, Tensor]) -> Sums:
        x = self.layout(batch["image"])
        with self.autocast():
            terms = self.net()(x, batch["boxes"], batch["box_labels"], **self.proposals_of(batch))
        terms = self.loss(terms)
        loss = sum(terms.values())
        self.optimize(loss)
        b = len(x)
        sums: dict[str, tuple[Tensor, int]] = {"loss": (loss.detach() * b, b)}
        # train/loss_<term>: YOLO's box, obj ...; torchvision's loss_classifier, ... lose "loss_"
        sums |= {f"loss_{k.removeprefix('loss_')}": (v.detach() * b, b) for k, v in terms.items()}
        return sums

    @torch.no_grad()
    def detect(self, images: Tensor, regions: Tensor | None = None) -> list[dict[str, Tensor]]:
        """Detections of normalised images (and their proposals), in eval-batch chunks."""
        self.model.eval()
        out: list[dict[str, Tensor]] = []
        size = self.data.eval_batch_size
        for i, chunk in enumerate(images.split(size)):
            extra = {} if regions is None else {"proposals": regions[i * size : (i + 1) * size]}
            with self.autocast():
                out += self.net()(self.layout(chunk.to(self.device)), **extra)
        return [{k: v.float() if k != "labels" else v for k, v in d.items()} for d in out]

    @torch.no_grad()
    def evaluate(self, loader: Any, prefix: str) -> dict[str, float]:
        preds: list[dict[str, Tensor]] = []
        targets: list[dict[str, Tensor]] = []
        for batch in loader:
            found = self.detect(batch["image"], batch.get("proposals"))
            preds += [{k: v.cpu() for k, v in d.items()} for d in found]
            targets += truth(batch["boxes"].cpu(), batch["box_labels"].cpu())
        scores = mean_average_precision(preds, targets, len(self.classes))
        metrics = {f"{prefix}/{k}": v for k, v in scores.items()}
        found = sum(len(p["scores"]) for p in confident(preds, SHOW_SCORE))
        metrics[f"{prefix}/boxes_per_image"] = found / max(len(preds), 1)
        if self.writer is not None:
            batch = self.data.example_batch(DRAWN, "test")
            shown = self.data.example_batch(DRAWN, "test", mean=[0.0], std=[1.0])["image"]
            dets = confident(self.detect(batch["image"], batch.get("proposals")), SHOW_SCORE)
            self.writer.add_image(
                f"{prefix}/predictions",
                make_grid(draw(shown, dets, self.classes), nrow=4),
                self.step_count,
            )
        return metrics

    def log_start(self, writer: SummaryWriter) -> None:
        batch = self.data.example_batch(DRAWN, "test", mean=[0.0], std=[1.0])
        drawn = draw(batch["image"], truth(batch["boxes"], batch["box_labels"]), self.classes)
        writer.add_image("test/truth", make_grid(drawn, nrow=4), 0)

    # ----- mode=predict -------------------------------------------------------------------------
    def mode_predict(
        self, state: Mapping[str, Any], options: Mapping[str, Any]
    ) -> dict[str, float]:
        """predict.input (a folder of images, or a split) -> <run>/predict/: one PNG per image
        with its boxes drawn (enlarged to 256 px), predictions.json with every box at least
        predict.score sure, in the input's pixels."""
        threshold = float(options.get("score", SHOW_SCORE))
        if not 0 <= threshold <= 1:
            raise UserError(f"predict.score must be in [0, 1], got {threshold}.")
        names, raw, x = run_modes.predict_inputs(self.data, self.device, options)
        settings = self.proposal_settings()
        regions = None if settings is None else proposals.selective_search(raw, **settings)
        found = self.detect(x, None if regions is None else regions.to(self.device))
        dets = confident([{k: v.cpu() for k, v in d.items()} for d in found], threshold)
        out = self.output_dir("predict")
        out.mkdir(parents=True, exist_ok=True)
        drawn = draw(raw.float() / 255, dets, self.classes)
        records = []
        for name, image, det in zip(names, drawn, dets, strict=True):
            save_image(image.float() / 255, out / f"{name}.png")
            records.append(
                {
                    "name": name,
                    "boxes": [
                        {
                            "box": [round(v, 2) for v in box],
                            "label": self.classes[label],
                            "score": round(score, 4),
                        }
                        for box, label, score in zip(
                            det["boxes"].tolist(),
                            det["labels"].tolist(),
                            det["scores"].tolist(),
                            strict=True,
                        )  # fmt: skip
                    ],
                }
            )
        (out / "predictions.json").write_text(json.dumps(records, indent=1) + "\n")
        log.info(
            "predicted %d images into %s (boxes at least %.2f sure)", len(names), out, threshold
        )
        return {"predict/items": float(len(names))}
