"""Two unpaired image domains (CycleGAN): `<root>/{trainA, trainB, testA, testB}/*.jpg`.

Training images are decoded once at `load_size` (bicubic, as the authors' transform) and cached;
each batch crops `image_size` windows at random offsets and flips at random, domain by domain,
on the device from the augmentation generator, so resume replays them. An epoch is
max(|A|, |B|) batches: the larger domain in a random order, the other drawn at random (the
authors' unaligned data set). Test images are decoded at `image_size`, neither cropped nor
flipped. `horse2zebra_domains` serves the same folders as a two-class classification set.
"""

import logging
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import Tensor

from dlrun.data.archive import safe_extract
from dlrun.data.download import download_tip, failure_reason, new_folders_removed_on_failure
from dlrun.data.folder import read_flat
from dlrun.data.in_memory import Splits, missing_data
from dlrun.data.module import DeviceGenerators
from dlrun.data.samplers import SequentialSampler, ShardedSampler, UnpairedSampler
from dlrun.data.tensor_loader import TensorLoader
from dlrun.data.transforms import Normalize, RandomCrop, RandomHFlip
from dlrun.engine import dist
from dlrun.errors import UserError

log = logging.getLogger(__name__)
FOLDERS = ("trainA", "trainB", "testA", "testB")
# The authors' release (junyanz/pytorch-CycleGAN-and-pix2pix, datasets/download_cyclegan_dataset.sh).
URL = "https://efrosgans.eecs.berkeley.edu/cyclegan/datasets/{name}.zip"
KEYS = {"a": "image_a", "b": "image_b"}


def _fix(url: str, root: Path, download: bool) -> str:
    zipped = Path(urlsplit(url).path).name
    return (
        f"on a machine with a network, run curl -LO {url} in your home folder, then copy the zip "
        f"to this machine and unzip it into {root}/: scp <that-machine>:{zipped} /tmp/ && unzip "
        f"/tmp/{zipped} -d {root}/{download_tip(download)}"
    )


def download(root: Path, name: str, url: str | None = None) -> Path:
    """Fetch `<name>.zip` from the authors' server into root and extract it safely; the folder."""
    url = url or URL.format(name=name)
    archive = root / f"{name}.zip"
    tmp = archive.with_suffix(".zip.part")
    with new_folders_removed_on_failure(root):
        root.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s to %s", url, archive)
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            tmp.replace(archive)
        except OSError as err:  # URLError is an OSError
            tmp.unlink(missing_ok=True)
            raise missing_data(
                name, [root / name], _fix(url, root, True), failure_reason([(url, err)])
            ) from err
    safe_extract(archive, root)  # refuses members that would land outside root
    archive.unlink()
    return root / name


def find(root: Path, name: str, download_ok: bool, title: str | None = None) -> Path:
    """`<root>/<name>` (or root itself) holding the four folders; downloaded if allowed.

    `title`: the data set's name in the message when they are missing (default: `name`, which
    is "" for a root that holds the folders itself).
    """
    for base in (root / name, root):
        if all((base / f).is_dir() for f in FOLDERS):
            return base
    if download_ok:  # the authors' archive of that name (data.folder only moves where it is read)
        return download(root, title or name)
    raise missing_data(
        title or name or str(root),
        [root / name / f for f in FOLDERS],
        f"put the images in {root / name}/{{{', '.join(FOLDERS)}}}/ (trainA/testA: domain A, "
        f"trainB/testB: domain B){download_tip(False)} (it fetches the authors' zip)",
    )


