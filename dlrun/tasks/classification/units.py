"""mode=units: what each unit of a conv layer sees (Zeiler & Fergus, 2014; notes 002, 6.1).

`dlrun mode=units ckpt=<run>/checkpoints/best.pt` runs the test split through the checkpoint's
network and, for the first `units.count` channels (units) of each layer of `units.layers`, finds
the `units.top` test images where the unit responds most: one position per image (the image's
largest activation of that unit), so the images are distinct. Each is shown as the input patch of
that position's receptive field (dlrun.models.receptive_field), in the data's own colours (the
normalisation undone): one grid per layer, a row per unit, its best image first.

A unit's activation is the layer's output after the normalisation layers that directly follow
it (BatchNorm, GroupNorm, ...: a negative scale there would reverse the order), before the
activation function. Zeiler & Fergus rank the rectified maps; an activation function keeps the
order (ReLU, sigmoid and tanh never decrease), but it ties what it saturates: after LeNet's
sigmoid, most of a unit's top activations are exactly 1.0 in float32, and the first test images
would win by their index.

Results (the mode's folder, <run>/units/NNN/): `<layer>.png` per layer, and `units.json` (per
layer its receptive field; per unit the test images, activations, positions and input windows).
The grids also go to TensorBoard as `units/<layer>` images, written into the training run's own
folder when the results lie inside it (TensorBoard shows them with that run's curves): a mode's
folder holds no event files, which would make TensorBoard list it as one more run
(dlrun/engine/result_files.py); results outside a run folder get their events beside them.
"""

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from dlrun.data.transforms import per_channel
from dlrun.engine.result_files import ResultFiles
from dlrun.errors import UserError
from dlrun.launch import mode_dir
from dlrun.models.receptive_field import FIELD_LAYERS, LayerField, conv_layers, receptive_fields

log = logging.getLogger(__name__)

MIN_SIDE = 48  # patches are upscaled (nearest) to at least this many pixels a side
_LISTED = 40  # conv layer names an error lists before "and N more"
Box = tuple[int, int, int, int]  # an input window: top, left, rows, cols
# Per-channel affine layers that belong to the conv before them (a unit is their output).
NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.InstanceNorm2d, nn.GroupNorm, nn.LayerNorm)


# ----- the options, checked before anything is written ------------------------------------------
def _whole(options: Mapping[str, Any], key: str, default: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"units.{key} must be a whole number of at least 1, got {value!r}.")
    return value


def _conv_names(model: nn.Module) -> str:
    names = conv_layers(model)
    more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def chosen_layers(model: nn.Module, layers: Any) -> list[str] | None:
    """`units.layers` checked against `model`: its names, or None for the default (null, [])."""
    if not conv_layers(model):
        raise UserError(
            f"mode=units shows what the units of conv layers see, but this model "
            f"({type(model).__name__}) has no Conv2d layer."
        )
    if layers is None or layers == []:
        return None
    names = [layers] if isinstance(layers, str) else layers
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise UserError(f"units.layers must be a list of layer names, got {layers!r}.")
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise UserError(
                f"units.layers: this model has no layer '{name}'; its conv layers: "
                f"{_conv_names(model)}."
            )
        if not isinstance(modules[name], FIELD_LAYERS):
            raise UserError(
                f"units.layers: '{name}' is a {type(modules[name]).__name__}, not a conv or pool "
                f"layer (Conv2d, MaxPool2d, AvgPool2d); its conv layers: {_conv_names(model)}."
            )
    return list(dict.fromkeys(names))  # each layer once, in the order given


def check_options(model: nn.Module, options: Mapping[str, Any]) -> None:
    """units.count, units.top and units.layers: one UserError line for the first mistake."""
    _whole(options, "count", 8)
    _whole(options, "top", 9)
    chosen_layers(model, options.get("layers"))


def default_layers(fields: Sequence[LayerField], model: nn.Module) -> list[str]:
    """The last conv layer at each resolution: a conv whose next conv/pool layer (in forward
    order) has a larger jump, and the last conv (LeNet: both convs; VGG: each stage's last)."""
    convs = [f for f in fields if isinstance(model.get_submodule(f.name), nn.Conv2d)]
    picked = []
    for i, field in enumerate(fields):
        after = fields[i + 1] if i + 1 < len(fields) else None
        if field in convs and (
            field is convs[-1] or (after is not None and after.jump > field.jump)
        ):
            picked.append(field.name)
    return picked


# ----- the search ---------------------------------------------------------------------------------
def window(field: LayerField, y: int, x: int, height: int, width: int) -> Box:
    """The input window (top, left, rows, cols) shown for the unit at output position (y, x): its
    receptive field, at most the image's size (a wider field shows the image's part of it)."""
    out = []
    for pos, rf, jump, start, size in zip(
        (y, x), field.rf, field.jump, field.start, (height, width), strict=True
    ):
        lo = round(start + pos * jump - (rf - 1) / 2)  # the field's first input row (or column)
        side = min(rf, size)
        out.append((min(max(0, lo), lo + rf - side), side))
    (top, rows), (left, cols) = out
    return top, left, rows, cols


