"""What moved: the one migration table of keys and `_target_` paths.

An old key on the command line ends in one line naming the new one (`renamed_key`); resume=true
and ckpt= read a run saved under old keys or old `_target_`s under today's (`migrate`,
`moved_target`, used by dlrun.config.resume and the checkpoint comparison), so a move is never a
difference to that run. A renamed node renames every key under it. Light: no torch.
"""

from collections.abc import Mapping, Sequence
from typing import Any

RENAMED = {"model.freeze": "freeze", "metrics.every_n_epochs": "trainer.val_every_n_epochs"}

# The modules whose classes and functions configs name, before the task packages (commit a15ad21
# and earlier) -> today's. A `_target_` under an old module is read under the new one.
MOVED_MODULES = {
    "dlrun.trainers.classification": "dlrun.tasks.classification.trainer",
    "dlrun.trainers.knn": "dlrun.tasks.classification.knn_trainer",
    "dlrun.trainers.distill": "dlrun.tasks.distill.trainer",
    "dlrun.trainers.metric": "dlrun.tasks.metric_learning.trainer",
    "dlrun.trainers.gan": "dlrun.tasks.gan.trainer",
    "dlrun.trainers.cyclegan": "dlrun.tasks.cyclegan.trainer",
    "dlrun.trainers.segmentation": "dlrun.tasks.segmentation.trainer",
    "dlrun.trainers.detection": "dlrun.tasks.detection.trainer",
    "dlrun.trainers.style": "dlrun.tasks.style.trainer",
    "dlrun.losses": "dlrun.tasks.classification.losses",
    "dlrun.metric_losses": "dlrun.tasks.metric_learning.losses",
    "dlrun.gan_losses": "dlrun.tasks.gan.losses",
    "dlrun.dense_losses": "dlrun.tasks.segmentation.losses",
    "dlrun.detection_losses": "dlrun.tasks.detection.losses",
    "dlrun.style_losses": "dlrun.tasks.style.losses",
    "dlrun.sched": "dlrun.engine.sched",
    "dlrun.data.scene_data": "dlrun.data.digit_scenes",
    "dlrun.data.streaming": "dlrun.data.streamed",
    "dlrun.rundir": "dlrun.launch.rundir",
    "dlrun.sweep": "dlrun.launch.sweep",
}
# Single names that moved to another module than the rest of theirs (old path -> new path).
MOVED_TARGETS: dict[str, str] = {
    "dlrun.metric_losses.distillation_loss": "dlrun.tasks.distill.losses.distillation_loss",
    # The labelled image sets' `_target_` up to commit 7aa44ad: the in-memory class, or the
    # chooser of the streamed module; today one factory builds either and gives it its pairs
    # (data.holdout_classes ... data.pair_seed are no arguments of the class any more).
    "dlrun.data.ClassificationData": "dlrun.data.image_sets.labelled_images",
    "dlrun.data.streamed.image_classification": "dlrun.data.image_sets.labelled_images",
}


def moved_target(path: str) -> str:
    """A dotted path under today's module (MOVED_TARGETS first, then MOVED_MODULES); any other
    string unchanged."""
    if path in MOVED_TARGETS:
        return MOVED_TARGETS[path]
    module, _, name = path.rpartition(".")
    return f"{MOVED_MODULES[module]}.{name}" if module in MOVED_MODULES else path


def renamed_key(args: Sequence[str]) -> str | None:
    """The message for an override that uses a key's old name, if one does."""
    for arg in args:
        key = arg.lstrip("+~").split("=", 1)[0]
        if key in RENAMED:
            return (
                f"{key} was renamed to {RENAMED[key]}: use {RENAMED[key]}="
                f"{arg.split('=', 1)[1] if '=' in arg else 'VALUE'} (docs/migration.md lists what moved)."
            )
    return None


def new_name(key: str) -> str:
    """A dotted key under today's name (RENAMED: the key itself, or a node above it)."""
    for old, new in RENAMED.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old) :]
    return key


def migrate(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config's dotted keys (checkpoint.flatten) under today's names, with today's
    `_target_` and function paths; a key saved under both names keeps today's value."""
    out: dict[str, Any] = {}
    for key in sorted(flat, key=lambda k: new_name(k) != k):  # today's names first
        value = flat[key]
        if isinstance(value, str):  # a `_target_`, or a function named by path (loss.fn)
            value = moved_target(value)
        out.setdefault(new_name(key), value)
    return out
