"""A task's modes (`mode=train|eval|sample|...`): the CLI dispatches, the trainer offers them
(`Trainer.run_mode`, `mode_<name>`); the pieces they share are here.

Contract for every mode but `train`: it needs `ckpt=PATH` (its weights are loaded into the
task's model before the run folder is written), reads its options from the config node of the
same name (`sample.n`, later `translate.input`, `predict.input`), and writes what it produces
under `<run>/<mode>/`. A task adds a mode by listing it in `modes` and defining `mode_<name>`.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dlrun.data.folder import IMAGE_SUFFIXES
from dlrun.data.folder import decode as decode_image
from dlrun.data.transforms import Normalize
from dlrun.errors import UserError


def folder_inputs(
    spec: str,
    channels: int,
    size: int,
    resample: str = "bilinear",
    splits: str = "train, val, test",
) -> tuple[list[str], Tensor]:
    """The images of a folder (`<mode>.input=DIR`), decoded to `size` and `channels`, in file-name
    order: their names and uint8 (N, C, S, S). A folder without images is a UserError."""
    folder = Path(spec).expanduser()
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not folder.is_dir() or not files:
        raise UserError(
            f"input={spec} is neither a split ({splits}) nor a folder holding images "
            f"({', '.join(sorted(IMAGE_SUFFIXES))})."
        )
    images = torch.stack([decode_image(p, channels, size, resample) for p in files])
    return [p.stem for p in files], images


def check_mode(modes: Sequence[str], mode: str, ckpt: str | None, task: str) -> None:
    """Before any work: the mode is one of the task's `modes` and has its checkpoint."""
    if mode not in modes:
        raise UserError(
            f"mode='{mode}' is not a mode of this task ({task}); use one of: {', '.join(modes)}."
        )
    if mode != "train" and not ckpt:
        raise UserError(
            f"mode={mode} needs ckpt=PATH, the checkpoint to use (e.g. <run>/checkpoints/best.pt)."
        )


def mode_inputs(data: Any, options: Mapping[str, Any]) -> tuple[list[str], Tensor]:
    """What an output mode reads (`<mode>.input`): a folder of images, decoded and resized to
    the model's input size and channels, or a split name (train | val | test) of `data`.

    Returns the item names and uint8 images (N, C, H, W), in file-name or split order.
    """
    spec = str(options.get("input") or "test")
    c, h, w = data.describe()["input_shape"]
    if spec in ("train", "val", "test"):
        n = data.describe()["sizes"][spec]
        images = data.example_batch(n, spec, mean=[0.0], std=[1 / 255])["image"]
        return [f"{spec}_{i:06d}" for i in range(n)], images.round().to(torch.uint8)
    return folder_inputs(spec, c, max(h, w))


def predict_inputs(
    data: Any, device: torch.device, options: Mapping[str, Any]
) -> tuple[list[str], Tensor, Tensor]:
    """`mode_inputs` for predict modes: a split gives its first `predict.n` items. Returns
    names, the uint8 images (to draw on) and the images normalised as the model wants."""
    names, raw = mode_inputs(data, options)
    if str(options.get("input") or "test") in ("train", "val", "test"):
        n = int(options.get("n") or 64)
        names, raw = names[:n], raw[:n]
    x = Normalize(data.mean, data.std).normalize(raw.to(device))
    return names, raw, x
