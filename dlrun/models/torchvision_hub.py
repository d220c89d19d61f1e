"""Any torchvision classification network by name (`model=torchvision model.name=resnet50`),
optionally with its ImageNet weights from torch's hub cache (`model.weights=IMAGENET1K_V2`).

`torchvision.models.get_model` builds the real network; dlrun never downloads its weights: they
are read from `torch.hub.get_dir()/checkpoints/<the file name of the weights' URL>`, and a missing
file is one UserError naming that path and the URL to fetch it from on a machine with a network.
The network's last Linear layer (ResNet's `fc`, VGG's `classifier[6]`, ViT's `heads.head`, ...)
becomes the wrapper's `head` (a fresh one of `num_classes` outputs when the weights have ImageNet's
1000), so dlrun's transfer learning finds it: `freeze=backbone` trains only `head`, `freeze=N`
freezes the first N of `features` (the network's top-level modules, its `features` stages where
it has that block), and a checkpoint with another class count keeps its backbone.
"""

import difflib
import logging
import math
import pickle
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dlrun.errors import UserError

log = logging.getLogger(__name__)

# Networks with auxiliary classifiers (training-only outputs dlrun's trainer does not read): they
# are removed, and the input transform these weights were ported with is set by the channels
# alone, so a rebuild without the weights (resume, mode=eval) gives the same network.
AUXILIARY = {"googlenet": ("aux1", "aux2"), "inception_v3": ("AuxLogits",)}
SET_BY_DLRUN = {"weights", "num_classes", "progress"}


class TorchvisionNet(nn.Module):
    """A torchvision network whose last Linear layer is `head`: forward is `head(net(x))`.

    The network's own classifier layer is an Identity in place (it is the last operation of every
    torchvision classifier's forward, so `net(x)` is the head's input). `features` lists the stages
    freeze=N counts (not registered again: no second copy in the state dict).
    """

    def __init__(self, net: nn.Module, head: nn.Module, name: str) -> None:
        super().__init__()
        self.net, self.head, self.name = net, head, name

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.net(x))

    @property
    def features(self) -> nn.Sequential:
        """The stages before the head, in order: the top-level modules, a `features` block's
        own stages in its place; the network's own tensors (ViT's class token) go first."""
        stages: list[nn.Module] = []
        own = list(self.net.named_parameters(recurse=False))
        if own:
            holder = nn.Module()
            for key, param in own:
                holder.register_parameter(key, param)
            stages.append(holder)
        for name, child in self.net.named_children():
            if isinstance(child, nn.Identity):
                continue  # where the classifier was
            if name == "features" and isinstance(child, nn.Sequential):
                stages += list(child.children())
            else:
                stages.append(child)
        return nn.Sequential(*stages)


def torchvision_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int | None = None,
    weights: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> TorchvisionNet:
    """`torchvision.models.get_model(name, weights=...)` with dlrun's class count and channels."""
    from torchvision import models

    extra = OmegaConf.to_container(kwargs) if isinstance(kwargs, DictConfig) else dict(kwargs or {})
    taken = SET_BY_DLRUN & set(extra)
    if taken:
        raise UserError(
            f"model.kwargs.{sorted(taken)[0]} is set by dlrun (model.weights, data.num_classes): "
            "remove it from model.kwargs."
        )
    _check_name(models, name)
    chosen = _weights(models, name, weights)
    asked = dict(extra)  # the user's own, for an error message
    if name in AUXILIARY:
        extra.setdefault("transform_input", in_channels == 3)
        if chosen is None:
            extra.setdefault("init_weights", True)  # torchvision's init, without its warning
    if chosen is not None:
        _check_cached(chosen, name)
    else:
        extra["num_classes"] = num_classes
    net = _build(models, name, chosen, extra, asked)
    for aux in AUXILIARY.get(name, ()):
        net.aux_logits = False  # as torchvision does for weights without aux_logits=True
        setattr(net, aux, None)
    fixed = getattr(net, "image_size", None)  # ViT: position embeddings for one size only
    if isinstance(fixed, int) and image_size is not None and fixed != image_size:
        hint = (
            ""
            if chosen
            else f", or build it for the data's size: model.kwargs={{image_size: {image_size}}}"
        )
        raise UserError(
            f"model.name={name} takes {fixed}x{fixed} images only (its position embeddings are "
            f"made for that size) and the data gives {image_size}x{image_size}: set "
            f"data.image_size={fixed}{hint}."
        )
    head = _take_head(net, name, 1000 if chosen is not None else num_classes, num_classes)
    if in_channels != 3:
        _adapt_first_conv(net, name, in_channels)
    source = f"{chosen} from torch's hub cache" if chosen is not None else "random weights"
    log.info("torchvision %s (%s), %d classes", name, source, num_classes)
    return TorchvisionNet(net, head, name)


