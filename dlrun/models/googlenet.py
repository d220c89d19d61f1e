"""GoogLeNet / Inception v1: Going Deeper with Convolutions (Szegedy et al., 2014)."""

from collections import OrderedDict

import torch
from torch import Tensor, nn

from dlrun.models.layers import init_weights, resolve_variant

# (in, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj) per block, Table 1 of the paper.
INCEPTION3 = {"3a": (192, 64, 96, 128, 16, 32, 32), "3b": (256, 128, 128, 192, 32, 96, 64)}
INCEPTION4 = {
    "4a": (480, 192, 96, 208, 16, 48, 64),
    "4b": (512, 160, 112, 224, 24, 64, 64),
    "4c": (512, 128, 128, 256, 24, 64, 64),
    "4d": (512, 112, 144, 288, 32, 64, 64),
    "4e": (528, 256, 160, 320, 32, 128, 128),
}
INCEPTION5 = {"5a": (832, 256, 160, 320, 32, 128, 128), "5b": (832, 384, 192, 384, 48, 128, 128)}
AUX_TAPS = {0: "aux1", 3: "aux2"}  # index inside the inception-4 group: after 4a and after 4d


class BasicConv2d(nn.Sequential):
    """conv (no bias) + BatchNorm(eps=1e-3) + ReLU: torchvision's unit (the paper predates BN)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, **kwargs: int) -> None:
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(in_ch, out_ch, kernel_size, bias=False, **kwargs),
                bn=nn.BatchNorm2d(out_ch, eps=0.001),
                relu=nn.ReLU(inplace=True),
            )
        )


class Inception(nn.Module):
    """Four parallel paths concatenated on channels; 1x1 convs cut channels before 3x3 / 5x5."""

    def __init__(
        self, in_ch: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int, k5: int = 5
    ) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(in_ch, c1, 1)
        self.branch2 = nn.Sequential(BasicConv2d(in_ch, c3r, 1), BasicConv2d(c3r, c3, 3, padding=1))
        self.branch3 = nn.Sequential(
            BasicConv2d(in_ch, c5r, 1), BasicConv2d(c5r, c5, k5, padding=k5 // 2)
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True), BasicConv2d(in_ch, cp, 1)
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, in, H, W) -> (B, c1 + c3 + c5 + cp, H, W)
        branches = (self.branch1, self.branch2, self.branch3, self.branch4)
        return torch.cat([b(x) for b in branches], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier: 4x4 avg pool, 1x1 conv 128, fc 1024, dropout, fc K.

    The adaptive pool makes it work on any feature-map size (14 px at 224, 16 / 14 px at 32 / 28).
    """

    def __init__(self, in_ch: int, num_classes: int, dropout: float = 0.7) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.conv = BasicConv2d(in_ch, 128, 1)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, 512|528, H, W) -> (B, K)
        x = self.conv(self.pool(x)).flatten(1)
        return self.fc2(self.dropout(self.relu(self.fc1(x))))


def inception_group(table: dict[str, tuple[int, ...]], k5: int, pool: nn.Module) -> nn.Sequential:
    blocks = [(f"inception{k}", Inception(*v, k5=k5)) for k, v in table.items()]
    return nn.Sequential(OrderedDict([*blocks, ("pool", pool)]))


class GoogLeNet(nn.Module):
    """Stem, inception groups 3 / 4 / 5 (each but the last ends with a /2 max pool), pool, linear.

    `features` = Sequential(stem, inception3, inception4, inception5). The auxiliary heads read
    the inception-4 group from the inside (after 4a and 4d, see AUX_TAPS), so `forward` walks
    that group block by block instead of calling `head(features(x))`. Protocol: in training mode
    with aux_logits it returns (logits, aux1, aux2) and the trainer adds
    `aux_weight * (loss(aux1) + loss(aux2))`; in eval mode (or aux_logits=False) it returns the
    logits alone and the aux heads are not run.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 1000,
        image_size: int = 224,
        variant: str = "auto",
        init: str = "default",
        dropout: float = 0.4,
        aux_logits: bool = True,
        aux_weight: float = 0.3,
        aux_dropout: float = 0.7,
        branch5_kernel: int | None = None,
    ) -> None:
        super().__init__()
        variant = resolve_variant(variant, image_size)
        # The "5x5" path: the paper's 5x5 for cifar, but torchvision's GoogLeNet has a 3x3 there
        # (pytorch/vision#906, kept for its pretrained weights); imagenet copies it so the
        # parameter count and shapes match torchvision's. Set 5 to get the paper's net.
        if branch5_kernel is None:
            branch5_kernel = 3 if variant == "imagenet" else 5
        if branch5_kernel < 1 or branch5_kernel % 2 == 0:
            raise ValueError(
                f"branch5_kernel must be odd and positive (3 or 5), got {branch5_kernel}"
            )
        self.aux_logits, self.aux_weight = aux_logits, aux_weight
        if variant == "imagenet":  # 224 px -> 28 px before inception 3a
            stem = nn.Sequential(
                OrderedDict(
                    conv1=BasicConv2d(in_channels, 64, 7, stride=2, padding=3),
                    maxpool1=nn.MaxPool2d(3, stride=2, ceil_mode=True),
                    conv2=BasicConv2d(64, 64, 1),
                    conv3=BasicConv2d(64, 192, 3, padding=1),
                    maxpool2=nn.MaxPool2d(3, stride=2, ceil_mode=True),
                )
            )
        else:  # 32 px stays 32 px into inception 3a (as 28 px does in the original at 224)
            stem = nn.Sequential(OrderedDict(conv1=BasicConv2d(in_channels, 192, 3, padding=1)))
        k5 = branch5_kernel
        self.features = nn.Sequential(
            OrderedDict(
                stem=stem,
                inception3=inception_group(
                    INCEPTION3, k5, nn.MaxPool2d(3, stride=2, ceil_mode=True)
                ),
                inception4=inception_group(
                    INCEPTION4, k5, nn.MaxPool2d(2, stride=2, ceil_mode=True)
                ),
                inception5=inception_group(INCEPTION5, k5, nn.Identity()),
            )
        )
        # Registered between features and head so that parameters come in torchvision's order.
        self.aux1 = InceptionAux(512, num_classes, aux_dropout) if aux_logits else None
        self.aux2 = InceptionAux(528, num_classes, aux_dropout) if aux_logits else None
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(1024, num_classes)
        )
        # torchvision's init: truncated normal(0, 0.01) weights, BN scale 1 shift 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        init_weights(self, init)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        # (B, C, 32, 32) -> 32 px (stem, inc. 3) -> 16 px (inc. 4) -> 8 px (inc. 5) -> (B, K)
        stem, inception3, inception4, inception5 = self.features
        x = inception3(stem(x))
        aux: list[Tensor] = []
        for i, block in enumerate(inception4):
            x = block(x)
            if i in AUX_TAPS and self.training and self.aux_logits:
                aux.append(getattr(self, AUX_TAPS[i])(x))
        logits = self.head(inception5(x))
        return (logits, aux[0], aux[1]) if aux else logits
