"""Where and how the networks run: starting weights, frozen stages, the device and its memory
format, DDP and torch.compile wrapping, train/eval modes, and the device's clock and memory."""

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from dlrun.engine import dist, sync_bn, transfer


class Placement:
    """trainer.channels_last, trainer.compile, trainer.sync_batchnorm and freeze= on `device`."""

    def __init__(
        self,
        device: torch.device,
        channels_last: bool = False,
        compile: bool = False,
        sync_batchnorm: bool = False,
        freeze: str | int | None = None,
    ) -> None:
        self.device, self.compile = device, compile
        self.sync_batchnorm, self.freeze = sync_batchnorm, freeze
        # NHWC: what tensor cores and oneDNN convolutions want; batches follow (Trainer.layout).
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.frozen_modules: list[nn.Module] = []  # freeze='s stages: eval mode while training

    def place(self, model: nn.Module, start_from: str | None) -> nn.Module:
        """`model` with the weights of `start_from` (ckpt= in training mode: a checkpoint, or a
        state dict), its frozen stages, synchronised BatchNorm under DDP, on the device."""
        if start_from:
            transfer.load_weights(model, transfer.read_weights(start_from), start_from)
        self.frozen_modules = transfer.freeze(model, self.freeze)
        if self.sync_batchnorm and dist.initialized():  # one process: nothing to synchronise
            model = sync_bn.convert(model, self.device)
        return model.to(self.device, memory_format=self.memory_format)

    @staticmethod
    def trainable(
        roles: Mapping[str, nn.Module], frozen_roles: frozenset[str]
    ) -> dict[str, list[nn.Parameter]]:
        """The parameters each trained role optimises (frozen roles and stages left out)."""
        return {
            role: [p for p in module.parameters() if p.requires_grad]
            for role, module in roles.items()
            if role not in frozen_roles
        }

    def wrap(
        self, roles: Mapping[str, nn.Module], trained: list[str]
    ) -> dict[str, Callable[..., Any]]:
        """What a task calls for each role: DDP around a trained one under torchrun, compiled
        with trainer.compile."""
        nets = dist.wrap_trained(dict(roles), trained, self.device)
        return {r: torch.compile(m) if self.compile else m for r, m in nets.items()}

    def train_mode(self, roles: Mapping[str, nn.Module], frozen_roles: frozenset[str]) -> None:
        """Trainable roles in train mode; frozen roles and frozen stages in eval mode."""
        for role, module in roles.items():
            module.train(role not in frozen_roles)
        for module in self.frozen_modules:
            module.eval()  # BatchNorm statistics of frozen stages stay as loaded

    def sync(self) -> None:
        """Wait for the device (CUDA runs asynchronously): before reading a clock."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def peak_memory(self) -> dict[str, float]:
        """CUDA only: the peak allocated since the last epoch's end (its evaluation included),
        in GiB, as sys/max_memory_gb; then a fresh peak for the next epoch."""
        if self.device.type != "cuda":
            return {}
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.device)
        return {"sys/max_memory_gb": peak}
