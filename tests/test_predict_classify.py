"""A classifier's mode=predict (predictions.csv) and dlrun.load, the notebook API."""

import csv
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

import dlrun
from dlrun.cli import CONFIG_DIR, build_trainer, run
from dlrun.data.folder import decode
from dlrun.data.transforms import Normalize
from dlrun.errors import UserError

MNIST = ("model=lenet", "data=mnist", "model.activation=relu", "data.batch_size=16")
CIFAR = ("model=lenet", "data=cifar10", "model.activation=relu", "data.batch_size=16")


@pytest.fixture(autouse=True)
def _threads(one_thread: None) -> None:
    """Tiny nets: one thread each (see conftest)."""


@pytest.fixture(scope="module")
def cfg_of(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., DictConfig]:
    """conftest's make_cfg for module-scoped fixtures: the fixture data, a private cache."""
    cache = tmp_path_factory.mktemp("cache")

    def make(*overrides: str) -> DictConfig:
        base = [f"data.root={data_root}", "device=cpu", "trainer.progress=false"]
        if "data=cifar10" in overrides:
            base.append(f"data.source.cache_dir={cache}")
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("train", overrides=base + list(overrides))

    return make


def _train(cfg_of: Callable[..., DictConfig], run_dir: Path, *keys: str) -> Path:
    run(cfg_of(*keys, "trainer.max_steps=4", "data.eval_subset=20"), run_dir)
    return run_dir / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def mnist_ckpt(cfg_of: Callable[..., DictConfig], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(cfg_of, tmp_path_factory.mktemp("mnist"), *MNIST)


@pytest.fixture(scope="module")
def cifar_ckpt(cfg_of: Callable[..., DictConfig], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(cfg_of, tmp_path_factory.mktemp("cifar"), *CIFAR)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _check_row(row: dict[str, str], probs: torch.Tensor, classes: list[str]) -> None:
    """One CSV row against the model's own softmax for that image."""
    top_p, top_i = probs.topk(5)
    assert row["class"] == classes[int(top_i[0])]
    assert float(row["probability"]) == pytest.approx(float(top_p[0]), abs=1e-4)
    listed = [item.rsplit(":", 1) for item in row["top5"].split(";")]
    assert [name for name, _ in listed] == [classes[int(i)] for i in top_i]
    assert [float(p) for _, p in listed] == pytest.approx(top_p.tolist(), abs=1e-4)


def test_predict_on_a_folder_writes_one_row_per_file_as_the_model_scores_it(
    cfg_of, mnist_ckpt: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    files = {"b.png": (40, 3), "a.jpg": (28, 1), "c.bmp": (17, 3)}  # other sizes, RGB, formats
    for name, (size, c) in files.items():
        pixels = rng.integers(0, 256, (size, size, c), dtype=np.uint8).squeeze()
        Image.fromarray(pixels).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    cfg = cfg_of(*MNIST, "mode=predict", f"ckpt={mnist_ckpt}", f"predict.input={folder}")
    out = run(cfg, tmp_path / "p")
    assert out == {"predict/items": 3.0}
    path = tmp_path / "p" / "predict" / "predictions.csv"
    rows = _rows(path)
    assert list(rows[0]) == ["file", "class", "probability", "top5"]
    assert [r["file"] for r in rows] == ["a.jpg", "b.png", "c.bmp"]  # sorted, with suffixes
    model, preprocess = dlrun.load(mnist_ckpt)
    classes = build_trainer(cfg_of(*MNIST), tmp_path / "unused").data.describe()["classes"]
    assert len(set(classes)) == 10
    with torch.no_grad():
        for row in rows:
            _check_row(row, model(preprocess(folder / row["file"])[None])[0].softmax(0), classes)


def test_predict_on_a_split_takes_its_first_n_items(cfg_of, mnist_ckpt: Path, tmp_path: Path):
    cfg = cfg_of(*MNIST, "mode=predict", f"ckpt={mnist_ckpt}", "predict.input=test", "predict.n=5")
    assert run(cfg, tmp_path / "p")["predict/items"] == 5
    rows = _rows(tmp_path / "p" / "predict" / "predictions.csv")
    assert [r["file"] for r in rows] == [f"test_{i:06d}" for i in range(5)]
    data = build_trainer(cfg_of(*MNIST), tmp_path / "unused").data
    model, _ = dlrun.load(mnist_ckpt)
    with torch.no_grad():
        probs = model(data.example_batch(5, "test")["image"]).softmax(1)
    for row, p in zip(rows, probs, strict=True):
        _check_row(row, p, data.describe()["classes"])


def test_predict_on_an_empty_folder_is_a_user_error(cfg_of, mnist_ckpt: Path, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    cfg = cfg_of(*MNIST, "mode=predict", f"ckpt={mnist_ckpt}", f"predict.input={tmp_path}/empty")
    with pytest.raises(UserError, match="neither a split .* nor a folder holding images"):
        run(cfg, tmp_path / "p")


def test_load_rebuilds_the_model_and_preprocess_equals_the_data_path(
    cfg_of, mnist_ckpt: Path, cifar_ckpt: Path, tmp_path: Path
) -> None:
    for ckpt, keys in ((mnist_ckpt, MNIST), (cifar_ckpt, CIFAR)):
        trainer = build_trainer(cfg_of(*keys, "mode=eval", f"ckpt={ckpt}"), tmp_path / "run")
        state = torch.load(ckpt, weights_only=True)
        trainer.model.load_state_dict(state["model"])
        model, preprocess = dlrun.load(ckpt)
        assert not model.training
        # A stored test image written as a PNG: preprocess gives exactly the batch training saw.
        batch = trainer.data.example_batch(4, "test")["image"]
        raw = trainer.data.example_batch(4, "test", mean=[0.0], std=[1 / 255])["image"]
        for i in range(4):
            pixels = raw[i].round().to(torch.uint8).permute(1, 2, 0).squeeze(-1).numpy()
            Image.fromarray(pixels).save(tmp_path / f"{i}.png")
            assert torch.equal(preprocess(Image.open(tmp_path / f"{i}.png")), batch[i])
        with torch.no_grad():
            assert torch.equal(model(batch), trainer.model.eval()(batch))
        # A file of another size and mode: dlrun's decoder plus the data's Normalize, bit for bit.
        odd = tmp_path / "odd.png"
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (45, 37, 3), np.uint8)).save(odd)
        c, s = preprocess.channels, preprocess.image_size
        want = Normalize(trainer.data.mean, trainer.data.std).normalize(decode(odd, c, s)[None])
        assert torch.equal(preprocess(odd), want[0])
        # A uint8 tensor batch: torchvision's resize, within float rounding of the same pixels.
        same_size = raw[:2].round().to(torch.uint8)
        assert torch.allclose(preprocess(same_size), batch[:2], atol=1e-6)
        assert preprocess(torch.zeros(2, 3, 50, 40, dtype=torch.uint8)).shape == (2, c, s, s)


def test_load_ema_weights_or_a_clear_error(mnist_ckpt: Path, tmp_path: Path) -> None:
    state = torch.load(mnist_ckpt, weights_only=True)
    ema = {k: v + 0.5 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save({**state, "ema": ema}, tmp_path / "ema.pt")
    model, _ = dlrun.load(tmp_path / "ema.pt", weights="ema")
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    plain, _ = dlrun.load(tmp_path / "ema.pt")
    assert all(torch.equal(v, state["model"][k]) for k, v in plain.state_dict().items())
    with pytest.raises(UserError, match="holds no weight average.*trainer.ema.decay"):
        dlrun.load(mnist_ckpt, weights="ema")
    with pytest.raises(UserError, match="weights='best' is not a choice"):
        dlrun.load(mnist_ckpt, weights="best")
    with pytest.raises(UserError, match="does not exist"):
        dlrun.load(tmp_path / "missing.pt")


def test_import_dlrun_stays_torch_free_and_load_is_lazy() -> None:
    code = "import sys, dlrun; assert 'torch' not in sys.modules; assert 'load' in dir(dlrun)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
    from dlrun import api, load

    assert load is dlrun.load is api.load
    with pytest.raises(AttributeError, match="no attribute 'loads'"):
        dlrun.loads  # noqa: B018
