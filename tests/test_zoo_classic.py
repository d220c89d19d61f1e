from contextlib import nullcontext
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from dlrun.models import instantiate_model

IMAGENET = {"variant": "imagenet", "image_size": 224, "num_classes": 1000, "in_channels": 3}
CIFAR = {"variant": "auto", "image_size": 32, "num_classes": 10, "in_channels": 3}
# smallest image each imagenet variant accepts (None: any size)
MIN_SIZE = {"alexnet": 63, "vgg11": 32, "vgg19": 32, "nin": 67, "dilated_cnn": None}


def builder(make_cfg, model: str, meta: bool = True) -> Any:
    """Compose a real config once; the returned function builds it with keyword overrides.

    On the meta device the 100M-parameter ImageNet models cost no memory and no init time.
    """
    cfg = make_cfg(f"model={model}")

    def build(**overrides: Any) -> nn.Module:
        with torch.device("meta") if meta else nullcontext():
            return instantiate_model(cfg.model, **overrides)

    return build


def shapes(tensors: Any) -> list[torch.Size]:
    return [t.shape for t in tensors]


def last_parameterised(module: nn.Module) -> nn.Module:
    return [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))][-1]


@pytest.mark.parametrize("model", ["alexnet", "vgg11", "vgg13", "vgg16", "vgg19"])
def test_imagenet_variant_matches_torchvision(make_cfg, model: str) -> None:
    build = builder(make_cfg, model)
    options = [(False, "")] if model == "alexnet" else [(False, ""), (True, "_bn")]
    for bn, suffix in options:
        ours = build(**IMAGENET, **({"batch_norm": bn} if model != "alexnet" else {}))
        with torch.device("meta"):
            tv = getattr(torchvision.models, model + suffix)()
        n_ours, n_tv = (sum(p.numel() for p in m.parameters()) for m in (ours, tv))
        assert n_ours == n_tv, f"{model}{suffix}: {n_ours} != torchvision's {n_tv}"
        assert shapes(ours.parameters()) == shapes(tv.parameters())  # loadable by position
        assert shapes(ours.buffers()) == shapes(tv.buffers())


@pytest.mark.parametrize("model", MIN_SIZE)
def test_classic_contract(make_cfg, model: str) -> None:
    build = builder(make_cfg, model)
    for kwargs in (CIFAR, IMAGENET):
        net = build(**kwargs)
        assert len(net.features) >= 3
        last = last_parameterised(net.head)  # the layer transfer learning replaces
        k = kwargs["num_classes"]
        assert getattr(last, "out_features", getattr(last, "out_channels", None)) == k
    with pytest.raises(Exception, match="unknown variant 'vit'.*auto, cifar, imagenet"):
        build(variant="vit")
    if (size := MIN_SIZE[model]) is not None:
        with pytest.raises(Exception, match=f"at least {size}x{size} px"):
            build(variant="imagenet", image_size=size - 1)
        net = build(variant="imagenet", image_size=size).eval()  # eval: BN takes a 1x1x1 batch
        assert net(torch.empty(1, 1, size, size, device="meta")).shape == (1, 10)  # shapes only


def test_alexnet_lrn_follows_conv1_and_conv2(make_cfg) -> None:
    build = builder(make_cfg, "alexnet")
    for kwargs in (CIFAR, IMAGENET):
        plain, net = build(**kwargs), build(**kwargs, lrn=True)
        assert not any(isinstance(m, nn.LocalResponseNorm) for m in plain.modules())
        for stage in net.features[:2]:
            assert [type(m) for m in stage] == [
                nn.Conv2d,
                nn.ReLU,
                nn.LocalResponseNorm,
                nn.MaxPool2d,
            ]
        assert sum(isinstance(m, nn.LocalResponseNorm) for m in net.modules()) == 2
        assert shapes(net.parameters()) == shapes(plain.parameters())
        pools = [m for m in net.modules() if isinstance(m, nn.MaxPool2d)]
        assert len(pools) == 3 and all(p.kernel_size == 3 and p.stride == 2 for p in pools)
        assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 5
        assert sum(isinstance(m, nn.Linear) for m in net.modules()) == 3


@pytest.mark.parametrize(
    ("model", "convs"), [("vgg11", [1, 1, 2, 2, 2]), ("vgg19", [2, 2, 4, 4, 4])]
)
def test_vgg_has_five_stages_each_ending_in_a_pool(make_cfg, model: str, convs: list[int]) -> None:
    build = builder(make_cfg, model)
    for bn in (False, True):
        net = build(batch_norm=bn)  # mnist: 28x28x1, cifar variant
        assert len(net.features) == 5
        for stage, n in zip(net.features, convs, strict=True):
            assert isinstance(stage[-1], nn.MaxPool2d)
            assert sum(isinstance(m, nn.Conv2d) for m in stage) == n
            assert sum(isinstance(m, nn.BatchNorm2d) for m in stage) == (n if bn else 0)
        for size in (28, 32):  # ceil-mode pools reach 1x1 from both
            x = torch.empty(1, 1, size, size, device="meta")
            assert net.features(x).shape == (1, 512, 1, 1)


def test_dilations_appear_in_the_convs(make_cfg) -> None:
    build = builder(make_cfg, "dilated_cnn", meta=False)
    net = build(dilations=[1, 3, 5], channels=8)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.dilation for c in convs] == [(1, 1), (3, 3), (5, 5)]
    assert [c.padding for c in convs] == [(1, 1), (3, 3), (5, 5)]
    assert all(c.out_channels == 8 for c in convs)
    assert not any(isinstance(m, nn.MaxPool2d | nn.AvgPool2d) for m in net.features.modules())
    x = torch.randn(2, 1, 28, 28)
    assert net.features(x).shape == (2, 8, 28, 28)  # no pooling: full resolution throughout
    for bad in ([], [1, 0]):
        with pytest.raises(Exception, match="dilations must be a non-empty list of integers"):
            build(dilations=bad)


def test_nin_has_no_fully_connected_layer(make_cfg) -> None:
    build = builder(make_cfg, "nin")
    for kwargs in (CIFAR, IMAGENET):
        net = build(**kwargs)
        assert not any(isinstance(m, nn.Linear) for m in net.modules())
        last = last_parameterised(net.head)
        assert isinstance(last, nn.Conv2d) and last.kernel_size == (1, 1)
        assert isinstance(net.head[-2], nn.AdaptiveAvgPool2d)
        assert isinstance(net.head[-1], nn.Flatten)


def test_nin_batch_norm_sits_between_each_conv_and_its_relu(make_cfg) -> None:
    build = builder(make_cfg, "nin")
    plain = build(**CIFAR, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(p.numel() for p in plain.parameters()) == 1_987_750  # d2l's NiN, biases and all
    net = build(**CIFAR, batch_norm=True)
    layers = [m for m in net.modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d | nn.ReLU)]
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 12
    for i in convs[:-1]:  # conv (no bias: BN shifts) -> BN -> ReLU
        assert layers[i].bias is None and isinstance(layers[i + 1], nn.BatchNorm2d)
        assert isinstance(layers[i + 2], nn.ReLU)
    logits = layers[convs[-1]]  # the class block's last conv stays plain: transfer replaces it
    assert logits.bias is not None and isinstance(layers[convs[-1] + 1], nn.ReLU)
    assert last_parameterised(net.head) is logits
