"""Image folders (`<dir>/<class>/*.png|jpg`) decoded once, in parallel, and cached as uint8 tensors."""

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dlrun.data.base import Splits, missing_data

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def list_images(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Sorted class folders and every (image path, class index) under them."""
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    files = [
        (Path(entry.path), label)
        for label, cls in enumerate(classes)
        for entry in sorted(os.scandir(split_dir / cls), key=lambda e: e.name)
        if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES
    ]
    return classes, files


def _decode(path: Path, channels: int, image_size: int) -> Tensor:
    # PIL rather than torchvision.io, whose image codecs are deprecated from torchvision 0.29.
    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
        array = np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, H, W)


def _cache_key(split_dir: Path, files: list[tuple[Path, int]], channels: int, size: int) -> str:
    # Path, count, newest mtime and the decode settings: a changed folder gets a new cache file.
    newest = max((p.stat().st_mtime_ns for p, _ in files), default=0)
    text = f"v2|{split_dir.resolve()}|{len(files)}|{newest}|{channels}|{size}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def read_split(
    split_dir: Path, channels: int, image_size: int, cache_dir: Path | None, workers: int = 0
) -> tuple[Tensor, Tensor, list[str]]:
    """Decode one split into (N, C, S, S) uint8 and labels, or read the cached copy of an earlier decode."""
    classes, files = list_images(split_dir)
    if not files:
        raise missing_data(
            f"image folder {split_dir}",
            [split_dir],
            "put the images in <split>/<class>/ sub-folders",
        )
    cache = None
    if cache_dir is not None:
        cache = (
            cache_dir / f"{split_dir.name}-{_cache_key(split_dir, files, channels, image_size)}.pt"
        )
        if cache.is_file():
            saved = torch.load(cache, weights_only=True)
            return saved["x"], saved["y"], classes
    log.info("decoding %d images in %s (once: the result is cached)", len(files), split_dir)
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        images = list(pool.map(lambda f: _decode(f[0], channels, image_size), files))
    # Class folders list one class after another; a fixed shuffle makes `data.train_subset` (the
    # first N images) and the logged image grid a mix of classes, as in the official CIFAR batches.
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))
    x, y = torch.stack(images)[order], torch.tensor([label for _, label in files])[order]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save({"x": x, "y": y}, tmp)
        os.replace(tmp, cache)
    return x, y, classes


def load(
    root: Path,
    download: bool,
    *,
    folder: str | None = None,
    channels: int = 3,
    image_size: int = 32,
    cache_dir: str | None = "~/.cache/dlrun",
    workers: int = 0,
) -> Splits:
    """Any `<root>[/folder]/{train, val|test}/<class>/*` tree; `download` does not apply."""
    base = root / folder if folder else root
    test_dir = next((base / s for s in ("val", "test") if (base / s).is_dir()), None)
    if not (base / "train").is_dir() or test_dir is None:
        raise missing_data(
            f"image folder {base}",
            [base / "train", base / "val", base / "test"],
            f"arrange the images as {base}/train/<class>/* and {base}/val/<class>/* (or test/)",
        )
    cache = Path(cache_dir).expanduser() / "folders" if cache_dir else None
    tx, ty, classes = read_split(base / "train", channels, image_size, cache, workers)
    vx, vy, test_classes = read_split(test_dir, channels, image_size, cache, workers)
    if test_classes != classes:
        raise missing_data(
            f"image folder {base}",
            [test_dir],
            f"give {test_dir.name}/ the same class folders as train/ ({len(classes)} of them)",
        )
    return Splits(tx, ty, vx, vy, classes)
