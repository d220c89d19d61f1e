"""Bad data files end with a UserError that names the file and the fix, never a traceback."""

import io
import logging
import os
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from dlrun.cli import build, run
from dlrun.data import cifar10, folder, mnist
from dlrun.data.archive import safe_extract
from dlrun.errors import UserError
from tests.fixtures import CIFAR_CLASSES, write_cifar_pickles, write_idx, write_png_folder

IDX_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


def user_error(call, *args, **kwargs) -> str:
    """The message of the UserError `call` raises (the test fails if it raises nothing else)."""
    with pytest.raises(UserError) as err:
        call(*args, **kwargs)
    return str(err.value)


# ---------------------------------------------------------------- MNIST / Fashion-MNIST IDX files


@pytest.mark.parametrize("name", IDX_FILES)
def test_mnist_truncated_file_is_named(tmp_path: Path, name: str) -> None:
    raw = write_idx(tmp_path, "MNIST", n_train=20, n_test=10) / "MNIST" / "raw"
    assert len(mnist.load(tmp_path, download=False).train_x) == 20  # the intact files load
    path = raw / name
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-5])
    msg = user_error(mnist.load, tmp_path, download=False)
    assert str(path) in msg and "truncated" in msg and "Re-download" in msg
    assert f"{size - 5} bytes" in msg and f"says {size} bytes" in msg
    assert "data.download=true" in msg
    assert all(other not in msg for other in IDX_FILES if other != name)


def test_fashion_mnist_oversized_file_is_named(tmp_path: Path) -> None:
    path = write_idx(tmp_path, "FashionMNIST", n_train=20, n_test=10) / "FashionMNIST" / "raw"
    path = path / "train-images-idx3-ubyte"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes() + b"\0" * 7)
    msg = user_error(mnist.load, tmp_path, download=False, name="FashionMNIST")
    assert str(path) in msg and f"{size + 7} bytes" in msg and f"says {size} bytes" in msg
    assert "longer than its header says" in msg and "Re-download" in msg


def test_mnist_bad_magic_is_named(tmp_path: Path) -> None:
    raw = write_idx(tmp_path, "MNIST", n_train=20, n_test=10) / "MNIST" / "raw"
    path = raw / "t10k-images-idx3-ubyte"
    import gzip  # the usual mistake: the .gz file saved under the plain name

    path.write_bytes(gzip.compress(path.read_bytes()))
    msg = user_error(mnist.load, tmp_path, download=False)
    assert str(path) in msg and "magic number" in msg and "1f 8b" in msg and "Re-download" in msg


def test_mnist_image_and_label_counts_must_agree(tmp_path: Path) -> None:
    raw = write_idx(tmp_path, "MNIST", n_train=20, n_test=10) / "MNIST" / "raw"
    labels = raw / "train-labels-idx1-ubyte"
    labels.write_bytes(struct.pack(">II", 2049, 15) + bytes(15))  # a valid file of 15 labels
    msg = user_error(mnist.load, tmp_path, download=False)
    assert str(labels) in msg and "15 labels" in msg and "20 images" in msg


def test_mnist_one_missing_file_is_named(tmp_path: Path) -> None:
    raw = write_idx(tmp_path, "MNIST", n_train=20, n_test=10) / "MNIST" / "raw"
    (raw / "t10k-labels-idx1-ubyte").unlink()
    msg = user_error(mnist.load, tmp_path, download=False)
    assert "MNIST was not found" in msg and str(raw / "t10k-labels-idx1-ubyte") in msg
    assert "t10k-images-idx3-ubyte" not in msg and "data.root" in msg


def test_mnist_damaged_file_stops_a_run(make_cfg, tmp_path: Path) -> None:
    root = write_idx(tmp_path / "data", "MNIST", n_train=20, n_test=10)
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    cfg = make_cfg(f"data.root={root}", "data.download=false", "model=linear")
    with pytest.raises(UserError, match="train-images-idx3-ubyte is damaged") as err:
        run(cfg, tmp_path / "run")
    assert str(path) in str(err.value) and "\n" not in str(err.value)  # one paragraph
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------- CIFAR-10 pickle batches


@pytest.mark.parametrize("name", ["data_batch_3", "test_batch", "batches.meta"])
def test_cifar_truncated_pickle_is_named(tmp_path: Path, name: str) -> None:
    base = write_cifar_pickles(tmp_path, per_batch=4, n_test=4) / cifar10.BATCHES
    assert len(cifar10.load(tmp_path, download=False).train_x) == 20  # the intact files load
    path = base / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    msg = user_error(cifar10.load, tmp_path, download=False)
    assert f"CIFAR-10 file {path} " in msg and "truncated or corrupt" in msg
    assert "download CIFAR-10 again" in msg


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Exec:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


