
import pytest
import torch
import torchvision
from torch import nn

from dlrun.models import instantiate_model
from dlrun.models.googlenet import GoogLeNet, Inception, InceptionAux
from dlrun.models.resnet import BasicBlock, Bottleneck, ResNet

IMAGENET = ("model.variant=imagenet", "model.image_size=224", "model.num_classes=1000")
RESNETS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread each (conftest)


def torchvision_model(name: str) -> nn.Module:
    if name == "googlenet":  # init_weights given: torchvision's default warns when it is left out
        return torchvision.models.googlenet(init_weights=False)
    return getattr(torchvision.models, name)()


def build(make_cfg, name: str, *overrides: str) -> nn.Module:
    return instantiate_model(make_cfg(f"model={name}", "data=cifar10", *overrides).model)


def with_torchvision_weights(make_cfg, name: str) -> tuple[nn.Module, nn.Module]:
    """Ours (imagenet variant) holding torchvision's random weights, loaded by position."""
    with torch.device("meta"):  # no init: every tensor comes from torchvision's state_dict
        ours = build(make_cfg, name, *IMAGENET, "model.in_channels=3")
    tv = torchvision_model(name)
    keys, values = list(ours.state_dict()), list(tv.state_dict().values())
    assert len(keys) == len(values)
    ours.load_state_dict(dict(zip(keys, values, strict=True)), assign=True)
    return ours, tv


@pytest.mark.parametrize("name", [*RESNETS, "googlenet"])
def test_imagenet_variant_matches_torchvision(make_cfg, name: str) -> None:
    with torch.device("meta"):  # shapes only: skips allocating and initialising the weights
        ours = build(make_cfg, name, *IMAGENET, "model.in_channels=3")
        tv = torchvision_model(name)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in tv.parameters())
    assert [p.shape for p in ours.parameters()] == [p.shape for p in tv.parameters()]
    assert [b.shape for b in ours.buffers()] == [b.shape for b in tv.buffers()]


def test_resnet18_with_torchvision_weights_computes_torchvision_outputs(make_cfg) -> None:
    ours, tv = with_torchvision_weights(make_cfg, "resnet18")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), tv.eval()(x))


def test_googlenet_with_torchvision_weights_computes_torchvision_outputs(make_cfg) -> None:
    ours, tv = with_torchvision_weights(make_cfg, "googlenet")
    ours.head[2].p = tv.dropout.p  # only the dropout rates differ (paper 0.4, torchvision 0.2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), tv.eval()(x))
        torch.manual_seed(0)  # same dropout masks: both draw them aux1, aux2, main in that order
        logits, aux1, aux2 = ours.train()(x)
        torch.manual_seed(0)
        tv_out = tv.train()(x)
    torch.testing.assert_close(logits, tv_out.logits)
    torch.testing.assert_close(aux1, tv_out.aux_logits1)  # taps after 4a and 4d as torchvision's
    torch.testing.assert_close(aux2, tv_out.aux_logits2)


def inception_kernels(net: nn.Module) -> set[int]:
    """Kernel sizes of the "5x5" paths."""
    return {m.branch3[1].conv.kernel_size[0] for m in net.modules() if isinstance(m, Inception)}


def test_googlenet_cifar_variant_structure_and_protocol(make_cfg) -> None:
    with torch.device("meta"):  # structure and output shapes; test_models.py trains it for real
        net = build(make_cfg, "googlenet", "model.image_size=28")
        x = torch.empty(2, 3, 28, 28)
        assert net.aux_weight == 0.3
        assert [name for name, _ in net.features.named_children()] == [
            "stem",
            "inception3",
            "inception4",
            "inception5",
        ]
        assert isinstance(net.head[-1], nn.Linear) and net.head[-1].out_features == 10
        assert inception_kernels(net) == {5}
        out = net.train()(x)
        assert isinstance(out, tuple) and [o.shape for o in out] == [(2, 10)] * 3
        assert net.eval()(x).shape == (2, 10)

        plain = build(make_cfg, "googlenet", "model.aux_logits=false", "model.branch5_kernel=3")
        assert not any(isinstance(m, InceptionAux) for m in plain.modules())
        assert inception_kernels(plain) == {3}
        assert plain.train()(x).shape == (2, 10)
    with pytest.raises(Exception, match="branch5_kernel must be odd"):
        build(make_cfg, "googlenet", "model.branch5_kernel=4")


@pytest.mark.parametrize("variant", ["cifar", "imagenet"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_blocks_and_projection_shortcuts(make_cfg, name: str, variant: str) -> None:
    with torch.device("meta"):
        net = build(make_cfg, name, f"model.variant={variant}")
    block, layers = RESNETS[name]
    stages = list(net.features)[1:]
    assert [len(s) for s in stages] == layers
    assert all(type(b) is block for s in stages for b in s)
    has_projection = []
    for stage in stages:
        for b in stage:
            in_ch, out_ch = b.conv1.in_channels, b.bn2.num_features * block.expansion
            stride = max(c.stride[0] for c in (b.conv1, b.conv2))
            assert (b.downsample is not None) == (stride != 1 or in_ch != out_ch)
            if b.downsample is not None:  # 1x1 conv + BN, no bias
                conv, bn = b.downsample
                assert conv.kernel_size == (1, 1) and conv.bias is None
                assert isinstance(bn, nn.BatchNorm2d)
            has_projection.append(b.downsample is not None)
    # First block of layers 2-4 (stride 2); for bottlenecks layer1's too (64 -> 256 channels).
    expected = {2, 4, 6} if block is BasicBlock else {0, 3, 7, 13}
    assert {i for i, p in enumerate(has_projection) if p} == expected


def test_resnet_cifar_stem_keeps_resolution(make_cfg) -> None:
    with torch.device("meta"):
        net = build(make_cfg, "resnet18")
        stem = net.features.stem
        assert stem.conv1.kernel_size == (3, 3) and stem.conv1.stride == (1, 1)
        assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
        assert net.features(torch.empty(1, 3, 32, 32)).shape == (1, 512, 4, 4)
        assert net.features(torch.empty(1, 3, 28, 28)).shape == (1, 512, 4, 4)


def test_resnet_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="unknown block"):
        ResNet(block=nn.Conv2d)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="four positive block counts"):
        ResNet(layers=(2, 2, 2))
    with pytest.raises(ValueError, match="choose one of: auto, cifar, imagenet"):
        GoogLeNet(variant="tiny")
