"""A data set as a checkpoint describes it: what `mode=predict` on a folder, `mode=export` and
`mode=sample` need of the data (input shape, classes, normalisation), without reading it.

A run's checkpoints store `data.describe()` and the normalisation (`record`); a checkpoint from
before that is described by its config (channels, image size, classes by number). The training
images are never needed by these modes, and the data folder a checkpoint names may be gone.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from dlrun.data.transforms import per_channel
from dlrun.errors import UserError

GROUPS = ("model", "data", "loss", "optim", "sched")  # the config groups a checkpoint names


def saved(
    data: Any, batches_per_epoch: int | None, hparams: Mapping[str, Any]
) -> dict[str, Any]:
    """A checkpoint's "data" (`record`) and "choices" (the run's config groups, from its hparams)."""
    choices = {g: str(hparams[g]) for g in GROUPS if hparams.get(g) not in (None, "None")}
    return {"data": record(data, batches_per_epoch), "choices": choices}


def record(data: Any, batches_per_epoch: int | None) -> dict[str, Any]:
    """What a checkpoint keeps of its data module (plain values: checkpoints load weights_only)."""
    about = {k: _plain(v) for k, v in data.describe().items()}
    return {
        "describe": about,
        "kind": str(getattr(data, "kind", "classification")),
        "mean": _plain(getattr(data, "mean", None)),
        "std": _plain(getattr(data, "std", None)),
        "batch_size": int(getattr(data, "batch_size", 1)),
        "eval_batch_size": int(getattr(data, "eval_batch_size", 1)),
        "batches_per_epoch": batches_per_epoch,
    }


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):  # ListConfig too
        return [_plain(v) for v in value]
    return value if isinstance(value, int | float | str | bool | None) else str(value)


def from_checkpoint(state: Mapping[str, Any]) -> "DescribedData | None":
    """The stand-in for a checkpoint's data: from its stored record, else from its config where
    that says the input shape (classifiers); None where neither does (the mode reads the data)."""
    stored = state.get("data")
    if isinstance(stored, Mapping) and isinstance(stored.get("describe"), Mapping):
        return DescribedData(dict(stored))
    data = (state.get("config") or {}).get("data") or {}
    try:
        c, size, k = int(data["channels"]), int(data["image_size"]), int(data["num_classes"])
    except (KeyError, TypeError, ValueError):
        return None
    about = {
        "name": data.get("name", "data"), "input_shape": [c, size, size], "num_classes": k,
        "classes": [str(i) for i in range(k)], "sizes": {"train": 0, "val": 0, "test": 0},
        "val_is_test": True,
    }  # fmt: skip
    return DescribedData({
        "describe": about, "kind": "classification", "mean": data.get("mean"),
        "std": data.get("std"), "batch_size": int(data.get("batch_size") or 1),
        "eval_batch_size": int(data.get("eval_batch_size") or 1), "batches_per_epoch": None,
    })  # fmt: skip


class _NoBatches:
    """A loader of the stand-in: its length plans the schedule, iterating it is a mistake."""

    def __init__(self, n: int, split: str) -> None:
        self.n, self.split = max(int(n), 1), split

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        raise UserError(
            f"This mode runs without the data set (the checkpoint describes it), so it has no "
            f"{self.split} images; give the mode a folder of images, or a split with data.root."
        )


class DescribedData:
    """The data module protocol (dlrun.data.module) over a checkpoint's description: shapes,
    classes and normalisation; `example_batch` gives seeded noise images (what export checks the
    exported file on), the loaders have a length and no batches."""

    offers: Mapping[str, Any] = {}
    synthetic = True  # its example images are noise: what a mode checks on them says so

    def __init__(self, stored: Mapping[str, Any]) -> None:
        self.about = dict(stored["describe"])
        self.name = str(self.about.get("name", "data"))
        self.kind = str(stored.get("kind") or "classification")
        self.batch_size = int(stored.get("batch_size") or 1)
        self.eval_batch_size = int(stored.get("eval_batch_size") or 1)
        self.batches_per_epoch = stored.get("batches_per_epoch") or 1
        c = int(self.about["input_shape"][0])
        self.mean = per_channel(stored.get("mean"), c, 0.0)
        self.std = per_channel(stored.get("std"), c, 1.0)
        self.offers = {"normalization": self}
        self.device = torch.device("cpu")

    def setup(
        self, device: torch.device, seed: int, rank: int = 0, world_size: int | None = None
    ) -> None:
        self.device, self.seed = device, seed

    def generators(self) -> dict[str, torch.Generator]:
        return {"order": torch.Generator(device=self.device).manual_seed(self.seed)}

    def train_loader(self, **kwargs: Any) -> _NoBatches:
        return _NoBatches(self.batches_per_epoch, "train")

    def val_loader(self) -> _NoBatches:
        return _NoBatches(1, "val")

    def test_loader(self) -> _NoBatches:
        return _NoBatches(1, "test")

    def example_batch(
        self,
        n: int = 1,
        split: str = "val",
        *,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
    ) -> dict[str, Tensor]:
        """`n` uniform noise images (seeded: the same on every call), normalised as asked."""
        c, h, w = (int(s) for s in self.about["input_shape"])
        pixels = torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(0))
        m = torch.tensor(per_channel(self.mean if mean is None else mean, c, 0.0))
        s = torch.tensor(per_channel(self.std if std is None else std, c, 1.0))
        image = (pixels - m.view(1, c, 1, 1)) / s.view(1, c, 1, 1)
        return {"image": image.to(self.device)}

    def describe(self) -> dict[str, Any]:
        return dict(self.about)