class UnpairedData(DeviceGenerators):
    """A `DataModule` of two unaligned domains. Batches: {"image_a", "image_b"} in [-1, 1]."""

    kind = "unpaired"

    def __init__(
        self,
        *,
        name: str,
        root: str,
        folder: str | None = None,
        download: bool = False,
        channels: int = 3,
        image_size: int = 256,
        load_size: int = 286,
        hflip: bool = True,
        batch_size: int = 1,
        eval_batch_size: int = 50,
        train_subset: int | None = None,
        domains: Sequence[str] = ("A", "B"),
        cache_dir: str | None = "~/.cache/dlrun",
        num_workers: int = 0,
        bad_images: str = "error",
    ) -> None:
        if load_size < image_size:
            raise UserError(
                f"data.load_size={load_size} is smaller than data.image_size={image_size}: the "
                "random crop is cut from the loaded image, so load_size must be >= image_size "
                "(286 for 256, 143 for 128, 72 for 64)."
            )
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise UserError(f"data.{key} must be a positive integer, got {value}.")
        self.name, self.channels = name, channels
        self.image_size, self.load_size, self.hflip = image_size, load_size, hflip
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.domains = list(domains)
        base = find(Path(root).expanduser(), name if folder is None else folder, download, name)
        cache = Path(cache_dir).expanduser() / "folders" if cache_dir else None

        def read(sub: str, size: int) -> Tensor:
            return read_flat(base / sub, channels, size, cache, num_workers, bad_images, "bicubic")

        self.x: dict[str, Tensor] = {
            "train_a": read("trainA", load_size),
            "train_b": read("trainB", load_size),
            "test_a": read("testA", image_size),
            "test_b": read("testB", image_size),
        }
        if train_subset is not None:
            for key in ("train_a", "train_b"):
                self.x[key] = self.x[key][:train_subset]
        self._generators: dict[str, torch.Generator] = {}
        self.rank, self.world_size = 0, 1
        log.info(
            "data %s: %d + %d train images at %d px (cropped to %d), %d + %d test images",
            name,
            len(self.x["train_a"]),
            len(self.x["train_b"]),
            load_size,
            image_size,
            len(self.x["test_a"]),
            len(self.x["test_b"]),
        )

    # ----- DataModule ---------------------------------------------------------------------------
    def setup(
        self, device: torch.device, seed: int, rank: int = 0, world_size: int | None = None
    ) -> None:
        world_size = dist.world_size() if world_size is None else world_size
        self.x = {k: v.to(device) for k, v in self.x.items()}
        self.rank, self.world_size = rank, world_size
        self.seed_generators(device, seed, rank, world_size)

    def train_loader(
        self,
        *,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        crop: bool = True,
    ) -> TensorLoader:
        a, b = self.x["train_a"], self.x["train_b"]
        sampler: Any = UnpairedSampler(len(a), len(b), self.batch_size)
        if self.world_size > 1:
            sampler = ShardedSampler(sampler, self.rank, self.world_size)
        transforms: list[Any] = []
        for key in KEYS.values():  # each domain its own crop offsets and flips: they are unrelated
            if crop or self.load_size != self.image_size:
                transforms.append(RandomCrop(size=self.image_size, keys=(key,)))
            if self.hflip:
                transforms.append(RandomHFlip(keys=(key,)))
        transforms.append(self._normalize(mean, std))
        gens = self._generators
        return TensorLoader(
            {"image_a": a, "image_b": b},
            sampler,
            transforms=transforms,
            groups={"image_a": "a", "image_b": "b"},
            order_generator=gens.get("order"),
            aug_generator=gens.get("aug"),
        )

    def domain_loader(self, split: str, domain: str) -> TensorLoader:
        """One domain's images of a split ("train" at load size, "test"), in order, normalised."""
        x = self.x[f"{split}_{domain.lower()}"]
        key = KEYS[domain.lower()]
        return TensorLoader(
            {key: x},
            SequentialSampler(len(x), self.eval_batch_size),
            transforms=[self._normalize(None, None, (key,))],
        )

    def val_loader(self) -> TensorLoader:
        """The test images of domain A (its translations are scored; `domain_loader` for B)."""
        return self.domain_loader("test", "a")

    def test_loader(self) -> TensorLoader:
        return self.domain_loader("test", "a")

    def example_batch(
        self,
        n: int,
        split: str = "val",
        *,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
    ) -> dict[str, Tensor]:
        """The first n images of each domain ("val" is the test split: there is no other)."""
        split = "train" if split == "train" else "test"
        norm = self._normalize(mean, std, tuple(KEYS.values()))
        s, o = self.image_size, (self.load_size - self.image_size) // 2 if split == "train" else 0
        batch = {
            key: self.x[f"{split}_{d}"][:n, :, o : o + s, o : o + s] for d, key in KEYS.items()
        }
        return norm(batch)

    def images(self, split: str, domain: str) -> Tensor:
        """A split's uint8 images of one domain (train: at load size), on the device."""
        return self.x[f"{split}_{domain.lower()}"]

    def describe(self) -> dict[str, Any]:
        s = self.image_size
        return {
            "name": self.name,
            "input_shape": (self.channels, s, s),
            "num_classes": 2,
            "classes": self.domains,
            "sizes": {
                "train": max(len(self.x["train_a"]), len(self.x["train_b"])),
                "val": len(self.x["test_a"]),
                "test": len(self.x["test_a"]),
                **{k: len(v) for k, v in self.x.items()},
            },
            "val_is_test": True,
            # A monitor set on it warns; the fix is no selection (the authors' protocol), or
            # test folders of images taken out of training.
            "holdout_hint": (
                f"{self.name} has no validation split",
                "trainer.monitor=null to train for a fixed length with no selection (the "
                "CycleGAN authors' protocol), or data=unpaired_folder data.root=DIR whose testA "
                "and testB hold images taken out of trainA and trainB,",
            ),
        }

    def _normalize(
        self,
        mean: float | Sequence[float] | None,
        std: float | Sequence[float] | None,
        keys: Sequence[str] = tuple(KEYS.values()),
    ) -> Normalize:
        # [-1, 1]: the generators' tanh range.
        return Normalize(0.5 if mean is None else mean, 0.5 if std is None else std, keys)


def domains(
    root: Path,
    download: bool,
    *,
    folder: str = "horse2zebra",
    names: Sequence[str] = ("A", "B"),
    channels: int = 3,
    image_size: int = 256,
    cache_dir: str | None = "~/.cache/dlrun",
    workers: int = 0,
    bad_images: str = "error",
) -> Splits:
    """The two domains as a classification set: label 0 for A (trainA/testA), 1 for B.

    What `metrics.domain.ckpt` classifiers are trained on (data=horse2zebra_domains).
    """
    base = find(root, folder, download)
    cache = Path(cache_dir).expanduser() / "folders" if cache_dir else None

    def read(sub: str) -> Tensor:
        return read_flat(base / sub, channels, image_size, cache, workers, bad_images, "bicubic")

    def both(split: str) -> tuple[Tensor, Tensor]:
        a, b = read(f"{split}A"), read(f"{split}B")
        y = torch.cat([torch.zeros(len(a), dtype=torch.long), torch.ones(len(b), dtype=torch.long)])
        # A fixed shuffle: the image grid and data.train_subset see both domains.
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        return torch.cat([a, b])[order], y[order]

    train_x, train_y = both("train")
    test_x, test_y = both("test")
    return Splits(train_x, train_y, test_x, test_y, list(names))
