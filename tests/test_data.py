from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from dlrun.cli import build
from dlrun.data import folder
from dlrun.data.tensor_loader import TensorLoader, random_crop, random_hflip
from dlrun.errors import UserError
from tests.fixtures import write_png_folder


@pytest.mark.parametrize(
    ("data", "n_train", "n_test", "shape"),
    [
        ("mnist", 200, 100, (1, 28, 28)),
        ("fashion_mnist", 200, 100, (1, 28, 28)),
        ("cifar10", 100, 40, (3, 32, 32)),  # from the cifar-10-batches-py pickles
    ],
)
def test_real_loaders_read_fixture_files(make_cfg, data, n_train, n_test, shape) -> None:
    d = instantiate(make_cfg(f"data={data}").data)
    assert d.train_x.dtype == torch.uint8 and d.train_x.shape == (n_train, *shape)
    assert d.test_x.shape == (n_test, *shape) and d.train_y.dtype == torch.int64
    assert set(d.train_y.tolist()) == set(range(10)) and len(d.classes) == 10
    x, y = next(iter(d.train_loader()))
    assert x.dtype == torch.float32 and x.shape == (min(d.batch_size, n_train), *shape)


def test_cifar_png_folder_is_detected_and_decoded_once(make_cfg, tmp_path, monkeypatch) -> None:
    root = tmp_path / "root"
    write_png_folder(root / "cifar10")
    cfg = make_cfg("data=cifar10", f"data.root={root}")
    first = instantiate(cfg.data)
    assert first.train_x.shape == (30, 3, 32, 32) and first.classes[0] == "airplane"
    labels = first.train_y.tolist()
    assert labels != sorted(labels)  # stored in a fixed mixed order, not class after class
    calls = []
    monkeypatch.setattr(folder, "_decode", lambda *a: calls.append(a))
    second = instantiate(cfg.data)  # a second run: read from the cache, no PNG decoding
    assert calls == [] and torch.equal(first.train_x, second.train_x)


def test_imagefolder_resizes_and_converts_channels(make_cfg, tmp_path) -> None:
    root = write_png_folder(
        tmp_path / "faces", splits=("train", "val"), n=12, size=40, classes=["a", "b", "c"]
    )
    d = instantiate(
        make_cfg(
            "data=imagefolder",
            f"data.root={root}",
            "data.channels=1",
            "data.image_size=24",
            "data.mean=[0.5]",
            "data.std=[0.5]",
        ).data
    )
    assert (
        d.train_x.shape == (12, 1, 24, 24) and d.num_classes == 3 and d.classes == ["a", "b", "c"]
    )


def test_train_subset_and_val_split(make_cfg) -> None:
    d = instantiate(make_cfg("data.train_subset=100", "data.val_split=0.2").data)
    assert len(d.train_x) == 80 and len(d.val_x) == 20 and len(d.test_x) == 100
    again = instantiate(make_cfg("data.train_subset=100", "data.val_split=0.2", "seed=5").data)
    assert torch.equal(d.val_x, again.val_x)  # the held-out images do not depend on the run seed
    quick = instantiate(make_cfg("data.eval_subset=30").data)
    assert len(quick.val_x) == 30 and len(quick.test_x) == 30 and len(quick.train_x) == 200


def test_missing_data_offline_explains_the_fix(make_cfg, tmp_path) -> None:
    with pytest.raises(UserError) as err:
        build(make_cfg(f"data.root={tmp_path}", "data.download=false").data, "data")
    msg = str(err.value)
    assert "MNIST was not found" in msg and str(tmp_path / "MNIST" / "raw") in msg
    assert "copy" in msg and "data.root" in msg and "DLRUN_DATA" in msg


def test_failed_download_is_reported_with_its_reason(make_cfg, tmp_path, monkeypatch) -> None:
    from dlrun.data import cifar10

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading cifar-10-python.tar.gz: no network")

    monkeypatch.setattr(cifar10, "download_url", offline)
    with pytest.raises(
        UserError, match="CIFAR-10 was not found.*download failed: Error downloading"
    ):
        build(make_cfg("data=cifar10", f"data.root={tmp_path}").data, "data")


def test_random_crop_shifts_whole_images() -> None:
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    assert torch.equal(random_crop(x, 0, None), x)
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for img, src in zip(out, x, strict=True):  # every output is a window of the zero-padded source
        padded = torch.nn.functional.pad(src, (2, 2, 2, 2))
        assert any(
            torch.equal(img, padded[:, i : i + 4, j : j + 4]) for i in range(5) for j in range(5)
        )


def test_hflip_mirrors_some_images() -> None:
    x = torch.arange(64 * 3 * 2 * 2, dtype=torch.uint8).view(64, 3, 2, 2)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, s.flip(2)) for o, s in zip(out, x, strict=True)]
    assert 10 < sum(flipped) < 54
    assert all(f or torch.equal(o, s) for f, o, s in zip(flipped, out, x, strict=True))


def test_loader_normalizes_and_shuffles_deterministically() -> None:
    x = torch.full((10, 1, 2, 2), 255, dtype=torch.uint8)
    y = torch.arange(10)
    loader = TensorLoader(
        x,
        y,
        batch_size=4,
        mean=[0.5],
        std=[0.25],
        shuffle=True,
        generator=torch.Generator().manual_seed(1),
    )
    batches = list(loader)
    assert len(loader) == 3 and [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.allclose(batches[0][0], torch.full((4, 1, 2, 2), 2.0))
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == list(range(10))
    again = TensorLoader(
        x,
        y,
        batch_size=4,
        mean=[0.5],
        std=[0.25],
        shuffle=True,
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(torch.cat([b[1] for b in again]), torch.cat([b[1] for b in batches]))


def test_folder_cache_key_changes_with_the_folder(tmp_path: Path) -> None:
    base = write_png_folder(tmp_path / "f", splits=("train",), n=5)
    _, files = folder.list_images(base / "train")
    key = folder._cache_key(base / "train", files, 3, 32)
    assert key != folder._cache_key(base / "train", files[:-1], 3, 32)
    assert key != folder._cache_key(base / "train", files, 1, 32)
