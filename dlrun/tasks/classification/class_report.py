"""A classifier's evaluation beyond accuracy: per-class accuracy, a confusion matrix, PR curves,
the worst-classified examples and the model graph, for TensorBoard.

`EvalAccumulator` gathers on the device, batch by batch, with no host sync (scatter-adds, not
`bincount`, which reads its maximum back on CUDA) and in bounded memory (counts and histograms,
not every prediction); `finish` moves it all to the host in one transfer. The images are drawn
with PIL (already a torchvision dependency), not matplotlib.
"""

import contextlib
import functools
import io
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)

PR_THRESHOLDS = 127  # TensorBoard's default and maximum
PR_MAX_CLASSES = 100  # one curve per class up to here: 1,000 curves would cost ~3 MB an evaluation
WORST = 16  # worst-classified examples kept (the highest cross-entropy)


def tag_names(classes: Sequence[str], k: int) -> list[str]:
    """One TensorBoard-safe name per class index ("0 - zero" -> "0_zero"); unnamed classes (a
    model with more outputs than the data has names) are their index, repeats get `_<index>`."""
    names: list[str] = []
    for i in range(k):
        raw = str(classes[i]) if i < len(classes) else ""
        name = re.sub(r"[^A-Za-z0-9.]+", "_", raw).strip("_") or str(i)
        names.append(f"{name}_{i}" if name in names else name)
    return names


def pr_counts(hist: np.ndarray) -> np.ndarray:
    """(2, T) histograms (negatives, positives) of bucketed probabilities -> TensorBoard's
    (tp, fp, tn, fn, precision, recall) rows, as `SummaryWriter.add_pr_curve` computes them."""
    tp = np.cumsum(hist[1][::-1])[::-1].astype(np.float64)
    fp = np.cumsum(hist[0][::-1])[::-1].astype(np.float64)
    tn, fn = fp[0] - fp, tp[0] - tp
    precision = tp / np.maximum(1e-7, tp + fp)
    recall = tp / np.maximum(1e-7, tp + fn)
    return np.stack((tp, fp, tn, fn, precision, recall))


@dataclass
class Worst:
    """The highest-loss examples of one evaluation, still on the device: normalised images,
    true and predicted classes, the predicted class's probability, the cross-entropy."""

    images: Tensor
    labels: Tensor
    preds: Tensor
    probs: Tensor
    losses: Tensor


@dataclass
class EvalReport:
    """What one evaluation leaves for TensorBoard besides its scalars."""

    names: list[str]  # tag-safe class names
    confusion: np.ndarray  # (K, K) counts, rows true, columns predicted
    pr: np.ndarray  # (P, 2, T) bucketed probabilities of the first P classes
    worst: Worst | None

    def class_accuracy(self, prefix: str) -> dict[str, float]:
        """`<prefix>/class_acc/<name>` for every class with examples (recall of that class)."""
        rows = self.confusion.sum(1)
        return {
            f"{prefix}/class_acc/{name}": float(self.confusion[i, i] / rows[i])
            for i, name in enumerate(self.names)
            if rows[i] > 0
        }

    def write(self, writer: SummaryWriter, prefix: str, step: int) -> None:
        """The confusion-matrix image and one PR curve per class."""
        image = confusion_image(self.confusion, self.names)
        writer.add_image(f"{prefix}/confusion_matrix", image, step, dataformats="HWC")
        for k, hist in enumerate(self.pr):
            if hist[1].sum() == 0:  # no positives: a curve of zeros says nothing
                continue
            writer.add_pr_curve_raw(
                f"{prefix}/pr/{self.names[k]}", *pr_counts(hist), step, PR_THRESHOLDS
            )


