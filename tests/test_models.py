from pathlib import Path

import pytest
import torch

from dlrun.cli import CONFIG_DIR
from dlrun.models import instantiate_model

# Classifiers: the models that keep the classification trainer. Those that bring their own are
# tested with it (k-NN: tests/test_knn.py, GANs: tests/test_gan_models.py, Siamese networks,
# pseudo_siamese inheriting the trainer of siamese: tests/test_metric.py).
MODELS = sorted(
    p.stem
    for p in (Path(CONFIG_DIR) / "model").glob("*.yaml")
    if "override /trainer" not in p.read_text() and p.stem != "pseudo_siamese"
)
SHAPES = {"mnist": (1, 28), "cifar10": (3, 32)}


@pytest.mark.parametrize("data", SHAPES)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_config_trains_on_every_shape(make_cfg, model: str, data: str) -> None:
    # Seeded: EfficientNet's stochastic depth can drop a block for a whole batch of 4, and then
    # its parameters rightly get no gradient.
    torch.manual_seed(0)
    # timm's ResNets start each block's last BatchNorm at 0 (zero_init_last): by design, the
    # convolutions before it get no gradient at the first step.
    extra = ["model.kwargs={zero_init_last: false}"] if model == "timm" else []
    if model.startswith("efficientnet"):  # the same by default here (zero_init_residual)
        extra = ["model.zero_init_residual=false"]
    cfg = make_cfg(f"model={model}", f"data={data}", *extra)
    net = instantiate_model(cfg.model)
    c, s = SHAPES[data]
    out = net(torch.randn(4, c, s, s))
    outs = out if isinstance(out, tuple) else (out,)  # GoogLeNet adds auxiliary logits in training
    assert all(o.shape == (4, 10) for o in outs)
    sum(o.logsumexp(1).sum() for o in outs).backward()
    for name, p in net.named_parameters():
        if not p.requires_grad:  # frozen by design (airbench's whitening stem and BN scales)
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{model}: no gradient for {name}"


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_lenet_options(make_cfg, activation: str, pool: str) -> None:
    net = instantiate_model(
        make_cfg("model=lenet", f"model.activation={activation}", f"model.pool={pool}").model
    )
    assert any(type(m).__name__.lower() == activation for m in net.modules())
    assert any(type(m).__name__.lower().startswith(pool) for m in net.modules())
    assert sum(p.numel() for p in net.parameters()) == 61706  # LeNet-5's 61,706 for 10 classes


def test_mlp_is_the_notes_784_128_10_net(make_cfg) -> None:
    net = instantiate_model(make_cfg("model=mlp").model)
    assert sum(p.numel() for p in net.parameters()) == 784 * 128 + 128 + 128 * 10 + 10


def test_unknown_activation_is_refused(make_cfg) -> None:
    with pytest.raises(Exception, match="unknown activation 'gelu'.*sigmoid, tanh, relu"):
        instantiate_model(make_cfg("model=mlp", "model.activation=gelu").model)


@pytest.mark.parametrize("scheme", ["xavier", "kaiming", "normal"])
def test_init_schemes(make_cfg, scheme: str) -> None:
    torch.manual_seed(0)
    net = instantiate_model(
        make_cfg("model=mlp", f"model.init={scheme}", "model.hidden=[512]").model
    )
    w = net.features[1].weight  # (512, 784)
    # kaiming: fan_in for linear layers (fan_out would be the layer's width)
    expected = {"xavier": (2 / (784 + 512)) ** 0.5, "kaiming": (2 / 784) ** 0.5, "normal": 0.01}
    assert w.std().item() == pytest.approx(expected[scheme], rel=0.05)
    assert net.features[1].bias.abs().sum() == 0


def test_kaiming_keeps_a_batchnorm_vgg_s_logits_near_unit_scale(make_cfg) -> None:
    # fan_out on the 512 -> 10 classifier gave logits of std ~19 and an initial loss of ~33:
    # VGG-11-BN sat at chance on CIFAR-10 under SGD
    torch.manual_seed(0)
    cfg = make_cfg("model=vgg11", "data=cifar10", "model.batch_norm=true", "model.init=kaiming")
    net = instantiate_model(cfg.model).train()
    logits = net(torch.randn(64, 3, 32, 32))
    assert logits.std().item() < 4
    assert torch.nn.functional.cross_entropy(logits, torch.randint(0, 10, (64,))).item() < 6
    # model.init=auto: torchvision's small head behind BatchNorm, He's for a plain stack
    for bn, std in (("true", 0.01), ("false", (2 / 512) ** 0.5)):
        net = instantiate_model(make_cfg("model=vgg11", "data=cifar10", f"model.batch_norm={bn}").model)
        assert net.head[-1].weight.std().item() == pytest.approx(std, rel=0.1)


def test_unknown_init_is_refused(make_cfg) -> None:
    with pytest.raises(Exception, match="unknown init 'he'"):
        instantiate_model(make_cfg("model=lenet", "model.init=he").model)
