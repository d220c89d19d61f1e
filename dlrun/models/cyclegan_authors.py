"""Generators saved by the CycleGAN authors' code (junyanz/pytorch-CycleGAN-and-pix2pix), loaded
into dlrun's `ResnetGenerator` (models/cyclegan.py).

Their files: `latest_net_G.pth` (the pretrained models their download script fetches, e.g.
horse2zebra: one generator, A -> B) and `<epoch>_net_G_A.pth` / `_G_B.pth` (a training run's two
generators). Each is a plain state_dict of their ResnetGenerator, whose one attribute `model` is
an nn.Sequential; with their CycleGAN defaults (`--norm instance`: InstanceNorm2d without affine
parameters or running statistics, so every convolution keeps its bias; `--no_dropout`; reflection
padding) its entries are, by index (n = the number of residual blocks):

    0 pad, 1 conv 7x7, 2 norm, 3 ReLU          4, 7: conv 3x3 stride 2 (each + norm, ReLU)
    10 .. 9+n: ResnetBlock, its `conv_block`: 0 pad, 1 conv, 2 norm, 3 ReLU, 4 pad, 5 conv, 6 norm
    10+n, 13+n: transposed conv (each + norm, ReLU)      16+n pad, 17+n conv 7x7, 18+n tanh

dlrun's generator was written to the same layer list, so `model.10.conv_block.1.weight` names
the same tensor in both: the rule (`dlrun_key`) is the identity on that layout. It is checked
here rather than trusted: every tensor of the file must land on a tensor of the same shape, and
every tensor of the generator must get one, else one line names the first key that does not fit
(with what it suggests: dropout, batch norm). Files written before PyTorch 0.4 also hold instance
norm running statistics that nothing reads; those are dropped, as the authors' loader does.
"""

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from dlrun.errors import UserError

FIRST_CONV = "model.1.weight"  # (ngf, in_channels, 7, 7): what every such file starts with
# Buffers of instance norm in files from PyTorch < 0.4 (their loader pops them too).
STALE_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
# A key of theirs dlrun has no tensor for, and the setting of theirs that put it there.
HINTS = (
    (r"\.conv_block\.[67]\.", "a generator trained with dropout (--no_dropout not set)"),
    (r"^model\.2\.weight$", "a generator with batch norm or affine instance norm (not --norm "
     "instance)"),
)  # fmt: skip


def is_authors_generator(state: Any) -> bool:
    """A plain state_dict of their ResnetGenerator: tensors only, every key under `model.`, its
    first 7x7 convolution there (a dlrun checkpoint is a dict of "model", "config", "step", ...)."""
    if not isinstance(state, Mapping) or FIRST_CONV not in state:
        return False
    return all(
        isinstance(k, str) and k.startswith("model.") and isinstance(v, Tensor)
        for k, v in state.items()
    )


def _index(key: str) -> int:
    return int(key.split(".")[1])


def generator_settings(state: Mapping[str, Tensor]) -> dict[str, int]:
    """`in_channels`, `ngf` and `n_blocks` of their generator, read off its tensors' shapes and
    keys: what model=cyclegan must be built with to take it."""
    first = state[FIRST_CONV]
    blocks = {_index(k) for k in state if ".conv_block." in k}
    last = max(_index(k) for k in state if k.endswith(".weight"))
    out_channels = int(state[f"model.{last}.weight"].shape[0])
    if first.dim() != 4 or out_channels != first.shape[1]:
        raise UserError(
            f"The authors' generator maps {first.shape[1]} to {out_channels} channels; dlrun's "
            "CycleGAN generator maps images to images of as many channels."
        )
    return {"in_channels": int(first.shape[1]), "ngf": int(first.shape[0]), "n_blocks": len(blocks)}


def dlrun_key(key: str, generator: nn.Module) -> str | None:
    """Their key -> dlrun's (the same path: the two Sequentials list the same layers), or None
    for an instance norm's stale running statistic (nothing reads it)."""
    path, _, name = key.rpartition(".")
    if name in STALE_NORM_BUFFERS:
        try:
            module = generator.get_submodule(path)
        except AttributeError:
            return key  # no such layer here: the check names it
        if isinstance(module, nn.InstanceNorm2d) and not module.track_running_stats:
            return None
    return key


def mapped_state(
    state: Mapping[str, Tensor], generator: nn.Module, source: str
) -> dict[str, Tensor]:
    """Their tensors under dlrun's keys, every one used and every shape equal; else one UserError
    line naming the first key that does not fit."""
    ours = generator.state_dict()
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        target = dlrun_key(key, generator)
        if target is None:
            continue
        if target not in ours:
            why = next((h for pattern, h in HINTS if re.search(pattern, key)), None)
            raise UserError(
                f"ckpt={source}: the authors' key {key} has no place in dlrun's CycleGAN "
                f"generator" + (f" ({why}, which dlrun's is not)." if why else ".")
            )
        if tuple(tensor.shape) != tuple(ours[target].shape):
            raise UserError(
                f"ckpt={source}: the authors' {key} has shape {tuple(tensor.shape)}, dlrun's "
                f"generator {target} {tuple(ours[target].shape)}."
            )
        out[target] = tensor
    missing = [k for k in ours if k not in out]
    if missing:
        raise UserError(
            f"ckpt={source}: the authors' generator has no {missing[0]}, which dlrun's CycleGAN "
            f"generator has ({len(missing)} tensor(s) missing in all)."
        )
    return out


def load_authors_generator(generator: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Their generator's weights into dlrun's `generator` (a ResnetGenerator of the settings
    `generator_settings` reads), checked key by key and shape by shape."""
    generator.load_state_dict(mapped_state(state, generator, source))


__all__ = ["generator_settings", "is_authors_generator", "load_authors_generator", "mapped_state"]
