import pytest
import torch
import torchvision
from torch import nn

from dlrun.models import instantiate_model

IMAGENET = (
    "model.variant=imagenet",
    "model.image_size=224",
    "model.num_classes=1000",
    "model.in_channels=3",
)
EFFICIENTNETS = [f"efficientnet_b{phi}" for phi in range(8)]


def _count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _build(make_cfg, model: str, *overrides: str, meta: bool = False) -> nn.Module:
    cfg = make_cfg(f"model={model}", "data=cifar10", *overrides)
    if not meta:
        return instantiate_model(cfg.model)
    with torch.device("meta"):  # shapes only: skips allocating and initialising B7's 66M weights
        return instantiate_model(cfg.model)


@pytest.mark.parametrize("model", ["mobilenet_v2", *EFFICIENTNETS])
def test_imagenet_variant_mirrors_torchvision(make_cfg, model: str) -> None:
    ours = _build(make_cfg, model, *IMAGENET, meta=True)
    with torch.device("meta"):
        theirs = getattr(torchvision.models, model)()
    assert _count(ours) == _count(theirs)
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    assert [b.shape for b in ours.buffers()] == [b.shape for b in theirs.buffers()]


@pytest.mark.parametrize("model", ["mobilenet_v2", "efficientnet_b0"])
def test_torchvision_weights_load_by_position(make_cfg, model: str) -> None:
    ours, theirs = _build(make_cfg, model, *IMAGENET), getattr(torchvision.models, model)()
    ours.load_state_dict(dict(zip(ours.state_dict(), theirs.state_dict().values(), strict=True)))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))


def test_mobilenet_v1_has_the_papers_4_2m_parameters(make_cfg) -> None:
    assert _count(_build(make_cfg, "mobilenet_v1", *IMAGENET, meta=True)) == 4_231_976


def _convs(net: nn.Module) -> list[nn.Conv2d]:
    return [m for m in net.modules() if isinstance(m, nn.Conv2d)]


