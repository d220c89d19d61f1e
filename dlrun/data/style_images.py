"""Style transfer's data: one content image and one style image (`style.content`, `style.style`).

Both are decoded once (RGB, the longer side resized to `image_size`, aspect kept) and served as
the same batch {"content": (1, 3, H, W), "style": (1, 3, H', W')} in [0, 1], `steps_per_epoch`
times an epoch: an epoch is a stretch of optimisation steps between evaluations and checkpoints.
Without paths, a fixed horse and a fixed zebra of horse2zebra's test folders (under data.root).
"""

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dlrun.data.module import DeviceGenerators
from dlrun.errors import UserError

log = logging.getLogger(__name__)


def load_image(path: Path, size: int, key: str) -> Tensor:
    """uint8 (3, H, W), the longer side `size` (bicubic), or a UserError naming `key` and why."""
    if not path.is_file():
        raise UserError(f"{key}={path}: there is no such file; pass the path of an image file.")
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")  # greyscale, palette and CMYK files as RGB
            w, h = img.size
            scale = size / max(w, h)
            shape = (max(1, round(w * scale)), max(1, round(h * scale)))
            array = np.asarray(img.resize(shape, Image.Resampling.BICUBIC), dtype=np.uint8)
    except Exception as err:  # any PIL failure: empty, truncated, not an image
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(
            f"{key}={path} could not be decoded as an image ({type(err).__name__}"
            f"{': ' + reason if reason else ''}); pass a PNG or JPEG file."
        ) from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class RepeatLoader:
    """The same batch `steps` times (a loader as trainers see one: len, iterate, position)."""

    def __init__(self, batch: dict[str, Tensor], steps: int) -> None:
        self.batch, self.steps, self._batch = batch, steps, 0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self.iterate()

    def iterate(self, resume: Mapping[str, Any] | None = None) -> Iterator[dict[str, Tensor]]:
        self._batch = int(resume["batch"]) if resume else 0
        return self._batches()

    def _batches(self) -> Iterator[dict[str, Tensor]]:
        while self._batch < self.steps:
            self._batch += 1  # before the yield, as TensorLoader: held means done
            yield self.batch

    def position(self) -> dict[str, Any]:
        return {"batch": self._batch, "order": None, "aug": None}


class StyleImages(DeviceGenerators):
    """A `DataModule` of one (content, style) pair. Nothing is random: the generators only exist
    because every data module's are saved in checkpoints."""

    kind = "style"

    def __init__(
        self,
        *,
        name: str = "style_images",
        content: str | None = None,
        style: str | None = None,
        root: str = "data",
        default_content: str = "horse2zebra/testA/n02381460_1300.jpg",
        default_style: str = "horse2zebra/testB/n02391049_2760.jpg",
        image_size: int = 192,
        steps_per_epoch: int = 5,
        batch_size: int = 1,
        eval_batch_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        if steps_per_epoch < 1 or batch_size != 1:
            raise UserError(
                "style.steps_per_epoch must be a positive integer and data.batch_size 1 (one "
                f"image is optimised), got {steps_per_epoch} and {batch_size}."
            )
        self.name, self.batch_size, self.eval_batch_size = name, 1, 1
        self.steps_per_epoch, self.image_size = steps_per_epoch, image_size
        base = Path(root).expanduser()
        paths = {"content": content, "style": style}
        defaults = {"content": base / default_content, "style": base / default_style}
        missing = [k for k, v in paths.items() if not v and not defaults[k].is_file()]
        if missing:
            raise UserError(
                f"style.{' and style.'.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                f"set, and the default pair (a horse and a zebra of horse2zebra) is not under "
                f"{base}/horse2zebra/{{testA,testB}}: pass style.content=IMAGE style.style=IMAGE "
                "(any image files), or point data.root (DLRUN_DATA) at a folder that holds "
                "horse2zebra/."
            )
        self.paths = {k: Path(v).expanduser() if v else defaults[k] for k, v in paths.items()}
        self.images = {k: load_image(p, image_size, f"style.{k}") for k, p in self.paths.items()}
        log.info(
            "style transfer: content %s (%dx%d), style %s (%dx%d)",
            self.paths["content"],
            *self.images["content"].shape[1:],
            self.paths["style"],
            *self.images["style"].shape[1:],
        )

    # ----- DataModule ---------------------------------------------------------------------------
    def setup(
        self, device: torch.device, seed: int, rank: int = 0, world_size: int | None = None
    ) -> None:
        self.x = {
            k: (v.float() / 255)[None].contiguous().to(device) for k, v in self.images.items()
        }
        self.seed_generators(device, seed, rank, 1)

    def train_loader(
        self,
        *,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        crop: bool = True,
    ) -> RepeatLoader:
        return RepeatLoader(dict(self.x), self.steps_per_epoch)

    def val_loader(self) -> RepeatLoader:
        return RepeatLoader(dict(self.x), 1)

    def test_loader(self) -> RepeatLoader:
        return RepeatLoader(dict(self.x), 1)

    def example_batch(
        self,
        n: int = 1,
        split: str = "val",
        *,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
    ) -> dict[str, Tensor]:
        return dict(self.x)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": tuple(self.images["content"].shape),
            "num_classes": 0,
            "classes": [],
            "sizes": {"train": 1, "val": 1, "test": 1},
            "val_is_test": False,
        }
