"""Semantic segmentation: per-pixel classes, pixel accuracy and mean IoU over the whole split.

The confusion matrix of every evaluated pixel is accumulated on the device (one bincount per
batch), so IoU is the split's, not a mean of batch IoUs. Mean IoU averages the object classes
(1..K); the background's IoU is reported apart, since it would flatter every model.
"""

import json
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import draw_segmentation_masks, make_grid, save_image

from dlrun.engine import run_modes
from dlrun.engine.loop import Sums, Trainer
from dlrun.engine.tb import palette
from dlrun.errors import UserError
from dlrun.tasks.segmentation.losses import SegObjective

log = logging.getLogger(__name__)
OVERLAYS = 8  # fixed test scenes drawn with their predicted masks


def overlay(images: Tensor, classes: Tensor, k: int) -> Tensor:
    """uint8 (B, 3, H, W): each [0, 1] image with its class map (0 background, 1..k) painted."""
    out = []
    colors = palette(k)
    for image, cls in zip(images, classes, strict=True):
        rgb = (image.clamp(0, 1) * 255).to(torch.uint8).cpu()
        rgb = rgb.expand(3, -1, -1) if rgb.shape[0] == 1 else rgb
        masks = cls.cpu()[None] == torch.arange(1, k + 1)[:, None, None]
        out.append(draw_segmentation_masks(rgb, masks, alpha=0.55, colors=colors))
    return torch.stack(out)


def scores(confusion: Tensor) -> dict[str, float]:
    """Pixel accuracy, mean IoU of classes 1..K (those present in truth or prediction) and the
    background's IoU, from a (K + 1, K + 1) confusion matrix (rows truth, columns prediction)."""
    cm = confusion.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = tp / union.clamp_min(1)
    present = union[1:] > 0
    return {
        "miou": float(iou[1:][present].mean()) if present.any() else float("nan"),
        "pixel_acc": float(tp.sum() / cm.sum().clamp_min(1)),
        "iou_background": float(iou[0]),
    }


class SegmentationTrainer(Trainer):
    """Trains `model(image) -> (B, K + 1, H, W)` logits against (B, H, W) masks."""

    modes = ("train", "eval", "predict")
    data_free_modes = {"predict": "input"}
    data_kinds = ("segmentation", "detection")
    default_monitor = "val/miou"
    scores_test_at_end = True  # data.val_scenes > 0 (the default): test/* by the final weights

    def __init__(self, *, loss: Any, **kwargs: Any) -> None:
        if not isinstance(loss, SegObjective):
            raise UserError(
                f"Segmentation trains with loss=seg_ce or loss=dice, not "
                f"loss={getattr(loss, 'name', type(loss).__name__)}."
            )
        super().__init__(**kwargs)
        self.loss = loss
        self.k = int(self.data.describe()["num_classes"])

    def check_model(self) -> None:
        c, h, w = self.data.describe()["input_shape"]
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            training = self.model.training
            self.model.eval()
            try:
                out = self.model(torch.zeros(2, c, h, w))
            except (RuntimeError, ValueError) as err:
                raise UserError(f"The model cannot take {h}x{w} scenes: {err}") from None
            finally:
                self.model.train(training)
        if tuple(out.shape) != (2, self.k + 1, h, w):
            raise UserError(
                f"A segmentation model must output (B, {self.k + 1}, {h}, {w}) class scores per "
                f"pixel, this one gives {tuple(out.shape)}: use model=unet or model=fcn."
            )

    def logged_metrics(self) -> list[str]:
        return ["val/miou", "val/pixel_acc", "val/iou_background", "val/loss", "train/loss"]

    def step(self, batch: Mapping[str, Tensor]) -> Sums:
        x, y = self.layout(batch["image"]), batch["mask"]
        with self.autocast():
            logits = self.net()(x)
        loss = self.loss(logits.float(), y)
        self.optimize(loss)
        b, pixels = len(y), y.numel()
        return {
            "loss": (loss.detach() * b, b),
            "pixel_acc": ((logits.argmax(1) == y).sum(), pixels),
        }

    @torch.no_grad()
    def predict_classes(self, images: Tensor) -> Tensor:
        self.model.eval()
        parts = []
        for chunk in images.split(self.data.eval_batch_size):
            with self.autocast():
                parts.append(self.net()(self.layout(chunk.to(self.device))).argmax(1))
        return torch.cat(parts)

    @torch.no_grad()
    def evaluate(self, loader: Any, prefix: str) -> dict[str, float]:
        self.model.eval()
        n = self.k + 1
        confusion = torch.zeros(n * n, dtype=torch.long, device=self.device)
        loss_sum, items = torch.zeros((), device=self.device), 0
        for batch in loader:
            x, y = self.layout(batch["image"]), batch["mask"]
            with self.autocast():
                logits = self.net()(x)
            loss_sum += self.loss(logits.float(), y) * len(y)
            items += len(y)
            confusion += torch.bincount(
                y.flatten() * n + logits.argmax(1).flatten(), minlength=n * n
            )
        metrics = {f"{prefix}/{k}": v for k, v in scores(confusion.view(n, n)).items()}
        metrics[f"{prefix}/loss"] = float(loss_sum) / max(items, 1)
        if self.writer is not None:
            batch = self.data.example_batch(OVERLAYS, "test")
            shown = self.data.example_batch(OVERLAYS, "test", mean=[0.0], std=[1.0])["image"]
            pred = self.predict_classes(batch["image"])
            self.writer.add_image(
                f"{prefix}/predictions",
                make_grid(overlay(shown, pred, self.k), nrow=4),
                self.step_count,
            )
        return metrics

    def log_start(self, writer: SummaryWriter) -> None:
        batch = self.data.example_batch(OVERLAYS, "test", mean=[0.0], std=[1.0])
        writer.add_image(
            "test/truth", make_grid(overlay(batch["image"], batch["mask"], self.k), nrow=4), 0
        )

    # ----- mode=predict -------------------------------------------------------------------------
    def mode_predict(
        self, state: Mapping[str, Any], options: Mapping[str, Any]
    ) -> dict[str, float]:
        """predict.input (a folder of images, or a split) -> <run>/predict/: one overlay PNG and
        one class-map PNG (pixel value = class, 0 background) per image, predictions.json."""
        names, raw, x = run_modes.predict_inputs(self.data, self.device, options)
        classes = self.predict_classes(x).cpu()
        out = self.output_dir("predict")
        out.mkdir(parents=True, exist_ok=True)
        painted = overlay(raw.float() / 255, classes, self.k)
        records = []
        for name, image, cls in zip(names, painted, classes, strict=True):
            save_image(image.float() / 255, out / f"{name}.png")
            save_image(cls[None].float() / 255, out / f"{name}_classes.png")  # value = class index
            counts = torch.bincount(cls.flatten(), minlength=self.k + 1)
            records.append(
                {
                    "name": name,
                    "pixels": {self.class_name(i): int(v) for i, v in enumerate(counts) if v and i},
                }
            )
        (out / "predictions.json").write_text(json.dumps(records, indent=1) + "\n")
        log.info("predicted %d images into %s", len(names), out)
        return {"predict/items": float(len(names))}

    def class_name(self, index: int) -> str:
        classes = self.data.describe()["classes"]
        return classes[index - 1] if 0 < index <= len(classes) else str(index)
