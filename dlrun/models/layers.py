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
