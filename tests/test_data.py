from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from dlrun.cli import build
from dlrun.data import Normalize, RandomCrop, RandomHFlip, RandomSampler, TensorLoader, folder
from dlrun.errors import UserError
from tests.fixtures import write_png_folder
from tests.test_samplers import old_epoch


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
    batch = next(iter(d.train_loader()))
    assert batch.keys() == {"image", "label"} and batch["image"].dtype == torch.float32
    assert batch["image"].shape == (min(d.batch_size, n_train), *shape)
    assert d.describe()["input_shape"] == shape and d.describe()["sizes"]["test"] == n_test


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
    assert torch.equal(RandomCrop()({"image": x}, None)["image"], x)
    out = RandomCrop(padding=2)({"image": x}, torch.Generator().manual_seed(0))["image"]
    assert out.shape == x.shape
    for img, src in zip(out, x, strict=True):  # every output is a window of the zero-padded source
        padded = torch.nn.functional.pad(src, (2, 2, 2, 2))
        assert any(
            torch.equal(img, padded[:, i : i + 4, j : j + 4]) for i in range(5) for j in range(5)
        )


def test_hflip_mirrors_some_images() -> None:
    x = torch.arange(64 * 3 * 2 * 2, dtype=torch.uint8).view(64, 3, 2, 2)
    out = RandomHFlip()({"image": x}, torch.Generator().manual_seed(0))["image"]
    flipped = [torch.equal(o, s.flip(2)) for o, s in zip(out, x, strict=True)]
    assert 10 < sum(flipped) < 54
    assert all(f or torch.equal(o, s) for f, o, s in zip(flipped, out, x, strict=True))


def test_loader_normalizes_and_shuffles_deterministically() -> None:
    x = torch.full((10, 1, 2, 2), 255, dtype=torch.uint8)
    y = torch.arange(10)

    def loader(seed: int) -> TensorLoader:
        g = torch.Generator().manual_seed(seed)
        return TensorLoader(
            {"image": x, "label": y},
            RandomSampler(10, 4),
            transforms=[Normalize([0.5], [0.25])],
            order_generator=g,
            aug_generator=g,
        )

    batches = list(loader(1))
    assert len(loader(1)) == 3 and [len(b["label"]) for b in batches] == [4, 4, 2]
    assert torch.allclose(batches[0]["image"], torch.full((4, 1, 2, 2), 2.0))
    labels = torch.cat([b["label"] for b in batches])
    assert sorted(labels.tolist()) == list(range(10))
    assert torch.equal(torch.cat([b["label"] for b in loader(1)]), labels)
    assert not torch.equal(torch.cat([b["label"] for b in loader(2)]), labels)


def test_classification_data_reproduces_the_old_loader(make_cfg) -> None:
    """CIFAR-10's crop + flip + normalise, one process: the very batches dlrun made before."""
    d = instantiate(make_cfg("data=cifar10", "data.batch_size=32").data)
    d.setup(torch.device("cpu"), seed=3)
    gens = d.generators()
    assert gens["order"] is gens["aug"]  # one process: the one stream runs always drew from
    reference = torch.Generator().manual_seed(3)
    for _ in range(2):
        old = list(old_epoch(d.train_x, d.train_y, 32, d.mean, d.std, 4, True, reference))
        new = list(d.train_loader())
        assert len(old) == len(new) == 4
        for (x, y), batch in zip(old, new, strict=True):
            assert torch.equal(x, batch["image"]) and torch.equal(y, batch["label"])
    assert torch.equal(reference.get_state(), gens["order"].get_state())


def test_ranks_share_the_order_and_not_the_augmentation(make_cfg) -> None:
    cfg = make_cfg("data=cifar10", "data.batch_size=30").data
    ranks = [instantiate(cfg) for _ in range(3)]
    for r, d in enumerate(ranks):
        d.setup(torch.device("cpu"), seed=1, rank=r, world_size=3)
    gens = [d.generators() for d in ranks]
    assert all(torch.equal(g["order"].get_state(), gens[0]["order"].get_state()) for g in gens)
    assert len({bytes(g["aug"].get_state().numpy()) for g in gens}) == 3
    firsts = [next(iter(d.train_loader(crop=False)))["label"] for d in ranks]
    assert [len(f) for f in firsts] == [10, 10, 10]
    reference = torch.randperm(100, generator=torch.Generator().manual_seed(1))[:30]
    assert torch.equal(torch.cat(firsts), ranks[0].train_y[reference])  # one global batch, split
    with pytest.raises(ValueError, match="rank must be in"):
        ranks[0].setup(torch.device("cpu"), seed=1, rank=1)  # one process (dlrun.engine.dist's answer)
    ranks[1].batch_size = 33  # 100 = 3 x 33 + 1: a last global batch of 1 would starve 2 ranks
    assert len(ranks[1].train_loader()) == 3
    ranks[1].batch_size = 2
    with pytest.raises(UserError, match="global batch and must be at least the number of proc"):
        ranks[1].train_loader()


def test_eval_loaders_examples_and_description(make_cfg) -> None:
    d = instantiate(make_cfg("data.train_subset=100", "data.val_split=0.2").data)
    with pytest.raises(RuntimeError, match="setup"):
        d.generators()
    d.setup(torch.device("cpu"), seed=0)
    before = d.generators()["order"].get_state()
    val = list(d.val_loader())
    assert torch.equal(torch.cat([b["label"] for b in val]), d.val_y)  # in order
    first = d.example_batch(5, "train", mean=0.0, std=1.0)
    assert torch.allclose(first["image"], d.train_x[:5].float() / 255, rtol=0, atol=1e-6)
    assert torch.equal(first["label"], d.train_y[:5])
    assert torch.equal(d.example_batch(3, "val")["image"], val[0]["image"][:3])
    assert torch.equal(d.generators()["order"].get_state(), before)  # evaluation draws nothing
    info = d.describe()
    assert info["sizes"] == {"train": 80, "val": 20, "test": 100} and not info["val_is_test"]
    assert info["input_shape"] == (1, 28, 28) and info["num_classes"] == 10
    assert instantiate(make_cfg().data).describe()["val_is_test"]
    with pytest.raises(ValueError, match="split must be"):
        d.example_batch(1, "holdout")


def test_folder_cache_key_changes_with_the_folder(tmp_path: Path) -> None:
    base = write_png_folder(tmp_path / "f", splits=("train",), n=5)
    _, files = folder.list_images(base / "train")
    key = folder._cache_key(base / "train", files, 3, 32)
    assert key != folder._cache_key(base / "train", files[:-1], 3, 32)
    assert key != folder._cache_key(base / "train", files, 1, 32)
