"""`dlrun.load`: a trained classifier and its preprocessing, for notebooks and scripts.

    model, preprocess = dlrun.load("outputs/.../checkpoints/best.pt")
    probs = model(preprocess(Image.open("seven.png"))[None]).softmax(1)
    preprocess.classes[int(probs.argmax())]  # the class's name, as the data set names it

The checkpoint rebuilds its own model (its stored config says which, with which options), so
no dlrun config or data set is needed. `preprocess` gives exactly the tensor training saw for the
same picture: the image converted to the data's channels, resized bilinearly to its size
(torchvision.transforms.v2, which resizes a PIL image with PIL itself, as dlrun's decoder does) and
normalised by dlrun's own Normalize with the run's mean and std.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from dlrun.data.transforms import Normalize, per_channel
from dlrun.engine import checkpoint
from dlrun.errors import UserError
from dlrun.models import instantiate_model, model_kwargs

WEIGHTS = ("model", "ema")


class Preprocess:
    """A PIL image, an image file or a uint8 tensor -> the normalised float tensor the model takes.

    A PIL image or a file gives (C, H, W); a tensor keeps its rank: (C, h, w) -> (C, H, W) and
    (B, C, h, w) -> (B, C, H, W). The result is on the CPU (move it to the model's device).
    PIL input is bit-exact with dlrun's data path; a tensor is resized with torchvision's
    antialiased bilinear (and, RGB to grey, its luma weights), within a grey level of PIL's.
    """

    def __init__(
        self, channels: int, image_size: int, mean: Sequence[float], std: Sequence[float],
        classes: Sequence[str] = (),
    ) -> None:  # fmt: skip
        self.channels, self.image_size = int(channels), int(image_size)
        self.classes = [str(c) for c in classes]  # class i's name (its number where unnamed)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.resize = v2.Resize(
            (self.image_size, self.image_size), InterpolationMode.BILINEAR, antialias=True
        )
        self.normalize = Normalize(self.mean, self.std)

    def __call__(self, image: Image.Image | Tensor | str | Path) -> Tensor:
        if isinstance(image, str | Path):
            with Image.open(Path(image).expanduser()) as img:
                return self(img)
        if isinstance(image, Image.Image):
            img = image.convert("L" if self.channels == 1 else "RGB")
            return self._normalize(TF.pil_to_tensor(self.resize(img)))
        if isinstance(image, Tensor):
            return self._normalize(self._tensor(image))
        raise TypeError(
            f"preprocess takes a PIL image, an image file path or a uint8 tensor, not "
            f"{type(image).__name__}"
        )

    def _tensor(self, x: Tensor) -> Tensor:
        if x.dtype != torch.uint8 or x.dim() not in (3, 4) or x.shape[-3] not in (1, 3):
            raise ValueError(
                "preprocess takes a uint8 tensor (C, H, W) or (B, C, H, W) of pixel values "
                f"0..255 with 1 or 3 channels, got {x.dtype} {tuple(x.shape)}"
            )
        if x.shape[-3] == 3 and self.channels == 1:
            x = TF.rgb_to_grayscale(x)
        elif x.shape[-3] == 1 and self.channels == 3:
            x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
        return self.resize(x) if tuple(x.shape[-2:]) != (self.image_size,) * 2 else x

    def _normalize(self, x: Tensor) -> Tensor:
        return self.normalize.normalize(x.reshape(-1, *x.shape[-3:])).reshape(x.shape)

    def __repr__(self) -> str:
        return (
            f"Preprocess(channels={self.channels}, image_size={self.image_size}, "
            f"mean={self.mean}, std={self.std}, classes={len(self.classes)})"
        )


def load(
    ckpt: str | Path, weights: str = "model", device: str | torch.device = "cpu"
) -> tuple[nn.Module, Preprocess]:
    """The classifier of a dlrun checkpoint, in eval mode on `device`, and its `Preprocess`.

    weights="ema" loads the weight average the run kept (trainer.ema.decay) instead of its weights.
    """
    if weights not in WEIGHTS:
        raise UserError(f"weights={weights!r} is not a choice; use one of: {', '.join(WEIGHTS)}.")
    state = checkpoint.load(ckpt)
    cfg = state.get("config")
    if not isinstance(cfg, Mapping) or "model" not in cfg or "data" not in cfg:
        raise UserError(
            f"{ckpt} holds no dlrun run config (model and data), so its model cannot be rebuilt; "
            "pass a checkpoints/*.pt file a dlrun run wrote."
        )
    if weights == "ema":
        if not isinstance(state.get("ema"), Mapping) or not state["ema"]:
            raise UserError(
                f"{ckpt} holds no weight average: its run was trained without trainer.ema.decay. "
                "Use weights='model', or train with trainer.ema.decay=0.999."
            )
        state = {**state, "model": state["ema"]}
    # A forked RNG: building the layers (their random init, overwritten next) must not shift the
    # caller's random stream.
    with torch.random.fork_rng(devices=[]):
        net = instantiate_model(OmegaConf.create(model_kwargs(cfg["model"])))
    checkpoint.load_model_state(net, state, ckpt)
    data = cfg["data"]
    channels = int(data["channels"])
    preprocess = Preprocess(
        channels, int(data["image_size"]),
        per_channel(data["mean"], channels), per_channel(data["std"], channels),
        class_names(state, int(data.get("num_classes") or 0)),
    )  # fmt: skip
    return net.to(torch.device(device)).eval(), preprocess


def class_names(state: Mapping[str, Any], k: int) -> list[str]:
    """The classes' names a checkpoint stores (its data's), by number where it names none (one
    written before it stored them)."""
    about = (state.get("data") or {}).get("describe") or {}
    named = [str(c) for c in about.get("classes") or []]
    k = max(k, int(about.get("num_classes") or 0), len(named))
    return [named[i] if i < len(named) else str(i) for i in range(k)]