def crop(image: Tensor, top: int, left: int, rows: int, cols: int) -> Tensor:
    """image[:, top:top+rows, left:left+cols], zero (the normalised mean, what the network's zero
    padding feeds it) where the window leaves the image."""
    patch = image.new_zeros(image.shape[0], rows, cols)
    h, w = image.shape[-2:]
    y0, y1, x0, x1 = max(top, 0), min(top + rows, h), max(left, 0), min(left + cols, w)
    if y1 > y0 and x1 > x0:
        patch[:, y0 - top : y1 - top, x0 - left : x1 - left] = image[:, y0:y1, x0:x1]
    return patch


class LayerBest:
    """One layer's running best: per unit the `top` largest activations seen so far, with their
    test image, position, input window and patch (normalised)."""

    def __init__(self, field: LayerField, units: int, top: int) -> None:
        self.field, self.units, self.top = field, units, top
        self.values = torch.zeros(units, 0)
        self.images = torch.zeros(units, 0, dtype=torch.long)
        # per unit, per kept image: its position (y, x) in the layer's maps and input window
        self.where: list[list[tuple[int, int, Box]]] = [[] for _ in range(units)]
        self.patches: list[list[Tensor]] = [[] for _ in range(units)]

    def add(self, peak: Tensor, at: Tensor, width: int, x: Tensor, first: int) -> None:
        """One batch: `peak` (B, U) each image's largest activation of each unit, `at` (B, U)
        where (flat index into the layer's maps of `width` columns), `x` (B, C, H, W) the
        normalised images, `first` the test index of the first."""
        b = len(peak)
        values = torch.cat([self.values, peak.T.float().cpu()], 1)
        images = torch.cat([self.images, torch.arange(first, first + b).expand(self.units, b)], 1)
        # stable: on a tie the earlier image (already kept, or of lower index) stays first
        order = values.sort(dim=1, descending=True, stable=True).indices[:, : self.top]
        kept, at = self.values.shape[1], at.cpu()
        where, patches = [], []
        for u in range(self.units):
            w_u, p_u = [], []
            for j in order[u].tolist():
                if j < kept:
                    w_u.append(self.where[u][j])
                    p_u.append(self.patches[u][j])
                    continue
                pos = divmod(int(at[j - kept, u]), width)
                box = window(self.field, *pos, *x.shape[-2:])
                w_u.append((*pos, box))
                p_u.append(crop(x[j - kept], *box).float().cpu())
            where.append(w_u)
            patches.append(p_u)
        self.values, self.images = values.gather(1, order), images.gather(1, order)
        self.where, self.patches = where, patches


