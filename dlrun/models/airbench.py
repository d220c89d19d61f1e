"""An airbench-style CIFAR-10 speed net (after Keller Jordan's airbench94; our own code).

A frozen 2x2 patch-whitening convolution (its filters come from the training images' patch
covariance, see `init_from_data`), then three conv groups -- conv, max-pool, BatchNorm, GELU,
conv, BatchNorm, GELU -- of widths 64/256/256, a global max-pool and a linear head whose output
is scaled down (1/9), which keeps the softmax soft early in the very short schedules it is made
for. BatchNorm scales stay at 1 (only the shifts learn): with nothing after the convolutions to
rescale them, the convolutions' weight norms set the effective learning rate.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlrun.models.layers import init_weights


class ScaledLinear(nn.Linear):
    """A bias-free linear layer whose output is multiplied by a constant."""

    def __init__(self, in_features: int, out_features: int, scale: float) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight) * self.scale


def _bn(width: int, momentum: float) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(width, momentum=momentum, eps=1e-12)
    bn.weight.requires_grad_(False)
    return bn


def conv_group(c_in: int, c_out: int, momentum: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.MaxPool2d(2),
        _bn(c_out, momentum),
        nn.GELU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        _bn(c_out, momentum),
        nn.GELU(),
    )


class AirNet(nn.Module):
    """Whitening stem + three conv groups + max-pool + scaled linear head."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        widths: tuple[int, ...] = (64, 256, 256),
        bn_momentum: float = 0.4,
        head_scale: float = 1 / 9,
        init: str = "default",
    ) -> None:
        super().__init__()
        patch = 2
        # Each whitening direction twice, with both signs, so the GELU after it loses nothing.
        whiten_width = 2 * in_channels * patch * patch
        self.whiten = nn.Conv2d(in_channels, whiten_width, patch, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        groups, c_in = [], whiten_width
        for width in widths:
            groups.append(conv_group(c_in, width, bn_momentum))
            c_in = width
        self.features = nn.Sequential(nn.Sequential(self.whiten, nn.GELU()), *groups)
        self.head = nn.Sequential(
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), ScaledLinear(c_in, num_classes, head_scale)
        )
        for m in self.modules():  # identity-like start: dirac centre plus a little noise
            if isinstance(m, nn.Conv2d) and m is not self.whiten:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                c = min(m.in_channels, m.out_channels)
                with torch.no_grad():
                    m.weight[:c].add_(nn.init.dirac_(torch.empty_like(m.weight[:c])))
        init_weights(self, init)

    @torch.no_grad()
    def init_from_data(self, images: Tensor, eps: float = 5e-4) -> None:
        """Set the stem's filters to whiten 2x2 patches of these (normalised) training images."""
        k = self.whiten.kernel_size[0]
        n_in = self.whiten.in_channels * k * k
        patches = F.unfold(images.float(), k).transpose(1, 2).reshape(-1, n_in)
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov.double())
        filters = (eigenvectors.T / (eigenvalues.clamp_min(0) + eps).sqrt()[:, None]).float()
        filters = filters.reshape(-1, self.whiten.in_channels, k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