def _check_name(models: Any, name: str) -> None:
    """An unknown name as a UserError with the closest classification networks torchvision has."""
    known = models.list_models(module=models)
    if name in known:
        return
    if name in models.list_models():
        raise UserError(
            f"model.name={name} is a torchvision network for another task (detection, "
            "segmentation, video, ...): model=torchvision builds classifiers, e.g. "
            f"{', '.join(known[:3])} (torchvision.models.list_models(module=torchvision.models))."
        )
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = (
        f"Close names: {', '.join(close)}."
        if close
        else f"Its classification networks: {', '.join(known)}."
    )
    raise UserError(f"model.name={name} is not a torchvision classification network. {hint}")


def _weights(models: Any, name: str, weights: str | None) -> Enum | None:
    """`model.weights` as the network's weights enum member: IMAGENET1K_V2, DEFAULT, or the full
    ResNet50_Weights.IMAGENET1K_V2; null / none: random weights."""
    if weights is None or str(weights).lower() in ("", "none", "null", "false", "random"):
        return None
    enum = models.get_model_weights(name)
    tags = ", ".join(m.name for m in enum)
    member = str(weights).split(".")[-1]
    if "." in str(weights) and str(weights).split(".")[0] != enum.__name__:
        raise UserError(
            f"model.weights={weights} are not {name}'s weights ({enum.__name__}): use one of "
            f"{tags} (DEFAULT: {enum.DEFAULT.name})."
        )
    try:
        return enum[member]
    except KeyError:
        raise UserError(
            f"model.weights={weights}: {name} has no weights {member}. Its weights: {tags} "
            f"(DEFAULT: {enum.DEFAULT.name}), or model.weights=null for random weights."
        ) from None


def cache_file(weights: Enum) -> Path:
    """Where torch.hub keeps (and torchvision looks for) the file of these weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def _check_cached(weights: Enum, name: str) -> None:
    path = cache_file(weights)
    if not path.is_file():
        raise UserError(
            f"model.name={name} model.weights={weights.name}: the weights file is not in torch's "
            f"hub cache (looked for {path}; dlrun does not download it). Download {weights.url} "
            "on a machine with a network and copy it to that path (TORCH_HOME moves the cache), "
            "or train from random weights (model.weights=null)."
        )


def _build(
    models: Any, name: str, weights: Enum | None, extra: dict[str, Any], asked: dict[str, Any]
) -> nn.Module:
    """get_model with the user's model.kwargs; a bad argument or an unreadable weights file is a
    UserError (the file exists: checked before, so get_model reads it and downloads nothing)."""
    try:
        return models.get_model(name, weights=weights, progress=False, **extra)
    except (TypeError, ValueError) as err:
        if not asked:
            raise
        raise UserError(
            f"model.kwargs={asked} are not arguments torchvision's {name} takes "
            f"(with model.weights={weights.name if weights else None}): {_first_line(err)}"
        ) from err
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        if weights is None:
            raise
        raise UserError(
            f"model.name={name} model.weights={weights.name}: {cache_file(weights)} cannot be "
            f"loaded ({_first_line(err)}). It may be partly copied or another network's: copy "
            f"{weights.url} there again."
        ) from err


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _take_head(net: nn.Module, name: str, outputs: int, num_classes: int) -> nn.Module:
    """The network's last Linear layer, taken out (an Identity in its place), as the head: a fresh
    Linear of `num_classes` outputs when it has another count (the weights' 1000)."""
    linear = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linear or linear[-1][1].out_features != outputs:
        raise UserError(
            f"model.name={name}: its classifier is not a Linear layer of {outputs} outputs "
            "(a SqueezeNet's is a 1x1 convolution), so dlrun cannot give it a head for "
            "data.num_classes: use another model.name."
        )
    path, layer = linear[-1]
    parent, _, attr = path.rpartition(".")
    setattr(net.get_submodule(parent), attr, nn.Identity())
    if layer.out_features == num_classes:
        return layer
    return nn.Linear(layer.in_features, num_classes, bias=layer.bias is not None)


def _adapt_first_conv(net: nn.Module, name: str, channels: int) -> None:
    """The first convolution made for `channels` inputs: for one (MNIST) its RGB kernels summed,
    which is what the network computes on a grey image repeated three times; otherwise timm's rule
    (the RGB kernels repeated and scaled by 3/channels)."""
    found = next(
        ((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3),
        None,
    )
    if found is None or found[1].groups != 1:
        raise UserError(
            f"model.name={name} has no 3-channel first convolution to adapt to "
            f"{channels} channel(s): use RGB data (data.channels=3)."
        )
    path, conv = found
    new = nn.Conv2d(
        channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )  # fmt: skip
    with torch.no_grad():
        w = conv.weight
        if channels == 1:
            new.weight.copy_(w.sum(dim=1, keepdim=True))
        else:
            new.weight.copy_(
                w.repeat(1, math.ceil(channels / 3), 1, 1)[:, :channels] * 3 / channels
            )
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent, _, attr = path.rpartition(".")
    setattr(net.get_submodule(parent), attr, new)
    log.info(
        "torchvision %s: first convolution (%s) adapted to %d channel(s)", name, path, channels
    )