@pytest.mark.parametrize(
    ("payload", "global_name"),
    [
        (lambda marker: _System(f"touch '{marker}'"), "system"),
        (lambda marker: _Exec(f"open({str(marker)!r}, 'w').close()"), "builtins.exec"),
    ],
)
def test_cifar_pickle_that_runs_code_is_refused(tmp_path: Path, payload, global_name) -> None:
    base = write_cifar_pickles(tmp_path / "data", per_batch=4, n_test=4) / cifar10.BATCHES
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"data": payload(marker), "labels": [0]})
    (base / "data_batch_2").write_bytes(evil)
    msg = user_error(cifar10.load, tmp_path / "data", download=False)
    assert msg.startswith(f"Refused to load {base / 'data_batch_2'}: it asks to run ")
    assert global_name in msg and "which a CIFAR-10 batch never does" in msg
    assert not marker.exists()
    pickle.loads(evil)  # the payload is live: a plain pickle.load would have run it
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_of_every_pickle_protocol_load(tmp_path: Path, protocol: int) -> None:
    """The allow-list takes what numpy writes: _reconstruct, _codecs.encode, _frombuffer."""
    base = tmp_path / cifar10.BATCHES
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [*cifar10.TRAIN_BATCHES, "test_batch"]:
        data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
        entry = {"batch_label": name, "data": data, "labels": [1, 2, 3], "filenames": ["a", "b"]}
        (base / name).write_bytes(pickle.dumps(entry, protocol=protocol))
    meta = {"label_names": CIFAR_CLASSES, "num_vis": 3072}
    (base / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    splits = cifar10.load(tmp_path, download=False)
    assert splits.train_x.shape == (15, 3, 32, 32) and splits.test_y.tolist() == [1, 2, 3]
    assert torch.equal(splits.test_x.reshape(3, -1), torch.from_numpy(data))


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            {"data": np.zeros((4, 3000), np.uint8), "labels": [0] * 4},
            "not an array of rows of 3072",
        ),
        ({"data": np.zeros((4, 3072), np.uint8), "labels": [0] * 3}, "4 images but 3 labels"),
        (
            {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 10]},
            "labels run from 0 to 10",
        ),
        ({"data": np.zeros((4, 3072), np.uint8)}, "no 'labels' entry"),
        ([1, 2, 3], "no 'data' entry"),
    ],
)
def test_cifar_batch_of_the_wrong_shape_is_named(tmp_path: Path, entry, expected) -> None:
    base = write_cifar_pickles(tmp_path, per_batch=4, n_test=4) / cifar10.BATCHES
    (base / "test_batch").write_bytes(pickle.dumps(entry))
    msg = user_error(cifar10.load, tmp_path, download=False)
    assert f"CIFAR-10 file {base / 'test_batch'} is not a valid batch" in msg and expected in msg


def test_cifar_missing_batch_is_named(tmp_path: Path) -> None:
    base = write_cifar_pickles(tmp_path, per_batch=4, n_test=4) / cifar10.BATCHES
    (base / "data_batch_4").unlink()
    msg = user_error(cifar10.load, tmp_path, download=False)
    assert "CIFAR-10 was not found" in msg and str(base / "data_batch_4") in msg


def _tar_gz(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_cifar_download_is_checked_and_extracted_safely(tmp_path: Path, monkeypatch) -> None:
    good = write_cifar_pickles(tmp_path / "src", per_batch=4, n_test=4) / cifar10.BATCHES
    members = {f"{cifar10.BATCHES}/{p.name}": p.read_bytes() for p in good.iterdir()}
    calls = []

    def fake_download(url, root, filename, md5):  # stands in for torchvision's download_url
        calls.append((url, filename, md5))
        Path(root).mkdir(parents=True, exist_ok=True)
        _tar_gz(Path(root) / filename, archive)

    monkeypatch.setattr(cifar10, "download_url", fake_download)
    root = tmp_path / "root"
    archive = {**members, "../evil": b"x"}
    msg = user_error(cifar10.load, root, download=True)
    assert f"Refused to extract {root / 'cifar-10-python.tar.gz'}" in msg and "'../evil'" in msg
    assert not (tmp_path / "evil").exists() and not (root / cifar10.BATCHES).exists()
    archive = members
    (root / "cifar-10-python.tar.gz").unlink()
    splits = cifar10.load(root, download=True)
    assert splits.train_x.shape == (20, 3, 32, 32) and splits.classes == CIFAR_CLASSES
    from torchvision.datasets import CIFAR10

    assert calls[-1] == (CIFAR10.url, CIFAR10.filename, CIFAR10.tgz_md5)


def test_cifar_failed_download_names_the_reason(tmp_path: Path, monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise URLError("no network here")

    monkeypatch.setattr(cifar10, "download_url", offline)
    msg = user_error(cifar10.load, tmp_path, download=True)
    assert "CIFAR-10 was not found" in msg and "download failed" in msg and "no network" in msg


# ------------------------------------------------------------------------------- image folders


def _damaged_folder(base: Path) -> tuple[Path, list[Path]]:
    """A 24-image train/test tree, plus an empty and a truncated PNG in train/."""
    write_png_folder(base, n=12, classes=["a", "b", "c"])
    empty = base / "train" / "a" / "empty.png"
    empty.write_bytes(b"")
    good = sorted((base / "train" / "b").glob("*.png"))[0]
    truncated = base / "train" / "c" / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:150])
    return base, [empty, truncated]