def activations(
    model: nn.Module, names: Sequence[str], seen: Callable[[str, Tensor], None]
) -> list[Any]:
    """Forward hooks calling `seen(name, activation)` for each layer of `names`, once per forward
    pass: its output, then again after each normalisation layer applied to it (`NORMS`), so the
    last call holds the unit's activation before the activation function. Returns the handles."""
    # id of each chosen layer's latest tensor -> (its name, the tensor: held, so that no other
    # tensor of this pass gets its id)
    followed: dict[int, tuple[str, Tensor]] = {}
    done: set[str] = set()  # layers already seen in this pass (shared weights: the first call)

    def hook(name: str, module: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
        if not isinstance(out, Tensor):
            return
        if name in names and name not in done:
            done.add(name)
            followed[id(out)] = (name, out)
            seen(name, out)
        elif isinstance(module, NORMS) and inputs and isinstance(inputs[0], Tensor):
            layer = followed.get(id(inputs[0]), ("", None))[0]
            if layer and out.shape == inputs[0].shape:
                followed[id(out)] = (layer, out)
                seen(layer, out)

    def reset(_module: nn.Module, _inputs: Any) -> None:  # a new forward pass
        followed.clear()
        done.clear()

    handles = [model.register_forward_pre_hook(reset)]
    for n, m in model.named_modules():
        if n in names or not list(m.children()):
            handles.append(m.register_forward_hook(lambda mod, i, o, n=n: hook(n, mod, i, o)))
    return handles


@torch.no_grad()
def search(
    model: nn.Module,
    forward: Callable[[Tensor], Any],
    batches: Any,
    fields: Mapping[str, LayerField],
    count: int,
    top: int,
) -> tuple[dict[str, LayerBest], int]:
    """Each layer of `fields`: its first `count` units' `top` test images (`batches`: dicts
    of normalised "image" batches in test order). Returns the layers' best and the number of
    images searched."""
    best: dict[str, LayerBest] = {}
    peaks: dict[str, tuple[Tensor, Tensor, int]] = {}

    def seen(name: str, act: Tensor) -> None:  # reduced now: a later in-place op would change it
        peak, at = act[:, :count].detach().float().flatten(2).max(2)
        peaks[name] = (peak, at, int(act.shape[-1]))

    handles = activations(model, list(fields), seen)
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in batches:
            x = batch["image"]
            peaks.clear()
            forward(x)
            for name, field in fields.items():
                if name not in peaks:
                    raise UserError(
                        f"units.layers: '{name}' is not run by this model's forward pass, so no "
                        "unit of it sees an image."
                    )
                peak, at, width = peaks[name]
                layer = best.setdefault(name, LayerBest(field, peak.shape[1], top))
                layer.add(peak, at, width, x, n)
            n += len(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return best, n


# ----- the results ------------------------------------------------------------------------------
def grid(layer: LayerBest, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The layer's patches as one image: a row per unit, its best image first, in the data's
    colours (normalisation undone), upscaled (nearest) so a 5x5 patch can be seen."""
    patches = torch.stack([p for row in layer.patches for p in row])  # (U * top, C, h, w)
    c = patches.shape[1]
    m, s = torch.tensor(mean[:c]).view(1, c, 1, 1), torch.tensor(std[:c]).view(1, c, 1, 1)
    patches = (patches * s + m).clamp(0, 1)
    scale = max(1, math.ceil(MIN_SIDE / max(patches.shape[-2:])))
    patches = nn.functional.interpolate(patches, scale_factor=scale, mode="nearest")
    # grey gaps: neither MNIST's black background nor its white strokes
    return make_grid(patches, nrow=len(layer.patches[0]), padding=2, pad_value=0.5)


def record(layer: LayerBest, module: nn.Module) -> dict[str, Any]:
    """units.json's entry of one layer."""
    f = layer.field
    units = []
    for u in range(layer.units):
        units.append({
            "unit": u,
            "images": layer.images[u].tolist(),  # indices into the test split, best first
            "activations": [round(v, 6) for v in layer.values[u].tolist()],
            "positions": [[y, x] for y, x, _ in layer.where[u]],  # in the layer's output maps
            "windows": [list(box) for _, _, box in layer.where[u]],  # top, left, rows, cols
        })  # fmt: skip
    return {
        "type": type(module).__name__,
        "receptive_field": list(f.rf),
        "jump": list(f.jump),
        "start": list(f.start),
        "units": units,
    }


def tensorboard_dir(out: Path, ckpt: str | None) -> Path:
    """The training run's folder when `out` lies inside it (<run>/units/NNN), else `out`."""
    run = mode_dir.run_of(Path(ckpt).expanduser()) if ckpt else None
    if run is not None and out.resolve().is_relative_to(run.resolve()):
        return run
    return out


def _side(pair: Sequence[Any]) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


def show_units(
    model: nn.Module,
    forward: Callable[[Tensor], Any],
    data: Any,
    options: Mapping[str, Any],
    out: Path,
    *,
    ckpt: str | None = None,
    step: int = 0,
) -> dict[str, float]:
    """mode=units: `model` (hooked; `forward` runs it on normalised images) over `data`'s test
    split -> `out`/<layer>.png per layer, `out`/units.json, TensorBoard images units/<layer>."""
    count, top = _whole(options, "count", 8), _whole(options, "top", 9)
    names = chosen_layers(model, options.get("layers"))
    c, h, w = data.describe()["input_shape"]
    fields = {f.name: f for f in receptive_fields(model, (c, h, w))}
    for f in fields.values():  # every conv and pool layer's, in forward order (the notes' table)
        log.info("receptive field of %s: %s px, jump %s", f.name, _side(f.rf), _side(f.jump))
    names = names or default_layers(list(fields.values()), model)
    for name in names:
        if name not in fields:
            raise UserError(
                f"units.layers: '{name}' is not run by this model's forward pass, so no unit of "
                "it sees an image."
            )
    best, n = search(model, forward, data.test_loader(), {k: fields[k] for k in names}, count, top)
    mean, std = per_channel(data.mean, c), per_channel(data.std, c)
    modules = dict(model.named_modules())
    out.mkdir(parents=True, exist_ok=True)
    tb = tensorboard_dir(out, ckpt)
    info: dict[str, Any] = {"checkpoint": ckpt, "step": step, "split": "test", "images": n,
                            "count": count, "top": top, "layers": {}}  # fmt: skip
    with ResultFiles(out) as files, SummaryWriter(str(tb)) as writer:
        for name in names:
            layer, f = best[name], fields[name]
            image = grid(layer, mean, std)
            files.add_image(f"units/{name}", image.numpy())
            writer.add_image(f"units/{name}", image, step)
            info["layers"][name] = record(layer, modules[name])
            log.info(
                "%s (%s): receptive field %s px, jump %s, first centre at %s; units 0-%d, "
                "top %d of %d test images each -> %s",
                name, type(modules[name]).__name__, _side(f.rf), _side(f.jump),
                tuple(f.start), layer.units - 1, len(layer.patches[0]), n, files.written[-1],
            )  # fmt: skip
    (out / "units.json").write_text(json.dumps(info, indent=1) + "\n")
    log.info("units of %d layers: %s; TensorBoard images units/<layer> in %s", len(names), out, tb)
    return {"units/layers": float(len(names)), "units/images": float(n)}
