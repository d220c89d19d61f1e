"""Model families: one file each; configs/model/*.yaml name their constructors, one to one.

`hydra.utils.instantiate(cfg.model)` builds any of them (a notebook or another tool can do the
same); training choices such as `freeze` live outside the model node.
"""

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

# model.* keys of checkpoints written before the freeze key moved out of the model node (format 1).
LEGACY_TRAINING_KEYS = ("freeze",)


def model_kwargs(node: DictConfig | dict) -> dict[str, Any]:
    """A (possibly older) checkpoint's model config as constructor kwargs: legacy keys dropped."""
    node = node if isinstance(node, DictConfig) else OmegaConf.create(node)
    kwargs = OmegaConf.to_container(node, resolve=True)  # a sub-node resolves through its parent
    return without_pretrained({k: v for k, v in kwargs.items() if k not in LEGACY_TRAINING_KEYS})


def without_pretrained(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A model config whose weights a checkpoint is about to overwrite: no pretrained download
    or file first (model=timm), so that evaluating or resuming works offline."""
    if kwargs.get("pretrained"):
        kwargs = {**kwargs, "pretrained": False, "weights_file": None}
    if str(kwargs.get("_target_", "")).endswith("torchvision_hub.torchvision_model"):
        kwargs = {**kwargs, "weights": None}  # model=torchvision: the same network, no cache file
    return kwargs


def instantiate_model(node: DictConfig, **overrides: Any) -> nn.Module:
    return instantiate(node, **overrides)
