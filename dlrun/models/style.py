"""Neural style transfer (Gatys et al., 2016): the generated image as a parameter, VGG features by name."""

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def flat_layers(features: nn.Module) -> list[nn.Module]:
    """A VGG's feature layers in order: dlrun's nest them in stages, torchvision's are flat."""
    if isinstance(features, nn.Sequential):
        return [m for child in features for m in flat_layers(child)]
    return [features]


def vgg_layer_names(layers: Sequence[nn.Module]) -> dict[str, int]:
    """Caffe-style names -> index in `layers`: conv{s}_{i}, bn{s}_{i} (BN nets), relu{s}_{i},
    pool{s}; stage s counts the pools, i the convolutions within a stage (as Gatys et al. name
    VGG-19's conv4_2). The same names hold for VGG-11/13/16/19, with or without BatchNorm."""
    names: dict[str, int] = {}
    stage, conv = 1, 0
    for index, layer in enumerate(layers):
        if isinstance(layer, nn.Conv2d):
            conv += 1
            names[f"conv{stage}_{conv}"] = index
        elif isinstance(layer, nn.BatchNorm2d):
            names[f"bn{stage}_{conv}"] = index
        elif isinstance(layer, nn.ReLU):
            names[f"relu{stage}_{conv}"] = index
        elif isinstance(layer, nn.MaxPool2d | nn.AvgPool2d):
            names[f"pool{stage}"] = index
            stage, conv = stage + 1, 0
        else:
            raise ValueError(f"not a VGG feature layer: {type(layer).__name__}")
    return names


def _copy_layer(layer: nn.Module, pool: str) -> nn.Module:
    # In-place ReLUs would overwrite a conv output that a cost reads (and that backward needs).
    if isinstance(layer, nn.ReLU):
        return nn.ReLU(inplace=False)
    if isinstance(layer, nn.MaxPool2d) and pool == "avg":  # Gatys et al.: smoother images
        return nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode)
    return layer


class VGGFeatures(nn.Module):
    """A frozen VGG's activations at named layers of a [0, 1] RGB image, normalised as the network
    was trained (its mean/std; greyscale first for a 1-channel network). Cut after the last layer
    any cost reads: the rest would cost time and change nothing."""

    def __init__(
        self,
        layers: Sequence[nn.Module],
        wanted: Sequence[str],
        *,
        mean: Sequence[float],
        std: Sequence[float],
        in_channels: int = 3,
        pool: str = "max",
    ) -> None:
        super().__init__()
        if pool not in ("max", "avg"):
            raise ValueError(f"pool must be max or avg, got {pool!r}")
        names = vgg_layer_names(layers)
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise KeyError(", ".join(unknown), ", ".join(names))
        last = max(names[n] for n in wanted)
        self.layers = nn.Sequential(*(_copy_layer(m, pool) for m in layers[: last + 1]))
        self.wanted = {names[n]: n for n in wanted}
        self.in_channels = in_channels
        shape = (1, in_channels, 1, 1)
        self.register_buffer(
            "mean",
            torch.tensor([float(m) for m in mean]).expand(in_channels).reshape(shape).clone(),
        )
        self.register_buffer(
            "std", torch.tensor([float(s) for s in std]).expand(in_channels).reshape(shape).clone()
        )
        self.requires_grad_(False)
        self.eval()

    def forward(self, image: Tensor) -> dict[str, Tensor]:  # (B, 3, H, W) in [0, 1] -> {name: map}
        if self.in_channels == 1:  # ITU-R 601 luminance, as PIL's "L" (what the network saw)
            image = (image * image.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, True)
        x = (image - self.mean) / self.std
        out: dict[str, Tensor] = {}
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index in self.wanted:
                out[self.wanted[index]] = x
        return out

    def fingerprint(self) -> str:
        """A hash of the weights and settings: resume refuses features that are not the run's."""
        h = hashlib.sha1(repr(self.layers).encode())
        for tensor in self.state_dict().values():
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


class StyleImage(nn.Module):
    """The generated image (B, C, H, W) in [0, 1]: the one trainable parameter of style transfer.

    Built as a placeholder; `start` gives it the content image's shape and its first pixels (the
    content image, or uniform noise), before the optimizer sees it.
    """

    def __init__(self, *, channels: int = 3, init: str = "content") -> None:
        super().__init__()
        if init not in ("content", "noise"):
            raise ValueError(f"init must be content or noise, got {init!r}")
        self.init = init
        self.pixels = nn.Parameter(torch.zeros(1, channels, 1, 1))

    @torch.no_grad()
    def start(self, content: Tensor, generator: torch.Generator | None = None) -> None:
        """Shape and first pixels from the content image (1, C, H, W) in [0, 1]."""
        if self.init == "noise":
            first = torch.rand(content.shape, generator=generator)  # a CPU generator: any device
        else:
            first = content.detach().clone(memory_format=torch.contiguous_format)
        self.pixels = nn.Parameter(
            first.to(self.pixels.device).contiguous()
        )  # L-BFGS views grads flat

    def forward(self) -> Tensor:  # () -> (1, C, H, W) in [0, 1]
        # The costs are those of the image as it is shown and saved. Clamping the parameter after
        # each step instead (the PyTorch tutorial's way) moves it under L-BFGS's curvature
        # history, and the cost rose after 10 steps in our horse/zebra run.
        return self.pixels.clamp(0, 1)
