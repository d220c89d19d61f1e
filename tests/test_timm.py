"""model=timm: any timm network by name, its pretrained weights from a file, transfer learning.

The pretrained path runs on random weights saved to a local file (no network here): timm's own
file override loads them exactly as it would load downloaded ones.
"""

import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from dlrun.cli import build_trainer, run
from dlrun.engine import checkpoint
from dlrun.errors import UserError
from tests.conftest import need_extra
from tests.fixtures import write_png_folder

# timm's tiny test networks (a 374k-parameter ResNet, a 307k-parameter ViT): same code paths as
# resnet18 and vit_base, fast enough for CPU tests. The fixture CIFAR-10 has 100 train images.
NET = ("model=timm", "model.name=test_resnet", "data=cifar10", "data.batch_size=50")
TIMING = ("time/", "images_per_s")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def timm() -> ModuleType:
    return need_extra("timm", "timm")


@pytest.fixture(scope="module")
def imagenet_file(timm: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_resnet's random weights with ImageNet's 1000 classes, saved as a state dict."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        net = timm.create_model("test_resnet", num_classes=1000)
    path = tmp_path_factory.mktemp("weights") / "w.pth"
    torch.save(net.state_dict(), path)
    return path


def saved(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def model_of(run_dir: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)["model"]


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_weights_file_loads_the_backbone_and_a_fresh_head_for_10_classes(
    make_cfg: Callable, tmp_path: Path, imagenet_file: Path, fmt: str
) -> None:
    path = imagenet_file
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file(saved(imagenet_file), path)
    cfg = make_cfg(*NET, "model.pretrained=true", f"model.weights_file={path}")
    ours = build_trainer(cfg, tmp_path / "run").model.state_dict()
    theirs = saved(imagenet_file)
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        if not key.startswith("fc."):
            assert torch.equal(ours[key], value), key
    assert theirs["fc.weight"].shape[0] == 1000 and ours["fc.weight"].shape[0] == 10


def test_freeze_backbone_trains_only_the_head(
    make_cfg: Callable, tmp_path: Path, imagenet_file: Path
) -> None:
    opts = (*NET, "model.pretrained=true", f"model.weights_file={imagenet_file}")
    fresh_head = build_trainer(make_cfg(*opts), tmp_path / "built").model.fc.weight.clone()
    metrics = run(make_cfg(*opts, "freeze=backbone", "trainer.max_steps=3"), tmp_path / "run")
    after, before = model_of(tmp_path / "run"), saved(imagenet_file)
    for key, value in before.items():  # BatchNorm statistics too: frozen stages run in eval mode
        if not key.startswith("fc."):
            assert torch.equal(after[key], value), key
    assert after["fc.weight"].shape == fresh_head.shape
    assert not torch.equal(after["fc.weight"], fresh_head)  # the head did train
    assert metrics["params"] == after["fc.weight"].numel() + after["fc.bias"].numel()


def test_freeze_n_freezes_the_first_feature_info_stages(make_cfg: Callable, tmp_path: Path) -> None:
    trainer = build_trainer(make_cfg(*NET, "freeze=2"), tmp_path)  # the stem (to act1), layer1
    frozen = {n for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert frozen == {
        n for n, _ in trainer.model.named_parameters() if n.startswith(("conv1", "bn1", "layer1"))
    }
    with pytest.raises(UserError, match=r"freeze=9 is not a choice.*from 1 to 5.*act1, layer1"):
        build_trainer(make_cfg(*NET, "freeze=9"), tmp_path / "bad")


def test_train_checkpoints_resume_eval_and_introspection(
    make_cfg: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = (*NET, "trainer.max_epochs=2")
    whole = run(make_cfg(*opts), tmp_path / "whole")
    assert whole["params"] > 300_000 and whole["step"] == 4
    save = checkpoint.save

    def save_then_die(path: Path, state: dict) -> None:  # killed right after epoch 1's save
        save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(*opts), tmp_path / "split")
    monkeypatch.setattr(checkpoint, "save", save)
    resumed = run(make_cfg(*opts, "resume=true"), tmp_path / "split")
    stable = lambda m: {k: v for k, v in m.items() if not any(t in k for t in TIMING)}  # noqa: E731
    assert stable(resumed) == stable(whole)

    ckpt = tmp_path / "whole" / "checkpoints" / "best.pt"
    scored = run(make_cfg(*NET, "mode=eval", f"ckpt={ckpt}"), tmp_path / "eval")
    assert scored["test/acc"] == pytest.approx(whole["val/acc"])  # val is the test split
    info = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert info["params"] == whole["params"] and info["flops"] > 1_000_000
    tags = {
        v.tag
        for f in (tmp_path / "whole").glob("events.out.tfevents.*")
        for e in EventFileLoader(str(f)).Load()
        for v in e.summary.value
    }
    # the first conv's filters, and feature maps of the top-level stages (introspect's fallback)
    assert "inside/filters" in tags and len([t for t in tags if t.startswith("inside/")]) > 1


def test_a_timm_checkpoint_starts_a_run_with_another_class_count(
    make_cfg: Callable, tmp_path: Path
) -> None:
    run(make_cfg(*NET, "trainer.max_steps=1"), tmp_path / "pre")
    root = write_png_folder(tmp_path / "three", ("train", "val"), n=20, classes=["a", "b", "c"])
    ckpt = tmp_path / "pre" / "checkpoints" / "last.pt"
    folder = ("data=imagefolder", f"data.root={root}", "data.batch_size=10")
    cfg = make_cfg("model=timm", "model.name=test_resnet", *folder, f"ckpt={ckpt}")
    ours = build_trainer(cfg, tmp_path / "new").model.state_dict()
    theirs = model_of(tmp_path / "pre")
    assert torch.equal(ours["layer4.0.conv1.weight"], theirs["layer4.0.conv1.weight"])
    assert ours["fc.weight"].shape[0] == 3 and theirs["fc.weight"].shape[0] == 10


def test_a_vit_made_for_160_px_takes_32_px_images_and_its_pretrained_weights(
    make_cfg: Callable, tmp_path: Path, timm: ModuleType
) -> None:
    fixed = "model.kwargs={dynamic_img_size: false}"  # test_vit is dynamic; vit_base_* is not
    with torch.random.fork_rng(devices=[]):
        source = timm.create_model("test_vit", num_classes=1000, dynamic_img_size=False)
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    opts = ("model=timm", "model.name=test_vit", fixed, "data=cifar10", "freeze=backbone")
    weights = ("model.pretrained=true", f"model.weights_file={tmp_path / 'vit.pth'}")
    net = build_trainer(make_cfg(*opts, *weights), tmp_path / "run").model
    assert tuple(net.patch_embed.img_size) == (32, 32)
    assert net.pos_embed.shape[1] == 1 + 2 * 2 and source.pos_embed.shape[1] == 1 + 10 * 10
    assert torch.equal(net.blocks[3].attn.qkv.weight, source.blocks[3].attn.qkv.weight)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]


@pytest.mark.parametrize(("overrides", "message"), [
    (("model.name=test_resnett",), r"model.name=test_resnett is not a timm model\. Close names: test_resnet"),
    (("model.name=test_resnet.nope",), "test_resnet has no weights tag nope: test_resnet.r160_in1k"),
    (("model.name=nf_resnet26", "model.pretrained=true"), "has no pretrained weights in timm"),
    (("model.weights_file=w.pth",), "only read with model.pretrained=true"),
    (("model.pretrained=true", "model.weights_file=/no/such.pth"), "no such file"),
    (("model.kwargs={num_classes: 3}",), "model.kwargs.num_classes is set by dlrun"),
    (("model.name=test_vit", "model.kwargs={dynamic_img_size: false, img_size: 64}"),
     "model.kwargs.img_size makes model.name=test_vit take 64x64 images but the data gives 32x32"),
])  # fmt: skip
def test_bad_timm_options_are_user_errors(
    make_cfg: Callable, tmp_path: Path, timm: ModuleType, overrides: tuple, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        build_trainer(make_cfg(*NET, *overrides), tmp_path)


def test_without_timm_the_error_names_the_extra(
    make_cfg: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(UserError, match=r"pip install -e '\.\[timm\]'"):
        build_trainer(make_cfg(*NET), tmp_path)


def test_offline_uncached_pretrained_weights_name_the_cache_and_the_fix(
    make_cfg: Callable, tmp_path: Path, timm: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As HF_HUB_OFFLINE=1 with an empty HF_HOME and TORCH_HOME (huggingface_hub reads both once,
    at import: its constants are set here instead; a subprocess would cost 10 s of imports)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "hf" / "hub" / "models--timm--test_resnet"
    with pytest.raises(UserError) as err:
        build_trainer(make_cfg(*NET, "model.pretrained=true"), tmp_path / "run")
    message = str(err.value)
    assert message.startswith("model.name=test_resnet model.pretrained=true: timm found no")
    assert str(hub) in message and "HF_HUB_OFFLINE is set" in message
    assert "model.weights_file=PATH" in message
    with pytest.raises(UserError, match=r"reads the network's config.json .* nor online"):
        build_trainer(make_cfg(*NET, "model.name=hf-hub:timm/test_resnet.r160_in1k"), tmp_path)


def test_eval_and_resume_of_a_pretrained_run_need_the_weights_file_no_more(
    make_cfg: Callable, tmp_path: Path, imagenet_file: Path
) -> None:
    """The checkpoint overwrites the pretrained weights: rebuilding it loads no file first."""
    weights = tmp_path / "w.pth"
    weights.write_bytes(imagenet_file.read_bytes())
    opts = (*NET, "model.pretrained=true", f"model.weights_file={weights}", "trainer.max_steps=2")
    trained = run(make_cfg(*opts), tmp_path / "run")
    weights.unlink()  # gone, as a cache on another machine would be
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    scored = run(make_cfg(*opts, "mode=eval", f"ckpt={last}"), tmp_path / "eval")
    assert scored["test/acc"] == trained["val/acc"]
    resumed = run(make_cfg(*opts, "resume=true"), tmp_path / "run")
    assert resumed["step"] == 2
