"""Optimisation by network role: optimizers, schedules, grad scaler, clipping, accumulation, closures."""

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from dlrun.errors import UserError


def build_optimizer(optim: Callable[..., Optimizer], params: list[nn.Parameter]) -> Optimizer:
    """The optimizer in its fused implementation (one kernel for all parameters) where it has one.

    A config that sets `fused` or `foreach` itself is left alone; an optimizer, device or dtype
    without a fused kernel falls back to torch's default (foreach on CUDA).
    """
    chosen = getattr(optim, "keywords", {})
    if "fused" in chosen or "foreach" in chosen:
        return optim(params=params)
    try:
        return optim(params=params, fused=True)
    except (TypeError, RuntimeError, ValueError):  # no `fused` argument, or not for these params
        return optim(params=params)


class Optimization:
    """One optimizer and schedule per trainable role, one grad scaler, clipping and accumulation.

    Counting: a *loop step* is one batch; with `accumulate` k, an *optimizer step* comes every k
    batches (and at an epoch's last batch). `max_steps`, schedules and `trainer.max_steps` count
    optimizer steps; a role that steps less often (the WGAN generator, once per `critic_iters`)
    gets a schedule laid over the steps it really takes (`role_steps`).
    """

    def __init__(
        self,
        *,
        optim: Callable[..., Optimizer],
        sched: Callable[..., LRScheduler | None],
        params: Mapping[str, list[nn.Parameter]],
        role_steps: Mapping[str, tuple[int, int]],  # role -> (total steps, steps per epoch)
        device: torch.device,
        fp16: bool,
        skip_nonfinite: bool,
        grad_clip: float | None,
        accumulate: int,
        closures: bool = False,
        task: str = "this task",
    ) -> None:
        if grad_clip is not None and grad_clip <= 0:
            raise UserError(
                f"trainer.grad_clip must be a positive number or null, got {grad_clip}."
            )
        if accumulate < 1:
            raise UserError(
                f"trainer.accumulate_grad_batches must be a positive integer, got {accumulate}."
            )
        self.params = {role: list(p) for role, p in params.items() if p}
        self.optimizers: dict[str, Optimizer] = {}
        self.schedulers: dict[str, LRScheduler | None] = {}
        self.total = {role: role_steps[role][0] for role in self.params}
        for role, ps in self.params.items():
            opt = self.optimizers[role] = build_optimizer(optim, ps)
            total, per_epoch = role_steps[role]
            self.schedulers[role] = sched(opt, total_steps=total, steps_per_epoch=per_epoch)
        if not closures and any(isinstance(o, torch.optim.LBFGS) for o in self.optimizers.values()):
            raise UserError(
                f"optim=lbfgs re-evaluates the loss through a closure, which {task} does not give "
                "it (only model=style_transfer does); use optim=adam, adamw or sgd."
            )
        self.taken = dict.fromkeys(self.params, 0)  # optimizer steps each role has taken
        self.grad_clip, self.accumulate = grad_clip, accumulate
        # Skipping a step without a host sync: a GradScaler fixed at scale 1 checks the gradients
        # and hands a found-inf flag to the (fused) optimizer, which then leaves the weights alone.
        self.skip_scaler = skip_nonfinite and not fp16
        self.scaler = torch.amp.GradScaler(
            device.type,
            init_scale=1.0 if self.skip_scaler else 2.0**16,
            enabled=fp16 or self.skip_scaler,
        )
        self.micro = 0  # batches accumulated into the current optimizer step
        self.boundary = True  # this batch ends an optimizer step
        self.grad_norms: dict[str, Tensor] = {}  # this step's norms, for train/grad_norm

    def begin(self, boundary: bool) -> None:
        """Before a batch: whether it completes an optimizer step (accumulation)."""
        self.boundary = boundary
        if self.grad_norms:
            self.grad_norms = {}

    def backward_step(self, loss: Tensor, role: str) -> None:
        """Backward (scaled, divided over the accumulated batches); step where the batch ends one."""
        opt = self.optimizers[role]
        if self.micro == 0:
            opt.zero_grad(set_to_none=True)
        scaled = loss / self.accumulate if self.accumulate > 1 else loss
        if self.scaler.is_enabled():
            scaled = self.scaler.scale(scaled)
        scaled.backward()
        if not self.boundary:
            return
        if self.grad_clip is not None:
            if self.scaler.is_enabled():
                self.scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
            self.grad_norms[role] = torch.nn.utils.clip_grad_norm_(
                self.params[role], self.grad_clip
            )
        if self.scaler.is_enabled():
            self.scaler.step(opt)
        else:
            opt.step()
        self._schedule(role)

    def closure_step(self, closure: Callable[[], Tensor], role: str) -> Tensor:
        """Optimizers that re-evaluate the loss (L-BFGS): `closure` zeroes, computes, backwards."""
        if self.scaler.is_enabled() or self.accumulate > 1:
            raise UserError(
                "A closure optimizer (e.g. L-BFGS) takes no fp16 grad scaling, "
                "trainer.on_nonfinite=skip or trainer.accumulate_grad_batches > 1."
            )
        loss = self.optimizers[role].step(closure)
        self._schedule(role)
        return loss

    def _schedule(self, role: str) -> None:
        self.taken[role] += 1
        scheduler = self.schedulers[role]
        # Not after the role's very last step: the schedule ends there (one-cycle would extrapolate).
        if scheduler is not None and self.taken[role] < self.total[role]:
            scheduler.step()

    def end(self) -> None:
        """After a batch: one grad-scaler update per loop step, however many roles stepped."""
        self.micro = 0 if self.boundary else self.micro + 1
        if self.boundary and self.scaler.is_enabled():
            self.scaler.update(1.0 if self.skip_scaler else None)

    def check_trains(self) -> None:
        """Before training: a task that trains weights has some left to train."""
        if not self.optimizers:
            raise UserError(
                "There is nothing to train: every parameter is frozen. Freeze fewer stages "
                "(freeze=N or freeze=null)."
            )

    def lr(self) -> float | None:
        """The first optimizer's learning rate (train/lr); None without an optimizer (k-NN)."""
        first = next(iter(self.optimizers.values()), None)
        return None if first is None else first.param_groups[0]["lr"]

    # ----- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": _roles(self.optimizers),
            "scheduler": _roles(self.schedulers),
            "scaler": self.scaler.state_dict(),
            "taken": dict(self.taken),
        }

    def load_state_dict(self, state: Mapping[str, Any], step_count: int) -> None:
        for key, objects in (("optimizer", self.optimizers), ("scheduler", self.schedulers)):
            if not objects:  # a task that trains no weights (k-NN) has none
                continue
            saved = state[key] if len(objects) > 1 else {next(iter(objects)): state[key]}
            for role, obj in objects.items():
                if obj is not None:
                    obj.load_state_dict(saved[role])
        if self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.taken = dict(state.get("taken") or dict.fromkeys(self.params, step_count))


def _roles(objects: Mapping[str, Any]) -> dict[str, Any]:
    """State dicts by role; a single network's stay unnested (the checkpoint format of 1.0)."""
    states = {role: obj.state_dict() if obj is not None else {} for role, obj in objects.items()}
    return next(iter(states.values())) if len(states) == 1 else states
