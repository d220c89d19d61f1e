"""Model families: one file each; configs/model/*.yaml name their constructors."""

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

TRAINING_KEYS = ("freeze",)  # model.* keys that choose how to train, not what to build


def model_kwargs(node: DictConfig) -> dict[str, Any]:
    """The resolved model config without the training-only keys: `_target_` plus constructor kwargs."""
    kwargs = OmegaConf.to_container(node, resolve=True)
    return {k: v for k, v in kwargs.items() if k not in TRAINING_KEYS}


def instantiate_model(node: DictConfig, **overrides: Any) -> nn.Module:
    return instantiate(model_kwargs(node), **overrides)
