"""Where style transfer's VGG features come from (`style.features`).

imagenet: torchvision's VGG-19 with its ImageNet weights, only when the weights file is already in
the torch hub cache (dlrun never downloads it: machines without a network are the common case).
ckpt: the `.features` of a dlrun VGG classifier checkpoint (`style.features_ckpt`; VGG-11/13/16/19,
with or without BatchNorm), normalised with that run's own data mean/std and channels.
random: the same VGG shape (the checkpoint's, else VGG-19) untrained, seeded: the baseline that
shows what trained features add. auto: imagenet if cached, else ckpt if given, else an error.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from hydra.utils import instantiate
from torch import nn
from torchvision.models import vgg

from dlrun.engine import checkpoint
from dlrun.errors import UserError
from dlrun.models import model_kwargs
from dlrun.models.style import VGGFeatures, flat_layers, vgg_layer_names
from dlrun.models.vgg import VGG
from dlrun.scoring.classifiers import load_classifier_net

SOURCES = ("auto", "imagenet", "ckpt", "random")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VGG_TARGETS = tuple(f"dlrun.models.vgg.vgg{n}" for n in (11, 13, 16, 19))


def imagenet_weights() -> tuple[Path, str]:
    """Where torchvision keeps VGG-19's ImageNet weights (the torch hub cache), and their URL."""
    url = torchvision.models.VGG19_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name, url


def vgg19_layers() -> nn.Sequential:
    """torchvision's VGG-19 feature layers (`features.*` of its state dict), He-initialised as
    torchvision initialises them, without the 120 M-parameter classifier nobody here reads."""
    layers = vgg.make_layers(vgg.cfgs["E"])
    for m in layers.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return layers


def _numbers(value: Any, channels: int) -> list[float]:
    """A data.mean / data.std value (one number or one per channel) as `channels` floats."""
    values = [float(value)] if isinstance(value, int | float) else [float(v) for v in value]
    return values * channels if len(values) == 1 else values


def _checkpoint_vgg(path: str, seed: int, trained: bool) -> tuple[nn.Module, dict[str, Any]]:
    """The network of a dlrun VGG checkpoint (its weights, or seeded default-initialised ones of
    the same shape) and the checkpoint's config."""
    if trained:
        net, cfg = load_classifier_net(path, torch.device("cpu"), key="style.features_ckpt")
    else:
        cfg = checkpoint.load(path).get("config", {})
        if "model" not in cfg or "data" not in cfg:
            raise UserError(f"style.features_ckpt={path} is not a dlrun classifier checkpoint.")
        with torch.random.fork_rng(devices=[]):  # the run's own random draws stay as they were
            torch.manual_seed(seed)
            net = instantiate(model_kwargs(cfg["model"]))
    if not isinstance(net, VGG):
        raise UserError(
            f"style.features_ckpt={path} holds {type(net).__name__} "
            f"({cfg['model'].get('_target_', '?')}), not a VGG: style transfer reads the named "
            "conv layers of a dlrun VGG checkpoint (model=vgg11, vgg13, vgg16 or vgg19)."
        )
    return net, cfg


def _imagenet_vgg19() -> tuple[nn.Module, str]:
    """VGG-19's feature layers with torchvision's ImageNet weights, from the torch hub cache only."""
    weights, url = imagenet_weights()
    if not weights.is_file():
        raise UserError(
            f"style.features=imagenet needs torchvision's VGG-19 ImageNet weights in the "
            f"torch hub cache: {weights} does not exist and dlrun never downloads it. Copy "
            f"{Path(url).name} there (from {url}), or use style.features=ckpt "
            "style.features_ckpt=PATH (a dlrun VGG checkpoint)."
        )
    net = vgg19_layers()
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        n = len("features.")
        net.load_state_dict({k[n:]: v for k, v in state.items() if k.startswith("features.")})
    except Exception as err:  # a truncated copy, another network's file
        raise UserError(
            f"{weights} could not be loaded as VGG-19's ImageNet weights ({type(err).__name__}); "
            "delete it and copy the file again."
        ) from err
    return net, f"torchvision VGG-19 (ImageNet, {weights})"


def _pick(source: str, ckpt: str | None) -> str:
    """`auto` resolved: imagenet if its weights are cached, else ckpt if given, else an error."""
    if source not in SOURCES:
        raise UserError(f"style.features must be one of {', '.join(SOURCES)}, got {source!r}.")
    if source != "auto":
        return source
    weights, url = imagenet_weights()
    if weights.is_file():
        return "imagenet"
    if ckpt:
        return "ckpt"
    raise UserError(
        "Style transfer needs a trained VGG for its features, and none is available: "
        f"torchvision's VGG-19 ImageNet weights are not in the torch hub cache ({weights}; "
        f"dlrun never downloads them: copy {Path(url).name} there from {url}), and no "
        "style.features_ckpt is set. Pass style.features_ckpt=PATH, a dlrun VGG checkpoint (e.g. "
        "dlrun model=vgg11 data=cifar10 writes one), or style.features=random for untrained "
        "features (a baseline)."
    )


def build_features(
    source: str,
    ckpt: str | None,
    layers: Sequence[str],
    *,
    pool: str,
    seed: int,
    device: torch.device,
) -> tuple[VGGFeatures, str]:
    """The frozen feature network for `layers`, on `device`, and a line saying what it is."""
    if pool not in ("max", "avg"):
        raise UserError(f"style.pool must be max or avg, got {pool!r}.")
    source = _pick(source, ckpt)
    mean, std, channels = IMAGENET_MEAN, IMAGENET_STD, 3
    if source == "imagenet":
        net, about = _imagenet_vgg19()
    elif source == "ckpt" or ckpt:  # random with a checkpoint: its shape, untrained
        if not ckpt:
            raise UserError(
                "style.features=ckpt needs style.features_ckpt=PATH: the checkpoint of a dlrun VGG "
                "classifier (e.g. <run>/checkpoints/best.pt of dlrun model=vgg11 data=cifar10)."
            )
        net, cfg = _checkpoint_vgg(str(ckpt), seed, trained=source == "ckpt")
        channels = int(cfg["data"].get("channels", 3))
        mean = _numbers(cfg["data"].get("mean", 0.0), channels)
        std = _numbers(cfg["data"].get("std", 1.0), channels)
        name = cfg["model"]["_target_"].rsplit(".", 1)[-1]
        name += "_bn" if cfg["model"].get("batch_norm") else ""
        kind = "trained" if source == "ckpt" else f"untrained (seed {seed}), the shape of"
        about = f"{kind} {name} of {ckpt} (data={cfg['data'].get('name')})"
    else:  # random, no checkpoint: VGG-19's shape
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = vgg19_layers()
        about = f"untrained VGG-19 (seed {seed})"
    all_layers = flat_layers(net.features if isinstance(net, VGG) else net)
    try:
        features = VGGFeatures(
            all_layers, layers, mean=mean, std=std, in_channels=channels, pool=pool
        )
    except KeyError:
        names = vgg_layer_names(all_layers)
        unknown = [n for n in layers if n not in names]
        raise UserError(
            f"Layer(s) {', '.join(unknown)} (style.content_layer / style.style_layers) are not in "
            f"this VGG; its layers are {', '.join(names)}."
        ) from None
    return features.to(device), f"{about}, {pool} pooling"
