"""Per-step learning-rate schedules built from torch's own schedulers, each with optional linear warmup."""

from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LambdaLR,
    LinearLR,
    LRScheduler,
    OneCycleLR,
    SequentialLR,
    StepLR,
)


def _with_warmup(
    optimizer: Optimizer, main: LRScheduler, warmup_steps: int, start_factor: float = 0.01
) -> LRScheduler:
    if warmup_steps <= 0:
        return main
    warm = LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warm, main], milestones=[warmup_steps])


def constant(
    optimizer: Optimizer, *, total_steps: int, steps_per_epoch: int, warmup_epochs: float = 0.0
) -> LRScheduler | None:
    """The optimizer's lr throughout (after the warmup, if any).

    Without a warmup there is nothing to schedule: None, and the loop skips the per-step call.
    """
    warmup = round(warmup_epochs * steps_per_epoch)
    if warmup <= 0:
        return None
    return _with_warmup(optimizer, ConstantLR(optimizer, factor=1.0, total_iters=0), warmup)


def step(
    optimizer: Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int,
    step_epochs: float = 30,
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
) -> LRScheduler:
    """Multiply the lr by `gamma` every `step_epochs` epochs."""
    warmup = round(warmup_epochs * steps_per_epoch)
    main = StepLR(optimizer, step_size=max(1, round(step_epochs * steps_per_epoch)), gamma=gamma)
    return _with_warmup(optimizer, main, warmup)


def cosine(
    optimizer: Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    min_lr: float = 0.0,
) -> LRScheduler:
    """Cosine decay from the optimizer's lr to `min_lr` at the last step."""
    warmup = round(warmup_epochs * steps_per_epoch)
    # The scheduler steps after each optimizer step but the last: steps 0 .. total - 1 see
    # t = 0 .. total - warmup - 1 of the cosine, so that is T_max, and the last step gets min_lr.
    # (A resumed run keeps its checkpoint's T_max: the scheduler's state holds it.)
    main = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup - 1), eta_min=min_lr)
    return _with_warmup(optimizer, main, warmup)


def onecycle(
    optimizer: Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    pct_start: float = 0.25,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal_strategy: str = "linear",
) -> LRScheduler:
    """Smith's one-cycle: linear warmup to the optimizer's lr, then annealing to lr/(div*final_div)."""
    if warmup_epochs:
        pct_start = min(0.99, warmup_epochs * steps_per_epoch / max(1, total_steps))
    total_steps = max(3, total_steps)
    # torch divides by each phase's length: keep both phases at least one step long on short runs.
    pct_start = min(max(pct_start, 2 / total_steps), (total_steps - 1) / total_steps)
    max_lr = [group["lr"] for group in optimizer.param_groups]
    return OneCycleLR(
        optimizer,
        max_lr=max_lr,
        total_steps=total_steps,
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        anneal_strategy=anneal_strategy,
        cycle_momentum=False,
    )


def linear_decay(
    optimizer: Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int,
    decay_start: float = 0.5,
) -> LRScheduler:
    """CycleGAN's schedule: the optimizer's lr for the first `decay_start` share of the run, then
    linearly down to zero at its end (the authors' n_epochs + n_epochs_decay, stepped per
    optimizer step instead of per epoch)."""
    start = round(decay_start * total_steps)
    span = max(1, total_steps - start)
    return LambdaLR(optimizer, lambda step: 1.0 - max(0, step - start) / span)


# resume=true refuses a changed run length for these: their lr curve is laid out over total_steps.
cosine.needs_total_steps = True  # type: ignore[attr-defined]
onecycle.needs_total_steps = True  # type: ignore[attr-defined]
linear_decay.needs_total_steps = True  # type: ignore[attr-defined]
