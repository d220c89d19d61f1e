"""The unpaired (CycleGAN) data module on a tiny horse2zebra of real JPEGs: layout, decode and
cache, unaligned epochs, crops cut from the load size, exact resume, downloads (extracted safely),
the configs, and the domains as a classification set."""

import io
import urllib.error
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor

from dlrun.cli import CONFIG_DIR
from dlrun.data import folder, unpaired
from dlrun.data.folder import read_flat
from dlrun.data.in_memory import ClassificationData
from dlrun.data.unpaired import FOLDERS, UnpairedData
from dlrun.engine import checkpoint
from dlrun.errors import UserError
from tests.fixtures import write_unpaired

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
SIZE, LOAD = 32, 36  # crop and load size; the JPEGs are 40x40
N_A, N_B, N_TEST_A, N_TEST_B = 5, 7, 3, 4
Located = tuple[int, int, int, bool]  # image index, top, left, mirrored


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Holds horse2zebra/{trainA, trainB, testA, testB}; read-only for the tests that share it."""
    base = tmp_path_factory.mktemp("unpaired")
    write_unpaired(base, "horse2zebra", N_A, N_B, N_TEST_A, N_TEST_B, size=40)
    return base


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def make(root: Path, cache: Path, **kwargs: object) -> UnpairedData:
    args: dict = {"image_size": SIZE, "load_size": LOAD, "num_workers": 1} | kwargs
    return UnpairedData(name="horse2zebra", root=str(root), cache_dir=str(cache), **args)


def to_uint8(x: Tensor) -> Tensor:
    """Values in [-1, 1] back to the uint8 they were normalised from (checked to be such)."""
    u = torch.round((x + 1) * 127.5)
    assert ((u / 127.5 - 1) - x).abs().max() < 1e-5, "not x / 127.5 - 1 of integer x"
    assert u.min() >= 0 and u.max() <= 255
    return u.to(torch.uint8)


def locate(crop: Tensor, images: Tensor) -> list[Located]:
    """Every (image, top, left, mirrored) whose SIZE x SIZE window equals `crop` (uint8)."""
    span = images.shape[-1] - crop.shape[-1]
    s, found = crop.shape[-1], []
    for flipped, target in ((False, crop), (True, crop.flip(-1))):
        for top in range(span + 1):
            for left in range(span + 1):
                window = images[:, :, top : top + s, left : left + s]
                for i in (window == target).flatten(1).all(1).nonzero().flatten().tolist():
                    found.append((i, top, left, flipped))
    return found


def identify(x: Tensor, images: Tensor, others: Tensor) -> Located:
    """Where a normalised crop comes from: one window of one of `images`, none of `others`."""
    crop = to_uint8(x)
    assert locate(crop, others) == [], "a crop of the other domain's images"
    found = locate(crop, images)
    assert len(found) == 1, f"the crop is found at {found}, not at exactly one window"
    return found[0]


# ----- 1. layout, decode, cache ---------------------------------------------------------------
def test_layout_is_decoded_at_load_and_image_size_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = write_unpaired(tmp_path / "data", "horse2zebra", N_A, N_B, N_TEST_A, N_TEST_B)
    cache = tmp_path / "cache"
    decoded: list[str] = []
    real = folder._decode

    def counting(path: Path, *args: object) -> Tensor:
        decoded.append(Path(path).parent.name)
        return real(path, *args)

    def failing(*_args: object) -> Tensor:
        raise RuntimeError("decoded instead of read from the cache")

    monkeypatch.setattr(folder, "_decode", counting)
    d = make(tmp_path / "data", cache)
    assert sorted(decoded) == sorted(
        ["trainA"] * N_A + ["trainB"] * N_B + ["testA"] * N_TEST_A + ["testB"] * N_TEST_B
    )
    shapes = {k: (len(v), *v.shape[1:]) for k, v in d.x.items()}
    assert shapes == {
        "train_a": (N_A, 3, LOAD, LOAD),
        "train_b": (N_B, 3, LOAD, LOAD),
        "test_a": (N_TEST_A, 3, SIZE, SIZE),
        "test_b": (N_TEST_B, 3, SIZE, SIZE),
    }
    assert all(v.dtype == torch.uint8 for v in d.x.values())
    # File-name order, bicubic at the load size (train) or the image size (test), not cropped.
    for key, sub in zip(d.x, FOLDERS, strict=True):
        size = LOAD if sub.startswith("train") else SIZE
        files = sorted((base / sub).iterdir())
        want = torch.stack([folder.decode(f, 3, size, "bicubic") for f in files])
        assert torch.equal(d.x[key], want), key
    # The greyscale files (trainA/001, testB/000) come out RGB with three equal channels.
    for grey in (d.images("train", "a")[1], d.images("test", "b")[0]):
        assert (
            grey.shape[0] == 3 and torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
        )
    for split in ("train", "test"):  # A reddish, B bluish: the domains were not swapped
        for dom, sign in (("a", 1), ("b", -1)):
            for i, img in enumerate(d.images(split, dom).float()):
                if (split, dom, i) not in {("train", "a", 1), ("test", "b", 0)}:
                    assert sign * (img[0].mean() - img[2].mean()) > 50

    assert len(list((cache / "folders").glob("*.pt"))) == 4
    monkeypatch.setattr(folder, "_decode", failing)
    again = make(tmp_path / "data", cache)  # every folder read from the cache
    assert all(torch.equal(again.x[k], d.x[k]) for k in d.x)

    extra = base / "trainB" / "007.jpg"  # a changed folder is decoded again ...
    extra.write_bytes((base / "trainB" / "003.jpg").read_bytes())
    with pytest.raises(UserError, match=r"could not be decoded.*trainB"):
        make(tmp_path / "data", cache)
    decoded.clear()
    monkeypatch.setattr(folder, "_decode", counting)
    changed = make(tmp_path / "data", cache)
    assert decoded == ["trainB"] * (N_B + 1)  # ... and only that folder
    assert len(changed.x["train_b"]) == N_B + 1
    assert torch.equal(changed.x["train_b"][-1], changed.x["train_b"][3])
    assert torch.equal(changed.x["train_a"], d.x["train_a"])


# ----- 2. unaligned epochs --------------------------------------------------------------------
def test_an_epoch_is_the_larger_domain_once_and_the_smaller_at_random(
    root: Path, cache: Path
) -> None:
    d = make(root, cache)
    d.setup(CPU, seed=0)
    loader = d.train_loader()
    assert len(loader) == max(N_A, N_B) == N_B
    a, b = d.images("train", "a"), d.images("train", "b")
    orders_a: list[list[int]] = []
    orders_b: list[list[int]] = []
    for _ in range(4):
        ia, ib = [], []
        for batch in loader:
            assert batch.keys() == {"image_a", "image_b"}
            for x in batch.values():
                assert x.shape == (1, 3, SIZE, SIZE) and x.dtype == torch.float32
                # [-1, 1] up to float rounding: 255 normalises to 1.0000001 (x * (1/127.5) - 1)
                assert x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6
            ia.append(identify(batch["image_a"][0], a, b)[0])
            ib.append(identify(batch["image_b"][0], b, a)[0])
        assert len(ia) == len(ib) == N_B
        assert sorted(ib) == list(range(N_B))  # the larger domain: each image once
        assert len(set(ia)) < len(ia)  # the smaller one drawn with repeats
        orders_a.append(ia)
        orders_b.append(ib)
    assert {i for o in orders_a for i in o} == set(range(N_A))
    # New draws every epoch, in no fixed pattern.
    assert len({tuple(o) for o in orders_a}) == len({tuple(o) for o in orders_b}) == 4
    assert orders_b[0] != sorted(orders_b[0])


def test_batches_of_several_cover_the_epoch(root: Path, cache: Path) -> None:
    d = make(root, cache, batch_size=3)
    d.setup(CPU, seed=2)
    batches = list(d.train_loader())
    assert [len(x["image_a"]) for x in batches] == [len(x["image_b"]) for x in batches] == [3, 3, 1]
    a, b = d.images("train", "a"), d.images("train", "b")
    ib = [identify(x, b, a)[0] for batch in batches for x in batch["image_b"]]
    assert sorted(ib) == list(range(N_B))


# ----- 3. crops from the load size ------------------------------------------------------------
@pytest.mark.parametrize("hflip", [True, False], ids=["hflip", "no_hflip"])
def test_crops_are_windows_of_the_load_size_image(root: Path, cache: Path, hflip: bool) -> None:
    d = make(root, cache, batch_size=4, hflip=hflip)
    d.setup(CPU, seed=1)
    a, b = d.images("train", "a"), d.images("train", "b")
    assert a.shape[-1] == LOAD
    loader = d.train_loader()
    pairs: list[tuple[Located, Located]] = []
    for _ in range(3):
        for batch in loader:
            found_a = [identify(x, a, b) for x in batch["image_a"]]
            found_b = [identify(x, b, a) for x in batch["image_b"]]
            pairs += zip(found_a, found_b, strict=True)
    located = [p for pair in pairs for p in pair]
    assert len(located) == 2 * 3 * N_B
    offsets = {(top, left) for _, top, left, _ in located}
    assert len(offsets) > 1 and offsets <= {(t, s) for t in range(5) for s in range(5)}
    flips = [f for *_, f in located]
    if hflip:
        assert any(flips) and not all(flips)
    else:
        assert not any(flips)
    # Each domain its own crop: the two images of a batch item are not cut at one offset.
    assert any(pa[1:3] != pb[1:3] for pa, pb in pairs)
    if hflip:
        assert any(pa[3] != pb[3] for pa, pb in pairs)


# ----- 4. exact resume ------------------------------------------------------------------------
def test_resume_mid_epoch_replays_the_rest_exactly(root: Path, cache: Path, tmp_path: Path) -> None:
    def fresh() -> tuple[UnpairedData, Callable[[Iterable], list]]:
        d = make(root, cache, batch_size=2)
        d.setup(CPU, seed=5)
        aug = d.generators()["aug"]

        def run(batches: Iterable) -> list:
            out = []
            for batch in batches:
                torch.rand(3, generator=aug)  # a trainer step's own draws (the image pools)
                out.append(batch)
            return out

        return d, run

    def assert_same(x: list[dict[str, Tensor]], y: list[dict[str, Tensor]]) -> None:
        assert len(x) == len(y)
        for p, q in zip(x, y, strict=True):
            assert p.keys() == q.keys() and all(torch.equal(p[k], q[k]) for k in p)

    d, run = fresh()
    loader = d.train_loader()
    run(loader)
    first, second = run(loader), run(loader)  # resume inside the second epoch, not at the seed
    assert len(first) == 4

    d, run = fresh()
    loader = d.train_loader()
    run(loader)
    batches = loader.iterate()
    head = run(next(batches) for _ in range(2))
    with torch.random.fork_rng(devices=[]):  # rng_state/set_rng_state touch the global RNG
        state = {"position": loader.position(), "rng": checkpoint.rng_state(d.generators())}
        torch.save(state, tmp_path / "last.pt")
        del d, loader, batches, state
        saved = torch.load(tmp_path / "last.pt", weights_only=True)
        assert saved["position"]["batch"] == 2

        d, run = fresh()  # a new process: same seed, generators moved on elsewhere
        torch.rand(11, generator=d.generators()["order"])
        checkpoint.set_rng_state(saved["rng"], d.generators())  # as the trainer restores
        loader = d.train_loader()
        tail = run(loader.iterate(resume=saved["position"]))
    assert len(tail) == 2
    assert_same(head + tail, first)
    assert_same(run(loader), second)


# ----- 5. errors and the download -------------------------------------------------------------
def test_load_size_below_image_size_is_refused(root: Path, cache: Path) -> None:
    with pytest.raises(UserError, match=r"data\.load_size=30 is smaller than data\.image_size=32"):
        make(root, cache, load_size=30)
    make(root, cache, load_size=SIZE)  # equal is fine: nothing to crop away


@pytest.mark.parametrize("key", ["batch_size", "eval_batch_size"])
def test_batch_sizes_must_be_positive(root: Path, cache: Path, key: str) -> None:
    with pytest.raises(UserError, match=rf"data\.{key} must be a positive integer, got 0"):
        make(root, cache, **{key: 0})


def test_missing_folders_are_named(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "horse2zebra" / "trainA").mkdir(parents=True)  # three folders short
    with pytest.raises(UserError) as err:
        make(tmp_path, cache)
    msg = str(err.value)
    assert all(str(tmp_path / "horse2zebra" / f) in msg for f in FOLDERS), msg
    assert "data.download=true" in msg and "data.root" in msg


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        assert zf.namelist() == list(members)  # member names kept as written, even hostile ones
    return buf.getvalue()


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The members of a horse2zebra.zip as the authors' server has it: horse2zebra/<folder>/*.jpg."""
    staging = tmp_path_factory.mktemp("release")
    base = write_unpaired(staging, "horse2zebra", 3, 4, 2, 2, size=40)
    return {p.relative_to(staging).as_posix(): p.read_bytes() for p in sorted(base.rglob("*.jpg"))}


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Callable[[bytes | Exception], list[str]]:
    """urlopen (as dlrun.data.unpaired calls it) answering with a payload, or raising; the URLs."""

    def install(payload: bytes | Exception | io.BytesIO) -> list[str]:
        urls: list[str] = []

        def urlopen(url: str, timeout: float | None = None) -> io.BytesIO:
            urls.append(url)
            assert timeout is not None  # a dead server must not hang the run forever
            if isinstance(payload, Exception):
                raise payload
            return io.BytesIO(payload) if isinstance(payload, bytes) else payload

        monkeypatch.setattr(unpaired.urllib.request, "urlopen", urlopen)
        return urls

    return install


