"""CIFAR-10 from torchvision's `cifar-10-batches-py` pickles or from a `cifar10/{train,test}/<class>/` PNG tree."""

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import datasets
from torchvision.datasets.utils import download_url

from dlrun.data import folder
from dlrun.data.archive import safe_extract
from dlrun.data.download import (
    STAGING,
    copy_advice,
    download_tip,
    failure_reason,
    new_folders_removed_on_failure,
)
from dlrun.data.in_memory import Splits, missing_data
from dlrun.errors import UserError

try:  # numpy 2
    from numpy._core.multiarray import _reconstruct, scalar
    from numpy._core.numeric import _frombuffer
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct, scalar
    from numpy.core.numeric import _frombuffer

BATCHES = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
PIXELS = 3 * 32 * 32

# Everything a CIFAR-10 python batch may ask the unpickler for: numpy array and dtype
# reconstruction (under numpy 1's and numpy 2's module names, pickle protocols 2 to 5), numpy
# scalars, and the bytes encoding of Python 3's protocol 2. Nothing here can run a command.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    ("codecs", "encode"): codecs.encode,
}
for _module in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_module}.multiarray", "_reconstruct")] = _reconstruct
    _ALLOWED[(f"{_module}.multiarray", "scalar")] = scalar
    _ALLOWED[(f"{_module}.numeric", "_frombuffer")] = _frombuffer


class _Refused(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild numpy arrays, lists, dicts, strings and numbers."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


def _redownload(path: Path) -> str:
    return (
        f"Delete {path.parent}/ and download CIFAR-10 again (run with data.download=true on a "
        "machine with a network, or copy cifar-10-batches-py/ again from a good copy)."
    )


def _unpickle(path: Path) -> Any:
    """One CIFAR pickle, read with `_BatchUnpickler`: a file that asks for more is refused."""
    try:
        with open(path, "rb") as f:
            return _BatchUnpickler(f, encoding="latin1").load()
    except FileNotFoundError as err:
        raise missing_data(
            "CIFAR-10",
            [path],
            f"copy the whole of cifar-10-batches-py/ again ({path.name} is missing)",
        ) from err
    except _Refused as err:
        raise UserError(
            f"Refused to load {path}: it asks to run {err.what}, which a CIFAR-10 batch never "
            f"does. The file is not a genuine CIFAR-10 batch (it may be malicious). {_redownload(path)}"
        ) from err
    except Exception as err:  # any failure to decode the file means it is damaged
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"Could not read the CIFAR-10 file {path} ({type(err).__name__}: {reason}): it is "
            f"truncated or corrupt. {_redownload(path)}"
        ) from err


def _bad_batch(path: Path, problem: str) -> UserError:
    return UserError(
        f"The CIFAR-10 file {path} is not a valid batch: {problem}. {_redownload(path)}"
    )


def _read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    entry = _unpickle(path)
    if not isinstance(entry, dict) or "data" not in entry:
        raise _bad_batch(path, "it holds no 'data' entry")
    labels = entry.get("labels", entry.get("fine_labels"))
    if labels is None:
        raise _bad_batch(path, "it holds no 'labels' entry")
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != PIXELS:
        shape = data.shape if isinstance(data, np.ndarray) else type(data).__name__
        raise _bad_batch(path, f"'data' is {shape}, not an array of rows of {PIXELS} pixels")
    if data.dtype.kind not in "ui" or (data.size and (data.min() < 0 or data.max() > 255)):
        raise _bad_batch(path, f"'data' holds {data.dtype} values, not bytes 0..255")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as err:
        raise _bad_batch(path, f"'labels' is not a list of integers ({err})") from err
    if y.ndim != 1 or len(y) != len(data):
        raise _bad_batch(path, f"it holds {len(data)} images but {y.size} labels")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise _bad_batch(
            path, f"its labels run from {y.min()} to {y.max()}, not 0..{num_classes - 1}"
        )
    return data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32), y


def _read_batches(
    base: Path, names: list[str], num_classes: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(_read_batch(base / name, num_classes) for name in names), strict=True)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _read_meta(base: Path) -> list[str]:
    path = base / "batches.meta"
    meta = _unpickle(path)
    names = meta.get("label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise _bad_batch(path, "it holds no 'label_names' list of class names")
    return names


def _read_pickles(base: Path) -> Splits:
    classes = _read_meta(base)
    tx, ty = _read_batches(base, TRAIN_BATCHES, len(classes))
    vx, vy = _read_batches(base, ["test_batch"], len(classes))
    return Splits(tx, ty, vx, vy, classes)


def _download(root: Path) -> None:
    """torchvision's CIFAR-10 archive (md5-checked by `download_url`), extracted by `safe_extract`."""
    cls = datasets.CIFAR10
    download_url(cls.url, str(root), cls.filename, cls.tgz_md5)
    safe_extract(root / cls.filename, root)


def load(
    root: Path,
    download: bool,
    *,
    cache_dir: str | None = "~/.cache/dlrun",
    workers: int = 0,
    bad_images: str = "error",
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
            bad_images=bad_images,
        )
    looked = [root / BATCHES, root / "cifar10" / "train"]
    fetch = f"python -c \"import torchvision; torchvision.datasets.CIFAR10('{STAGING}', download=True)\""
    fix = (
        f"{copy_advice(fetch, BATCHES, root / BATCHES)}, or copy an image-folder copy to "
        f"{root / 'cifar10'}/{{train,test}}/<class>/{download_tip(download)}"
    )
    if not download:
        raise missing_data("CIFAR-10", looked, fix)
    try:
        with new_folders_removed_on_failure(root):
            _download(root)
    except (RuntimeError, OSError) as err:  # URLError is an OSError
        reason = failure_reason([(datasets.CIFAR10.url, err)])
        raise missing_data("CIFAR-10", looked, fix, reason) from err
    if not (root / BATCHES / "test_batch").is_file():
        raise missing_data(
            "CIFAR-10", looked, fix, f"{datasets.CIFAR10.filename} holds no {BATCHES}/test_batch"
        )
    return _read_pickles(root / BATCHES)