class EvalAccumulator:
    """Confusion counts, PR histograms and the worst examples of an evaluation, on the device."""

    def __init__(self, device: torch.device, keep: int = WORST) -> None:
        self.device, self.keep = device, keep
        self.k = 0
        self.worst: Worst | None = None

    def add(self, logits: Tensor, y: Tensor, x: Tensor) -> None:
        """One batch: logits (B, K), labels (B,), the normalised images (B, C, H, W)."""
        logp, y = logits.detach().float().log_softmax(1), y.long()
        if not self.k:  # the first batch sets the class count (the model's outputs)
            self.k = logp.shape[1]
            self.p = min(self.k, PR_MAX_CLASSES)
            self.confusion = torch.zeros(self.k * self.k, dtype=torch.long, device=self.device)
            self.pr = torch.zeros(self.p * 2 * PR_THRESHOLDS, dtype=torch.long, device=self.device)
        pred = logits.argmax(1)  # from the logits themselves: val/acc as without this report
        self.confusion.scatter_add_(0, y * self.k + pred, torch.ones_like(y))
        # PR buckets as add_pr_curve makes them: floor(p * (T - 1)), per class and positive/negative
        probs = logp[:, : self.p].exp()
        bucket = (probs * (PR_THRESHOLDS - 1)).floor().long().clamp_(0, PR_THRESHOLDS - 1)
        classes = torch.arange(self.p, device=y.device)
        positive = (y[:, None] == classes).long()
        index = ((classes * 2 + positive) * PR_THRESHOLDS + bucket).flatten()
        self.pr.scatter_add_(0, index, torch.ones_like(index))
        prob = logp.gather(1, pred[:, None]).squeeze(1).exp()
        self._keep_worst(x, y, pred, prob, -logp.gather(1, y[:, None]).squeeze(1))

    def _keep_worst(self, x: Tensor, y: Tensor, pred: Tensor, prob: Tensor, loss: Tensor) -> None:
        """The batch's top `keep` by loss, merged with those kept so far (small tensors only)."""
        top = loss.topk(min(self.keep, len(loss))).indices
        new = Worst(x[top].detach(), y[top], pred[top], prob[top], loss[top])
        if self.worst is not None:
            parts = zip(vars(self.worst).values(), vars(new).values(), strict=True)
            new = Worst(*(torch.cat(pair) for pair in parts))
            top = new.losses.topk(min(self.keep, len(new.losses))).indices
            new = Worst(*(t[top] for t in vars(new).values()))
        self.worst = new

    def finish(self, loss_sum: Tensor, classes: Sequence[str]) -> tuple[float, EvalReport]:
        """One transfer: the loss sum, the confusion counts and the PR histograms (float64 holds
        counts exactly up to 2**53). The worst images stay on the device until they are drawn."""
        packed = torch.cat([loss_sum.detach().double().view(1), self.confusion, self.pr]).cpu()
        values = packed.numpy()
        k, p = self.k, self.p
        confusion = values[1 : 1 + k * k].astype(np.int64).reshape(k, k)
        pr = values[1 + k * k :].astype(np.int64).reshape(p, 2, PR_THRESHOLDS)
        return float(values[0]), EvalReport(tag_names(classes, k), confusion, pr, self.worst)