def test_download_fetches_and_extracts_the_release(
    tmp_path: Path, cache: Path, release: dict[str, bytes], serve: Callable
) -> None:
    urls = serve(zip_of(release))
    data = tmp_path / "data"
    d = make(data, cache, download=True)
    assert urls == ["https://efrosgans.eecs.berkeley.edu/cyclegan/datasets/horse2zebra.zip"]
    assert [len(d.x[k]) for k in ("train_a", "train_b", "test_a", "test_b")] == [3, 4, 2, 2]
    assert sorted(p.name for p in data.iterdir()) == ["horse2zebra"]  # the zip is gone
    make(data, cache, download=True)  # there now: not fetched again
    assert len(urls) == 1


@pytest.mark.parametrize("evil", ["../evil.txt", "horse2zebra/trainA/../../../evil.txt", "ABS"])
def test_download_refuses_members_outside_the_root(
    tmp_path: Path, cache: Path, release: dict[str, bytes], serve: Callable, evil: str
) -> None:
    data = tmp_path / "sub" / "data"
    outside = tmp_path / "sub" / "evil.txt"
    name = str(tmp_path / "abs" / "evil.txt") if evil == "ABS" else evil
    serve(zip_of({**release, name: b"owned"}))  # the hostile member after the good ones
    with pytest.raises(UserError, match=r"Refused to extract .*horse2zebra\.zip") as err:
        make(data, cache, download=True)
    assert name in str(err.value)
    assert not outside.exists() and not (tmp_path / "abs").exists()
    assert [p for p in tmp_path.rglob("*") if p.name == "evil.txt"] == []
    assert not (data / "horse2zebra").exists()  # nothing at all is extracted


