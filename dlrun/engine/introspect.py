"""Looking inside a network: FLOPs, the first layer's filters, and the feature maps of one image."""

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.utils import make_grid

from dlrun.engine.checkpoint import unwrap


def count_flops(model: nn.Module, shape: tuple[int, ...], device: torch.device) -> int:
    """Forward FLOPs for one image of `shape` (C, H, W), counted by torch.utils.flop_counter."""
    model = unwrap(model)
    if not any(True for _ in model.parameters()):
        return 0  # nothing learned, nothing counted (k-NN)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *shape, device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def _rescale(x: Tensor) -> Tensor:
    """Min-max each image of (N, C, H, W) to [0, 1] so weights and activations are visible."""
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo + 1e-8)


def first_conv_filters(model: nn.Module, max_filters: int = 64) -> Tensor | None:
    """The first convolution's kernels as one image grid: RGB for 3 input channels, else grey."""
    conv = next((m for m in unwrap(model).modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return None
    w = conv.weight.detach().float()[:max_filters]  # (O, I, kh, kw)
    w = w if w.shape[1] == 3 else w[:, :1]
    w = nn.functional.interpolate(_rescale(w), scale_factor=4, mode="nearest")  # tiny kernels
    return make_grid(w.cpu(), nrow=8, padding=1)


KINDS = {"conv": "conv", "pool": "pool", "norm": "bn", "linear": "fc"}  # class name part -> label


def _label(module: nn.Module) -> str:
    """A stage's kind as a short name: conv, pool, bn, fc, or its class in lower case (relu, ...)."""
    name = type(module).__name__.lower()
    return next((label for part, label in KINDS.items() if part in name), name)


def stage_outputs(model: nn.Module, image: Tensor, max_stages: int = 4) -> list[tuple[str, Tensor]]:
    """Feature maps (C, H, W) of one image after a few evenly spaced stages of `model.features`,
    each named by its layer and shape: conv1_6x28x28 (the first conv), pool2_16x5x5, ..."""
    net = unwrap(model)
    stages = list(getattr(net, "features", net).named_children())
    if not stages:
        return []
    picks = sorted(
        {round(i * (len(stages) - 1) / max(1, max_stages - 1)) for i in range(max_stages)}
    )
    labels, seen = [], {}  # the k-th conv is conv<k>, counted over every stage
    for _, module in stages:
        label = _label(module)
        seen[label] = seen.get(label, 0) + 1
        labels.append(f"{label}{seen[label]}")
    maps: dict[str, Tensor] = {}
    hooks = [
        stages[i][1].register_forward_hook(
            lambda _m, _in, out, name=labels[i]: maps.setdefault(name, out)
        )
        for i in picks
    ]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(image[None])
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    return [
        (f"{k}_{'x'.join(str(d) for d in v.shape[1:])}", v[0])
        for k, v in maps.items()
        if isinstance(v, Tensor) and v.dim() == 4
    ]


def feature_grid(fmap: Tensor, max_maps: int = 16) -> Tensor:
    """The first channels of one (C, H, W) activation as a grey image grid."""
    x = fmap.detach().float()[:max_maps, None]  # (N, 1, H, W)
    if x.shape[-1] < 16:
        x = nn.functional.interpolate(x, size=(32, 32), mode="nearest")
    return make_grid(_rescale(x).cpu(), nrow=4, padding=1)