# ----- drawing ----------------------------------------------------------------------------------
@functools.cache
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at `size` px (a fixed small bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def shade(fraction: float) -> tuple[int, int, int]:
    """White (0) to dark blue (1), as matplotlib's Blues."""
    low, high = np.array([247, 251, 255]), np.array([8, 48, 107])
    return tuple(int(c) for c in low + (high - low) * fraction)


def confusion_image(confusion: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """An (H, W, 3) uint8 picture: rows true, columns predicted, colour the row's fraction,
    the count written in each cell and the class names along both axes where they fit."""
    k = len(confusion)
    cell = int(np.clip(640 // k, 3, 40))
    text = cell >= 16
    size = max(9, min(14, cell - 4))
    f = font(size)
    names = [n[:18] for n in names]
    label = (max(f.getbbox(n)[2] for n in names) + 8) if text else 0
    top = 24 + label
    rows = confusion.sum(1, keepdims=True)
    frac = confusion / np.maximum(rows, 1)
    image = Image.new("RGB", (label + k * cell + 8, top + k * cell + 8), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), "rows: true class, columns: predicted (colour: fraction of the row)",
              fill="black", font=font(12))  # fmt: skip
    for i in range(k):
        for j in range(k):
            x0, y0 = label + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=shade(frac[i, j]))
            if text and confusion[i, j]:
                colour = "white" if frac[i, j] > 0.5 else "black"
                draw.text((x0 + cell / 2, y0 + cell / 2), str(confusion[i, j]), fill=colour,
                          font=font(max(8, min(size, cell // 3))), anchor="mm")  # fmt: skip
    if text:
        for i, name in enumerate(names):  # true classes down the left
            draw.text((label - 4, top + i * cell + cell / 2), name, fill="black", font=f,
                      anchor="rm")  # fmt: skip
        # predicted classes across the top, written upwards: drawn on a strip, then rotated
        strip = Image.new("RGB", (label, k * cell), "white")
        sd = ImageDraw.Draw(strip)
        for j, name in enumerate(names):  # the strip's top row becomes the leftmost column
            sd.text((4, j * cell + cell / 2), name, fill="black", font=f, anchor="lm")
        image.paste(strip.rotate(90, expand=True), (label, 24))
    return np.asarray(image)


def worst_grid(images: Tensor, captions: Sequence[str], columns: int = 4) -> np.ndarray:
    """(N, C, H, W) images in [0, 1], enlarged to >= 96 px, each above its caption lines."""
    n, _, h, w = images.shape
    scale = max(1, -(-96 // max(h, w)))
    rgb = images.clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    rgb = rgb.expand(-1, 3, -1, -1) if rgb.shape[1] == 1 else rgb[:, :3]
    rgb = rgb.repeat_interleave(scale, 2).repeat_interleave(scale, 3)  # nearest: pixels stay sharp
    f = font(11)
    lines = max(c.count("\n") + 1 for c in captions)
    cw, ch = max(w * scale, 120), h * scale + 14 * lines + 6
    rows = -(-n // columns)
    sheet = Image.new("RGB", (columns * cw + 4, rows * ch + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        x0, y0 = 2 + (i % columns) * cw, 2 + (i // columns) * ch
        sheet.paste(Image.fromarray(rgb[i].permute(1, 2, 0).numpy()), (x0, y0))
        draw.multiline_text((x0, y0 + h * scale + 2), captions[i], fill="black", font=f,
                            spacing=3)  # fmt: skip
    return np.asarray(sheet)


def log_worst(
    writer: SummaryWriter,
    tag: str,
    worst: Worst,
    classes: Sequence[str],
    mean: float | Sequence[float],
    std: float | Sequence[float],
    step: int,
) -> None:
    """The worst examples, un-normalised, captioned with the true and the predicted class."""
    c = worst.images.shape[1]
    m = torch.as_tensor(mean, dtype=torch.float32).flatten().expand(c).view(1, c, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).flatten().expand(c).view(1, c, 1, 1)
    images = worst.images.float().cpu() * s + m
    labels, preds = worst.labels.tolist(), worst.preds.tolist()
    probs, losses = worst.probs.tolist(), worst.losses.tolist()

    def name(i: int) -> str:
        return str(classes[i])[:18] if i < len(classes) else str(i)

    captions = [
        f"true: {name(t)}\npred: {name(p)} ({q:.2f})\nloss {ls:.2f}"
        for t, p, q, ls in zip(labels, preds, probs, losses, strict=True)
    ]
    writer.add_image(tag, worst_grid(images, captions), step, dataformats="HWC")


def log_graph(writer: SummaryWriter, model: nn.Module, example: Tensor) -> None:
    """The model graph (TensorBoard's Graphs tab), traced on `example` in eval mode; a model the
    tracer cannot follow costs one warning line, not the run."""
    if not any(True for _ in model.parameters()):  # k-NN: nothing to draw (and no memory yet)
        return
    modes = {m: m.training for m in model.modules()}  # frozen stages stay in eval mode after
    devices = [example.device] if example.device.type == "cuda" else []
    try:  # add_graph prints the tracer's error to stdout; the warning below says it once
        with (
            torch.random.fork_rng(devices=devices),
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")  # TracerWarnings about Python-side values
            writer.add_graph(model, example)
    except Exception as err:  # noqa: BLE001 - any tracer failure: the run goes on without it
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        log.warning("no model graph in TensorBoard: %s does not trace (%s)",
                    type(model).__name__, first[:200])  # fmt: skip
    finally:
        for m, training in modes.items():
            m.training = training
