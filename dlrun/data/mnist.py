"""MNIST and Fashion-MNIST through torchvision's data sets (its `<root>/<Name>/raw/` IDX layout)."""

from pathlib import Path
from urllib.error import URLError

from torchvision import datasets

from dlrun.data.base import Splits, missing_data

_CLASSES = {"MNIST": datasets.MNIST, "FashionMNIST": datasets.FashionMNIST}


def load(root: Path, download: bool, *, name: str = "MNIST") -> Splits:
    """Read the IDX files (downloading them first when allowed) into uint8 (N, 1, 28, 28)."""
    cls = _CLASSES[name]
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except (RuntimeError, URLError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if download else ""
        fix = (
            f'download it on a machine with a network (python -c "import torchvision; '
            f"torchvision.datasets.{name}('data', download=True)\") and copy data/{name}/raw/ "
            f"to {root / name / 'raw'}/, or set data.download=true on a machine with a network"
        )
        raise missing_data(name, [root / name / "raw"], fix, reason) from err
    return Splits(
        train.data[:, None], train.targets, test.data[:, None], test.targets, list(train.classes)
    )
