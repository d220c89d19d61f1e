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

from dlrun.data.in_memory import Splits, missing_data
from dlrun.engine.progress import Heartbeat
from dlrun.errors import UserError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# data.bad_images: an image file that cannot be decoded stops the run, or is left out.
BAD_IMAGE_POLICIES = ("error", "skip")
SHOWN_FAILURES = 5  # how many undecodable files a message names
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def list_images(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Sorted class folders and every (image path, class index) under them."""
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    files: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):  # names as strings first: a Path per file only once
        folder = os.path.join(split_dir, cls)  # (CIFAR-10's 50,000: 0.47 s instead of 0.6-0.8)
        names = sorted(n for n in os.listdir(folder) if os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES)
        files += [(Path(folder, n), label) for n in names]
    return classes, files


def _decode(path: Path, channels: int, image_size: int, resample: str = "bilinear") -> Tensor:
    # PIL rather than torchvision.io, whose image codecs are deprecated from torchvision 0.29.
    # convert() also turns the odd greyscale (or palette, CMYK) file into RGB.
    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), RESAMPLE[resample])
        array = np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, H, W)


decode = _decode  # public: output modes (mode_inputs) decode their input images the same way


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:  # a dangling link: it fails to decode, and is reported, later
        return 0


def _cache_key(
    split_dir: Path,
    files: list[tuple[Path, int]],
    channels: int,
    size: int,
    bad_images: str = "error",
    resample: str = "bilinear",
) -> str:
    # Path, count, newest mtime, the decode settings and the bad-image policy: a changed folder
    # gets a new cache file, and a cache that left bad images out is not used under `error`.
    newest = max((_mtime(p) for p, _ in files), default=0)
    text = f"v3|{split_dir.resolve()}|{len(files)}|{newest}|{channels}|{size}|{bad_images}"
    if resample != "bilinear":  # the keys of caches written before resampling was a choice stay
        text += f"|{resample}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _try_decode(
    path: Path, channels: int, image_size: int, resample: str = "bilinear"
) -> Tensor | str:
    """The decoded image, or why it could not be decoded (one line)."""
    try:
        return _decode(path, channels, image_size, resample)
    except Exception as err:  # any failure of PIL on an image file: empty, truncated, not an image
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"{type(err).__name__}: {reason}" if reason else type(err).__name__


def _check_policy(bad_images: str) -> None:
    if bad_images not in BAD_IMAGE_POLICIES:
        raise UserError(
            f"data.bad_images={bad_images!r} is not a policy; use one of: "
            f"{', '.join(BAD_IMAGE_POLICIES)}."
        )


def _list_failures(failed: list[tuple[Path, str]]) -> str:
    shown = "; ".join(f"{path} ({reason})" for path, reason in failed[:SHOWN_FAILURES])
    more = len(failed) - SHOWN_FAILURES
    return shown + (f"; and {more} more" if more > 0 else "")


def read_split(
    split_dir: Path,
    channels: int,
    image_size: int,
    cache_dir: Path | None,
    workers: int = 0,
    bad_images: str = "error",
) -> tuple[Tensor, Tensor, list[str]]:
    """Decode one split into (N, C, S, S) uint8 and labels, or read the cached copy of an earlier decode.

    An image file that cannot be decoded stops the run (`bad_images="error"`), or is left out
    with its label and a warning (`"skip"`); a split with no good image is an error either way.
    """
    _check_policy(bad_images)
    classes, files = list_images(split_dir)
    if not files:
        raise missing_data(
            f"image folder {split_dir}",
            [split_dir],
            "put the images in <split>/<class>/ sub-folders",
        )
    # Class folders list one class after another; a fixed shuffle makes `data.train_subset` (the
    # first N images) and the logged image grid a mix of classes, as in the official CIFAR batches.
    x, y = decode_files(
        split_dir, files, channels, image_size, cache_dir, workers, bad_images, shuffle=True
    )
    return x, y, classes


def read_flat(
    folder: Path,
    channels: int,
    image_size: int,
    cache_dir: Path | None,
    workers: int = 0,
    bad_images: str = "error",
    resample: str = "bilinear",
) -> Tensor:
    """Every image directly in `folder`, in file-name order, as (N, C, S, S) uint8 (cached)."""
    _check_policy(bad_images)
    files = (
        [
            (Path(e.path), 0)
            for e in sorted(os.scandir(folder), key=lambda e: e.name)
            if Path(e.name).suffix.lower() in IMAGE_SUFFIXES
        ]
        if folder.is_dir()
        else []
    )
    if not files:
        raise UserError(f"{folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    x, _ = decode_files(
        folder, files, channels, image_size, cache_dir, workers, bad_images, resample=resample
    )
    return x


def decode_files(
    split_dir: Path,
    files: list[tuple[Path, int]],
    channels: int,
    image_size: int,
    cache_dir: Path | None,
    workers: int = 0,
    bad_images: str = "error",
    *,
    shuffle: bool = False,
    resample: str = "bilinear",
) -> tuple[Tensor, Tensor]:
    """Decode (path, label) pairs into (N, C, S, S) uint8 and labels, or read the cache of an
    earlier decode of the same files; `shuffle`: a fixed permutation (seed 0) of the result."""
    cache = None
    if cache_dir is not None:
        key = _cache_key(split_dir, files, channels, image_size, bad_images, resample)
        cache = cache_dir / f"{split_dir.name}-{key}.pt"
        if cache.is_file():
            try:
                saved = torch.load(cache, weights_only=True)
                x, y = saved["x"], saved["y"]
                if (
                    x.dtype == torch.uint8
                    and x.shape[1:] == (channels, image_size, image_size)
                    and len(x) == len(y)
                ):
                    return x, y
            except Exception as err:  # a damaged cache file is decoded again, not trusted
                log.warning("ignoring the damaged cache file %s (%s): decoding again", cache, err)
            else:
                log.warning("ignoring the cache file %s, which does not fit: decoding again", cache)
    log.info("decoding %d images in %s (once: the result is cached)", len(files), split_dir)
    beat = Heartbeat(f"decoding {split_dir}", len(files), unit="images")  # progress.py
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        decoded = pool.map(lambda f: _try_decode(f[0], channels, image_size, resample), files)
        results = list(beat.wrap(decoded))
    failed = [(path, r) for (path, _), r in zip(files, results, strict=True) if isinstance(r, str)]
    if failed:
        if bad_images == "error":
            raise UserError(
                f"{len(failed)} of the {len(files)} image files in {split_dir} could not be "
                f"decoded: {_list_failures(failed)}. To fix it: repair or delete those files, or "
                "set data.bad_images=skip to leave them out (with their labels)."
            )
        if len(failed) == len(files):
            raise UserError(
                f"None of the {len(files)} image files in {split_dir} could be decoded, so "
                f"data.bad_images=skip leaves nothing to train on: {_list_failures(failed)}. "
                "To fix it: replace them with readable images."
            )
        log.warning(
            "data.bad_images=skip: leaving out %d of the %d image files in %s (and their labels), "
            "which could not be decoded: %s",
            len(failed),
            len(files),
            split_dir,
            _list_failures(failed),
        )
    kept = [
        (r, label) for (_, label), r in zip(files, results, strict=True) if not isinstance(r, str)
    ]
    x = torch.stack([image for image, _ in kept])
    y = torch.tensor([label for _, label in kept])
    if shuffle:
        order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(0))
        x, y = x[order], y[order]
    if cache is not None:  # only a complete decode (every image, or every good one when skipping)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"x": x, "y": y}, tmp)
            os.replace(tmp, cache)
        except OSError as err:  # the cache only saves time: go on without it
            log.warning(
                "could not write the decode cache %s (%s); continuing without it", cache, err
            )
            tmp.unlink(missing_ok=True)
    return x, y


def load(
    root: Path,
    download: bool,
    *,
    folder: str | None = None,
    channels: int = 3,
    image_size: int = 32,
    cache_dir: str | None = "~/.cache/dlrun",
    workers: int = 0,
    bad_images: str = "error",
) -> Splits:
    """Any `<root>[/folder]/{train, val|test}/<class>/*` tree; `download` does not apply.

    `bad_images`: what an image file that cannot be decoded does, "error" (stop, naming the
    files) or "skip" (leave it out, with a warning).
    """
    _check_policy(bad_images)
    base = root / folder if folder else root
    test_dir = next((base / s for s in ("val", "test") if (base / s).is_dir()), None)
    if not (base / "train").is_dir() or test_dir is None:
        raise missing_data(
            f"image folder {base}",
            [base / "train", base / "val", base / "test"],
            f"arrange the images as {base}/train/<class>/* and {base}/val/<class>/* (or test/)",
        )
    cache = Path(cache_dir).expanduser() / "folders" if cache_dir else None
    tx, ty, classes = read_split(base / "train", channels, image_size, cache, workers, bad_images)
    vx, vy, test_classes = read_split(test_dir, channels, image_size, cache, workers, bad_images)
    if test_classes != classes:
        raise missing_data(
            f"image folder {base}",
            [test_dir],
            f"give {test_dir.name}/ the same class folders as train/ ({len(classes)} of them)",
        )
    return Splits(tx, ty, vx, vy, classes)
