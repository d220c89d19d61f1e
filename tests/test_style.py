"""Neural style transfer: Gram matrix and cost known answers, VGG layer names, the feature sources,
runs through the CLI with L-BFGS and Adam, exact resume, and the user's mistakes."""

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from torch import nn
from torchvision.models import vgg as tv_vgg

from dlrun.cli import CONFIG_DIR, build_trainer, run
from dlrun.errors import UserError
from dlrun.models.style import VGGFeatures, flat_layers, vgg_layer_names
from dlrun.models.vgg import vgg11, vgg19
from dlrun.tasks.style.features import build_features, imagenet_weights, vgg19_layers
from dlrun.tasks.style.losses import (
    StyleObjective,
    content_cost,
    gram_matrix,
    layer_style_cost,
    style_gram_target,
    total_variation,
)
from dlrun.tasks.style.trainer import StyleTrainer
from tests.conftest import stopped_at_step
from tests.test_cli import dlrun
from tests.test_monitor import scalars

pytestmark = pytest.mark.usefixtures("one_thread")
TIMING = ("time/", "images_per_s")
LAYERS = "{relu1_1:1,relu2_1:1,relu3_1:1}"  # small images: the first three stages are enough
TINY = ("model=style_transfer", "style.size=16", f"style.style_layers={LAYERS}",
        "style.content_layer=relu3_1", "style.style_weight=1000",
        "style.steps_per_epoch=2", "style.log_every_n_steps=2")  # fmt: skip


# ----- the costs ----------------------------------------------------------------------------------
def test_gram_matrix_shape_symmetry_and_known_answer() -> None:
    # Seeded, with an absolute tolerance: an entry near 0 of one random draw in ~40 missed the
    # default atol=1e-8 by float32 rounding (the two sides sum in different orders).
    a = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(0))
    g = gram_matrix(a)
    assert g.shape == (2, 5, 5) and torch.allclose(g, g.transpose(1, 2), atol=1e-6)
    assert torch.allclose(g[1], a[1].flatten(1) @ a[1].flatten(1).T, atol=1e-6)
    # channel 0 = [1, 2], channel 1 = [3, 4]: G = [[1+4, 3+8], [3+8, 9+16]]
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)
    assert gram_matrix(x).tolist() == [[[5.0, 11.0], [11.0, 25.0]]]


def test_content_style_and_tv_costs_known_answers() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)  # n_C 2, n_H 1, n_W 2
    assert content_cost(x, torch.zeros_like(x)).item() == pytest.approx(30 / (4 * 2 * 1 * 2))
    # (25 + 121 + 121 + 625) / (2 n_H n_W n_C)^2 = 892 / 64
    assert layer_style_cost(x, torch.zeros(1, 2, 2)).item() == pytest.approx(892 / 64)
    assert layer_style_cost(x, gram_matrix(x)).item() == 0
    # A style map of 4 positions against a generated map of 2: its Gram matrix halved.
    s = torch.randn(1, 2, 2, 2)
    assert torch.allclose(style_gram_target(s, 2), gram_matrix(s) / 2)
    ramp = torch.arange(4.0).view(1, 1, 2, 2)  # rows differ by 2, columns by 1
    assert total_variation(ramp).item() == pytest.approx(4 + 1)
    objective = StyleObjective(
        content_layer="a", style_layers={"a": 0.5, "b": 2.0}, content_weight=3, style_weight=10,
        tv_weight=0.1,
    )  # fmt: skip
    y = torch.ones(1, 2, 1, 2)
    targets = {
        "content": torch.zeros_like(x),
        "gram/a": gram_matrix(x),
        "gram/b": torch.zeros(1, 2, 2),
    }
    costs = objective({"a": x, "b": y}, targets, ramp)
    style = 0.5 * 0 + 2.0 * layer_style_cost(y, torch.zeros(1, 2, 2))
    assert costs["style_loss"].item() == pytest.approx(style.item())
    expected = 3 * 30 / 16 + 10 * style.item() + 0.1 * 5
    assert costs["loss"].item() == pytest.approx(expected) and objective.layers == ["a", "b"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"style_layers": {}}, "style.style_layers must map at least one layer"),
        (
            {"style_layers": {"a": 1}, "style_weight": -1},
            "style.style_weight must be a number >= 0",
        ),
        ({"style_layers": {"a": 1}, "content_weight": 0, "style_weight": 0}, "cannot both be 0"),
    ],
)
def test_bad_weights_are_user_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        StyleObjective(**kwargs)


