"""Transfer learning (the notes: reuse the early layers, replace the softmax, freeze what you keep)."""

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from dlrun.engine import checkpoint
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
    """The state-dict prefix of the layer that produces the logits: the last one in `model.head`
    (dlrun's networks), or the module a timm network's `get_classifier()` returns."""
    net = checkpoint.unwrap(model)
    if is_timm(net):
        name = _classifier_name(net)
        return f"{name}." if name else None
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
    """`backbone`: train only the head; N: freeze the first N stages of `model.features` (a timm
    network: of its `feature_info` stages).

    Returns the frozen stages: the trainer keeps them in eval mode, so their BatchNorm statistics
    stay those of the weights they came with instead of drifting while "frozen".
    """
    if spec in (None, 0, "none"):
        return []
    net = checkpoint.unwrap(model)
    if is_timm(net):
        return _freeze_timm(net, spec)
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


def is_timm(net: nn.Module) -> bool:
    """A timm network (model=timm): it names its classifier and its stages its own way."""
    return hasattr(net, "get_classifier") and hasattr(net, "pretrained_cfg")


def _classifier_name(net: nn.Module) -> str | None:
    classifier = net.get_classifier()
    return next((n for n, m in net.named_modules() if m is classifier and n), None)


def _freeze_timm(net: nn.Module, spec: str | int) -> list[nn.Module]:
    """timm's stages are its `feature_info` modules (e.g. act1, layer1..layer4 of a ResNet; the
    blocks of a ViT): stage k is everything from the end of stage k-1 to the end of feature k
    (the stem goes with the first), in the network's module order."""
    features = [f["module"] for f in getattr(net, "feature_info", None) or []]
    names = dict(net.named_modules())
    head = _classifier_name(net)
    if spec == "backbone":
        if head is None:
            raise UserError(
                f"freeze=backbone: {type(net).__name__} has no classifier to train "
                "(get_classifier() is not a layer): use freeze=N or freeze=null."
            )
        # everything but the head and the containers that hold it (a ConvNeXt's head.norm: frozen)
        chosen = {n for n in names if n and not _within(n, head) and not _within(head, n)}
        what = f"everything but the classifier ({head})"
    elif isinstance(spec, int) and 0 < spec <= len(features):
        stage = _timm_stages(net, features)
        chosen = {n for n in names if n and stage[n] < spec}
        what = f"{spec} of {len(features)} stages (up to {features[spec - 1]})"
    else:
        listed = ", ".join(features) if features else "none: it has no feature_info"
        raise UserError(
            f"freeze={spec!r} is not a choice: use backbone, or a number of stages from 1 to "
            f"{len(features)} (timm {type(net).__name__}'s stages: {listed}), or null."
        )
    # The topmost frozen modules (eval() reaches the rest); the root's own tensors (a ViT's
    # position embedding, class token) go with the first stage, i.e. frozen by either spec.
    tops = [names[n] for n in chosen if not any(p in chosen for p in _ancestors(n))]
    for module in tops:
        module.requires_grad_(False)
    for p in net.parameters(recurse=False):
        p.requires_grad_(False)
    log.info("froze %s: %d modules", what, len(tops))
    return tops


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _ancestors(name: str) -> list[str]:
    """The dotted names of the modules that contain `name` (not the root, not itself)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _timm_stages(net: nn.Module, features: list[str]) -> dict[str, int]:
    """Each module's stage: a leaf's is the index of the feature module it is in, else of the next
    one to come (after the last feature, e.g. the pooling and the head: len(features)); a
    container's is the last of its contents', so a frozen container holds only frozen stages."""
    stage, passed = {}, -1
    for name, _ in net.named_modules():
        inside = next((i for i, f in enumerate(features) if _within(name, f)), None)
        passed = max(passed, inside) if inside is not None else passed
        stage[name] = inside if inside is not None else passed + 1
    for name in list(stage):
        for parent in _ancestors(name):
            stage[parent] = max(stage[parent], stage[name])
    return stage
