"""Transfer learning (the notes: reuse the early layers, replace the softmax, freeze what you keep)."""

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from dlrun import checkpoint
from dlrun.errors import UserError

log = logging.getLogger(__name__)
TORCHVISION = "torchvision:"


def read_weights(spec: str) -> dict[str, Tensor]:
    """A dlrun checkpoint, a saved state dict (e.g. torchvision's .pth), or `torchvision:<Weights enum>`."""
    if spec.startswith(TORCHVISION):
        from torchvision.models import get_weight

        name = spec[len(TORCHVISION) :]
        try:
            weights = get_weight(name)
        except (ValueError, KeyError, AttributeError) as err:
            raise UserError(
                f"ckpt={spec}: '{name}' is not a torchvision weights enum "
                "(e.g. torchvision:ResNet18_Weights.IMAGENET1K_V1)."
            ) from err
        hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        if not hub.is_file():
            raise UserError(
                f"ckpt={spec}: the weights are not available locally (looked for {hub}). Download "
                f"{weights.url} on a machine with a network and copy it there, or pass ckpt=<file>."
            )
        return weights.get_state_dict(progress=False)
    state = checkpoint.load(spec)
    return state["model"] if isinstance(state.get("model"), dict) else state


def head_layer(model: nn.Module) -> str | None:
    """The state-dict prefix of the layer that produces the logits: the last one in `model.head`."""
    net = checkpoint.unwrap(model)
    head = getattr(net, "head", None)
    if head is None:
        return None
    names = [n for n, m in head.named_modules() if any(True for _ in m.parameters(recurse=False))]
    if not names:
        return None
    return f"head.{names[-1]}." if names[-1] else "head."  # "": the head is the layer itself


def load_weights(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Copy matching weights into `model`; keep its own fresh head when the class count differs.

    Keys are matched by name (a dlrun checkpoint) or, when the names differ (a torchvision file for
    an ImageNet variant), by position, as long as every shape but the head's agrees.
    """
    net = checkpoint.unwrap(model)
    ours = net.state_dict()
    theirs = state if set(state) == set(ours) else _by_position(ours, state, source)
    head = head_layer(net) or "\0"
    merged, replaced = dict(ours), []
    for key, value in theirs.items():
        if ours[key].shape == value.shape:
            merged[key] = value
        elif key.startswith(head):
            replaced.append(key)
        else:
            raise UserError(
                f"Checkpoint {source} does not fit this model: {key} has shape {tuple(value.shape)} "
                f"there and {tuple(ours[key].shape)} here. Use the same model= (and model.* options) "
                "as the network that wrote it; only the classifier head may differ."
            )
    net.load_state_dict(merged)
    if replaced:
        log.info(
            "replaced the head (%s): the checkpoint has another class count", ", ".join(replaced)
        )
    log.info("started from the weights in %s", source)


def _by_position(
    ours: dict[str, Tensor], theirs: dict[str, Tensor], source: str
) -> dict[str, Tensor]:
    if len(ours) != len(theirs):
        raise UserError(
            f"Checkpoint {source} does not fit this model: it holds {len(theirs)} tensors, this "
            f"model {len(ours)}. Use the model (and model.variant) the weights were made for."
        )
    return {k: v for k, v in zip(ours, theirs.values(), strict=True)}


def freeze(model: nn.Module, spec: str | int | None) -> list[nn.Module]:
    """`backbone`: train only the head; N: freeze the first N stages of `model.features`.

    Returns the frozen stages: the trainer keeps them in eval mode, so their BatchNorm statistics
    stay those of the weights they came with instead of drifting while "frozen".
    """
    if spec in (None, 0, "none"):
        return []
    net = checkpoint.unwrap(model)
    stages = list(getattr(net, "features", nn.Sequential()).children())
    if spec == "backbone":
        frozen = stages
    elif isinstance(spec, int) and 0 < spec <= len(stages):
        frozen = stages[:spec]
    else:
        raise UserError(
            f"freeze={spec!r} is not a choice: use backbone, or a number of stages from 1 to "
            f"{len(stages)} ({type(net).__name__} has {len(stages)} stages in model.features), or null."
        )
    for stage in frozen:
        for p in stage.parameters():
            p.requires_grad_(False)
    log.info("froze %d of %d stages", len(frozen), len(stages))
    return frozen