def test_a_truncated_download_is_a_user_error(
    tmp_path: Path, cache: Path, release: dict[str, bytes], serve: Callable
) -> None:
    good = zip_of(release)
    serve(good[: len(good) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        make(tmp_path / "data", cache, download=True)


class ResetMidway(io.BytesIO):
    """A response whose connection drops after its first chunk."""

    def read(self, size: int | None = -1) -> bytes:
        if self.tell():
            raise ConnectionResetError(104, "Connection reset by peer")
        return super().read(size)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (urllib.error.URLError("Temporary failure in name resolution"), "name resolution"),
        (urllib.error.URLError(""), "urlopen error"),  # no reason given: still one shown
        (TimeoutError("timed out"), "timed out"),
        ("reset", "Connection reset by peer"),  # after part of the file was written
    ],
    ids=["no_network", "no_reason", "timeout", "reset_midway"],
)
def test_a_failed_download_names_the_url_and_why(
    tmp_path: Path, cache: Path, serve: Callable, error: Exception | str, reason: str
) -> None:
    serve(ResetMidway(b"PK" * (1 << 20)) if error == "reset" else error)
    data = tmp_path / "data"
    with pytest.raises(UserError) as err:
        make(data, cache, download=True)
    msg = str(err.value)
    assert unpaired.URL.format(name="horse2zebra") in msg
    why = msg.split("The download failed: ", 1)[1].split(". To fix it", 1)[0]
    assert why.strip() and reason in why, msg
    assert not data.exists()  # no partial file, and no folder it made, left behind


