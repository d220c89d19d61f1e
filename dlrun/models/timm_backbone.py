"""Any timm network by name (`model=timm model.name=resnet18`), optionally with its pretrained weights.

timm (the `timm` extra) builds the network with dlrun's class count and input channels: when the
pretrained weights have another class count (ImageNet's 1000), timm leaves their classifier out and
the network keeps a fresh one; with other than 3 channels it adapts the first convolution.
The weights come from timm's own sources (the Hugging Face hub cache, else torch.hub's cache), or
from `weights_file` through timm's file override (`pretrained_cfg_overlay=dict(file=PATH)`).
"""

import difflib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dlrun.errors import UserError

log = logging.getLogger(__name__)


def timm_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int | None = None,
    pretrained: bool = False,
    weights_file: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """`timm.create_model(name, ...)` with dlrun's sizes; errors a user can act on as UserError."""
    timm = _import_timm()
    extra = OmegaConf.to_container(kwargs) if isinstance(kwargs, DictConfig) else dict(kwargs or {})
    taken = {"pretrained", "num_classes", "in_chans", "pretrained_cfg_overlay"} & set(extra)
    if taken:
        raise UserError(
            f"model.kwargs.{sorted(taken)[0]} is set by dlrun (model.pretrained, "
            "data.num_classes, data.channels, model.weights_file): remove it from model.kwargs."
        )
    source = _check_name(timm, name)
    if weights_file is not None:
        if not pretrained:
            raise UserError(
                f"model.weights_file={weights_file} is only read with model.pretrained=true: "
                "add model.pretrained=true, or drop model.weights_file for random weights."
            )
        path = Path(weights_file).expanduser()
        if not path.is_file():
            raise UserError(
                f"model.weights_file={weights_file}: no such file ({path.resolve()}). Give the "
                f"path of {name}'s weights (.pth, .bin or .safetensors, e.g. pytorch_model.bin "
                "or model.safetensors from its Hugging Face page)."
            )
        extra["pretrained_cfg_overlay"] = dict(file=str(path.resolve()))
    elif pretrained and source is None and not timm.is_model_pretrained(name):
        raise UserError(
            f"model.name={name} has no pretrained weights in timm: use model.pretrained=false, "
            "or a name with weights (timm.list_models(pretrained=True) lists them)."
        )
    try:
        model = timm.create_model(
            name, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels, **extra
        )
    except OSError as err:  # huggingface_hub's LocalEntryNotFoundError, urllib's URLError, ...
        if weights_file is not None or not (pretrained or source):  # a hub id: even its config
            raise
        raise UserError(_not_available(timm, name, source, err)) from err
    if image_size is not None:
        _fit_input_size(model, name, image_size, "img_size" in extra)
    source = (weights_file or "timm's cache") if pretrained else "random weights"
    log.info("timm %s (%s), %d classes", name, source, num_classes)
    return model


def _import_timm() -> ModuleType:
    try:
        import timm
    except ImportError as err:
        raise UserError(
            f"model=timm needs the timm package ({err}): pip install -e '.[timm]'."
        ) from err
    return timm


def _check_name(timm: ModuleType, name: str) -> str | None:
    """An unknown name as a UserError with the closest names timm knows; returns the name's
    source prefix (hf-hub, local-dir: not checked here, timm resolves them when it loads)."""
    source, arch = timm.models.parse_model_name(name)
    if source is not None:
        return source
    arch, tag = timm.models.split_model_name_tag(arch)
    if timm.is_model(arch):
        if tag:
            try:
                timm.models.get_pretrained_cfg(name)
            except RuntimeError as err:  # "Invalid pretrained tag"
                tags = ", ".join(timm.list_pretrained(f"{arch}.*")) or f"none: use {arch}"
                raise UserError(
                    f"model.name={name}: {arch} has no weights tag {tag}: {tags}."
                ) from err
        return None
    known = timm.list_models()
    close = difflib.get_close_matches(arch, known, n=5, cutoff=0.6)
    close += [n for n in timm.list_models(f"*{arch}*") if n not in close][: 8 - len(close)]
    hint = (
        f"Close names: {', '.join(close)}."
        if close
        else "timm.list_models('*resnet*') lists names."
    )
    raise UserError(f"model.name={name} is not a timm model. {hint}")


