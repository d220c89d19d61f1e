"""`data=mnist_seg` / `mnist_det`: scenes of real digits (or any object set), made on the device.

Training scenes come from training objects and the run's `seed`; test scenes from test objects
and validation scenes (`data.val_scenes` > 0) from the last `data.val_objects` training objects,
which training scenes then leave out; both from `data.scene_seed`, fixed whatever `seed` is.
Batches hold "image", "mask" (B, H, W: 0 background, 1 + class), "boxes" (B, M, 4) and
"box_labels" (B, M, -1 empty).
"""

import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dlrun.data import mnist, proposals
from dlrun.data.in_memory import Splits
from dlrun.data.module import DeviceGenerators
from dlrun.data.samplers import RandomSampler, Sampler, SequentialSampler, ShardedSampler
from dlrun.data.scene_layout import Scenes, compose
from dlrun.data.tensor_loader import TensorLoader
from dlrun.data.transforms import Normalize, RandomHFlip, Transform
from dlrun.engine import dist
from dlrun.engine.progress import Heartbeat
from dlrun.errors import UserError

log = logging.getLogger(__name__)
# Object sets by name (data.source=fashion_mnist); a config may also give a loader itself.
SOURCES: dict[str, Callable[[Path, bool], Splits]] = {
    "mnist": partial(mnist.load, name="MNIST"),
    "fashion_mnist": partial(mnist.load, name="FashionMNIST"),
}