def _good_images(split_dir: Path) -> list[tuple[int, bytes]]:
    """(label, pixels) of every decodable image, decoded one by one, sorted."""
    _, files = folder.list_images(split_dir)
    out = []
    for path, label in files:
        try:
            out.append((label, folder._decode(path, 3, 32).numpy().tobytes()))
        except OSError:
            pass
    return sorted(out)


def test_bad_images_error_names_every_bad_file(tmp_path: Path) -> None:
    base, bad = _damaged_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    msg = user_error(folder.load, base, False, cache_dir=str(cache))
    assert "2 of the 14 image files" in msg and all(str(p) in msg for p in bad)
    assert "image file is truncated" in msg and "cannot identify image file" in msg
    assert "data.bad_images=skip" in msg and "delete" in msg
    assert not list(cache.rglob("*.pt"))  # a failed decode is never cached


def test_bad_images_skip_warns_and_keeps_exactly_the_good_ones(tmp_path: Path, caplog) -> None:
    base, bad = _damaged_folder(tmp_path / "imgs")
    with caplog.at_level(logging.WARNING, logger="dlrun.data.folder"):
        splits = folder.load(base, False, cache_dir=str(tmp_path / "cache"), bad_images="skip")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "leaving out 2 of the 14" in warnings[0]
    assert all(str(p) in warnings[0] for p in bad)
    assert len(splits.train_x) == 12 and len(splits.test_x) == 12
    loaded = sorted(
        (int(label), image.numpy().tobytes())
        for image, label in zip(splits.train_x, splits.train_y, strict=True)
    )
    assert loaded == _good_images(base / "train")  # every good image, each with its own label


def test_bad_images_cache_is_not_shared_between_policies(tmp_path: Path, monkeypatch) -> None:
    base, bad = _damaged_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    skipped = folder.load(base, False, cache_dir=str(cache), bad_images="skip")
    assert len(list(cache.rglob("*.pt"))) == 2  # train and test, both decoded while skipping
    msg = user_error(folder.load, base, False, cache_dir=str(cache))  # error: not the skip cache
    assert str(bad[0]) in msg
    assert len(list(cache.rglob("*.pt"))) == 2
    decoded = []
    original = folder._decode
    monkeypatch.setattr(folder, "_decode", lambda *a: decoded.append(a) or original(*a))
    again = folder.load(base, False, cache_dir=str(cache), bad_images="skip")
    assert decoded == [] and torch.equal(again.train_x, skipped.train_x)  # skip: its own cache
    for path in bad:
        path.unlink()
    fixed = folder.load(base, False, cache_dir=str(cache))  # the files deleted: error is happy
    assert len(fixed.train_x) == 12 and len(decoded) == 24


def test_bad_images_all_bad_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    base = write_png_folder(tmp_path / "imgs", n=6, classes=["a", "b"])
    for path in (base / "test").rglob("*.png"):
        path.write_bytes(b"not a png")
    msg = user_error(folder.load, base, False, cache_dir=None, bad_images="skip")
    assert f"None of the 6 image files in {base / 'test'}" in msg
    assert str(next((base / "test").rglob("*.png"))) in msg


