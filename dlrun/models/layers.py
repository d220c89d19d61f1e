"""Small helpers shared by the model families."""

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
}
POOLS: dict[str, type[nn.Module]] = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}


def choose(table: dict[str, type[nn.Module]], name: str, what: str) -> type[nn.Module]:
    """Look a layer type up by its config name, with a message that lists the choices."""
    if name not in table:
        raise ValueError(f"unknown {what} '{name}'; choose one of: {', '.join(table)}")
    return table[name]


def init_weights(model: nn.Module, scheme: str = "default") -> None:
    """The notes' initialisations for conv and linear weights (biases to zero).

    `default` keeps what the constructor did (PyTorch's or the family's own init); `xavier` is
    Glorot uniform, `kaiming` He normal (for ReLU nets), `normal` N(0, 0.01).
    `kaiming` takes fan_out for convolutions (as torchvision does) but fan_in for linear layers:
    a linear layer's fan_out is its width, so a 512 -> 10 classifier would get std sqrt(2/10)
    and logits of std ~19 behind BatchNorm (initial loss ~33, SGD stuck at chance).
    """
    if scheme == "default":
        return
    init = {
        "xavier": nn.init.xavier_uniform_,
        "kaiming": lambda w: nn.init.kaiming_normal_(
            w, mode="fan_in" if w.dim() == 2 else "fan_out", nonlinearity="relu"
        ),
        "normal": lambda w: nn.init.normal_(w, 0.0, 0.01),
    }
    if scheme not in init:
        raise ValueError(f"unknown init '{scheme}'; choose one of: default, {', '.join(init)}")
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear | nn.ConvTranspose2d):
            init[scheme](m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def resolve_variant(variant: str, image_size: int) -> str:
    """`auto` picks the small-image variant below 128 px (MNIST, CIFAR) and the original above."""
    if variant == "auto":
        return "imagenet" if image_size >= 128 else "cifar"
    if variant not in ("cifar", "imagenet"):
        raise ValueError(f"unknown variant '{variant}'; choose one of: auto, cifar, imagenet")
    return variant


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of `divisor`, never below 90% of `value` (MobileNet's rule)."""
    min_value = min_value or divisor
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new
