"""mode=translate on a generator saved by the CycleGAN authors' code (`latest_net_G.pth`): the
data stand-in of a folder input, and the file's weights into G_A.

`dlrun.config.from_checkpoint` recognises such a file before the run is built and composes
model=cyclegan with the file's settings; its mapping and checks are
`dlrun.models.cyclegan_authors`'.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlrun.data.described import DescribedData
from dlrun.engine import checkpoint
from dlrun.errors import UserError
from dlrun.models.cyclegan_authors import is_authors_generator, load_authors_generator


def images_only(
    name: str,
    channels: int,
    image_size: int,
    batch_size: int = 1,
    eval_batch_size: int = 50,
    num_workers: int = 0,
) -> DescribedData:
    """Two unpaired domains known by their image shape only: translate.input=DIR reads its own
    images, and an authors' file names no data set whose files could be read."""
    about = {
        "name": name, "input_shape": [channels, image_size, image_size], "num_classes": 2,
        "classes": ["A", "B"], "sizes": {"train": 0, "val": 0, "test": 0}, "val_is_test": True,
    }  # fmt: skip
    return DescribedData({
        "describe": about, "kind": "unpaired", "batch_size": batch_size,
        "eval_batch_size": eval_batch_size,
    })  # fmt: skip


def peek(ckpt: str) -> Any:
    """The file's contents, memory-mapped where it is a zip-format file (a dlrun checkpoint: its
    keys are all that is looked at, and its tensors are read later, once); older files whole."""
    try:
        return torch.load(Path(ckpt).expanduser(), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy (pre-1.6) format, or unreadable: load says which
        return checkpoint.load(ckpt)


def load_generator(
    g_a: nn.Module, ckpt: str, options: Mapping[str, Any]
) -> Mapping[str, Any] | None:
    """An authors' generator file into `g_a` (their one network translates the way it was
    trained: translate.direction=AtoB runs it); None for any other file (a dlrun checkpoint)."""
    state = peek(ckpt)
    if not is_authors_generator(state):
        return None
    if str(options.get("direction") or "AtoB") != "AtoB":
        raise UserError(
            f"ckpt={ckpt} holds one generator of the CycleGAN authors' code, which translates "
            "one way: run it with translate.direction=AtoB (for the other way, their other "
            "generator's file, e.g. latest_net_G_B.pth)."
        )
    load_authors_generator(g_a, state, ckpt)
    return state