class SceneData(DeviceGenerators):
    """Scenes of `source` objects for segmentation and detection (a `DataModule`)."""

    def __init__(
        self,
        *,
        name: str,
        kind: str,
        source: str | Callable[[Path, bool], Splits],
        root: str,
        download: bool = True,
        canvas: int = 64,
        per_scene: Sequence[int] = (2, 4),
        scale: Sequence[float] = (0.7, 1.3),
        max_overlap: float = 0.2,
        train_scenes: int = 20000,
        test_scenes: int = 2000,
        val_scenes: int = 0,
        val_objects: int = 5000,
        scene_seed: int = 0,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        batch_size: int = 64,
        eval_batch_size: int = 500,
        hflip: bool = False,
        cache_dir: str | None = None,
        channels: int | None = None,
        image_size: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        if kind not in ("segmentation", "detection"):
            raise UserError(f"data.kind must be segmentation or detection, got '{kind}'.")
        if batch_size < 1 or eval_batch_size < 1 or train_scenes < 1 or test_scenes < 1:
            raise UserError(
                "data.batch_size, data.eval_batch_size, data.train_scenes and data.test_scenes "
                "must be positive integers."
            )
        self.name, self.kind = name, kind
        if isinstance(source, str):
            if source not in SOURCES:
                raise UserError(
                    f"data.source={source} is not an object set; use one of: {', '.join(SOURCES)}."
                )
            source = SOURCES[source]
        # Selective-search proposals are cached here (None: computed each run).
        self.cache_dir = Path(cache_dir).expanduser() / "proposals" if cache_dir else None
        splits = source(Path(root).expanduser(), download)
        self.objects = {
            "train": (splits.train_x, splits.train_y),
            "test": (splits.test_x, splits.test_y),
        }
        self.classes = list(splits.classes)
        self.num_classes = len(self.classes)  # objects; masks add the background as class 0
        self.channels = int(splits.train_x.shape[1])
        self.canvas, self.image_size = canvas, canvas
        # The keys models read (${data.channels} ...) must describe these scenes: not settable.
        given = {"channels": channels, "image_size": image_size, "num_classes": num_classes}
        actual = {"channels": self.channels, "image_size": canvas, "num_classes": self.num_classes}
        for key, value in given.items():
            if value is not None and value != actual[key]:
                raise UserError(
                    f"data.{key}={value} does not describe these scenes ({key} {actual[key]}, "
                    f"from data.source and data.canvas); leave data.{key} as it is."
                )
        self.layout = {
            "canvas": canvas,
            "per_scene": (int(per_scene[0]), int(per_scene[1])),
            "scale": (float(scale[0]), float(scale[1])),
            "max_overlap": float(max_overlap),
        }
        self.counts = {"train": train_scenes, "val": val_scenes, "test": test_scenes}
        if val_scenes and not 0 < val_objects < len(splits.train_x):
            raise UserError(
                f"data.val_objects must be between 1 and the {len(splits.train_x) - 1} training "
                f"objects that leave some to train on, got {val_objects}."
            )
        self.val_objects = val_objects if val_scenes else 0
        self.scene_seed = scene_seed
        self.mean, self.std, self.hflip = list(mean), list(std), hflip
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.scenes: dict[str, Scenes] = {}
        self.rank, self.world_size = 0, 1
        self._generators: dict[str, torch.Generator] = {}
        # What trainers may `require` (dlrun.data.module.CAPABILITIES): anchors fit box_sizes.
        self.offers: dict[str, Any] = {"boxes": self, "normalization": self, "proposals": self}
        self.proposals: dict[str, Tensor] = {}  # per split, once attach_proposals made them

    def setup(
        self, device: torch.device, seed: int, rank: int = 0, world_size: int | None = None
    ) -> None:
        """Compose the scenes on `device`: training ones from `seed`, the others fixed."""
        world_size = dist.world_size() if world_size is None else world_size
        self.rank, self.world_size = rank, world_size
        fixed = torch.Generator(device=device).manual_seed(self.scene_seed)
        # Seconds on a CPU (22 s for YOLO's): said every trainer.log_every_s (progress.py).
        beat = Heartbeat(f"composing {self.name} scenes", sum(self.counts.values()), unit="scenes")
        layout = self.layout | {"tick": beat.tick}
        test_x, test_y = (t.to(device) for t in self.objects["test"])
        self.scenes["test"] = compose(test_x, test_y, self.counts["test"], fixed, **layout)
        train_x, train_y = (t.to(device) for t in self.objects["train"])
        keep = len(train_x) - self.val_objects
        if self.counts["val"]:  # the last data.val_objects training digits, never trained on
            self.scenes["val"] = compose(
                train_x[keep:], train_y[keep:], self.counts["val"], fixed, **layout
            )
        else:
            self.scenes["val"] = self.scenes["test"]
        self.scenes["train"] = compose(
            train_x[:keep], train_y[:keep], self.counts["train"],
            torch.Generator(device=device).manual_seed(seed), **layout,
        )  # fmt: skip
        beat.close()
        self.seed_generators(device, seed, rank, world_size)
        log.info(
            "data %s: %d train, %d val, %d test scenes of %dx%d (%s)", self.name,
            self.counts["train"], len(self.scenes["val"].images), self.counts["test"],
            self.canvas, self.canvas, self.kind,
        )  # fmt: skip

    def _tensors(self, split: str) -> dict[str, Tensor]:
        if not self.scenes:
            raise RuntimeError("call setup() first: the scenes are made on the device")
        s = self.scenes[split]
        out = {"image": s.images, "mask": s.masks, "boxes": s.boxes, "box_labels": s.box_labels}
        if split in self.proposals:
            out["proposals"] = self.proposals[split]
        return out

    def attach_proposals(self, **settings: Any) -> None:
        """Selective-search proposals for every split's scenes (dlrun/data/proposals.py), cached
        under data.cache_dir; batches then carry "proposals" (B, P, 4), -1 rows unused."""
        if self.hflip:
            raise UserError("data.hflip=true would mirror scenes but not their proposals: use false.")
        splits = {k: v for k, v in self.scenes.items() if k != "val" or self.counts["val"]}
        beat = Heartbeat(
            "selective search", sum(len(s.images) for s in splits.values()), unit="scenes"
        )
        for split, scenes in splits.items():
            self.proposals[split] = proposals.cached(
                scenes.images, self.cache_dir, tick=beat.tick, **settings
            )
        beat.close()
        if not self.counts["val"]:
            self.proposals["val"] = self.proposals["test"]
        found = {k: proposals.valid(self.proposals[k]).sum(1).float().mean() for k in splits}
        log.info(
            "proposals (selective search, %s): %s per scene", settings.get("strategy", "fast"),
            ", ".join(f"{k} {float(v):.1f}" for k, v in found.items()),
        )  # fmt: skip

    def _normalize(self, mean: Any = None, std: Any = None) -> Normalize:
        return Normalize(self.mean if mean is None else mean, self.std if std is None else std)

    def _loader(self, split: str, sampler: Sampler, transforms: list[Transform]) -> TensorLoader:
        return TensorLoader(
            self._tensors(split), sampler, transforms=transforms,
            order_generator=self._generators.get("order"),
            aug_generator=self._generators.get("aug"),
        )  # fmt: skip

    def train_loader(self, *, mean: Any = None, std: Any = None, crop: bool = True) -> TensorLoader:
        n = self.counts["train"]
        sampler: Sampler = RandomSampler(n, self.batch_size)
        if self.world_size > 1:
            sampler = ShardedSampler(sampler, self.rank, self.world_size)
        transforms: list[Transform] = [RandomHFlip()] if self.hflip else []
        return self._loader("train", sampler, [*transforms, self._normalize(mean, std)])

    def val_loader(self) -> TensorLoader:
        n = len(self.scenes["val"].images)
        return self._loader("val", SequentialSampler(n, self.eval_batch_size), [self._normalize()])

    def test_loader(self) -> TensorLoader:
        n = self.counts["test"]
        return self._loader("test", SequentialSampler(n, self.eval_batch_size), [self._normalize()])

    def example_batch(
        self, n: int, split: str = "val", *, mean: Any = None, std: Any = None
    ) -> dict[str, Tensor]:
        batch = {k: v[:n] for k, v in self._tensors(split).items()}
        batch["image"] = self._normalize(mean, std).normalize(batch["image"])
        return batch

    def box_sizes(self, split: str = "train") -> Tensor:
        """(N, 2) widths and heights of the split's boxes: what anchors are fitted to."""
        s = self.scenes[split]
        boxes = s.boxes[s.box_labels >= 0]
        return boxes[:, 2:] - boxes[:, :2]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": (self.channels, self.canvas, self.canvas),
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "sizes": {
                k: len(self.scenes[k].images) if self.scenes else v for k, v in self.counts.items()
            },
            "val_is_test": self.counts["val"] == 0,
            "holdout_hint": ("data.val_scenes=0", "data.val_scenes=1000"),
        }