def test_bad_images_policy_goes_through_the_config(make_cfg, tmp_path: Path) -> None:
    root, bad = _damaged_folder(tmp_path / "root" / "cifar10")
    root = root.parent  # data=cifar10 reads <root>/cifar10/{train,test}/<class>/*.png
    with pytest.raises(UserError) as err:
        run(make_cfg("data=cifar10", f"data.root={root}", "model=linear"), tmp_path / "run")
    assert all(str(p) in str(err.value) for p in bad)
    data = instantiate(make_cfg("data=cifar10", f"data.root={root}", "data.bad_images=skip").data)
    assert len(data.train_x) == 12 and len(data.test_x) == 12
    folder_root = tmp_path / "root" / "cifar10"
    skipped = instantiate(
        make_cfg("data=imagefolder", f"data.root={folder_root}", "data.bad_images=skip").data
    )
    assert len(skipped.train_x) == 12
    bad_value = make_cfg("data=imagefolder", f"data.root={folder_root}", "data.bad_images=maybe")
    with pytest.raises(UserError, match="data.bad_images='maybe' is not a policy"):
        build(bad_value.data, "data")


# ------------------------------------------------------------------------------ safe_extract


def _tar(path: Path, members: list[tarfile.TarInfo], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for info in members:
            data = b"payload" if info.isreg() else b""
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def _bad_archive(tmp: Path, case: str) -> tuple[Path, str]:
    """An archive whose second member is hostile (the first is harmless), and that member's name."""
    ok = _info("good.txt")
    outside = tmp / "outside"
    if case == "zip-dotdot":
        path = tmp / "bad.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("good.txt", b"payload")
            zf.writestr("../outside/evil", b"payload")
        return path, "../outside/evil"
    members = {
        "tar-dotdot": _info("../outside/evil"),
        "tar-absolute": _info(str(outside / "evil")),
        "tar-symlink-etc": _info("etc", tarfile.SYMTYPE, "/etc"),
        "tar-symlink-up": _info("up", tarfile.SYMTYPE, "../outside"),
        "tar-hardlink-out": _info("hard", tarfile.LNKTYPE, "../outside/evil"),
        "tar-fifo": _info("fifo", tarfile.FIFOTYPE),
        "tar-chardev": _info("dev", tarfile.CHRTYPE),
    }
    if case == "tar-symlink-chain":  # 'here' -> '.', then 'esc' -> 'here/..': outside on disk
        path = _tar(
            tmp / "bad.tar",
            [ok, _info("here", tarfile.SYMTYPE, "."), _info("esc", tarfile.SYMTYPE, "here/..")],
        )
        return path, "esc"
    path = _tar(tmp / "bad.tar.gz", [ok, members[case]], "w:gz")
    return path, members[case].name


@pytest.mark.parametrize(
    "case",
    [
        "tar-dotdot",
        "tar-absolute",
        "tar-symlink-etc",
        "tar-symlink-up",
        "tar-symlink-chain",
        "tar-hardlink-out",
        "tar-fifo",
        "tar-chardev",
        "zip-dotdot",
    ],
)
def test_safe_extract_refuses_a_hostile_member(tmp_path: Path, case: str) -> None:
    archive, member = _bad_archive(tmp_path, case)
    (tmp_path / "outside").mkdir()
    target = tmp_path / "target"
    msg = user_error(safe_extract, archive, target)
    assert f"Refused to extract {archive}" in msg and f"'{member}'" in msg
    assert not target.exists() or not any(target.iterdir())  # nothing, not even good.txt
    assert not any((tmp_path / "outside").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([archive.name, "outside"])


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz", ".zip"])
def test_safe_extract_extracts_a_good_archive(tmp_path: Path, suffix: str) -> None:
    archive = tmp_path / f"good{suffix}"
    files = {"top/a.txt": b"alpha", "top/sub/b.bin": bytes(range(256))}
    if suffix == ".zip":
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in files.items():
                zf.writestr(name, data)
    else:
        mode = "w" if suffix == ".tar" else "w:gz"
        with tarfile.open(archive, mode) as tf:
            tf.addfile(_info("./", tarfile.DIRTYPE))  # as `tar -C dir -czf x.tgz .` writes
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            tf.addfile(_info("top/link", tarfile.SYMTYPE, "sub/b.bin"))  # a link that stays inside
    target = tmp_path / "out"
    paths = safe_extract(archive, target)
    for name, data in files.items():
        assert (target / name).read_bytes() == data and target / name in paths
    if suffix != ".zip":
        assert (target / "top" / "link").is_symlink()
        assert (target / "top" / "link").read_bytes() == files["top/sub/b.bin"]


def test_safe_extract_names_a_truncated_archive(tmp_path: Path) -> None:
    archive = _tar_gz(tmp_path / "data.tar.gz", {"a.bin": os.urandom(50_000)})
    archive.write_bytes(archive.read_bytes()[:20_000])
    msg = user_error(safe_extract, archive, tmp_path / "out")
    assert f"Could not read the archive {archive}" in msg and "truncated or corrupt" in msg
    assert "download it again" in msg and not (tmp_path / "out").exists()
