"""CycleGAN's networks (Zhu et al. 2017), as the authors' repository builds them.

The ResNet generator (reflection padding, instance norm, two stride-2 convolutions down, residual
blocks, two transposed convolutions up, tanh) and the 70x70 PatchGAN discriminator. Instance
norm without affine parameters, so every convolution keeps its bias; weights N(0, 0.02), biases
0. At ngf=ndf=64 the parameter counts equal the authors': 11,378,179 (9 blocks), 7,837,699
(6 blocks), 2,764,737 (3 layers).

Naming follows the authors' code: G_A translates A -> B and D_A judges domain-B images (real B
against G_A's fakes); G_B translates B -> A and D_B judges domain-A images.
"""

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from dlrun.errors import UserError


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class ResnetBlock(nn.Module):
    """x + conv-norm-relu-conv-norm(x), each 3x3 convolution after a 1-pixel reflection pad."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3),
            _norm(dim),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3),
            _norm(dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """c7s1-ngf, d(2 ngf), d(4 ngf), n_blocks x R(4 ngf), u(2 ngf), u(ngf), c7s1-out, tanh."""

    def __init__(
        self, in_channels: int = 3, out_channels: int = 3, ngf: int = 64, n_blocks: int = 9
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, 7),
            _norm(ngf),
            nn.ReLU(True),
        ]
        for i in range(2):  # downsampling
            mult = 2**i
            layers += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1),
                _norm(ngf * mult * 2),
                nn.ReLU(True),
            ]
        layers += [ResnetBlock(ngf * 4) for _ in range(n_blocks)]
        for i in range(2):  # upsampling
            mult = 2 ** (2 - i)
            layers += [
                nn.ConvTranspose2d(
                    ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1
                ),
                _norm(ngf * mult // 2),
                nn.ReLU(True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: 4x4 convolutions; with n_layers=3 each output judges a 70x70 input patch."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last of these keeps the resolution
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1),
                _norm(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class Generators(nn.Module):
    """Both generators: one role, one optimizer (the authors' itertools.chain of the two).

    `batched`: each generator takes its two first-stage inputs (G_A: A, and B for the identity
    loss) as one batch. Instance norm is per image, so the results are those of separate calls
    (to float rounding), from fewer, larger convolutions.
    """

    def __init__(self, g_a: nn.Module, g_b: nn.Module, batched: bool = True) -> None:
        super().__init__()
        self.g_a, self.g_b, self.batched = g_a, g_b, batched

    def forward(self, real_a: Tensor, real_b: Tensor, identity: bool = True) -> dict[str, Tensor]:
        """Everything the generator step needs, in one call (one compiled graph)."""
        out: dict[str, Tensor] = {}
        if identity and self.batched:
            b = len(real_a)
            out["fake_b"], out["idt_a"] = self.g_a(torch.cat([real_a, real_b])).split(b)
            out["fake_a"], out["idt_b"] = self.g_b(torch.cat([real_b, real_a])).split(b)
        else:
            out["fake_b"], out["fake_a"] = self.g_a(real_a), self.g_b(real_b)
            if identity:  # G_A should leave a B image as it is, and G_B an A image
                out["idt_a"], out["idt_b"] = self.g_a(real_b), self.g_b(real_a)
        out["rec_a"], out["rec_b"] = self.g_b(out["fake_b"]), self.g_a(out["fake_a"])
        return out


class Discriminators(nn.Module):
    """Both discriminators: D_A judges domain-B images, D_B domain-A images."""

    def __init__(self, d_a: nn.Module, d_b: nn.Module) -> None:
        super().__init__()
        self.d_a, self.d_b = d_a, d_b

    def forward(self, images_b: Tensor, images_a: Tensor) -> tuple[Tensor, Tensor]:
        return self.d_a(images_b), self.d_b(images_a)


def check_patch_size(image_size: int, n_layers: int) -> None:
    """Instance norm needs more than one value per channel: each normed PatchGAN map >= 2x2."""
    size = image_size // 2
    for _ in range(n_layers - 1):
        size //= 2
    if size - 1 < 2:
        raise UserError(
            f"data.image_size={image_size} is too small for a PatchGAN of model.n_layers="
            f"{n_layers}: use images of at least {2**n_layers * 3} px or fewer layers."
        )


def init_weights(module: nn.Module, gain: float = 0.02) -> None:
    """The authors' 'normal' init: convolution weights N(0, gain), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class CycleGAN(nn.Module):
    """Two generators and two discriminators; `forward` translates A -> B (G_A)."""

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 256,
        ngf: int = 64,
        ndf: int = 64,
        n_blocks: int | str = "auto",
        n_layers: int = 3,
        init_gain: float = 0.02,
        batched: bool = True,
    ) -> None:
        super().__init__()
        check_patch_size(image_size, n_layers)
        if n_blocks == "auto":  # the authors' choice: 9 blocks at 256 px, 6 at 128 px and below
            n_blocks = 9 if image_size >= 256 else 6
        self.n_blocks, self.image_size, self.channels = int(n_blocks), image_size, in_channels
        self.generators = Generators(
            ResnetGenerator(in_channels, in_channels, ngf, self.n_blocks),
            ResnetGenerator(in_channels, in_channels, ngf, self.n_blocks),
            batched,
        )
        self.discriminators = Discriminators(
            NLayerDiscriminator(in_channels, ndf, n_layers),
            NLayerDiscriminator(in_channels, ndf, n_layers),
        )
        init_weights(self, init_gain)

    def forward(self, x: Tensor) -> Tensor:
        return self.generators.g_a(x)

    def translate(self, x: Tensor, direction: str = "AtoB") -> Tensor:
        return (self.generators.g_a if direction == "AtoB" else self.generators.g_b)(x)

    def counts(self) -> Mapping[str, int]:
        """Parameters of one generator and one discriminator (what the run log prints)."""
        return {
            "generator": sum(p.numel() for p in self.generators.g_a.parameters()),
            "discriminator": sum(p.numel() for p in self.discriminators.d_a.parameters()),
        }


def cyclegan(**kwargs: object) -> CycleGAN:
    return CycleGAN(**kwargs)  # type: ignore[arg-type]


__all__ = ["CycleGAN", "NLayerDiscriminator", "ResnetGenerator", "cyclegan"]
