"""A checkpoint is enough (issue 30, items 1, 2, 8): every mode takes the model, data set and task
from `ckpt=`, refuses an override that contradicts it in one line, writes its results to
`<run>/<mode>/NNN/` (no TensorBoard events there), and predict/export read no data set.

Each command runs `dlrun` in this process (dlrun.cli.main), as test_resume_config does.
"""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

import dlrun
from dlrun.cli import run
from tests.fixtures import CIFAR_CLASSES
from tests.test_resume_config import dlrun as dlrun_cli  # `dlrun` in this process

V1 = Path(__file__).parent / "data" / "v1"
RUN_81F06B5 = Path(__file__).parent / "data" / "run_81f06b5"
# Not the default config (lenet, mnist): the checkpoint's own choices must be what a mode builds.
TRAINED = ("model=lenet", "data=cifar10", "model.widths=[4,8]", "data.batch_size=16",
           "trainer.max_steps=4", "data.eval_subset=20", "optim.lr=0.003")  # fmt: skip


@pytest.fixture(autouse=True)
def _env(one_thread: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # Hydra's own folders (outputs/...) land here
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # main() sets it to 1: restored afterwards
    monkeypatch.setenv("TQDM_DISABLE", "1")
    yield
    GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """A CIFAR-10 LeNet of non-default widths, as `dlrun` leaves it: <run>/checkpoints/last.pt."""
    from hydra import compose, initialize_config_dir

    from dlrun.cli import CONFIG_DIR

    run_dir = tmp_path_factory.mktemp("run") / "run"
    cache = tmp_path_factory.mktemp("cache")
    base = [f"data.root={data_root}", "device=cpu", "trainer.progress=false",
            f"data.source.cache_dir={cache}", "trainer.num_threads=1"]  # fmt: skip
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*base, *TRAINED])
        run(cfg, run_dir, {"model": "lenet", "data": "cifar10"})  # the groups Hydra records
    GlobalHydra.instance().clear()
    return run_dir


def pictures(folder: Path) -> Path:
    """Three PNGs: two colour 32x32 (as trained), one grey 40x20 (unlike them)."""
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"img{i}.png")
    Image.new("L", (40, 20), 128).save(folder / "grey.png")
    return folder


def no_events(folder: Path) -> bool:
    return not list(folder.rglob("events.out.tfevents*"))


