"""Checkpoints: atomic save, safe (`weights_only`) load, and the RNG states that make resume exact."""

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlrun.errors import UserError


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile's and DDP's wrappers, so every checkpoint has the same keys."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["data"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "data" in state:
        generator.set_state(state["data"])


def save(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file and rename it, so a kill mid-write never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: str | Path) -> dict[str, Any]:
    """Load a dlrun checkpoint with `weights_only=True` (no arbitrary code from pickles)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"Checkpoint {path} does not exist. Pass ckpt= the path of a .pt file a dlrun run wrote "
            "(its run folder has checkpoints/last.pt and best.pt)."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, not a torch file, or unsafe pickle content
        raise UserError(
            f"Checkpoint {path} could not be read as a dlrun checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Pass a checkpoints/*.pt file of a dlrun run."
        ) from err


def load_model_state(model: nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """Load the `model` weights of a checkpoint, or say which model and data the checkpoint was made for."""
    try:
        unwrap(model).load_state_dict(state["model"])
    except (RuntimeError, KeyError) as err:
        cfg = state.get("config", {})
        made = f"model {cfg.get('model', {}).get('_target_', '?')} on data {cfg.get('data', {}).get('name', '?')}"
        first = str(err).strip().splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"Checkpoint {path} does not fit this model: it was written for {made} ({first}). "
            "Use the same model= and data= (and model.* options) as the run that wrote it."
        ) from err
