"""Tiny data sets written in the real on-disk formats: IDX files, CIFAR pickle batches, PNG folders."""

import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def _images(n: int, c: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake images: each class is a bright bar at a class-specific row, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    x = rng.integers(0, 60, size=(n, c, size, size), dtype=np.uint8)
    for i, label in enumerate(labels):
        row = 2 + label * (size - 4) // 10
        x[i, :, row : row + 2, :] = 250
    return x, labels.astype(np.uint8)


def write_idx(root: Path, name: str = "MNIST", n_train: int = 200, n_test: int = 100) -> Path:
    raw = root / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        x, y = _images(n, 1, 28, seed)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + x.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + y.tobytes())
    return root


def write_cifar_pickles(root: Path, per_batch: int = 20, n_test: int = 40) -> Path:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for seed, name in enumerate(names):
        x, y = _images(n_test if name == "test_batch" else per_batch, 3, 32, seed)
        entry = {"batch_label": name, "data": x.reshape(len(x), -1), "labels": y.tolist()}
        with open(base / name, "wb") as f:
            pickle.dump(entry, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_vis": 3072}, f)
    return root


def write_png_folder(
    base: Path,
    splits: tuple[str, ...] = ("train", "test"),
    n: int = 30,
    size: int = 32,
    classes: list[str] | None = None,
) -> Path:
    classes = classes or CIFAR_CLASSES
    for seed, split in enumerate(splits):
        x, y = _images(n, 3, size, seed)
        for i, (img, label) in enumerate(zip(x, y, strict=True)):
            folder = base / split / classes[label % len(classes)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{i:04d}.png")
    return base


def write_unpaired(
    root: Path,
    name: str = "horse2zebra",
    n_a: int = 5,
    n_b: int = 7,
    n_test_a: int = 3,
    n_test_b: int = 4,
    size: int = 40,
) -> Path:
    """Two unpaired domains as the CycleGAN release lays them out: `<root>/<name>/{trainA, trainB,
    testA, testB}/NNN.jpg` (real JPEGs); returns `<root>/<name>`.

    Domain A is reddish, B bluish; every image is its own noise over a diagonal gradient, so any
    window of it is found in that image at one offset only. trainA/001.jpg and testB/000.jpg are
    greyscale files (mode L), as a few of the real horse2zebra images are.
    """
    base = root / name
    ramp = np.add.outer(np.arange(size), np.arange(size)) * (60 / (2 * size))  # 0..60
    counts = {"trainA": n_a, "trainB": n_b, "testA": n_test_a, "testB": n_test_b}
    grey = {("trainA", 1), ("testB", 0)}
    for seed, (sub, n) in enumerate(counts.items()):
        folder = base / sub
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(100 + seed)
        tint = (170, 50, 30) if sub.endswith("A") else (30, 60, 170)
        for i in range(n):
            noise = rng.integers(0, 70, size=(size, size, 3))
            img = np.stack([np.full((size, size), t) for t in tint], axis=-1) + ramp[..., None]
            img = Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8))
            if (sub, i) in grey:
                img = img.convert("L")
            img.save(folder / f"{i:03d}.jpg", quality=95)
    return base