def _not_available(timm: ModuleType, name: str, source: str | None, err: OSError) -> str:
    """Where timm looked for the weights, and how to give them from a file instead."""
    if source == "hf-hub":  # hf-hub:org/repo[@revision]: the config and weights of that repo
        cfg = {"hf_hub_id": timm.models.parse_model_name(name)[1].split("@")[0]}
    elif source is None:
        cfg = timm.models.get_pretrained_cfg(name)
        cfg = cfg.to_dict() if cfg is not None else {}
    else:
        cfg = {}
    try:  # timm's own order: the hub when it has an id and huggingface_hub is there, else the URL
        from huggingface_hub import constants
    except ImportError:
        constants = None
    if cfg.get("hf_hub_id") and constants is not None:
        repo = "models--" + cfg["hf_hub_id"].replace("/", "--")
        looked = f"the Hugging Face hub cache {Path(constants.HF_HUB_CACHE) / repo}"
    elif cfg.get("url"):
        looked = (
            f"torch.hub's cache {Path(torch.hub.get_dir()) / 'checkpoints' / Path(cfg['url']).name}"
        )
    else:
        looked = "its configured sources"
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    page = f"https://huggingface.co/{cfg['hf_hub_id']}" if cfg.get("hf_hub_id") else cfg.get("url")
    if source == "hf-hub":
        return (
            f"model.name={name}: timm reads the network's config.json (and its weights) from "
            f"that Hugging Face hub repo, found neither in {looked} nor online{offline}: {first} "
            "Offline, name the timm architecture the repo holds (e.g. model.name=resnet18 for "
            "timm/resnet18.a1_in1k) and pass its downloaded weights file as "
            "model.pretrained=true model.weights_file=PATH."
        )
    return (
        f"model.name={name} model.pretrained=true: timm found no pretrained weights in "
        f"{looked} and could not download them{offline}: {first} Download the weights "
        f"(model.safetensors or pytorch_model.bin from {page or 'the model page'}) on a machine "
        "with a network and pass the file as model.weights_file=PATH (or copy them into that "
        "cache), or train from random weights (model.pretrained=false)."
    )


def _fit_input_size(model: nn.Module, name: str, image_size: int, asked: bool) -> None:
    """A network made for one input size (a ViT's position embeddings) set to the data's size.

    timm's `set_input_size` resamples pretrained position embeddings to the new patch grid; a
    network without it cannot change size here, and says which key can. A size the user asked
    for (model.kwargs.img_size) is kept, and must be the data's.
    """
    embed = getattr(model, "patch_embed", None)
    fixed = getattr(embed, "img_size", None)
    size = (image_size, image_size)
    if fixed is None or tuple(fixed) == size or not getattr(embed, "strict_img_size", True):
        return
    if getattr(model, "dynamic_img_size", False):
        return
    if asked:
        raise UserError(
            f"model.kwargs.img_size makes model.name={name} take {fixed[0]}x{fixed[1]} images "
            f"but the data gives {image_size}x{image_size} (data.image_size): drop "
            "model.kwargs.img_size (dlrun sets the data's size), or set data.image_size to it."
        )
    if not hasattr(model, "set_input_size"):
        raise UserError(
            f"model.name={name} takes {fixed[0]}x{fixed[1]} images and the data gives "
            f"{image_size}x{image_size}: set model.kwargs.img_size={image_size} (timm resamples "
            "pretrained position embeddings), or a data.image_size of the network's size."
        )
    try:
        model.set_input_size(img_size=size)
    except (AssertionError, RuntimeError, ValueError) as err:
        raise UserError(
            f"model.name={name} (made for {fixed[0]}x{fixed[1]} images) cannot be set to the "
            f"data's {image_size}x{image_size} ({err}): use data.image_size={fixed[0]} or "
            "a multiple of its patch and window sizes, or another model.name."
        ) from err
    grid = tuple(getattr(embed, "grid_size", ()) or ())
    log.info(
        "timm %s: input size set from %dx%d to the data's %dx%d (patch grid %s)",
        name, fixed[0], fixed[1], image_size, image_size, "x".join(map(str, grid)),
    )  # fmt: skip
    if grid and min(grid) < 4:
        log.warning(
            "timm %s sees %s patches of a %dx%d image: smaller patches (model.kwargs.patch_size=4) "
            "or a larger data.image_size give it more to attend over",
            name, "x".join(map(str, grid)), image_size, image_size,
        )  # fmt: skip