# ----- VGG layers by name ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("depth", "bn", "known"),
    [
        (11, False, {"conv1_1": 0, "pool1": 2, "conv4_2": 13, "relu4_2": 14, "relu5_1": 17}),
        (11, True, {"conv1_1": 0, "bn1_1": 1, "relu3_2": 13, "relu4_2": 20, "conv5_1": 22}),
        # Gatys et al.'s VGG-19 layers at the indices the PyTorch tutorial uses
        (19, False, {"conv1_1": 0, "conv2_1": 5, "conv3_1": 10, "conv4_1": 19, "conv4_2": 21, "conv5_1": 28}),
        (19, True, {"conv4_2": 30, "bn4_2": 31, "relu4_2": 32, "relu5_1": 42, "pool5": 52}),
    ],
)  # fmt: skip
def test_layer_names_of_dlrun_and_torchvision_vggs(depth: int, bn: bool, known: dict) -> None:
    tv = list(tv_vgg.make_layers(tv_vgg.cfgs["A" if depth == 11 else "E"], batch_norm=bn))
    ours = flat_layers(
        (vgg11 if depth == 11 else vgg19)(num_classes=10, image_size=32, batch_norm=bn).features
    )
    assert [type(m) for m in ours] == [
        type(m) for m in tv
    ]  # dlrun's stages flatten to torchvision's
    names = vgg_layer_names(tv)
    assert vgg_layer_names(ours) == names
    assert {k: names[k] for k in known} == known
    assert sum(k.startswith("conv") for k in names) == depth - 3  # the 3 FC layers are not here
    for name, index in names.items():
        kind = {"conv": nn.Conv2d, "bn": nn.BatchNorm2d, "relu": nn.ReLU, "pool": nn.MaxPool2d}
        assert isinstance(tv[index], kind[name.rstrip("0123456789_")])


def test_features_are_frozen_cut_after_the_last_layer_and_pool_as_asked() -> None:
    torch.manual_seed(0)
    layers = flat_layers(vgg11(num_classes=10, image_size=32).features)
    wanted = ["conv2_1", "relu2_1", "conv3_1"]
    f = VGGFeatures(layers, wanted, mean=[0.5] * 3, std=[0.25] * 3, pool="avg")
    assert len(f.layers) == 7 and not any(p.requires_grad for p in f.parameters())
    assert not any(isinstance(m, nn.MaxPool2d) for m in f.layers) and not f.training
    x = torch.rand(1, 3, 16, 16)
    out = f(x)
    ref = (x - 0.5) / 0.25
    for m in f.layers[:4]:
        ref = m(ref)
    # conv2_1's output as the conv gave it: the in-place ReLU after it would have clipped it
    assert torch.equal(out["conv2_1"], ref) and (out["conv2_1"] < 0).any()
    assert torch.equal(out["relu2_1"], ref.relu()) and out["conv3_1"].shape == (1, 256, 4, 4)
    grey = VGGFeatures(
        [nn.Conv2d(1, 2, 3, padding=1), nn.ReLU()],
        ["relu1_1"],
        mean=[0.0],
        std=[1.0],
        in_channels=1,
    )
    assert grey(torch.rand(2, 3, 8, 8))["relu1_1"].shape == (2, 2, 8, 8)


