"""What a mode shows beyond its numbers, as files in its results folder rather than TensorBoard
events: a mode's folder sits inside its run (<run>/eval/001), where event files would make
TensorBoard list it as one more training run.

`ResultFiles` takes the SummaryWriter calls a task's `log_evaluation` makes, so one drawing
function serves both: images become PNGs, PR curves one CSV; scalars are in metrics.json already.
"""

import csv
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from PIL import Image


class ResultFiles:
    """A SummaryWriter stand-in writing into `folder`: `<tag without its split>.png` per image
    (test/confusion_matrix -> confusion_matrix.png) and `pr_curves.csv` for every PR curve."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.written: list[Path] = []
        self._pr_rows: list[list[Any]] = []

    def _path(self, tag: str, suffix: str) -> Path:
        name = tag.split("/", 1)[-1].replace("/", "_")
        return self.folder / f"{name}{suffix}"

    def add_image(
        self, tag: str, img_tensor: Any, global_step: int | None = None, walltime: float | None = None,
        dataformats: str = "CHW",
    ) -> None:  # fmt: skip
        image = torch.as_tensor(np.array(img_tensor))  # a copy: the caller's stays its own
        if dataformats == "HWC":
            image = image.permute(2, 0, 1)
        elif dataformats == "HW":
            image = image[None]
        if image.is_floating_point():  # TensorBoard's convention: floats in [0, 1]
            image = (image.clamp(0, 1) * 255).round()
        path = self._path(tag, ".png")
        self.folder.mkdir(parents=True, exist_ok=True)
        pixels = image.to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(path)
        self.written.append(path)

    def add_pr_curve_raw(
        self, tag: str, true_positive_counts: Any, false_positive_counts: Any,
        true_negative_counts: Any, false_negative_counts: Any, precision: Any, recall: Any,
        global_step: int | None = None, num_thresholds: int = 127, weights: Any = None,
        walltime: float | None = None,
    ) -> None:  # fmt: skip
        curve = tag.split("/", 1)[-1].removeprefix("pr/")
        for i, (p, r, tp, fp) in enumerate(
            zip(precision, recall, true_positive_counts, false_positive_counts, strict=True)
        ):
            self._pr_rows.append([curve, f"{i / max(num_thresholds - 1, 1):.4f}",
                                  f"{p:.4f}", f"{r:.4f}", int(tp), int(fp)])  # fmt: skip

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        """Scalars are the mode's metrics: metrics.json and the log line hold them."""

    def close(self) -> None:
        if self._pr_rows:
            path = self.folder / "pr_curves.csv"
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="") as f:
                rows = csv.writer(f)
                rows.writerow(["class", "threshold", "precision", "recall", "tp", "fp"])
                rows.writerows(self._pr_rows)
            self.written.append(path)
            self._pr_rows = []

    def __enter__(self) -> "ResultFiles":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