def test_width_mult_scales_mobilenet_v1_channels(make_cfg) -> None:
    full = _build(make_cfg, "mobilenet_v1", meta=True)
    half = _build(make_cfg, "mobilenet_v1", "model.width_mult=0.5", meta=True)
    assert [c.out_channels // 2 for c in _convs(full)] == [c.out_channels for c in _convs(half)]
    assert half.head[-1].in_features == 512


def test_width_mult_scales_mobilenet_v2_channels(make_cfg) -> None:
    half = _build(make_cfg, "mobilenet_v2", "model.width_mult=0.5", meta=True)
    wide = _build(make_cfg, "mobilenet_v2", "model.width_mult=1.4", meta=True)
    assert _convs(half)[0].out_channels == 16 and _convs(wide)[0].out_channels == 48
    # the last 1x1 conv never narrows below 1280, and widens with width_mult > 1
    assert half.head[-1].in_features == 1280 and wide.head[-1].in_features == 1792


@pytest.mark.parametrize(("model", "size"), [("mobilenet_v1", 4), ("mobilenet_v2", 4)])
@pytest.mark.parametrize(("channels", "pixels"), [(1, 28), (3, 32)])
def test_cifar_variant_keeps_resolution(
    make_cfg, model: str, size: int, channels: int, pixels: int
) -> None:
    net = _build(make_cfg, model, f"model.in_channels={channels}", f"model.image_size={pixels}")
    assert net.features(torch.randn(1, channels, pixels, pixels)).shape[-2:] == (size, size)


def test_efficientnet_cifar_variant_ends_at_2x2(make_cfg) -> None:
    net = _build(make_cfg, "efficientnet_b0", "model.in_channels=1", "model.image_size=28")
    assert net.features(torch.randn(1, 1, 28, 28)).shape[-2:] == (2, 2)


def _blocks(net: nn.Module) -> list[int]:
    return [len(stage) for stage in net.features[1:-1]]


def test_phi_scales_efficientnet_depth_and_width(make_cfg) -> None:
    b0, b3 = (_build(make_cfg, m, meta=True) for m in ("efficientnet_b0", "efficientnet_b3"))
    assert _blocks(b0) == [1, 2, 2, 3, 3, 4, 1]
    assert _blocks(b3) == [2, 3, 3, 5, 5, 6, 2]  # ceil(n * 1.4)
    assert _convs(b0)[0].out_channels == 32 and _convs(b3)[0].out_channels == 40  # 32 * 1.2 -> 40
    assert b0.head[-1].in_features == 1280 and b3.head[-1].in_features == 1536
    assert b0.head[2].p == 0.2 and b3.head[2].p == 0.3


def test_width_and_depth_mult_override_phi(make_cfg) -> None:
    net = _build(
        make_cfg, "efficientnet_b3", "model.width_mult=1.0", "model.depth_mult=1.0", meta=True
    )
    assert _count(net) == _count(_build(make_cfg, "efficientnet_b0", meta=True))


def test_b5_to_b7_keep_torchvisions_batchnorm_settings(make_cfg) -> None:
    for model, eps in (("efficientnet_b4", 1e-5), ("efficientnet_b5", 1e-3)):
        bn = next(
            m for m in _build(make_cfg, model, meta=True).modules() if isinstance(m, nn.BatchNorm2d)
        )
        assert bn.eps == eps


def test_bn_momentum_and_eps_override_only_their_own_setting(make_cfg) -> None:
    for model, default in (("efficientnet_b0", 0.1), ("efficientnet_b5", 0.01)):
        net = _build(make_cfg, model, "model.bn_momentum=null", meta=True)
        assert {m.momentum for m in net.modules() if isinstance(m, nn.BatchNorm2d)} == {default}
        net = _build(make_cfg, model, "model.bn_momentum=0.3", meta=True)
        bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        assert {m.momentum for m in bns} == {0.3}
        assert {m.eps for m in bns} == {1e-3 if default == 0.01 else 1e-5}  # eps untouched
        net = _build(make_cfg, model, "model.bn_eps=1e-4", "model.bn_momentum=null", meta=True)
        bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        assert {(m.eps, m.momentum) for m in bns} == {(1e-4, default)}


def test_b5_to_b7_configs_set_bn_momentum_0_1(make_cfg) -> None:
    for model, momentum in (("efficientnet_b4", 0.1), ("efficientnet_b5", 0.1)):
        net = _build(make_cfg, model, meta=True)
        assert {m.momentum for m in net.modules() if isinstance(m, nn.BatchNorm2d)} == {momentum}
    for phi in (5, 6, 7):
        assert make_cfg(f"model=efficientnet_b{phi}").model.bn_momentum == 0.1


def test_unknown_phi_is_refused(make_cfg) -> None:
    with pytest.raises(Exception, match="unknown phi 8; choose one of: 0, 1, 2, 3, 4, 5, 6, 7"):
        _build(make_cfg, "efficientnet_b0", "model.phi=8", meta=True)


@pytest.mark.parametrize("model", ["mobilenet_v1", "mobilenet_v2"])
def test_bad_width_mult_is_refused(make_cfg, model: str) -> None:
    with pytest.raises(Exception, match="width_mult must be positive"):
        _build(make_cfg, model, "model.width_mult=0", meta=True)


def test_classifier_init_does_not_scale_with_fewer_classes(make_cfg) -> None:
    # torchvision's U(+-1/sqrt(num_classes)) gave B0 on 10 classes logits of std ~3.4 at init
    torch.manual_seed(0)
    net = _build(make_cfg, "efficientnet_b0", "model.width_mult=0.25", "model.depth_mult=0.25")
    fc = net.head[-1]
    assert fc.weight.abs().max() <= 1 / fc.in_features**0.5
    assert fc.weight.abs().max() > 0.9 / fc.in_features**0.5  # U(+-b), not some smaller range
    with torch.no_grad():
        logits = net.train()(torch.randn(16, 3, 32, 32))
    assert logits.std() < 1.0


def test_zero_init_residual_starts_every_residual_block_as_the_identity(make_cfg) -> None:
    from dlrun.models.efficientnet import MBConv

    small = ("model.width_mult=0.25", "model.depth_mult=0.5")
    net = _build(make_cfg, "efficientnet_b0", *small)  # the configs' default: true
    blocks = [m for m in net.modules() if isinstance(m, MBConv)]
    residual = [b for b in blocks if b.use_residual]
    assert residual and len(residual) < len(blocks)
    assert all(b.project_norm.weight.abs().sum() == 0 for b in residual)
    assert all(b.project_norm.weight.abs().sum() > 0 for b in blocks if not b.use_residual)
    x = torch.randn(2, residual[0].block[0][0].in_channels, 4, 4)
    assert torch.equal(residual[0].eval()(x), x)
    residual[0].train()(x).pow(2).sum().backward()  # the zeroed scale learns from the first step
    assert residual[0].project_norm.weight.grad.abs().sum() > 0
    net = _build(make_cfg, "efficientnet_b0", *small, "model.zero_init_residual=false")
    assert all(b.project_norm.weight.min() == 1 for b in net.modules() if isinstance(b, MBConv))


def test_depthwise_convs_take_the_fan_out_of_one_group(make_cfg) -> None:
    # torch's fan_out for a depthwise conv counts every channel: std sqrt(2 / (C k k)), ~0.01 here
    torch.manual_seed(0)
    net = _build(make_cfg, "efficientnet_b0", "model.zero_init_residual=false")
    depthwise = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise
    for conv in depthwise:
        k = conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.groups == conv.out_channels
        assert abs(conv.weight.std().item() / (2 / k) ** 0.5 - 1) < 0.25
