"""U-Net (Ronneberger et al., 2015): a contracting path, an expanding path of transposed
convolutions with the contracting path's features concatenated at each scale, a 1x1 output conv.

Padded 3x3 convolutions (the output is the input's size, not the paper's valid-crop) and
BatchNorm, as most modern U-Nets. Outputs (B, num_classes + 1, H, W): class 0 is background.
"""

import torch
from torch import Tensor, nn

from dlrun.errors import UserError


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        base_width: int = 32,
        depth: int = 3,
    ) -> None:
        super().__init__()
        if depth < 1 or base_width < 1:
            raise UserError(
                f"model.depth and model.base_width must be >= 1, got {depth}, {base_width}."
            )
        if image_size % 2**depth:
            raise UserError(
                f"model=unet with model.depth={depth} halves the image {depth} times: "
                f"data.image_size={image_size} must be a multiple of {2**depth}."
            )
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths[:-1]:
            self.down.append(double_conv(cin, w))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.bottom = double_conv(widths[-2], widths[-1])
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w_in, w in zip(widths[:0:-1], widths[-2::-1], strict=True):
            self.up.append(nn.ConvTranspose2d(w_in, w, 2, stride=2))  # learned 2x upsampling
            self.merge.append(double_conv(2 * w, w))  # after concatenating the skip
        self.head = nn.Conv2d(widths[0], num_classes + 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips), strict=True):
            x = merge(torch.cat([up(x), skip], 1))
        return self.head(x)
