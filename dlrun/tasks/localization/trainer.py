"""Object localisation (`model=localizer data=mnist_loc`) and landmark detection
(`model=landmark_net data=mnist_landmarks`): one trainer, which follows `data.kind`.

Both regress one object's description from a canvas with a plain network output and the notes'
squared errors (losses.py); they differ in the targets, the scores and what is drawn:

- localization: val|test/presence_acc (Pc > 0.5 against the truth, every canvas), class_acc
  (argmax on canvases that hold a digit), box_iou (mean IoU of the predicted box on those
  canvases) and loss. The monitor is val/box_iou (max): presence and class accuracy near 1 within
  an epoch on MNIST and then barely tell checkpoints apart, while the box is the task's point
  and keeps improving; a net that loses presence or class accuracy loses loss too, which is
  logged beside it. Predicted boxes (Pc > 0.5, with class and Pc) are drawn on fixed test canvases.
- landmarks: val|test/mean_px_error (mean Euclidean distance in pixels over every landmark),
  within_3px (the share within 3 px) and loss; monitor val/mean_px_error (min). The predicted
  landmarks are drawn on fixed test canvases.
"""

import json
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid, save_image

from dlrun.data.module import kind_of
from dlrun.data.single_digit import LANDMARKS
from dlrun.engine import run_modes
from dlrun.engine.loop import Sums, Trainer
from dlrun.errors import UserError
from dlrun.tasks.localization import metrics as m
from dlrun.tasks.localization.drawing import draw_boxes, draw_landmarks

log = logging.getLogger(__name__)
DRAWN = 8  # fixed test canvases drawn with their predictions
KINDS = ("localization", "landmarks")
LOSSES = {"localization": "loss=localization", "landmarks": "loss=landmarks"}
MONITORS = {"localization": "val/box_iou", "landmarks": "val/mean_px_error"}
FIX = "use model=localizer with data=mnist_loc, or model=landmark_net with data=mnist_landmarks"


def check_task(model: nn.Module, data: Any, loss: Any) -> str:
    """The data's kind, once the model and the loss are known to be for it (one line if not)."""
    kind, name = kind_of(data), getattr(data, "name", "?")
    if kind not in KINDS:
        raise UserError(
            f"trainer=localization trains on canvases of one digit, but data={name} is {kind} "
            f"data: {FIX}."
        )
    task = getattr(model, "task", None)
    if task not in KINDS:
        raise UserError(f"{type(model).__name__} is not a localisation network: {FIX}.")
    if task != kind:
        raise UserError(
            f"{type(model).__name__} predicts {task}, but data={name} is {kind} data: {FIX}."
        )
    if getattr(loss, "task", None) != kind:
        raise UserError(
            f"data={name} ({kind}) trains with {LOSSES[kind]}, not "
            f"loss={getattr(loss, 'name', type(loss).__name__)}."
        )
    return kind


