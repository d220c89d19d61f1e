"""GAN (Goodfellow et al. 2014) as the notes' MNIST MLP pair, and DCGAN (Radford et al. 2015)."""

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dlrun.models.layers import choose

# Spatial size the DCGAN generator projects z to, per supported image size: every later stage
# doubles it, so the image size must be that start times a power of two.
DCGAN_START = {28: 7, 32: 4, 64: 4}


class LayerNorm2d(nn.GroupNorm):
    """Layer norm over (C, H, W) of each image: one group. Normalises per sample, unlike BatchNorm."""

    def __init__(self, num_channels: int) -> None:
        super().__init__(1, num_channels)


# WGAN-GP penalises the critic's gradient per sample, which BatchNorm's batch coupling breaks
# (Gulrajani et al. 2017, section 4): its critic uses layer norm or none.
CRITIC_NORMS: dict[str, type[nn.Module]] = {
    "batch": nn.BatchNorm2d,
    "layer": LayerNorm2d,
    "none": nn.Identity,
}


def dcgan_init(module: nn.Module) -> None:
    """The DCGAN paper's init: weights N(0, 0.02), BatchNorm scales N(1, 0.02), biases 0."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _dcgan_stages(image_size: int) -> tuple[int, int]:
    """(start size, number of x2 stages) for a supported image size."""
    if image_size not in DCGAN_START:
        sizes = ", ".join(f"{s}x{s}" for s in DCGAN_START)
        raise ValueError(
            f"DCGAN supports images of {sizes} pixels (MNIST 28, CIFAR-10 32, the paper's 64), "
            f"got {image_size}x{image_size}; set data.image_size to one of them."
        )
    start = DCGAN_START[image_size]
    return start, int(math.log2(image_size // start))


class MLPGenerator(nn.Module):
    """The notes' generator: z -> Linear blocks (BatchNorm1d except the first, LeakyReLU 0.2) -> Tanh."""

    def __init__(
        self,
        *,
        latent_dim: int = 100,
        channels: int = 1,
        image_size: int = 28,
        hidden: Sequence[int] = (128, 256, 512, 1024),
        bn_eps: float = 0.8,
    ) -> None:
        super().__init__()
        self.shape = (channels, image_size, image_size)
        layers: list[nn.Module] = []
        width = latent_dim
        for i, out in enumerate(hidden):
            layers.append(nn.Linear(width, out))
            if i > 0:  # the notes normalise every block but the first
                # The notes write BatchNorm1d(out, 0.8): the 0.8 lands on eps, not momentum. Kept,
                # since that is the network the notes train (bn_eps=1e-5 gives PyTorch's default).
                layers.append(nn.BatchNorm1d(out, eps=bn_eps))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            width = out
        layers += [nn.Linear(width, math.prod(self.shape)), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:  # (B, latent) -> (B, C*H*W) -> (B, C, H, W) in [-1, 1]
        return self.model(z).view(z.shape[0], *self.shape)


class MLPDiscriminator(nn.Module):
    """The notes' discriminator: flatten -> Linear + LeakyReLU 0.2 blocks -> one raw logit."""

    def __init__(
        self, *, channels: int = 1, image_size: int = 28, hidden: Sequence[int] = (512, 256)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = channels * image_size * image_size
        for out in hidden:
            layers += [nn.Linear(width, out), nn.LeakyReLU(0.2, inplace=True)]
            width = out
        # No Sigmoid (the notes end with one): the losses take logits, which is numerically
        # stable, and LSGAN / WGAN need the raw score anyway.
        layers.append(nn.Linear(width, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, 1) -> (B,)
        return self.model(x).squeeze(1)


class DCGANGenerator(nn.Module):
    """Project z to start x start, then (ConvT stride 2, BN, ReLU) stages halving width; Tanh out."""

    def __init__(
        self, *, latent_dim: int = 100, channels: int = 1, image_size: int = 28, width: int = 64
    ) -> None:
        super().__init__()
        start, stages = _dcgan_stages(image_size)
        c = width * 2 ** (stages - 1)
        # The paper's "project and reshape": on a 1x1 input a start-sized transposed conv is
        # exactly a Linear to (c, start, start). No biases before BN (its mean removes them).
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, c, start, 1, 0, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
        ]
        for _ in range(stages - 1):
            layers += [
                nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False),  # k4 s2 p1: exactly x2
                nn.BatchNorm2d(c // 2),
                nn.ReLU(inplace=True),
            ]
            c //= 2
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1), nn.Tanh()]  # no BN on the output
        self.model = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, z: Tensor) -> Tensor:
        # (B, latent) -> (B, latent, 1, 1) -> (B, 4w|2w, 4|7, 4|7) -> ... -> (B, C, 32|28, 32|28)
        return self.model(z[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    """Strided convs (LeakyReLU 0.2, norm except the first) down to start x start, then one logit."""

    def __init__(
        self, *, channels: int = 1, image_size: int = 28, width: int = 64, norm: str = "batch"
    ) -> None:
        super().__init__()
        start, stages = _dcgan_stages(image_size)
        norm_layer = choose(CRITIC_NORMS, norm, "norm")
        bias = norm == "none"  # a bias just before a norm layer is cancelled by it
        layers: list[nn.Module] = [
            nn.Conv2d(channels, width, 4, 2, 1),  # the paper: no norm on the input layer
            nn.LeakyReLU(0.2, inplace=True),
        ]
        c = width
        for _ in range(stages - 1):
            layers += [
                nn.Conv2d(c, c * 2, 4, 2, 1, bias=bias),  # k4 s2 p1: exactly /2
                norm_layer(c * 2),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            c *= 2
        layers.append(nn.Conv2d(c, 1, start, 1, 0))  # start x start -> 1x1: the logit
        self.model = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, x: Tensor) -> Tensor:
        # (B, C, 32|28, 32|28) -> (B, w, 16|14, 16|14) -> ... -> (B, 4w|2w, 4|7, 4|7) -> (B,)
        return self.model(x).flatten()


class GAN(nn.Module):
    """A generator and a discriminator (critic) trained against each other, plus the latent size."""

    def __init__(self, *, generator: nn.Module, discriminator: nn.Module, latent_dim: int) -> None:
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator
        self.latent_dim = latent_dim

    def sample_latent(
        self,
        n: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:  # -> (n, latent) ~ N(0, I), on `device` (default: where the model lives)
        if device is None:
            device = next(self.parameters()).device
        return torch.randn(n, self.latent_dim, device=device, generator=generator)

    def forward(self, z: Tensor) -> Tensor:  # (B, latent) -> (B, C, H, W) in [-1, 1]
        return self.generator(z)


def gan(
    *,
    in_channels: int = 1,
    image_size: int = 28,
    latent_dim: int = 100,
    g_hidden: Sequence[int] = (128, 256, 512, 1024),
    d_hidden: Sequence[int] = (512, 256),
    bn_eps: float = 0.8,
) -> GAN:
    """The notes' fully connected GAN (Goodfellow et al. 2014 on MNIST)."""
    shape = {"channels": in_channels, "image_size": image_size}
    return GAN(
        generator=MLPGenerator(
            latent_dim=latent_dim, hidden=tuple(g_hidden), bn_eps=bn_eps, **shape
        ),
        discriminator=MLPDiscriminator(hidden=tuple(d_hidden), **shape),
        latent_dim=latent_dim,
    )


def dcgan(
    *,
    in_channels: int = 1,
    image_size: int = 28,
    latent_dim: int = 100,
    g_width: int = 64,
    d_width: int = 64,
    norm: str = "batch",
    loss_name: str | None = None,
) -> GAN:
    """DCGAN (Radford et al. 2015); `norm="layer"` or `"none"` makes the WGAN-GP critic.

    `norm="auto"` is BatchNorm, except for loss=wgan_gp: its gradient penalty is taken per sample,
    and BatchNorm makes each critic score depend on the rest of the batch.
    """
    if norm == "auto":
        norm = "layer" if loss_name == "wgan_gp" else "batch"
    shape = {"channels": in_channels, "image_size": image_size}
    return GAN(
        generator=DCGANGenerator(latent_dim=latent_dim, width=g_width, **shape),
        discriminator=DCGANDiscriminator(width=d_width, norm=norm, **shape),
        latent_dim=latent_dim,
    )