def test_eval_takes_everything_from_the_checkpoint_and_writes_beside_the_run(
    trained, data_root, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("DLRUN_DATA", str(data_root))
    ckpt = trained / "checkpoints" / "last.pt"
    metrics = [trained / "eval" / f"{n:03d}" / "metrics.json" for n in (1, 2)]
    for path in metrics:
        code, out, err = dlrun_cli("mode=eval", f"ckpt={ckpt}", capsys=capsys, monkeypatch=monkeypatch)
        assert code == 0, err
        assert f"results: {path.parent.resolve()}" in out
    first, second = (json.loads(p.read_text()) for p in metrics)
    assert first["test/acc"] == second["test/acc"]
    assert (metrics[0].parent / "confusion_matrix.png").is_file()
    assert no_events(trained / "eval")  # results, not a run TensorBoard would list
    assert not (tmp_path / "outputs").exists()  # no top-level folder that looks like a run


def test_an_override_contradicting_the_checkpoint_is_refused_in_one_line(
    trained, data_root, capsys, monkeypatch
):
    monkeypatch.setenv("DLRUN_DATA", str(data_root))
    ckpt = trained / "checkpoints" / "last.pt"
    before = sorted(trained.rglob("*"))
    for given, named in [
        ("model=resnet18", "model: lenet (checkpoint) vs resnet18 (this command)"),
        ("model.widths=[8,16]", "model.widths: [4, 8] (checkpoint) vs [8, 16] (this command)"),
        ("data=mnist", "data: cifar10 (checkpoint) vs mnist (this command)"),
    ]:
        code, _, err = dlrun_cli("mode=eval", f"ckpt={ckpt}", given, capsys=capsys,
                                 monkeypatch=monkeypatch)  # fmt: skip
        assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err
    assert sorted(trained.rglob("*")) == before  # a refused mode leaves no folder behind
    # The checkpoint's own values repeated (the old `model=lenet data=cifar10`) are no conflict.
    code, _, err = dlrun_cli("mode=eval", f"ckpt={ckpt}", "model=lenet", "data=cifar10",
                             "data.eval_subset=8", capsys=capsys, monkeypatch=monkeypatch)  # fmt: skip
    assert code == 0, err


def test_predict_and_export_read_no_data_set(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DLRUN_DATA", str(tmp_path / "gone"))  # the data folder no longer exists
    ckpt = trained / "checkpoints" / "last.pt"
    folder = pictures(tmp_path / "in")
    code, out, err = dlrun_cli("mode=predict", f"ckpt={ckpt}", f"predict.input={folder}",
                               capsys=capsys, monkeypatch=monkeypatch)  # fmt: skip
    assert code == 0, err
    with open(trained / "predict" / "001" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == ["grey.png", "img0.png", "img1.png"]
    assert all(r["class"] in CIFAR_CLASSES for r in rows)  # names the checkpoint stores
    assert "1 of 3 input images differ" in out and "grey.png (grey, 40x20)" in out
    code, out, err = dlrun_cli("mode=export", f"ckpt={ckpt}", "export.format=torchscript",
                               capsys=capsys, monkeypatch=monkeypatch)  # fmt: skip
    assert code == 0, err
    sidecar = json.loads((trained / "export" / "001" / "model.pt.json").read_text())
    assert sidecar["classes"] == CIFAR_CLASSES and sidecar["check"]["of"] == "random images"
    assert no_events(trained / "predict") and no_events(trained / "export")


def test_a_run_folder_that_cannot_take_results_says_where_they_went(
    trained, tmp_path, capsys, monkeypatch
):
    run_dir = tmp_path / "copy"
    shutil.copytree(trained / "checkpoints", run_dir / "checkpoints")
    (run_dir / "predict").write_text("a file where the results folder would go")
    code, out, err = dlrun_cli("mode=predict", f"ckpt={run_dir / 'checkpoints' / 'last.pt'}",
                               f"predict.input={pictures(tmp_path / 'in')}", capsys=capsys,
                               monkeypatch=monkeypatch)  # fmt: skip
    assert code == 0, err
    assert f"cannot write in the run folder {run_dir}" in out
    assert list((tmp_path / "outputs").rglob("predictions.csv"))


def test_old_checkpoints_work_through_the_modes(data_root, tmp_path, capsys, monkeypatch):
    """Format 1 (tests/data/v1) and one written by 81f06b5 (before checkpoints described their
    data): eval with the data set, predict on a folder without it."""
    monkeypatch.setenv("DLRUN_DATA", str(data_root))
    v1 = tmp_path / "v1" / "checkpoints" / "best.pt"
    v1.parent.mkdir(parents=True)
    shutil.copy(V1 / "linear_best.pt", v1)
    code, _, err = dlrun_cli("mode=eval", f"ckpt={v1}", capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0, err
    assert "test/acc" in json.loads((v1.parents[1] / "eval" / "001" / "metrics.json").read_text())
    monkeypatch.setenv("DLRUN_DATA", str(tmp_path / "gone"))
    old = tmp_path / "old"
    shutil.copytree(RUN_81F06B5, old)
    code, _, err = dlrun_cli("mode=predict", f"ckpt={old / 'checkpoints' / 'last.pt'}",
                             f"predict.input={pictures(tmp_path / 'in')}", capsys=capsys,
                             monkeypatch=monkeypatch)  # fmt: skip
    assert code == 0, err
    rows = (old / "predict" / "001" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 4  # the header and three images, classes by number


def test_load_returns_the_class_names(trained):
    model, preprocess = dlrun.load(trained / "checkpoints" / "last.pt")
    assert preprocess.classes == CIFAR_CLASSES
    old_model, old = dlrun.load(RUN_81F06B5 / "checkpoints" / "last.pt")
    assert old.classes == [str(i) for i in range(10)]


def test_yolo_predict_and_gan_sample_need_only_the_checkpoint(
    make_cfg, tmp_path, capsys, monkeypatch, no_fid
):
    """The other data-free modes: a detector on a folder (its anchors come with the checkpoint,
    not from k-means on training boxes) and a GAN's samples, the data folder gone."""
    yolo = ("model=yolo", "data=mnist_det", "model.width=4", "data.train_scenes=16",
            "data.test_scenes=4", "data.batch_size=8", "data.val_scenes=0", "trainer.max_steps=1")  # fmt: skip
    run(make_cfg(*yolo), tmp_path / "yolo", {"model": "yolo", "data": "mnist_det"})
    gan = ("model=gan", "model.g_hidden=[16,32]", "model.d_hidden=[16]", "model.latent_dim=8",
           "data.batch_size=50", "trainer.max_steps=1")  # fmt: skip
    run(make_cfg(*gan), tmp_path / "gan", {"model": "gan", "data": "mnist"})
    GlobalHydra.instance().clear()
    monkeypatch.setenv("DLRUN_DATA", str(tmp_path / "gone"))
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    Image.new("L", (64, 64), 0).save(scenes / "blank.png")
    code, out, err = dlrun_cli("mode=predict", f"ckpt={tmp_path / 'yolo/checkpoints/last.pt'}",
                               f"predict.input={scenes}", "predict.score=0", capsys=capsys,
                               monkeypatch=monkeypatch)  # fmt: skip
    assert code == 0, err
    assert "reads no data set" in out and "k-means" not in out
    assert (tmp_path / "yolo" / "predict" / "001" / "predictions.json").is_file()
    code, out, err = dlrun_cli("mode=sample", f"ckpt={tmp_path / 'gan/checkpoints/last.pt'}",
                               "sample.n=4", capsys=capsys, monkeypatch=monkeypatch)  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "gan" / "sample" / "001" / "grid.png").is_file()
