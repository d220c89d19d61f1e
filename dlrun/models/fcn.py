"""FCN (Long et al., 2015): a zoo classifier made fully convolutional, with skip fusion.

The backbone's convolutional stages (`.features`, any zoo model that has them) give feature maps
at falling resolutions. A 1x1 convolution scores the deepest; `variant=16s` / `8s` add the scores
of the one or two shallower resolutions, each after a 2x transposed convolution of the deeper
sum (FCN-16s / 8s; `32s` fuses nothing), and a last transposed convolution brings the sum up to
the input size. Transposed convolutions start as bilinear interpolation, as in the paper.
Outputs (B, num_classes + 1, H, W): class 0 is background.
"""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dlrun.errors import UserError
from dlrun.models.siamese import zoo_model

FUSED = {"32s": 1, "16s": 2, "8s": 3}  # resolutions whose scores are summed


def bilinear_up(channels: int, factor: int) -> nn.ConvTranspose2d:
    """A per-channel transposed convolution that upsamples by `factor`, starting as bilinear."""
    k = 2 * factor - factor % 2
    up = nn.ConvTranspose2d(
        channels, channels, k, stride=factor, padding=(k - factor + 1) // 2, bias=False
    )
    centre = (k - 1) / 2 if k % 2 else k / 2 - 0.5
    og = torch.arange(k, dtype=torch.float32)
    filt = 1 - (og - centre).abs() / (factor if k % 2 else factor)
    kernel = filt[:, None] * filt[None, :]
    with torch.no_grad():
        up.weight.zero_()
        for c in range(channels):
            up.weight[c, c] = kernel
    return up


class FCN(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        backbone: str = "vgg11",
        backbone_args: Mapping[str, Any] | None = None,
        variant: str = "8s",
    ) -> None:
        super().__init__()
        if variant not in FUSED:
            raise UserError(f"model.variant must be one of {', '.join(FUSED)}, got '{variant}'.")
        net = zoo_model(
            backbone, in_channels=in_channels, image_size=image_size, num_classes=num_classes + 1,
            **dict(backbone_args or {}),
        )  # fmt: skip
        features = getattr(net, "features", None)
        if not isinstance(features, nn.Sequential):
            raise UserError(
                f"model.backbone={backbone} has no convolutional stages (.features) to make "
                "fully convolutional; use e.g. vgg11, resnet18, alexnet or nin."
            )
        self.features = features
        # Probe each stage's output: the last stage at each resolution is that resolution's tap.
        x, taps = torch.zeros(1, in_channels, image_size, image_size), {}
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            features.eval()
            for i, stage in enumerate(features):
                x = stage(x)
                if x.dim() != 4:
                    raise UserError(
                        f"model.backbone={backbone}'s stages are not all convolutional."
                    )
                taps[x.shape[-1]] = (i, x.shape[1])
            features.train()
        sizes = sorted(taps)[: FUSED[variant]]  # the deepest resolutions, smallest first
        if len(sizes) < FUSED[variant]:
            raise UserError(
                f"model.backbone={backbone} has {len(taps)} resolution(s); FCN-{variant} needs "
                f"{FUSED[variant]}: use model.variant=32s or another backbone."
            )
        for small, large in zip(sizes, sizes[1:], strict=False):
            if large != 2 * small:
                raise UserError(
                    f"FCN fuses resolutions 2x apart; {backbone} gives {small} and {large}."
                )
        if image_size % sizes[-1]:
            raise UserError(f"data.image_size={image_size} is not a multiple of {sizes[-1]}.")
        k = num_classes + 1
        self.taps = [taps[s][0] for s in sizes]  # stage indices, deepest first
        self.score = nn.ModuleList(nn.Conv2d(taps[s][1], k, 1) for s in sizes)
        self.up2 = nn.ModuleList(bilinear_up(k, 2) for _ in sizes[1:])
        self.final = bilinear_up(k, image_size // sizes[-1])

    def forward(self, x: Tensor) -> Tensor:
        outputs = {}
        last = max(self.taps)
        for i, stage in enumerate(self.features):
            x = stage(x)
            if i in self.taps:
                outputs[i] = x
            if i == last:
                break
        score = self.score[0](outputs[self.taps[0]])
        for up, conv, tap in zip(self.up2, self.score[1:], self.taps[1:], strict=True):
            score = up(score) + conv(outputs[tap])
        return self.final(score)
