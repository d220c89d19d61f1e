"""Receptive fields: which input pixels each conv / pool layer's units see (notes 002, 6.1).

For a layer, `rf` is the side of the input patch one output unit depends on, `jump` the input
distance between two neighbouring units (the product of the strides so far) and `start` the
input coordinate of the first unit's centre (pixel i's centre is at coordinate i, so a unit at
output position y looks at input rows start + y * jump - (rf - 1) / 2 onwards). Through a layer
of effective kernel k = d (k - 1) + 1, stride s and padding p:

    rf_out = rf_in + (k - 1) * jump_in,  jump_out = jump_in * s,
    start_out = start_in + ((k - 1) / 2 - p) * jump_in.

The layers are found by running the model once (under no_grad, in eval mode) with forward hooks:
that gives the order they are called in, which `named_modules()` does not promise. Each
tensor's field is followed from module to module (a ReLU or BatchNorm keeps its input's), so a
ResNet's 1x1 shortcut conv starts from its block's input, not from the conv called before it. A
tensor made by a function rather than a module (`x + shortcut`, `torch.cat`, `F.relu`) gets the
widest field seen so far at its spatial size: a sum or a concatenation sees what its widest
branch sees. A layer called twice (shared weights) keeps the field of its first call.
"""

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

FIELD_LAYERS = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)  # the layers whose geometry is known


class LayerField(NamedTuple):
    """One layer's receptive field, per axis (rows, columns)."""

    name: str  # as in model.named_modules()
    rf: tuple[int, int]
    jump: tuple[int, int]
    start: tuple[float, float]


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, tuple | list) else (value, value)


def geometry(layer: nn.Module) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """A conv or pool layer's effective kernel (dilation applied), stride and leading padding,
    each (rows, columns)."""
    kernel = _pair(layer.kernel_size)  # type: ignore[arg-type]
    stride = _pair(layer.stride if layer.stride is not None else kernel)  # type: ignore[arg-type]
    dilation = _pair(getattr(layer, "dilation", 1))  # AvgPool2d has none
    k = tuple(d * (n - 1) + 1 for d, n in zip(dilation, kernel, strict=True))
    padding: Any = layer.padding
    if padding == "valid":
        padding = 0
    if padding == "same":  # PyTorch pads k - 1 in all, the smaller half first
        pad = tuple((n - 1) // 2 for n in k)
    else:
        pad = _pair(padding)
    return k, stride, pad  # type: ignore[return-value]


def step(field: LayerField, layer: nn.Module, name: str) -> LayerField:
    """The field after `layer`, given the field of its input (the recurrence above)."""
    k, s, p = geometry(layer)
    rf = tuple(r + (n - 1) * j for r, n, j in zip(field.rf, k, field.jump, strict=True))
    jump = tuple(j * t for j, t in zip(field.jump, s, strict=True))
    start = tuple(
        a + ((n - 1) / 2 - q) * j for a, n, q, j in zip(field.start, k, p, field.jump, strict=True)
    )
    return LayerField(name, rf, jump, start)  # type: ignore[arg-type]


PIXEL = LayerField("input", (1, 1), (1, 1), (0.0, 0.0))


def receptive_fields(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerField]:
    """Each Conv2d / MaxPool2d / AvgPool2d of `model` in forward order, with its field on an
    input of `input_shape` (C, H, W): one forward pass of zeros on the model's device."""
    fields: dict[int, LayerField] = {}
    widest: dict[tuple[int, int], LayerField] = {}  # spatial size -> widest field seen there
    keep: list[Tensor] = []  # the tensors whose id() is a key: alive, so no id is reused
    found: dict[str, LayerField] = {}

    def field_of(x: Any) -> LayerField:
        if not isinstance(x, Tensor):
            return PIXEL
        known = fields.get(id(x))
        if known is not None:
            return known
        return widest.get(tuple(x.shape[-2:]), PIXEL) if x.dim() >= 3 else PIXEL

    def remember(x: Any, field: LayerField) -> None:
        if isinstance(x, Tensor) and x.dim() >= 3:
            fields[id(x)] = field
            keep.append(x)
            size = tuple(x.shape[-2:])
            if size not in widest or field.rf > widest[size].rf:
                widest[size] = field  # type: ignore[index]

    def hook(name: str, layer: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        before = field_of(inputs[0]) if inputs else PIXEL
        if isinstance(layer, FIELD_LAYERS):
            after: LayerField | None = step(before, layer, name)
            found.setdefault(name, after)  # type: ignore[arg-type]
        else:
            after = carried(before, inputs[0] if inputs else None, output)
        if after is not None:
            remember(output, after)

    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    handles = [
        m.register_forward_hook(lambda mod, i, o, name=n: hook(name, mod, i, o)) for n, m in leaves
    ]
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(1, *input_shape, device=device, dtype=dtype)
    remember(x, PIXEL)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return list(found.values())


def carried(field: LayerField, x: Any, out: Any) -> LayerField | None:
    """The field after a module of unknown geometry: its input's where the size stays
    (activations, norms, dropout); a pool of kernel ceil(in / out) and stride floor(in / out)
    where it shrinks (an adaptive pool: exact for 1x1); None (unknown) otherwise."""
    if not (isinstance(x, Tensor) and isinstance(out, Tensor) and x.dim() == out.dim() >= 3):
        return None
    size_in, size_out = tuple(x.shape[-2:]), tuple(out.shape[-2:])
    if size_in == size_out:
        return field
    if any(o > i or o < 1 for i, o in zip(size_in, size_out, strict=True)):
        return None
    pool = nn.AvgPool2d(
        tuple(-(-i // o) for i, o in zip(size_in, size_out, strict=True)),
        tuple(i // o for i, o in zip(size_in, size_out, strict=True)),
    )
    return step(field, pool, field.name)


def conv_layers(model: nn.Module) -> list[str]:
    """The names of `model`'s Conv2d layers, in `named_modules()` order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
