"""MNIST and Fashion-MNIST through torchvision's data sets (its `<root>/<Name>/raw/` IDX layout)."""

import math
import struct
from pathlib import Path

from torchvision import datasets
from torchvision.datasets.utils import download_and_extract_archive

from dlrun.data.download import (
    STAGING,
    copy_advice,
    download_tip,
    failure_reason,
    new_folders_removed_on_failure,
)
from dlrun.data.in_memory import Splits, missing_data
from dlrun.errors import UserError

_CLASSES = {"MNIST": datasets.MNIST, "FashionMNIST": datasets.FashionMNIST}
# The four raw IDX files and the number of dimensions each holds (images N x 28 x 28, labels N).
IDX_FILES = {
    "train-images-idx3-ubyte": 3,
    "train-labels-idx1-ubyte": 1,
    "t10k-images-idx3-ubyte": 3,
    "t10k-labels-idx1-ubyte": 1,
}


def _fix(name: str, root: Path, download: bool) -> str:
    fetch = (
        f"python -c \"import torchvision; torchvision.datasets.{name}('{STAGING}', download=True)\""
    )
    return copy_advice(fetch, f"{name}/raw", root / name / "raw") + download_tip(download)


def _bad_file(path: Path, problem: str) -> UserError:
    return UserError(
        f"The data file {path} is damaged: {problem}. Re-download it: delete it and run with "
        "data.download=true on a machine with a network, or copy it again from a good copy."
    )


def check_idx(path: Path, ndim: int) -> tuple[int, ...]:
    """Check an uncompressed uint8 IDX file's header against its size; return its dimensions."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4:
            raise _bad_file(path, f"it is {size} bytes, too short for an IDX header")
        if head[:3] != b"\x00\x00\x08" or head[3] != ndim:
            raise _bad_file(
                path,
                f"it does not start with the IDX magic number of a uint8 array of {ndim} "
                f"dimension{'s' if ndim > 1 else ''} (00 00 08 0{ndim}) but with {head.hex(' ')}; "
                "it is not an uncompressed MNIST IDX file",
            )
        raw_dims = f.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise _bad_file(
            path, f"it is {size} bytes, too short for its header ({4 + 4 * ndim} bytes)"
        )
    dims = struct.unpack(f">{ndim}I", raw_dims)
    expected = 4 + 4 * ndim + math.prod(dims)
    if size != expected:
        shape = "x".join(str(d) for d in dims)
        what = "truncated" if size < expected else "longer than its header says"
        raise _bad_file(
            path,
            f"it is {size} bytes but its header ({shape} values) says {expected} bytes, so it is "
            f"{what}",
        )
    return dims


def check_raw_files(raw: Path, name: str) -> list[str]:
    """Check every IDX file present in `raw`; return the names of the missing ones."""
    missing, dims = [], {}
    for file, ndim in IDX_FILES.items():
        path = raw / file
        if path.is_file():
            dims[file] = check_idx(path, ndim)
        else:
            missing.append(file)
    for prefix in ("train", "t10k"):
        images, labels = (
            dims.get(f"{prefix}-images-idx3-ubyte"),
            dims.get(f"{prefix}-labels-idx1-ubyte"),
        )
        if images and images[1:] != (28, 28):
            raise _bad_file(
                raw / f"{prefix}-images-idx3-ubyte",
                f"it holds {images[1]}x{images[2]} images, not the 28x28 of {name}",
            )
        if images and labels and images[0] != labels[0]:
            raise _bad_file(
                raw / f"{prefix}-labels-idx1-ubyte",
                f"it holds {labels[0]} labels but {prefix}-images-idx3-ubyte holds {images[0]} "
                "images (one of the two is from another copy)",
            )
    return missing


def _download(name: str, root: Path, missing: list[str]) -> None:
    """The missing files from torchvision's mirrors, one after the other, as its own download
    does, but keeping each failure (torchvision's one RuntimeError flattens them into text)."""
    cls, raw = _CLASSES[name], root / name / "raw"
    with new_folders_removed_on_failure(raw):
        for filename, md5 in cls.resources:
            if filename.removesuffix(".gz") not in missing:
                continue
            tried: list[tuple[str, BaseException]] = []
            for mirror in cls.mirrors:
                try:
                    download_and_extract_archive(
                        f"{mirror}{filename}", str(raw), filename=filename, md5=md5
                    )
                    break
                except (RuntimeError, OSError) as err:  # URLError is an OSError
                    tried.append((f"{mirror}{filename}", err))
            else:
                raise missing_data(
                    name, [raw], _fix(name, root, True), failure_reason(tried)
                ) from tried[-1][1]


def load(root: Path, download: bool, *, name: str = "MNIST") -> Splits:
    """Read the IDX files (downloading the missing ones first when allowed) into uint8 (N, 1, 28, 28)."""
    cls = _CLASSES[name]
    raw = root / name / "raw"
    legacy = root / name / "processed"  # torchvision's old cache, which it reads instead of raw/
    if not ((legacy / "training.pt").is_file() and (legacy / "test.pt").is_file()):
        missing = check_raw_files(raw, name)
        if missing and not download:
            looked = [raw / file for file in missing] if len(missing) < len(IDX_FILES) else [raw]
            raise missing_data(name, looked, _fix(name, root, download))
        if missing:
            _download(name, root, missing)
            check_raw_files(raw, name)  # what was just downloaded gets the same checks
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except (RuntimeError, OSError) as err:
        raise missing_data(name, [raw], _fix(name, root, download)) from err
    return Splits(
        train.data[:, None], train.targets, test.data[:, None], test.targets, list(train.classes)
    )
