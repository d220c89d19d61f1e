"""model=torchvision (issue 31, item 4): a torchvision classifier by name, its weights from torch's
hub cache, a head for data.num_classes, freeze=.

No network here: the "pretrained" weights are torchvision's resnet18 with random weights, saved in
a private TORCH_HOME under the exact file name torchvision's URL gives, where torch.hub keeps them.
"""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models import ResNet18_Weights

from dlrun.cli import build_trainer, run
from dlrun.errors import UserError
from dlrun.models.torchvision_hub import torchvision_model
from tests.fixtures import write_png_folder

NET = ("model=torchvision", "model.name=resnet18", "data=cifar10", "data.batch_size=50")
PRETRAINED = (*NET, "model.weights=IMAGENET1K_V1")
FILE = "resnet18-f37072fd.pth"  # the last part of ResNet18_Weights.IMAGENET1K_V1.url

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert Path(torch.hub.get_dir()) == tmp_path / "torch" / "hub"
    return tmp_path / "torch"


@pytest.fixture
def cached(torch_home: Path) -> dict[str, torch.Tensor]:
    """resnet18's random ImageNet-shaped weights (1000 classes) in the hub cache."""
    assert Path(ResNet18_Weights.IMAGENET1K_V1.url).name == FILE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        state = torchvision.models.resnet18().state_dict()
    path = torch_home / "hub" / "checkpoints" / FILE
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def last(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_the_cached_weights_load_with_a_fresh_head_of_10_classes(
    make_cfg: Callable, tmp_path: Path, cached: dict[str, torch.Tensor]
) -> None:
    model = build_trainer(make_cfg(*PRETRAINED), tmp_path / "run").model
    ours = model.state_dict()
    body = {k: v for k, v in cached.items() if not k.startswith("fc.")}
    assert set(ours) == {f"net.{k}" for k in body} | {"head.weight", "head.bias"}
    for key, value in body.items():
        assert torch.equal(ours[f"net.{key}"], value), key
    assert model.head.out_features == 10 and model.head.in_features == 512
    assert cached["fc.weight"].shape == (1000, 512)
    reference = torchvision.models.resnet18(num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in reference.parameters()
    )  # 11,181,642
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_it_trains_and_freeze_backbone_trains_the_head_only(
    make_cfg: Callable, tmp_path: Path, cached: dict[str, torch.Tensor]
) -> None:
    whole = run(make_cfg(*PRETRAINED, "trainer.max_steps=2"), tmp_path / "whole")
    assert whole["step"] == 2 and whole["params"] == 11_181_642
    trained = last(tmp_path / "whole")
    assert not torch.equal(trained["net.layer1.0.conv1.weight"], cached["layer1.0.conv1.weight"])

    fresh = build_trainer(make_cfg(*PRETRAINED), tmp_path / "built").model.head.weight.clone()
    frozen = run(make_cfg(*PRETRAINED, "freeze=backbone", "trainer.max_steps=2"), tmp_path / "fr")
    after = last(tmp_path / "fr")
    for key, value in cached.items():  # BatchNorm statistics too: frozen stages run in eval mode
        if not key.startswith("fc."):
            assert torch.equal(after[f"net.{key}"], value), key
    assert not torch.equal(after["head.weight"], fresh)  # the head did train
    assert frozen["params"] == 512 * 10 + 10


def test_freeze_n_freezes_the_first_top_level_stages(make_cfg: Callable, tmp_path: Path) -> None:
    model = build_trainer(make_cfg(*NET, "freeze=5"), tmp_path).model  # conv1 ... layer1
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {
        n
        for n, _ in model.named_parameters()
        if n.startswith(("net.conv1", "net.bn1", "net.layer1"))
    }
    with pytest.raises(UserError, match=r"freeze=10 is not a choice.*from 1 to 9"):
        build_trainer(make_cfg(*NET, "freeze=10"), tmp_path / "bad")


def test_missing_cache_file_is_one_line_naming_the_path_and_the_url(
    make_cfg: Callable, tmp_path: Path, torch_home: Path
) -> None:
    with pytest.raises(UserError) as err:
        build_trainer(make_cfg(*PRETRAINED), tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message
    assert str(torch_home / "hub" / "checkpoints" / FILE) in message
    assert ResNet18_Weights.IMAGENET1K_V1.url in message
    assert not (torch_home / "hub" / "checkpoints" / FILE).exists()  # nothing downloaded


@pytest.mark.parametrize(("overrides", "message"), [
    (("model.name=resnet19",), r"^model.name=resnet19 is not a torchvision classification network\. Close names: resnet18"),
    (("model.name=fasterrcnn_resnet50_fpn",), "is a torchvision network for another task"),
    (("model.weights=IMAGENET1K_V7",), "resnet18 has no weights IMAGENET1K_V7. Its weights: IMAGENET1K_V1"),
    (("model.weights=ResNet50_Weights.IMAGENET1K_V2",), "are not resnet18's weights"),
    (("model.kwargs={num_classes: 3}",), "model.kwargs.num_classes is set by dlrun"),
    (("model.kwargs={width: 3}",), "model.kwargs={'width': 3} are not arguments torchvision's resnet18 takes"),
    (("model.name=squeezenet1_1",), "its classifier is not a Linear layer"),
    (("model.name=alexnet",), "TorchvisionNet\\) cannot take images of 32x32 px"),
])  # fmt: skip
def test_bad_options_are_one_line_user_errors(
    make_cfg: Callable, tmp_path: Path, torch_home: Path, overrides: tuple, message: str
) -> None:
    with pytest.raises(UserError, match=message) as err:
        build_trainer(make_cfg(*NET, *overrides), tmp_path)
    assert "\n" not in str(err.value)


def test_a_vit_of_fixed_size_says_which_size() -> None:
    with pytest.raises(UserError, match=r"vit_b_32 takes 224x224 images only.*data.image_size=224"):
        torchvision_model("vit_b_32", 10, image_size=32)


@pytest.mark.parametrize(
    "name", ["mobilenet_v3_small", "shufflenet_v2_x0_5", "mnasnet0_5", "regnet_x_400mf"]
)
def test_the_head_is_the_last_operation_so_the_wrapper_computes_the_same(name: str) -> None:
    """The classifier layer taken out to `head` was the network's last operation: with
    torchvision's own 1000-class head kept, the wrapper's output is the plain network's."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        plain = torchvision.models.get_model(name).eval()
        torch.manual_seed(3)
        ours = torchvision_model(name, num_classes=1000).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), plain(x))


def test_grey_images_sum_the_first_convolution_over_rgb(
    make_cfg: Callable, tmp_path: Path, cached: dict[str, torch.Tensor]
) -> None:
    cfg = make_cfg("model=torchvision", "model.name=resnet18", "model.weights=IMAGENET1K_V1",
                   "data=mnist", "data.batch_size=50")  # fmt: skip
    model = build_trainer(cfg, tmp_path).model
    assert model.net.conv1.weight.shape == (64, 1, 7, 7)
    assert torch.allclose(model.net.conv1.weight, cached["conv1.weight"].sum(1, keepdim=True))
    grey = torch.rand(2, 1, 28, 28)
    reference = torchvision.models.resnet18()
    reference.load_state_dict(cached)
    reference.fc = torch.nn.Identity()
    with torch.no_grad():  # what the RGB network computes on the grey image repeated 3 times
        assert torch.allclose(
            model.net.eval()(grey), reference.eval()(grey.repeat(1, 3, 1, 1)), atol=1e-4
        )


def test_a_checkpoint_starts_a_run_with_another_class_count(
    make_cfg: Callable, tmp_path: Path
) -> None:
    run(make_cfg(*NET, "trainer.max_steps=1"), tmp_path / "pre")
    root = write_png_folder(tmp_path / "three", ("train", "val"), n=20, classes=["a", "b", "c"])
    folder = ("data=imagefolder", f"data.root={root}", "data.batch_size=10")
    ckpt = tmp_path / "pre" / "checkpoints" / "last.pt"
    cfg = make_cfg("model=torchvision", "model.name=resnet18", *folder, f"ckpt={ckpt}")
    ours = build_trainer(cfg, tmp_path / "new").model.state_dict()
    theirs = last(tmp_path / "pre")
    assert torch.equal(ours["net.layer4.1.conv2.weight"], theirs["net.layer4.1.conv2.weight"])
    assert ours["head.weight"].shape == (3, 512) and theirs["head.weight"].shape == (10, 512)


def test_ckpt_torchvision_weights_still_load_into_the_same_network(
    make_cfg: Callable, tmp_path: Path, cached: dict[str, torch.Tensor]
) -> None:
    """ckpt=torchvision:<Weights> keeps working (matched by position, here the same network)."""
    cfg = make_cfg(*NET, "ckpt=torchvision:ResNet18_Weights.IMAGENET1K_V1")
    ours = build_trainer(cfg, tmp_path).model.state_dict()
    assert torch.equal(
        ours["net.layer3.0.downsample.0.weight"], cached["layer3.0.downsample.0.weight"]
    )
    assert ours["head.weight"].shape == (10, 512)


def test_eval_rebuilds_without_the_cache_file(
    make_cfg: Callable, tmp_path: Path, cached: dict[str, torch.Tensor], torch_home: Path
) -> None:
    run(make_cfg(*PRETRAINED, "trainer.max_steps=1"), tmp_path / "run")
    (
        torch_home / "hub" / "checkpoints" / FILE
    ).unlink()  # offline elsewhere: the checkpoint suffices
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    scored = run(make_cfg(*PRETRAINED, "mode=eval", f"ckpt={ckpt}"), tmp_path / "eval")
    assert "test/acc" in scored