# ----- fixtures: images and a dlrun VGG checkpoint ----------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A smooth 32x24 'photo' (content) and a 32x32 stripe pattern (style), as PNG files."""
    folder = tmp_path_factory.mktemp("style_images")
    yy, xx = np.mgrid[0:24, 0:32]
    content = np.stack([xx * 8, yy * 10, 255 - xx * 8], -1).clip(0, 255).astype(np.uint8)
    stripes = ((np.mgrid[0:32, 0:32][1] // 3) % 2 * 255).astype(np.uint8)
    Image.fromarray(content).save(folder / "content.png")
    Image.fromarray(stripes).convert("RGB").save(folder / "style.png")
    (folder / "empty.png").write_bytes(b"")
    return {k: folder / f"{k}.png" for k in ("content", "style", "empty")}


@pytest.fixture(scope="module")
def vgg_ckpt(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dlrun VGG-11-BN checkpoint of (fake) CIFAR-10, written as every classifier run writes one."""
    folder = tmp_path_factory.mktemp("vgg")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            f"data.root={data_root}", "device=cpu", "trainer.progress=false", "model=vgg11",
            "model.batch_norm=true", "data=cifar10", "trainer.max_steps=1", "data.batch_size=8",
            "optim=sgd", "optim.momentum=0", "trainer.monitor=null",
        ])  # fmt: skip
    run(cfg, folder)
    return folder / "checkpoints" / "last.pt"


@pytest.fixture
def style_cfg(
    make_cfg: Callable, images: dict[str, Path], vgg_ckpt: Path, tmp_path: Path, monkeypatch
) -> Callable:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached ImageNet weights

    def make(*overrides: str):
        lbfgs = [] if any(o.startswith("optim=") for o in overrides) else ["optim.max_iter=4"]
        return make_cfg(
            *TINY, f"style.content={images['content']}", f"style.style={images['style']}",
            "style.features=ckpt", f"style.features_ckpt={vgg_ckpt}", *lbfgs, *overrides,
        )  # fmt: skip

    return make


def stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}


# ----- runs -----------------------------------------------------------------------------------------
def test_features_from_a_checkpoint_use_its_weights_and_normalisation(
    style_cfg: Callable, vgg_ckpt: Path, tmp_path: Path
) -> None:
    trainer = build_trainer(style_cfg(), tmp_path)
    saved = torch.load(vgg_ckpt, weights_only=True)
    assert torch.equal(trainer.features.layers[0].weight, saved["model"]["features.0.0.weight"])
    assert trainer.features.mean.flatten().tolist() == pytest.approx([0.4914, 0.4822, 0.4465])
    assert trainer.image.pixels.shape == (
        1,
        3,
        12,
        16,
    )  # the content image's aspect, longer side 16
    assert trainer.params == 3 * 12 * 16  # only the image is trained
    random = build_trainer(style_cfg("style.features=random"), tmp_path / "r")
    assert [type(m) for m in random.features.layers] == [type(m) for m in trainer.features.layers]
    assert random.features.fingerprint() != trainer.features.fingerprint()
    again = build_trainer(style_cfg("style.features=random"), tmp_path / "r2")
    assert again.features.fingerprint() == random.features.fingerprint()  # seeded


def test_lbfgs_through_the_cli_lowers_the_cost_and_writes_the_result(
    images: dict[str, Path], vgg_ckpt: Path, data_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    res = dlrun(
        *TINY, f"style.content={images['content']}", f"style.style={images['style']}",
        "style.features=ckpt", f"style.features_ckpt={vgg_ckpt}", "trainer.max_steps=4", "optim.max_iter=4",
        f"hydra.run.dir={out}", data=data_root, cwd=tmp_path,
        env_extra={"TORCH_HOME": str(tmp_path / "torch"), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "style transfer features: trained vgg11_bn of" in res.stdout
    series = scalars(out)
    first, last = series["train/loss_step"][0][1], series["val/loss"][-1][1]
    assert [s for s, _ in series["val/loss"]] == [2, 4] and last < first
    assert series["train/evaluations_step"][0][1] > 1  # L-BFGS evaluated the costs several times
    sizes = {n: Image.open(out / "style" / f"{n}.png").size for n in ("result", "content", "style")}
    assert sizes == {"result": (16, 12), "content": (16, 12), "style": (16, 16)}
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert list(state["model"]) == ["pixels"] and "features" in state["task"]  # VGG not saved


def test_adam_lowers_the_cost(style_cfg: Callable, tmp_path: Path) -> None:
    metrics = run(
        style_cfg(
            "optim=adam", "optim.lr=0.05", "trainer.max_steps=6", "trainer.log_every_n_steps=1"
        ),
        tmp_path,
    )
    series = scalars(tmp_path)
    assert metrics["step"] == 6 and metrics["train/evaluations"] == 1
    assert metrics["val/loss"] < series["train/loss_step"][0][1]
    assert {"val/content_loss", "val/style_loss", "train/content_loss"} <= set(metrics)


def test_resume_mid_epoch_ends_exactly_like_an_uninterrupted_run(
    style_cfg: Callable, vgg_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L-BFGS (its history in the checkpoint): epochs of 3 steps, last.pt at step 4, killed at 5."""
    ckpt = tmp_path / "vgg.pt"
    ckpt.write_bytes(vgg_ckpt.read_bytes())
    cfg = ("trainer.max_steps=6", "style.steps_per_epoch=3", "trainer.checkpoint_every_n_steps=2",
           f"style.features_ckpt={ckpt}")  # fmt: skip
    full = run(style_cfg(*cfg), tmp_path / "full")
    stopped_at_step(style_cfg(*cfg), tmp_path / "cut", StyleTrainer, 4, monkeypatch)
    saved = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == 4 and saved["progress"]["batch"] == 1
    resumed = run(style_cfg(*cfg, "resume=true"), tmp_path / "cut")
    assert stable(resumed) == stable(full)
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert torch.equal(a["model"]["pixels"], b["model"]["pixels"])
    # The checkpoint file of the features changed under the run: resume refuses to go on.
    state = torch.load(ckpt, weights_only=True)
    state["model"]["features.0.0.weight"] += 1
    torch.save(state, ckpt)
    with pytest.raises(UserError, match="feature network is not the one this run started with"):
        run(style_cfg(*cfg, "trainer.max_steps=8", "resume=true"), tmp_path / "cut")


def test_imagenet_weights_are_used_from_the_cache_and_never_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, _ = imagenet_weights()
    with pytest.raises(UserError, match="torch hub cache.*never downloads"):
        build_features(
            "imagenet", None, ["relu1_1"], pool="max", seed=0, device=torch.device("cpu")
        )
    torch.manual_seed(1)
    layers = vgg19_layers()[:4]  # the file's first conv layers are all a 2-layer cut reads
    path.parent.mkdir(parents=True)
    torch.save(
        {f"features.{k}": v for k, v in layers.state_dict().items()}
        | {"classifier.0.bias": torch.zeros(3)},
        path,
    )
    monkeypatch.setattr(
        "dlrun.tasks.style.features.vgg19_layers", lambda: nn.Sequential(*vgg19_layers()[:4])
    )
    features, about = build_features(
        "auto", "/not/read.pt", ["relu1_2"], pool="max", seed=0, device=torch.device("cpu")
    )
    assert about.startswith("torchvision VGG-19 (ImageNet")
    assert torch.equal(features.layers[2].weight, layers[2].weight)


# ----- mistakes ---------------------------------------------------------------------------------------
def test_default_pair_comes_from_horse2zebra(style_cfg: Callable, tmp_path: Path, images) -> None:
    base = tmp_path / "root" / "horse2zebra"
    for sub, name, src in (
        ("testA", "n02381460_1300.jpg", "content"),
        ("testB", "n02391049_2760.jpg", "style"),
    ):
        (base / sub).mkdir(parents=True)
        Image.open(images[src]).save(base / sub / name)
    trainer = build_trainer(
        style_cfg("style.content=null", "style.style=null", f"data.root={tmp_path / 'root'}"),
        tmp_path / "run",
    )
    assert trainer.data.paths["content"] == base / "testA" / "n02381460_1300.jpg"
    assert trainer.image.pixels.shape == (1, 3, 12, 16)


def test_feature_mistakes_are_user_errors(data_root: Path, tmp_path: Path, vgg_ckpt: Path) -> None:
    cpu = torch.device("cpu")
    with pytest.raises(UserError, match="style.features=ckpt needs style.features_ckpt=PATH"):
        build_features("ckpt", None, ["relu1_1"], pool="max", seed=0, device=cpu)
    with pytest.raises(
        UserError, match=r"Layer\(s\) relu9_9 .* its layers are conv1_1, bn1_1, relu1_1"
    ):
        build_features("random", str(vgg_ckpt), ["relu9_9"], pool="max", seed=0, device=cpu)
    with pytest.raises(UserError, match="style.pool must be max or avg"):
        build_features("random", None, ["relu1_1"], pool="min", seed=0, device=cpu)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"data.root={data_root}", "device=cpu",
                      "trainer.progress=false", "model=linear", "trainer.max_steps=1"])  # fmt: skip
    run(cfg, tmp_path)
    with pytest.raises(
        UserError, match="holds Linear.*not a VGG.*model=vgg11, vgg13, vgg16 or vgg19"
    ):
        build_features("ckpt", str(tmp_path / "checkpoints" / "last.pt"), ["relu1_1"], pool="max",
                       seed=0, device=cpu)  # fmt: skip


def run_all(cases: dict[str, list[str]], data: Path, cwd: Path) -> dict[str, tuple[int, str]]:
    """dlrun processes side by side (each is mostly Python's start-up): name -> (exit, stderr)."""
    env = dict(os.environ, DLRUN_DATA=str(data), DLRUN_CACHE=str(cwd / "cache"),
               HYDRA_FULL_ERROR="0", TORCH_HOME=str(cwd / "torch"), OMP_NUM_THREADS="1")  # fmt: skip
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "dlrun", *args], cwd=cwd, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for name, args in cases.items()
    }  # fmt: skip
    return {name: (p.wait(timeout=300), p.stderr.read()) for name, p in procs.items()}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["style.content={empty}"], "style.content={empty} could not be decoded as an image"),
        (
            ["style.features_ckpt=/no/vgg.pt"],
            "style.features_ckpt=/no/vgg.pt: there is no such file",
        ),
        (
            ["data=mnist"],
            "StyleTrainer trains on style data, but data=mnist is classification data",
        ),
        (["loss=cross_entropy"], "Style transfer trains with loss=style"),
        (["optim=adam", "trainer.accumulate_grad_batches=2"], "accumulate_grad_batches must be 1"),
        (["trainer.grad_clip=1"], "trainer.grad_clip does not apply to L-BFGS"),
        (
            ["style.content=/no/such/horse.jpg", "style.features=random"],
            "style.content=/no/such/horse.jpg: there is no such file",
        ),
        (  # the fixture's data.root holds no horse2zebra
            ["style.content=null", "style.style=null", "style.features=random"],
            "style.content and style.style are not set, and the default pair",
        ),
    ],
)
def test_more_mistakes_are_user_errors(
    style_cfg: Callable, images: dict[str, Path], tmp_path: Path, overrides: list, message: str
) -> None:
    overrides = [o.format(empty=images["empty"]) for o in overrides]
    with pytest.raises(UserError, match=re.escape(message.format(empty=images["empty"]))):
        build_trainer(style_cfg(*overrides), tmp_path)


