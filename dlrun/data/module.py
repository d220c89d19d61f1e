"""The data module protocol: all that trainers and the CLI know about data.

A new task adds its data as one class with these members (configs/data/<name>.yaml names it
with `_target_`), and touches nothing else: decode once into tensors, move them to the device in
`setup`, and build `TensorLoader`s from a sampler (random, P x K, unpaired, sharded), key-aware
transforms and the module's two generators. Batches are dicts of tensors ("image", "label",
"mask", "boxes", "image_b", ...); the task's trainer reads the keys it needs.

Data larger than memory fits the same protocol: its loaders may be any iterable of dict batches
with `__len__`, `iterate(resume)` and `position()` (a DataLoader wrapper whose position is the
batch count plus its generators' states), so trainers do not tell the two apart.

What a task needs beyond the loaders (pairs of images, box sizes, ...) a module declares in
`offers` and a trainer asks for with `require`: one clear error instead of an AttributeError deep
in a run, and no trainer guessing at a module's attributes.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from dlrun.data.tensor_loader import TensorLoader
from dlrun.errors import UserError


class Capability(NamedTuple):
    what: str  # what a trainer needs, as its error says it
    fix: str  # the data configs that offer it


# What a module may offer beyond the loaders, and what its provider (`offers[name]`) has.
CAPABILITIES = {
    # dlrun.data.pairs.PairBatches: pair_loader(), pk_loader(), eval_pairs(split, classes),
    # holdout_classes, hold_out_validation(fraction, minimum)
    "pairs": Capability(
        "pairs and P x K batches of labelled images held in memory",
        "use data=mnist, fashion_mnist or cifar10, or data=imagefolder with data.in_memory=true",
    ),
    # the module (dlrun.data.base.ClassificationData): split(name) -> (images, labels),
    # normalize(mean, std), loader(tensors, sampler, transforms, groups), batch_size,
    # crop_padding, hflip, rank, world_size, hold_out_validation(fraction, minimum)
    "tensors": Capability(
        "labelled images held in memory",
        "use data.in_memory=true, or data=mnist, fashion_mnist or cifar10",
    ),
    # the module (dlrun.data.digit_scenes.SceneData): box_sizes(split) -> (N, 2) widths, heights
    "boxes": Capability("object boxes", "use data=mnist_det"),
    # SceneData.attach_proposals(**settings): batches then carry "proposals" (dlrun/data/proposals)
    "proposals": Capability("region proposals of its scenes", "use data=mnist_det"),
    # the module: mean and std, the per-channel normalisation of its batches
    "normalization": Capability(
        "the mean and std of its images", "use a data set of configs/data/"
    ),
}


class DataModule(Protocol):
    name: str
    kind: str  # "classification" (image, label), "unpaired" (image_a, image_b): Trainer.data_kinds
    batch_size: int  # the global batch: with several ranks each trains on its share
    eval_batch_size: int
    # Optional (none: offers nothing): each capability (CAPABILITIES) -> the object that provides
    # its members, often the module itself. Trainers read it through `require` / `offered`.
    offers: Mapping[str, Any]

    def setup(
        self, device: torch.device, seed: int, rank: int = 0, world_size: int | None = None
    ) -> None:
        """Move the data to `device` and seed the generators; world_size None: dlrun.engine.dist's.

        The order generator is seeded with `seed` on every rank, so all ranks draw the same
        global batches. One process uses that generator for augmentation too (the stream dlrun
        always drew from, so earlier runs reproduce); with world_size > 1 augmentation gets its
        own generator, seeded seed + 7919 * (rank + 1), different on every rank.
        """
        ...

    def generators(self) -> dict[str, torch.Generator]:
        """{"order": ..., "aug": ...} (possibly one object twice): checkpoints save their states."""
        ...

    def train_loader(
        self,
        *,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        crop: bool = True,
    ) -> TensorLoader:
        """Shuffled, augmented training batches; mean/std (a scalar: every channel) override the
        data's normalisation (a GAN's [-1, 1]: 0.5 and 0.5), crop=False leaves out random crops (a GAN must not
        learn padding borders) and keeps the other augmentation."""
        ...

    def val_loader(self) -> TensorLoader:
        """Validation batches in order, normalised, not augmented."""
        ...

    def test_loader(self) -> TensorLoader:
        """Test batches in order, normalised, not augmented."""
        ...

    def example_batch(
        self,
        n: int,
        split: str = "val",
        *,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
    ) -> dict[str, Tensor]:
        """The first n items of "train", "val" or "test", normalised (mean 0, std 1: [0, 1]
        images), not augmented; draws nothing from the generators."""
        ...

    def describe(self) -> dict[str, Any]:
        """{"name", "input_shape": (C, H, W), "num_classes", "classes",
        "sizes": {"train": n, "val": n, "test": n}, "val_is_test": bool}, and optionally
        "holdout_hint": (what made val the test split, what to do instead) for the warning
        that selecting on the test split logs (default: data.val_split's)."""
        ...


class DeviceGenerators:
    """The "order" / "aug" generator pair of a tensor data module, as `DataModule.setup` seeds it.

    One process keeps one stream for shuffling and augmentation, the one runs always drew from,
    so they reproduce. Ranks must share the order yet augment differently, and an aug draw on a
    shared generator would shift that rank's next order: with world_size > 1, two generators.
    """

    _generators: dict[str, torch.Generator]

    def seed_generators(self, device: torch.device, seed: int, rank: int, world_size: int) -> None:
        order = torch.Generator(device=device).manual_seed(seed)
        aug = order
        if world_size > 1:
            aug = torch.Generator(device=device).manual_seed(seed + 7919 * (rank + 1))
        self._generators = {"order": order, "aug": aug}

    def generators(self) -> dict[str, torch.Generator]:
        if not getattr(self, "_generators", None):
            raise RuntimeError("call setup() before generators(): they are made on the device")
        return dict(self._generators)


def offered(data: "DataModule", capability: str) -> Any | None:
    """What provides `capability` for `data` (`data.offers[capability]`), or None."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; one of {sorted(CAPABILITIES)}")
    # `offers` is optional in the protocol: a module of one's own may leave it out.
    offers: Mapping[str, Any] = getattr(data, "offers", None) or {}
    return offers.get(capability)


def require(data: "DataModule", capability: str, *, by: str) -> Any:
    """The provider of `capability` for `data`, or one UserError naming who needs it and the fix.
    `by`: who asks, as the user chose it (e.g. "trainer=metric")."""
    provider = offered(data, capability)
    if provider is None:
        what, fix = CAPABILITIES[capability]
        raise UserError(f"{by} needs {what}, which data={data.name} does not offer; {fix}.")
    return provider


def kind_of(data: "DataModule") -> str:
    """`data.kind`: the batches it serves (Trainer.data_kinds); a module of one's own without one
    serves classification batches (image, label)."""
    return getattr(data, "kind", "classification")


def check_kind(data: "DataModule", kinds: Sequence[str], task: str) -> None:
    """A trainer (`task`, which trains on `kinds` of data) refuses a module serving others."""
    kind = kind_of(data)
    if kind not in kinds:
        unpaired = " (two image domains: train it with model=cyclegan)."
        raise UserError(
            f"{task} trains on {' or '.join(kinds)} data, but data={getattr(data, 'name', '?')} "
            f"is {kind} data" + (unpaired if kind == "unpaired" else ".")
        )