# ----- 6. the configs -------------------------------------------------------------------------
def compose_data(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides)).data


def test_unpaired_folder_config_reads_the_four_folders_in_root(root: Path, cache: Path) -> None:
    small = [f"data.cache_dir={cache}", f"data.image_size={SIZE}", f"data.load_size={LOAD}"]
    d = instantiate(
        compose_data("data=unpaired_folder", f"data.root={root / 'horse2zebra'}", *small)
    )
    assert isinstance(d, UnpairedData) and d.domains == ["A", "B"]
    assert [len(d.x[k]) for k in ("train_a", "train_b", "test_a", "test_b")] == [5, 7, 3, 4]
    assert d.x["train_a"].shape[-1] == LOAD and d.batch_size == 1 and d.hflip
    # folder "" is root itself: a root that only holds horse2zebra/ is not searched below
    with pytest.raises(InstantiationException) as err:
        instantiate(compose_data("data=unpaired_folder", f"data.root={root}", *small))
    assert isinstance(err.value.__cause__, UserError)
    msg = str(err.value.__cause__)
    assert msg.startswith("Data set unpaired_folder was not found") and str(root / "trainA") in msg
    h2z = instantiate(compose_data("data=horse2zebra", f"data.root={root}", *small))
    assert h2z.domains == ["horse", "zebra"] and torch.equal(h2z.x["test_b"], d.x["test_b"])


