"""Every labelled image set's `_target_` (configs/data/mnist.yaml, cifar10.yaml, imagefolder.yaml
...): the module that holds it, and metric learning's pairs of it.

data.in_memory picks the module: `ClassificationData` decodes the set once into tensors on the
device; `StreamingClassificationData` reads image folders every epoch with DataLoader workers
(auto: only when the decoded set would not fit). The metric-learning keys (data.holdout_classes,
data.classes_per_batch, data.verify_pairs, data.pair_seed) are no argument of either: they
configure the `PairBatches` that wraps an in-memory module, which the module then offers as its
"pairs" (dlrun.data.module.require). Every run gets it, as every run always could make pairs:
building it reads and draws nothing.
"""

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dlrun.data.in_memory import ClassificationData
from dlrun.data.pairs import PairBatches, without_classes
from dlrun.data.streamed import StreamingClassificationData, decoded_bytes, memory_bytes
from dlrun.errors import UserError

log = logging.getLogger(__name__)
IN_MEMORY = ("auto", True, False)
STREAM_ONLY = ("persistent_workers", "prefetch_factor")  # DataLoader settings: the streamed path's


def labelled_images(
    *,
    in_memory: bool | str = True,
    memory_share: float = 0.5,
    folder: str | None = None,
    holdout_classes: Sequence[int] | None = None,
    classes_per_batch: int | None = None,
    verify_pairs: int = 10000,
    pair_seed: int = 0,
    **options: Any,
) -> ClassificationData | StreamingClassificationData:
    """data.in_memory: true decodes once into tensors on the device; false streams the folders;
    auto streams only when the decoded set exceeds memory_share of the memory it would fill.
    `options`: the module's own data.* keys (dlrun.data.labelled, and the source or folder's)."""
    if in_memory not in IN_MEMORY:
        raise UserError(f"data.in_memory must be auto, true or false, got {in_memory!r}.")
    if not 0 < memory_share <= 1:
        raise UserError(f"data.memory_share must be in (0, 1], got {memory_share}.")
    streaming = {k: options.pop(k) for k in STREAM_ONLY if k in options}
    base = Path(options["root"]).expanduser() / (folder or "")
    if in_memory is not True and _streams(in_memory, base, options, memory_share):
        if holdout_classes or classes_per_batch:
            raise UserError(
                "Metric learning (data.holdout_classes, data.classes_per_batch) needs its pairs "
                "in memory; use data.in_memory=true."
            )
        options.pop("source", None)
        options.pop("download", None)
        return StreamingClassificationData(folder=base, **options, **streaming)
    if holdout_classes:  # out of the training images before train_subset and val_split cut them
        options["source"] = without_classes(
            options["source"],
            holdout_classes,
            name=options["name"],
            num_classes=options.get("num_classes"),
        )
    data = ClassificationData(**options)
    data.offers["pairs"] = PairBatches(
        data,
        holdout_classes=holdout_classes,
        classes_per_batch=classes_per_batch,
        verify_pairs=verify_pairs,
        pair_seed=pair_seed,
    )
    return data


def _streams(in_memory: bool | str, base: Path, options: dict[str, Any], share: float) -> bool:
    """Whether to stream: always for in_memory=false; for auto, an image folder (not CIFAR-10's
    pickles) whose decoded images exceed `share` of the memory they would fill."""
    if in_memory is False:
        return True
    if not (base / "train").is_dir():
        return False
    need = decoded_bytes(base, options["channels"], options["image_size"])
    have = memory_bytes()
    if need <= share * have:
        return False
    log.info(
        "data.in_memory=auto: the decoded set (%.1f GB) exceeds %.0f%% of memory (%.1f GB): "
        "reading the folders with worker processes",
        need / 1e9,
        100 * share,
        have / 1e9,
    )
    return True
