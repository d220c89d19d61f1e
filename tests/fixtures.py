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
