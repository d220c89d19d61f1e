"""Siamese networks (the notes' face-verification chapter): an embedding net, shared or not.

The embedding net is any classifier of the zoo (`model.backbone=lenet|resnet18|...`, its own
config from configs/model/) whose last layer outputs `embedding_dim` numbers instead of class
scores, optionally L2-normalised. `Siamese` holds one (the "true" Siamese network: both images
through the same weights) or two (`shared=false`: the notes' pseudo-Siamese network, one branch
per input), plus, with `head=true`, the notes' classifier on |f(a) - f(b)| -> linear -> sigmoid.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from dlrun.errors import UserError

# The model configs: dlrun/configs/model in an installed wheel, configs/model in a checkout (as
# dlrun.config.compose finds CONFIG_DIR; models import no config module).
_HERE = Path(__file__).resolve()
ZOO = next(
    (p / "configs" / "model" for p in (_HERE.parents[1], _HERE.parents[2])
     if (p / "configs" / "model").is_dir()),
    _HERE.parents[2] / "configs" / "model",
)  # fmt: skip
NOT_BACKBONES = ("siamese", "pseudo_siamese", "knn", "gan", "dcgan", "cyclegan")


def zoo_model(
    name: str, *, in_channels: int, image_size: int, num_classes: int, **overrides: Any
) -> nn.Module:
    """The zoo model `name` as `dlrun model=<name>` builds it, for these image and output sizes.

    Its config's ${data.*} keys are filled from the arguments; `overrides` replace its keys
    (model.backbone_args). Task defaults a model config brings (a trainer, a loss) are ignored.
    """
    path = ZOO / f"{name}.yaml"
    if name in NOT_BACKBONES or not path.is_file():
        known = sorted(p.stem for p in ZOO.glob("*.yaml") if p.stem not in NOT_BACKBONES)
        raise UserError(
            f"model.backbone={name} is not a classifier of the zoo; use one of: {', '.join(known)}."
        )
    node = OmegaConf.load(path)
    node.pop("defaults", None)
    unknown = sorted(set(overrides) - set(node))
    if unknown:
        raise UserError(
            f"model.backbone_args.{unknown[0]} is not a key of model={name} "
            f"(its keys: {', '.join(k for k in node if not str(k).startswith('_'))})."
        )
    data = {"channels": in_channels, "image_size": image_size, "num_classes": num_classes}
    root = OmegaConf.create({"data": data, "model": node})
    root.model.merge_with(overrides)
    return instantiate(OmegaConf.to_container(root.model, resolve=True))


class EmbeddingNet(nn.Module):
    """A zoo backbone whose output layer gives the embedding; `normalize`: onto the unit sphere."""

    def __init__(self, backbone: nn.Module, normalize: bool) -> None:
        super().__init__()
        self.backbone, self.normalize = backbone, normalize

    def forward(self, x: Tensor) -> Tensor:
        e = self.backbone(x)
        e = e[0] if isinstance(e, tuple) else e  # GoogLeNet's auxiliary heads in training
        return F.normalize(e.float(), dim=1) if self.normalize else e


class Siamese(nn.Module):
    """`forward(x)` embeds with the first branch; `pair(a, b)` embeds a pair; `same_logit` is
    the head's score that a pair is of one class (head=true)."""

    def __init__(
        self,
        *,
        backbone: str,
        in_channels: int,
        image_size: int,
        embedding_dim: int = 64,
        normalize: bool = True,
        shared: bool = True,
        head: bool = False,
        backbone_args: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if embedding_dim < 1:
            raise UserError(f"model.embedding_dim must be a positive integer, got {embedding_dim}.")
        args = dict(backbone_args or {})

        def branch() -> EmbeddingNet:
            net = zoo_model(
                backbone,
                in_channels=in_channels,
                image_size=image_size,
                num_classes=embedding_dim,
                **args,
            )
            return EmbeddingNet(net, normalize)

        self.shared, self.embedding_dim = shared, embedding_dim
        self.branch_a = branch()
        # Pseudo-Siamese: a second branch with weights of its own (not a second reference to the
        # first, which would save every tensor twice).
        self.branch_b = None if shared else branch()
        self.head = nn.Linear(embedding_dim, 1) if head else None

    def forward(self, x: Tensor) -> Tensor:
        return self.branch_a(x)

    def pair(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Embeddings of both sides; shared weights take the two halves in one batch."""
        if self.branch_b is None:
            return self.branch_a(torch.cat([a, b])).chunk(2)
        return self.branch_a(a), self.branch_b(b)

    def same_logit(self, ea: Tensor, eb: Tensor) -> Tensor:
        """The notes' Siamese classifier: linear(|f(a) - f(b)|), a logit of "same class"."""
        if self.head is None:
            raise UserError("This Siamese network has no head (model.head=false).")
        return self.head((ea - eb).abs()).squeeze(1)
