"""dlrun classifier checkpoints used as measuring instruments (FID features, domain scores) and as
teachers (knowledge distillation)."""

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from dlrun.engine import checkpoint
from dlrun.errors import UserError
from dlrun.models import model_kwargs
from dlrun.scoring.sample_quality import ClassifierFeatures


def load_classifier_net(
    path: str | Path,
    device: torch.device,
    *,
    key: str,
    data_name: str | None = None,
    image_size: int | None = None,
    num_classes: int | None = None,
) -> tuple[nn.Module, dict]:
    """The network of a dlrun classifier checkpoint (image -> logits), in eval mode on `device`,
    and the config it was trained with.

    `key` names the config key that gave the path (for messages); `data_name`, `image_size` and
    `num_classes`, when given, must match what it was trained on: a classifier of other images
    (or of other classes) measures or teaches nothing about these.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{key}={path}: there is no such file.")
    state = checkpoint.load(path)
    cfg = state.get("config", {})
    if "model" not in cfg or "data" not in cfg:
        raise UserError(f"{key}={path} is not a dlrun classifier checkpoint.")
    made_for = cfg["data"].get("name")
    if data_name is not None and made_for != data_name:
        raise UserError(
            f"{key}={path} is a classifier of {made_for}, not of {data_name}: its outputs "
            "would not describe these images."
        )
    size = cfg["data"].get("image_size")
    if image_size is not None and size != image_size:
        raise UserError(
            f"{key}={path} was trained on {size} px images but these are {image_size} px; "
            f"train one at data.image_size={image_size}."
        )
    classes = cfg["data"].get("num_classes")
    if num_classes is not None and classes != num_classes:
        raise UserError(
            f"{key}={path} is a classifier of {classes} classes but data={data_name or made_for} "
            f"here has {num_classes}: its outputs are not scores of these classes."
        )
    net = instantiate(model_kwargs(OmegaConf.create(cfg["model"])))
    checkpoint.load_model_state(net, state, path)
    return net.to(device).eval(), cfg


def load_classifier(
    path: str | Path,
    device: torch.device,
    *,
    key: str,
    data_name: str | None = None,
    image_size: int | None = None,
) -> tuple[ClassifierFeatures, dict]:
    """The classifier of a dlrun checkpoint as a feature extractor (`load_classifier_net`'s
    checks), and its config."""
    net, cfg = load_classifier_net(
        path, device, key=key, data_name=data_name, image_size=image_size
    )
    return ClassifierFeatures(net, cfg["data"]["mean"], cfg["data"]["std"]), cfg
