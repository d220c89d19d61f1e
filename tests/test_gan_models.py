import pytest
import torch
from torch import nn

from dlrun.models.gan import (
    GAN,
    DCGANDiscriminator,
    DCGANGenerator,
    MLPGenerator,
    dcgan,
    dcgan_init,
    gan,
)

SHAPES = [(1, 28), (3, 32)]  # MNIST, CIFAR-10


def _check_gan(model: GAN, channels: int, size: int) -> None:
    torch.manual_seed(0)
    z = model.sample_latent(4, generator=torch.Generator().manual_seed(0))
    assert z.shape == (4, model.latent_dim)
    images = model(z)
    assert images.shape == (4, channels, size, size)
    assert images.min() >= -1 and images.max() <= 1  # Tanh: the data's normalised range
    logits = model.discriminator(images)
    assert logits.shape == (4,)
    # One backward through D(G(z)) reaches every parameter of both networks.
    logits.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(("channels", "size"), SHAPES)
def test_mlp_gan_shapes_and_gradients(channels: int, size: int) -> None:
    _check_gan(gan(in_channels=channels, image_size=size, latent_dim=16), channels, size)


@pytest.mark.parametrize(("channels", "size"), SHAPES)
@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_dcgan_shapes_and_gradients(channels: int, size: int, norm: str) -> None:
    model = dcgan(
        in_channels=channels, image_size=size, latent_dim=16, g_width=8, d_width=8, norm=norm
    )
    _check_gan(model, channels, size)


def test_the_notes_mlp_sizes() -> None:
    model = gan()  # the notes' defaults: 100 -> 128-256-512-1024 -> 784 and 784 -> 512-256 -> 1
    widths = [m.out_features for m in model.generator.modules() if isinstance(m, nn.Linear)]
    assert widths == [128, 256, 512, 1024, 784]
    widths = [m.out_features for m in model.discriminator.modules() if isinstance(m, nn.Linear)]
    assert widths == [512, 256, 1]
    bns = [m for m in model.generator.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(bns) == 3  # the first block has none
    assert not any(isinstance(m, nn.Sigmoid) for m in model.discriminator.modules())  # logits


def test_the_paper_dcgan_at_64_pixels() -> None:
    g = DCGANGenerator(latent_dim=100, channels=3, image_size=64)
    channels = [m.out_channels for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert channels == [512, 256, 128, 64, 3]  # 4 -> 8 -> 16 -> 32 -> 64
    assert g(torch.randn(2, 100)).shape == (2, 3, 64, 64)


@pytest.mark.parametrize("norm", ["none", "layer"])
def test_critic_without_batchnorm(norm: str) -> None:
    d = DCGANDiscriminator(channels=3, image_size=32, norm=norm)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in d.modules())
    # Per-sample: the critic's score of an image does not depend on the rest of the batch.
    x = torch.randn(3, 3, 32, 32)
    d.train()
    torch.testing.assert_close(d(x)[:1], d(x[:1]))


def test_unknown_norm_names_the_choices() -> None:
    with pytest.raises(ValueError, match="batch, layer, none"):
        DCGANDiscriminator(norm="instance")


@pytest.mark.parametrize("size", [30, 48, 16])
def test_unsupported_image_size_names_the_supported_ones(size: int) -> None:
    for build in (DCGANGenerator, DCGANDiscriminator):
        with pytest.raises(ValueError, match="28x28, 32x32, 64x64"):
            build(image_size=size)


def test_dcgan_init_statistics() -> None:
    g = DCGANGenerator(latent_dim=100, channels=3, image_size=32)
    conv = g.model[0]
    assert conv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert conv.weight.mean().abs().item() < 0.002
    bn = g.model[1]
    assert bn.weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert bn.bias.abs().sum().item() == 0.0
    lin = nn.Linear(500, 500)
    dcgan_init(lin)
    assert lin.weight.std().item() == pytest.approx(0.02, rel=0.05) and lin.bias.sum() == 0


def test_sample_latent_follows_the_model_and_the_generator() -> None:
    model = gan(latent_dim=8)
    a = model.sample_latent(3, "cpu", generator=torch.Generator().manual_seed(5))
    b = model.sample_latent(3, generator=torch.Generator().manual_seed(5))
    assert a.shape == (3, 8) and torch.equal(a, b)


def test_mlp_generator_reshapes_to_images() -> None:
    g = MLPGenerator(latent_dim=10, channels=3, image_size=32, hidden=(32, 64))
    assert g(torch.randn(2, 10)).shape == (2, 3, 32, 32)