def test_mistakes_exit_non_zero_with_one_clear_message(
    images: dict[str, Path], tmp_path: Path
) -> None:
    # One process: the exit code, one paragraph, no traceback, nothing written (the other
    # messages are checked in-process above: a dlrun process is seconds of start-up each).
    both = (f"style.content={images['content']}", f"style.style={images['style']}")
    cases = {
        "no_features": (
            [*both],
            "needs a trained VGG for its features, and none is available",
        ),
    }
    results = run_all(
        {k: [*TINY, *args, f"hydra.run.dir={tmp_path / k}"] for k, (args, _) in cases.items()},
        tmp_path / "empty",
        tmp_path,
    )
    for name, (_, message) in cases.items():
        code, err = results[name]
        assert code == 2 and message in err and "Traceback" not in err, (name, err)
        assert not any((tmp_path / name).glob("*"))  # nothing written for a refused run
    err = results["no_features"][1]
    assert "style.features_ckpt=PATH" in err and imagenet_weights()[0].name in err


def test_lbfgs_with_a_task_that_gives_no_closure_is_one_clear_error(make_cfg) -> None:
    from dlrun.cli import build_trainer
    from dlrun.errors import UserError

    with pytest.raises(UserError, match="optim=lbfgs re-evaluates the loss through a closure"):
        build_trainer(make_cfg("model=lenet", "data=mnist", "optim=lbfgs", "sched=none"), "unused")