# ----- 7. the domains as a classification set -------------------------------------------------
def test_domains_are_two_labelled_classes(root: Path, cache: Path) -> None:
    splits = unpaired.domains(root, False, image_size=SIZE, cache_dir=str(cache), workers=1)
    assert splits.classes == ["A", "B"]
    for split, n_a, n_b in (("train", N_A, N_B), ("test", N_TEST_A, N_TEST_B)):
        x, y = getattr(splits, f"{split}_x"), getattr(splits, f"{split}_y")
        assert x.shape == (n_a + n_b, 3, SIZE, SIZE) and y.dtype == torch.int64
        assert (y == 0).sum() == n_a and (y == 1).sum() == n_b
        assert y.tolist() != sorted(y.tolist())  # mixed, not all of A first
        for label, sub in ((0, f"{split}A"), (1, f"{split}B")):  # label 0 is exactly A's images
            ref = read_flat(root / "horse2zebra" / sub, 3, SIZE, None, 1, "error", "bicubic")
            mine = x[y == label]
            assert sorted(map(bytes, mine.flatten(1).numpy())) == sorted(
                map(bytes, ref.flatten(1).numpy())
            )
    named = unpaired.domains(
        root, False, names=("horse", "zebra"), image_size=SIZE, cache_dir=str(cache)
    )
    assert named.classes == ["horse", "zebra"] and torch.equal(named.train_y, splits.train_y)

    cfg = compose_data(
        "data=horse2zebra_domains",
        f"data.root={root}",
        f"data.image_size={SIZE}",
        f"data.source.cache_dir={cache}",
        "data.val_split=0",  # every training image, to compare with the source's own
    )
    d = instantiate(cfg)
    assert isinstance(d, ClassificationData) and d.classes == ["horse", "zebra"]
    assert d.num_classes == 2 and torch.equal(d.train_y, splits.train_y)
    assert torch.equal(d.train_x, splits.train_x) and len(d.test_x) == N_TEST_A + N_TEST_B


# ----- 8. describe, example batches, evaluation loaders ---------------------------------------
def test_describe_example_batch_and_eval_loaders(root: Path, cache: Path) -> None:
    d = make(root, cache, domains=("horse", "zebra"), eval_batch_size=2)
    desc = d.describe()
    assert desc["input_shape"] == (3, SIZE, SIZE) and desc["classes"] == ["horse", "zebra"]
    assert desc["num_classes"] == 2 and desc["val_is_test"] is True
    # What the monitor's test-split warning advises: no selection, there is no validation split.
    setting, fix = desc["holdout_hint"]
    assert setting == "horse2zebra has no validation split"
    assert fix.startswith("trainer.monitor=null to train for a fixed length")
    assert desc["sizes"] == {
        "train": N_B,
        "val": N_TEST_A,
        "test": N_TEST_A,
        "train_a": N_A,
        "train_b": N_B,
        "test_a": N_TEST_A,
        "test_b": N_TEST_B,
    }
    o = (LOAD - SIZE) // 2  # the centre crop
    train = d.example_batch(2, "train")
    assert train.keys() == {"image_a", "image_b"}
    for key, dom in (("image_a", "a"), ("image_b", "b")):
        assert train[key].shape == (2, 3, SIZE, SIZE)
        centre = d.images("train", dom)[:2, :, o : o + SIZE, o : o + SIZE]
        assert torch.equal(to_uint8(train[key]), centre)
        val = d.example_batch(3)  # "val": the test images, whole
        assert torch.equal(to_uint8(val[key]), d.images("test", dom)[:3])

    d.setup(CPU, seed=0)
    val = [batch["image_a"] for batch in d.val_loader()]
    assert [len(x) for x in val] == [2, 1]
    assert torch.equal(to_uint8(torch.cat(val)), d.images("test", "a"))
    test_b = [batch["image_b"] for batch in d.domain_loader("test", "b")]
    assert torch.equal(to_uint8(torch.cat(test_b)), d.images("test", "b"))
    train_a = torch.cat([batch["image_a"] for batch in d.domain_loader("train", "a")])
    assert torch.equal(to_uint8(train_a), d.images("train", "a"))  # whole, at the load size
