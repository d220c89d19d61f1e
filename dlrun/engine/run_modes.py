"""A task's modes (`mode=train|eval|sample|...`): the CLI dispatches, the trainer offers them
(`Trainer.run_mode`, `mode_<name>`); the pieces they share are here.

Contract for every mode but `train`: it needs `ckpt=PATH` (its weights are loaded into the
task's model before the run folder is written), reads its options from the config node of the
same name (`sample.n`, later `translate.input`, `predict.input`), and writes what it produces
under `<run>/<mode>/`. A task adds a mode by listing it in `modes` and defining `mode_<name>`.
"""

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from dlrun.data.folder import IMAGE_SUFFIXES
from dlrun.data.folder import decode as decode_image
from dlrun.data.transforms import Normalize
from dlrun.errors import UserError

log = logging.getLogger("dlrun")


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
    warn_unlike(files, channels, size)
    images = torch.stack([decode_image(p, channels, size, resample) for p in files])
    return [p.stem for p in files], images


GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes of one channel (LA: plus alpha)
_LISTED = 3  # files a warning names before "and N more"


def warn_unlike(files: Sequence[Path], channels: int, size: int) -> list[str]:
    """One warning for input images unlike the model's training images (colour for a grey
    model, grey for a colour one, another size), saying what is done to them; returns the
    files it names. Reads only the files' headers."""
    unlike, done = [], set()
    for path in files:
        with Image.open(path) as img:
            grey, (w, h) = img.mode in GREY_MODES, img.size
        why = []
        if grey != (channels == 1):
            why.append("colour" if not grey else "grey")
            done.add("converted to grey" if channels == 1 else "grey copied to 3 channels")
        if (w, h) != (size, size):
            why.append(f"{w}x{h}")
            done.add(f"resized to {size}x{size}" + ("" if w == h else ", aspect ratio not kept"))
        if why:
            unlike.append(f"{path.name} ({', '.join(why)})")
    if unlike:
        more = f" and {len(unlike) - _LISTED} more" if len(unlike) > _LISTED else ""
        kind = "grey" if channels == 1 else "colour"
        log.warning(
            "%d of %d input images differ from the %s %dx%d images the model was trained on: "
            "%s%s; they were %s. Predictions on such images may mean little.",
            len(unlike), len(files), kind, size, size, ", ".join(unlike[:_LISTED]), more,
            " and ".join(sorted(done)),
        )  # fmt: skip
    return unlike


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
