"""Region proposals by selective search (Uijlings et al. 2013), for `model=rcnn` and `fast_rcnn`.

OpenCV's contrib module (`ximgproc`, the `proposals` extra: `pip install 'dlrun[proposals]'`) is a
maintained implementation. The scenes are small (64 px) and grey: selective search runs on the
image enlarged `upscale` times (at 1x its graph segmentation merges a digit with its neighbours;
at 2x, fast mode finds ~30 boxes a scene, 93% of the digits at IoU >= 0.5, in ~30 ms). Proposals
are computed once per split, as the R-CNN paper caches them, in worker processes, and stored on
disk keyed by the images and the settings, so a second run (or Fast R-CNN after R-CNN) reads them.
"""

import hashlib
import logging
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dlrun.errors import UserError

log = logging.getLogger(__name__)
STRATEGIES = ("fast", "quality", "single")
CHUNK = 64  # images a worker takes at a time


def _cv2() -> Any:
    try:
        import cv2

        cv2.ximgproc.segmentation.createSelectiveSearchSegmentation  # noqa: B018
    except (ImportError, AttributeError):
        raise UserError(
            "Selective search needs OpenCV's contrib module: pip install 'dlrun[proposals]' "
            "(opencv-contrib-python-headless)."
        ) from None
    return cv2


def _search(images: np.ndarray, upscale: int, max_boxes: int, strategy: str) -> list[np.ndarray]:
    """xyxy boxes (P, 4) of each uint8 (N, H, W, 3) image, in its own pixels, best ranked first."""
    cv2 = _cv2()
    cv2.setNumThreads(1)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    out = []
    for image in images:
        if upscale > 1:
            image = cv2.resize(image, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_LINEAR)
        ss.setBaseImage(image)
        if strategy == "fast":
            ss.switchToSelectiveSearchFast()
        elif strategy == "quality":
            ss.switchToSelectiveSearchQuality()
        else:
            ss.switchToSingleStrategy()
        xywh = ss.process()[:max_boxes].astype(np.float32).reshape(-1, 4) / upscale
        out.append(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1))
    return out


def selective_search(
    images: Tensor,
    *,
    upscale: int = 2,
    max_boxes: int = 300,
    strategy: str = "fast",
    tick: Callable[[int], None] | None = None,
) -> Tensor:
    """Proposals of uint8 images (N, C, H, W): float (N, P, 4) xyxy pixels on the images' device,
    P the most any image has (<= max_boxes), unused rows -1 (`valid(proposals)` marks the rest)."""
    if strategy not in STRATEGIES:
        raise UserError(f"proposals strategy must be one of {', '.join(STRATEGIES)}, got {strategy}.")
    if upscale < 1 or max_boxes < 1:
        raise UserError(f"proposals need upscale >= 1 and max_boxes >= 1, got {upscale}, {max_boxes}.")
    _cv2()
    rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]
    arrays = np.ascontiguousarray(rgb.permute(0, 2, 3, 1).cpu().numpy())
    chunks = [arrays[i : i + CHUNK] for i in range(0, len(arrays), CHUNK)]
    workers = min(len(os.sched_getaffinity(0)), len(chunks))
    boxes: list[np.ndarray] = []
    args = (upscale, max_boxes, strategy)
    if workers <= 1:
        for chunk in chunks:
            boxes += _search(chunk, *args)
            if tick is not None:
                tick(len(chunk))
    else:  # worker processes: OpenCV's search is single-threaded Python-side per image
        repeated = ([a] * len(chunks) for a in args)
        # fork: the workers run OpenCV and numpy only (no torch, whose thread pool a fork does not
        # carry), and fork, unlike spawn, does not re-run a calling script that has no main guard.
        fork = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=fork) as pool:
            for chunk, found in zip(chunks, pool.map(_search, chunks, *repeated), strict=True):
                boxes += found
                if tick is not None:
                    tick(len(chunk))
    p = max([len(b) for b in boxes] + [1])
    out = torch.full((len(boxes), p, 4), -1.0)
    for i, b in enumerate(boxes):
        out[i, : len(b)] = torch.from_numpy(b)
    return out.to(images.device)


def valid(proposals: Tensor) -> Tensor:
    """(N, P) which rows of padded proposals are boxes."""
    return proposals[..., 2] > proposals[..., 0]


def cached(
    images: Tensor,
    cache: Path | None,
    tick: Callable[[int], None] | None = None,
    **settings: Any,
) -> Tensor:
    """selective_search(images, **settings), read from / written to `cache` (a folder)."""
    if cache is None:
        return selective_search(images, tick=tick, **settings)
    key = hashlib.sha1(images.cpu().numpy().tobytes())
    key.update(repr(sorted(settings.items())).encode())
    path = cache / f"proposals-{key.hexdigest()[:16]}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True).to(images.device)
    out = selective_search(images, tick=tick, **settings)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(out.cpu(), tmp)
        tmp.replace(path)  # atomic: a parallel sweep's trial never reads half a file
    except OSError as e:  # a read-only data root: computed again next time
        log.warning("could not cache proposals in %s (%s)", cache, e)
    return out
