"""CIFAR-10 from torchvision's `cifar-10-batches-py` pickles or from a `cifar10/{train,test}/<class>/` PNG tree."""

import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
from torchvision import datasets

from dlrun.data import folder
from dlrun.data.base import Splits, missing_data

BATCHES = "cifar-10-batches-py"


def _read_batches(base: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for name in names:
        with open(base / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _read_pickles(base: Path) -> Splits:
    tx, ty = _read_batches(base, [f"data_batch_{i}" for i in range(1, 6)])
    vx, vy = _read_batches(base, ["test_batch"])
    with open(base / "batches.meta", "rb") as f:
        classes = pickle.load(f, encoding="latin1")["label_names"]
    return Splits(tx, ty, vx, vy, list(classes))


def load(
    root: Path, download: bool, *, cache_dir: str | None = "~/.cache/dlrun", workers: int = 0
) -> Splits:
    """Official pickles if present, else the PNG folder layout, else torchvision's download."""
    if (root / BATCHES / "test_batch").is_file():
        return _read_pickles(root / BATCHES)
    if (root / "cifar10" / "train").is_dir():
        return folder.load(
            root,
            False,
            folder="cifar10",
            channels=3,
            image_size=32,
            cache_dir=cache_dir,
            workers=workers,
        )
    looked = [root / BATCHES, root / "cifar10" / "train"]
    fix = (
        'download it on a machine with a network (python -c "import torchvision; '
        "torchvision.datasets.CIFAR10('data', download=True)\") and copy data/cifar-10-batches-py/ "
        f"to {root / BATCHES}/, or copy an image-folder copy to {root / 'cifar10'}/{{train,test}}/<class>/"
    )
    if not download:
        raise missing_data("CIFAR-10", looked, fix)
    try:
        datasets.CIFAR10(str(root), train=True, download=True)
    except (RuntimeError, URLError, OSError) as err:
        raise missing_data("CIFAR-10", looked, fix, str(err).strip().splitlines()[0]) from err
    return _read_pickles(root / BATCHES)
