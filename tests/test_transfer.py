import pytest
import torch

from dlrun.cli import run
from dlrun.errors import UserError
from tests.fixtures import write_png_folder

LENET = ("model=lenet", "model.activation=relu", "data.batch_size=50", "trainer.max_epochs=1")


@pytest.fixture
def lenet_ckpt(make_cfg, tmp_path):
    run(make_cfg(*LENET), tmp_path / "pre")
    return tmp_path / "pre" / "checkpoints" / "last.pt"


def folder_data(tmp_path) -> tuple[str, ...]:
    root = write_png_folder(
        tmp_path / "three", ("train", "val"), n=30, size=28, classes=["a", "b", "c"]
    )
    return ("data=imagefolder", f"data.root={root}", "data.channels=1", "data.image_size=28",
            "data.mean=[0.5]", "data.std=[0.5]", "data.batch_size=10")  # fmt: skip


def weights(path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def test_new_class_count_replaces_the_head_and_keeps_the_rest(
    make_cfg, tmp_path, lenet_ckpt
) -> None:
    cfg = make_cfg(*LENET, *folder_data(tmp_path), f"ckpt={lenet_ckpt}", "trainer.max_steps=1",
                   "optim.lr=0")  # fmt: skip
    run(cfg, tmp_path / "new")
    before, after = weights(lenet_ckpt), weights(tmp_path / "new" / "checkpoints" / "last.pt")
    assert torch.equal(before["features.0.weight"], after["features.0.weight"])
    assert after["head.5.weight"].shape == (3, 84) and before["head.5.weight"].shape == (10, 84)


def test_freeze_backbone_trains_only_the_head(make_cfg, tmp_path, lenet_ckpt) -> None:
    metrics = run(make_cfg(*LENET, *folder_data(tmp_path), f"ckpt={lenet_ckpt}", "freeze=backbone"),
                  tmp_path / "frozen")  # fmt: skip
    after = weights(tmp_path / "frozen" / "checkpoints" / "last.pt")
    before = weights(lenet_ckpt)
    for key in before:
        if key.startswith("features."):
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["head.1.weight"], after["head.1.weight"])
    assert metrics["params"] == 16 * 5 * 5 * 120 + 120 + 120 * 84 + 84 + 84 * 3 + 3


def test_freeze_a_number_of_stages(make_cfg, tmp_path) -> None:
    metrics = run(make_cfg(*LENET, "freeze=1"), tmp_path)
    assert metrics["params"] == 61706 - (6 * 25 + 6)  # the first conv is frozen


@pytest.mark.parametrize(("spec", "message"), [
    ("99", "freeze=99 is not a choice"),
    ("legs", "freeze='legs' is not a choice"),
])  # fmt: skip
def test_bad_freeze_is_a_user_error(make_cfg, tmp_path, spec, message) -> None:
    with pytest.raises(UserError, match=message):
        run(make_cfg(*LENET, f"freeze={spec}"), tmp_path)


def test_checkpoint_of_another_network_is_a_user_error(make_cfg, tmp_path, lenet_ckpt) -> None:
    with pytest.raises(
        UserError, match="does not fit this model: it holds 10 tensors, this model 4"
    ):
        run(make_cfg("model=mlp", f"ckpt={lenet_ckpt}"), tmp_path / "mlp")


def test_torchvision_weights_missing_locally_is_a_user_error(
    make_cfg, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match="not available locally.*resnet18-f37072fd.pth"):
        run(make_cfg(*LENET, "ckpt=torchvision:ResNet18_Weights.IMAGENET1K_V1"), tmp_path / "tv")
    with pytest.raises(UserError, match="is not a torchvision weights enum"):
        run(make_cfg(*LENET, "ckpt=torchvision:NoSuchWeights.X"), tmp_path / "tv2")


def test_torchvision_weights_file_loads_by_position(make_cfg, tmp_path) -> None:
    import torchvision

    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    cfg = make_cfg(
        "model=resnet18",
        "model.variant=imagenet",
        "data=cifar10",
        f"ckpt={tmp_path / 'resnet18.pth'}",
        "trainer.max_steps=1",
        "optim.lr=0",
        "data.batch_size=10",
        "data.eval_subset=10",
    )
    run(cfg, tmp_path / "run")
    ours = weights(tmp_path / "run" / "checkpoints" / "last.pt")
    assert torch.equal(ours["features.stem.conv1.weight"], tv.conv1.weight)
    assert torch.equal(ours["features.layer4.1.conv2.weight"], tv.layer4[1].conv2.weight)
    assert ours["head.2.weight"].shape == (
        10,
        512,
    )  # ImageNet's 1000-way fc replaced for 10 classes


def test_nothing_left_to_train_is_a_user_error(make_cfg, tmp_path, monkeypatch) -> None:
    from dlrun.engine import transfer

    def freeze_everything(model, spec) -> None:  # a network whose head sits inside its features
        for p in model.parameters():
            p.requires_grad_(False)

    monkeypatch.setattr(transfer, "freeze", freeze_everything)
    with pytest.raises(UserError, match="nothing to train: every parameter is frozen"):
        run(make_cfg(*LENET, "freeze=backbone"), tmp_path)


def test_frozen_stages_keep_their_batchnorm_statistics(make_cfg, tmp_path) -> None:
    """A frozen stage runs in eval mode: its BatchNorm statistics stay those it was loaded with.

    LeNet's stages are its layers: features.0 conv, .1 BatchNorm, .2 act, .3 pool, .4 conv, .5
    BatchNorm, ...; freeze=2 freezes the first conv and its BatchNorm.
    """
    bn = ("model=lenet", "model.activation=relu", "model.batchnorm=true", "data.batch_size=50")
    run(make_cfg(*bn, "trainer.max_epochs=1"), tmp_path / "pre")
    pre = tmp_path / "pre" / "checkpoints" / "last.pt"
    # Two epochs with an evaluation between them: eval() and back must leave the stage frozen.
    run(make_cfg(*bn, f"ckpt={pre}", "freeze=2", "trainer.max_epochs=2"), tmp_path / "frozen")
    before, after = weights(pre), weights(tmp_path / "frozen" / "checkpoints" / "last.pt")
    for name in ("running_mean", "running_var", "num_batches_tracked", "weight", "bias"):
        key = f"features.1.{name}"
        assert torch.equal(before[key], after[key]), key
    for name in ("running_mean", "running_var", "num_batches_tracked"):  # the unfrozen BatchNorm
        key = f"features.5.{name}"
        assert not torch.equal(before[key], after[key]), key
    assert int(after["features.5.num_batches_tracked"]) == int(
        before["features.5.num_batches_tracked"]
    ) + 8  # 2 epochs x 4 batches