class LocalizationTrainer(Trainer):
    """Trains `model(image) -> (B, 5 + K)` (localization) or `(B, 10)` (landmarks)."""

    modes = ("train", "eval", "predict")
    data_free_modes = {"predict": "input"}
    data_kinds = KINDS
    default_monitor = "val/box_iou"
    scores_test_at_end = True  # data.val_scenes > 0 (the default): test/* by the final weights

    def __init__(self, *, model: nn.Module, data: Any, loss: Any, **kwargs: Any) -> None:
        kind = check_task(model, data, loss)
        super().__init__(model=model, data=data, **kwargs)
        self.kind, self.loss = kind, loss
        self.default_monitor = MONITORS[kind]
        about = data.describe()
        self.k, self.classes = int(about["num_classes"]), [str(c) for c in about["classes"]]
        _, self.h, self.w = (int(s) for s in about["input_shape"])

    def logged_metrics(self) -> list[str]:
        if self.kind == "landmarks":
            return ["val/mean_px_error", "val/within_3px", "val/loss", "train/loss"]
        return ["val/box_iou", "val/class_acc", "val/presence_acc", "val/loss", "train/loss"]

    # ----- targets and outputs ------------------------------------------------------------------
    def objective(self, out: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """The loss of the net's outputs against the batch's targets, relative to the canvas."""
        if self.kind == "landmarks":
            scale = torch.tensor([self.w, self.h], device=out.device, dtype=torch.float32)
            return self.loss(out, batch["landmarks"] / scale)
        box = m.relative_box(batch["box"].float(), self.h, self.w)
        return self.loss(out, batch["present"], box, batch["label"])

    def landmarks_px(self, out: Tensor) -> Tensor:
        """(B, 10) outputs -> (B, 5, 2) (x, y) in pixels."""
        return out.view(-1, 5, 2) * torch.tensor([self.w, self.h], device=out.device)

    @torch.no_grad()
    def outputs(self, images: Tensor) -> Tensor:
        """The eval-mode outputs (float) of normalised images, in eval-batch chunks."""
        self.model.eval()
        parts = []
        for chunk in images.split(self.data.eval_batch_size):
            with self.autocast():
                parts.append(self.net()(self.layout(chunk.to(self.device))).float())
        return torch.cat(parts)

    def step(self, batch: Mapping[str, Tensor]) -> Sums:
        x = self.layout(batch["image"])
        with self.autocast():
            out = self.net()(x)
        loss = self.objective(out.float(), batch)
        self.optimize(loss)
        b = len(x)
        return {"loss": (loss.detach() * b, b)}

    # ----- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loader: Any, prefix: str) -> dict[str, float]:
        sums: m.Sums = {}
        for batch in loader:
            out = self.outputs(batch["image"])
            b = torch.tensor(float(len(out)), device=out.device)
            part = {"loss": self.objective(out, batch) * b, "items": b}
            if self.kind == "landmarks":
                part |= m.landmark_sums(self.landmarks_px(out), batch["landmarks"])
            else:
                part |= m.localization_sums(self.loss.presence(out), out, batch["present"],
                                            batch["label"], batch["box"], (self.h, self.w))  # fmt: skip
            sums = m.add(sums, part)
        scores = (
            m.landmark_scores(sums) if self.kind == "landmarks" else m.localization_scores(sums)
        )
        scores["loss"] = float(sums["loss"]) / max(float(sums["items"]), 1.0)
        metrics = {f"{prefix}/{k}": v for k, v in scores.items()}
        if self.writer is not None:
            batch = self.data.example_batch(DRAWN, "test")
            shown = self.data.example_batch(DRAWN, "test", mean=[0.0], std=[1.0])["image"]
            drawn = self.drawn(shown, self.outputs(batch["image"]))
            self.writer.add_image(
                f"{prefix}/predictions", make_grid(drawn, nrow=4), self.step_count
            )
        return metrics

    # ----- drawings -----------------------------------------------------------------------------
    def short(self, label: int) -> str:
        return self.classes[label].split(" - ")[0]  # MNIST's "7 - seven": room for "7"

    def drawn(self, images: Tensor, out: Tensor) -> Tensor:
        """[0, 1] images with what `out` predicts: landmarks, or the box where Pc > 0.5."""
        if self.kind == "landmarks":
            return draw_landmarks(images, self.landmarks_px(out))
        pc = self.loss.presence(out)
        label = out[:, 5:].argmax(1)
        shown = torch.where(pc > 0.5, label, torch.full_like(label, -1))
        names = [
            f"{self.short(c)} {p:.2f}" for c, p in zip(label.tolist(), pc.tolist(), strict=True)
        ]
        return draw_boxes(images, m.pixel_box(out[:, 1:5], self.h, self.w), shown, names, self.k)

    def log_start(self, writer: SummaryWriter) -> None:
        batch = self.data.example_batch(DRAWN, "test", mean=[0.0], std=[1.0])
        if self.kind == "landmarks":
            drawn = draw_landmarks(batch["image"], batch["landmarks"])
        else:
            names = [self.short(c) if c >= 0 else "" for c in batch["label"].tolist()]
            drawn = draw_boxes(batch["image"], batch["box"], batch["label"], names, self.k)
        writer.add_image("test/truth", make_grid(drawn, nrow=4), 0)

    # ----- mode=predict -------------------------------------------------------------------------
    def mode_predict(
        self, state: Mapping[str, Any], options: Mapping[str, Any]
    ) -> dict[str, float]:
        """predict.input (a folder of images, resized to the canvas, or a split) -> <run>/predict/:
        one PNG per image with its prediction drawn (enlarged), and predictions.json: Pc, and
        where Pc > 0.5 the box (xyxy, canvas pixels) and class; or the five landmarks (x, y)."""
        names, raw, x = run_modes.predict_inputs(self.data, self.device, options)
        out = self.outputs(x).cpu()
        folder = self.output_dir("predict")
        folder.mkdir(parents=True, exist_ok=True)
        for name, image in zip(names, self.drawn(raw.float() / 255, out), strict=True):
            save_image(image.float() / 255, folder / f"{name}.png")
        records = [self.record(name, row) for name, row in zip(names, out, strict=True)]
        (folder / "predictions.json").write_text(json.dumps(records, indent=1) + "\n")
        log.info("predicted %d images into %s", len(names), folder)
        return {"predict/items": float(len(names))}

    def record(self, name: str, out: Tensor) -> dict[str, Any]:
        """One image's entry of predictions.json, from its (5 + K,) or (10,) outputs."""
        if self.kind == "landmarks":
            points = self.landmarks_px(out[None])[0].tolist()
            return {"name": name, "landmarks": {k: [round(v, 2) for v in p]
                                                for k, p in zip(LANDMARKS, points, strict=True)}}  # fmt: skip
        pc = float(self.loss.presence(out[None])[0])
        entry: dict[str, Any] = {"name": name, "present": pc > 0.5, "pc": round(pc, 4)}
        if pc > 0.5:
            box = m.pixel_box(out[None, 1:5], self.h, self.w)[0]
            entry |= {"box": [round(v, 2) for v in box.tolist()],
                      "label": self.classes[int(out[5:].argmax())]}  # fmt: skip
        return entry
