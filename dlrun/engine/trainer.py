"""The one training loop: devices, precision, compile, steps, evaluation cadence, TensorBoard, checkpoints."""

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.tensorboard import SummaryWriter

from dlrun.data.module import kind_of
from dlrun.engine import dist, introspect, sync_bn, transfer
from dlrun.engine.guards import NonFiniteGuard, StopSignals
from dlrun.engine.hooks.base import Hook, checked, running
from dlrun.engine.monitor import Monitor
from dlrun.engine.optimize import Optimization
from dlrun.engine.precision import resolve_precision
from dlrun.engine.resumable import EpochProgress, ResumableRun
from dlrun.engine.run_log import RunLog
from dlrun.engine.run_modes import RunModes
from dlrun.engine.stops import Stops
from dlrun.errors import UserError

log = logging.getLogger(__name__)
Sums = Mapping[str, tuple[Tensor, Tensor | int]]  # what a step returns: metric -> (sum, count)


def batch_items(batch: Mapping[str, Tensor]) -> int:
    """Items in a dict batch (its first tensor's length): what images/s counts."""
    return len(next(iter(batch.values())))


class Trainer(RunModes, RunLog, Stops, ResumableRun):
    """Owns the loop. A task implements `step(batch) -> {metric: (sum, count)}` and `evaluate`.

    It may also name its networks by role (`roles`, `frozen_roles`), add modes (`modes`,
    `mode_<name>`), state (`extra_state`), start/end logging and a model check. The constructor
    only stores; `setup()` (after every subclass constructor has run) calls those methods.
    Side effects (EMA, profiling, top-k, early stopping, callbacks) are `hooks` (hooks/base.py).
    """

    default_monitor: str | None = "val/acc"
    # What its batches must hold: a data module's `kind` ("classification": image + label;
    # "unpaired": image_a + image_b). A module without one is taken as classification.
    data_kinds: tuple[str, ...] = ("classification",)

    def __init__(
        self,
        *,
        model: nn.Module,
        data: Any,
        optim: Callable[..., Optimizer],
        sched: Callable[..., LRScheduler | None],
        run_dir: str | Path,
        device: torch.device,
        run_config: Mapping[str, Any],
        hparams: Mapping[str, Any],
        max_epochs: int = 10,
        max_steps: int | None = None,
        precision: str = "fp32",
        channels_last: bool = False,
        compile: bool = False,
        log_every_n_steps: int = 50,
        checkpoint_every_n_steps: int | None = None,
        on_nonfinite: str = "stop",
        progress: bool | None = None,
        grad_clip: float | None = None,
        accumulate_grad_batches: int = 1,
        val_every_n_epochs: int = 1,
        val_every_n_steps: int | None = None,
        monitor: str | None = "auto",
        monitor_mode: str = "max",
        freeze: str | int | None = None,
        sync_batchnorm: bool = False,
        hooks: Sequence[Hook] = (),
    ) -> None:
        if max_epochs < 1 or (max_steps is not None and max_steps < 1):
            raise UserError("trainer.max_epochs and trainer.max_steps must be positive integers.")
        if val_every_n_epochs < 1 or (val_every_n_steps is not None and val_every_n_steps < 1):
            raise UserError(
                "trainer.val_every_n_epochs and trainer.val_every_n_steps must be positive "
                "integers (val_every_n_steps may be null)."
            )
        kind = kind_of(data)
        if kind not in self.data_kinds:
            raise UserError(
                f"{type(self).__name__} trains on {' or '.join(self.data_kinds)} data, but "
                f"data={getattr(data, 'name', '?')} is {kind} data"
                + (
                    " (two image domains: train it with model=cyclegan)."
                    if kind == "unpaired"
                    else "."
                )
            )
        self.device, self.data, self.model = device, data, model
        self.config, self.hparams = dict(run_config), dict(hparams)
        self.run_dir = Path(run_dir)
        self.dtype = resolve_precision(precision, device)
        # NHWC: what tensor cores and oneDNN convolutions want; batches follow in `layout`.
        self.channels_last = channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.optim_factory, self.sched_factory = optim, sched
        self.requested_steps, self.requested_epochs = max_steps, max_epochs
        self.compile, self.freeze_spec = compile, freeze
        self.sync_batchnorm = sync_batchnorm
        self.grad_clip, self.accumulate = grad_clip, accumulate_grad_batches
        self.on_nonfinite = on_nonfinite
        self.log_every = max(1, log_every_n_steps)
        self.checkpoint_every = checkpoint_every_n_steps
        self.val_every_epochs, self.val_every_steps = val_every_n_epochs, val_every_n_steps
        self.monitor = Monitor(monitor, monitor_mode)
        self.hooks: list[Hook] = checked(hooks)
        # The weights the model holds while a task evaluates: "model", or "ema" while trainer.ema's
        # average is swapped in (or eval.weights=ema); a task fitting a threshold keeps one per set.
        self.scored_weights = "model"
        self.progress = progress
        self.epoch = self.step_count = 0
        self.train_time = 0.0
        self.metrics: dict[str, float] = {}
        self.writer: SummaryWriter | None = None
        self.resumed_progress: EpochProgress | None = None  # set by a mid-epoch resume
        self.stop = StopSignals()
        self.phase = "train"  # or "eval": which batch size an out-of-memory message names
        self.prepared = self.resumed = self.is_setup = False
        self.last_eval_step = -1
        self.frozen_modules: list[nn.Module] = []

    # ----- what a task provides -----------------------------------------------------------------
    def roles(self) -> dict[str, nn.Module]:
        """The task's networks by role; `trainer.compile` wraps each one the task calls."""
        return {"model": self.model}

    frozen_roles: frozenset[str] = frozenset()  # e.g. a teacher: eval mode, no optimizer
    # Score the test split at the end when val/* is held out of training (`_score_test_split`).
    scores_test_at_end: bool = False
    # Optimizers that re-evaluate the loss (L-BFGS) need a task that steps through a closure.
    takes_closures: bool = False

    def role_steps(self, role: str) -> tuple[int, int]:
        """(total, per epoch) optimizer steps a role takes: what its schedule is laid over."""
        return self.max_steps, self.steps_per_epoch

    def check_model(self) -> None:
        """Checks and data-dependent initialisation before the model moves to the device."""

    def count_flops(self) -> int:
        """Forward FLOPs of one input, as the run folder reports them."""
        shape = tuple(self.data.describe()["input_shape"])
        return introspect.count_flops(self.model, shape, self.device)

    def train_loader(self) -> Any:
        return self.data.train_loader()

    def step(self, batch: Mapping[str, Tensor]) -> Sums:
        """One loop step; returns each metric's (sum, count) over the items it covers, detached."""
        raise NotImplementedError

    def evaluate(self, loader: Any, prefix: str) -> dict[str, float]:
        raise NotImplementedError

    def logged_metrics(self) -> list[str]:
        """Tags this task always logs: what the HParams tab declares besides the monitor."""
        return []

    def log_start(self, writer: SummaryWriter) -> None:
        """Anything a task logs once at the start of a fresh run (e.g. an image grid)."""

    def log_end(self, writer: SummaryWriter) -> None:
        """Anything a task logs once when training ends (e.g. what the network learned to see)."""

    def log_evaluation(self, writer: SummaryWriter, prefix: str) -> None:
        """What an evaluation shows beyond its scalars (images, PR curves), written once after
        them from what `evaluate` kept: `evaluate` may run twice (e.g. with averaged weights)."""

    def extra_state(self) -> dict[str, Any]:
        """Task state beyond models, optimizers and RNGs that resume needs (e.g. a step counter)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned."""

    # ----- set-up: after every constructor ------------------------------------------------------
    def setup(self, start_from: str | None = None) -> None:
        """Check the model, load starting weights, freeze, place, and build the optimisation."""
        if self.is_setup:
            return
        self.check_model()
        if start_from:  # ckpt= in training mode: a checkpoint's (or a state dict's) weights
            transfer.load_weights(self.model, transfer.read_weights(start_from), start_from)
        self.frozen_modules = transfer.freeze(self.model, self.freeze_spec)
        if self.sync_batchnorm and dist.initialized():  # one process: nothing to synchronise
            self.model = sync_bn.convert(self.model, self.device)
        self.model.to(self.device, memory_format=self.memory_format)
        roles = self.roles()
        trainable = {
            role: [p for p in module.parameters() if p.requires_grad]
            for role, module in roles.items()
            if role not in self.frozen_roles
        }
        self.params = sum(p.numel() for ps in trainable.values() for p in ps)
        self.flops = self.count_flops()
        self.batches_per_epoch = len(self.train_loader())
        self.steps_per_epoch = -(-self.batches_per_epoch // self.accumulate)
        self.max_steps = self.requested_steps or self.requested_epochs * self.steps_per_epoch
        self.max_epochs = -(-self.max_steps // self.steps_per_epoch)
        self.opt = Optimization(
            optim=self.optim_factory,
            sched=self.sched_factory,
            params=trainable,
            role_steps={role: self.role_steps(role) for role in trainable},
            device=self.device,
            fp16=self.dtype == torch.float16,
            skip_nonfinite=self.on_nonfinite == "skip",
            grad_clip=self.grad_clip,
            accumulate=self.accumulate,
            closures=self.takes_closures,
            task=type(self).__name__,
        )
        self.optimizers, self.scaler = self.opt.optimizers, self.opt.scaler
        self.optimizer = next(iter(self.optimizers.values()), None)  # the one train/lr shows
        # A run shorter than one logging window logs 10 step points (a curve, not one dot); a
        # longer one keeps the cadence asked for (each window ends in a host sync).
        if self.max_steps < self.log_every:
            self.log_every = max(1, self.max_steps // 10)
        self.guard = NonFiniteGuard(
            self.on_nonfinite, self.log_every, list(self.optimizers), self.device
        )
        nets = dist.wrap_trained(roles, [r for r, ps in trainable.items() if ps], self.device)
        self.nets = {r: torch.compile(m) if self.compile else m for r, m in nets.items()}
        self.monitor.resolve(self.default_monitor)
        for hook in self.hooks:  # the model placed, the optimizers and the monitor settled
            hook.setup(self)
        self.is_setup = True

    # ----- helpers for tasks --------------------------------------------------------------------
    def net(self, role: str = "model") -> Callable[..., Any]:
        """The network to call for `role`: compiled when trainer.compile=true."""
        return self.nets[role]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def layout(self, x: Tensor) -> Tensor:
        """An image batch in the model's memory format (the batched crop gathers in NHWC)."""
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    def optimize(self, loss: Tensor, role: str = "model") -> None:
        """Backward and (at an accumulation boundary) one optimizer step of `role`."""
        self.guard.watch(loss, self.step_count, role, add=self.opt.micro > 0)
        self.opt.backward_step(loss, role)

    def optimize_closure(self, closure: Callable[[], Tensor], role: str = "model") -> Tensor:
        """One step of an optimizer that re-evaluates the loss (L-BFGS); returns the loss."""
        loss = self.opt.closure_step(closure, role)
        self.guard.watch(loss, self.step_count, role)
        return loss

    def train_mode(self) -> None:
        """Trainable roles in train mode; frozen roles and frozen stages in eval mode."""
        for role, module in self.roles().items():
            module.train(role not in self.frozen_roles)
        for module in self.frozen_modules:
            module.eval()  # BatchNorm statistics of frozen stages stay as loaded

    # ----- the loop -----------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, float]:
        if not self.prepared:
            self.prepare(resume)
        for torn in self.last_path.parent.glob(".*.tmp*"):  # left by a process killed mid-write
            torn.unlink(missing_ok=True)
        # From here on a stop signal ends in a checkpoint, not a kill (and trainer.profile records).
        with self.stop, running(self.hooks, self):
            self._open_writer(self.resumed)
            self._hint_short_run()
            try:
                self._pending_validation()
                while not self.finished() or self.resumed_progress is not None:
                    if self._train_epoch() == "signal":
                        self._stop_now()
                    self.epoch += 1
                    due = self.epoch % self.val_every_epochs == 0 or self.finished()
                    if due and self.last_eval_step != self.step_count:
                        self._validate()
                    self._save_checkpoints()
                    cut = self.last_eval_step != self.step_count and due
                    if self.stop.received and (not self.finished() or cut):
                        self._stop_now(mid_epoch=False)
                self._score_test_split()
            except torch.OutOfMemoryError:
                raise self._out_of_memory() from None
        if self.writer is not None:
            self.log_end(self.writer)
            self.writer.close()
        return self.write_metrics()

    def finished(self) -> bool:
        return (
            self.epoch >= self.max_epochs
            or self.step_count >= self.max_steps
            or self.monitor.stopped_early
        )

    def _train_epoch(self) -> str | None:
        """One epoch (or its rest, after a mid-epoch resume); "signal" if a stop signal cut it."""
        self.train_mode()
        p, self.resumed_progress = self.resumed_progress or EpochProgress(), None
        self._sync()
        start = time.perf_counter() - p.elapsed
        loader = self.train_loader()
        batches = loader.iterate(p.position if p.batch else None)
        n_batches = len(loader)
        skip, distributed = self.guard.policy == "skip", dist.initialized()
        hooked = bool(self.hooks)  # without hooks, the steps do no work for them
        for batch in self._bar(batches, n_batches, p.batch):
            if self.step_count >= self.max_steps:
                break
            boundary = (p.batch + 1) % self.accumulate == 0 or p.batch + 1 == n_batches
            if hooked and p.batch % self.accumulate == 0:  # an optimizer step's first batch
                for hook in self.hooks:
                    hook.before_step(self)
            self.opt.begin(boundary)
            out = self.step(batch)
            self.opt.end()
            if self.opt.grad_norms:
                out = dict(out) | {
                    "grad_norm" if role == "model" else f"grad_norm_{role}": (norm, 1)
                    for role, norm in self.opt.grad_norms.items()
                }
            if skip:
                out = self.guard.masked(out, self.step_count)
            p.batch += 1
            p.window_seen += batch_items(batch)
            p.add(out)
            if not boundary:
                continue
            self.step_count += 1
            if hooked:
                for hook in self.hooks:
                    hook.after_step(self)
            if self.step_count % self.log_every == 0 or self.step_count >= self.max_steps:
                p.seen += p.window_seen
                self._flush(p, p.seen / (time.perf_counter() - start))
            if self.step_count >= self.max_steps:
                break
            val_due = self.val_every_steps and self.step_count % self.val_every_steps == 0
            if val_due and p.batch < n_batches:  # an epoch end evaluates anyway
                self._sync()
                start += self._validate()  # evaluation time is not training time
                self.train_mode()
                if self.monitor.stopped_early:
                    break
            stop = self.stop.received is not None
            if distributed:  # every rank stops at the same step (one all-reduce per step)
                stop = dist.any_rank(stop, self.device)
            ckpt_due = self.checkpoint_every and self.step_count % self.checkpoint_every == 0
            if (stop or ckpt_due or val_due) and p.batch < n_batches:
                self._sync()
                p.elapsed, p.position = time.perf_counter() - start, loader.position()
                saving = time.perf_counter()
                self._save_checkpoints(p)
                start += time.perf_counter() - saving  # writing is not training time
                if stop:
                    return "signal"
        p.seen += p.window_seen
        p.fold()
        self._sync()
        elapsed = time.perf_counter() - start
        self.train_time += elapsed
        self._check_finite()
        metrics = {f"train/{k}": v for k, v in p.means(p.sums, p.counts).items()}
        metrics |= {
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/images_per_s": p.seen / max(elapsed, 1e-9),
            "time/epoch_s": elapsed,
            "epoch": float(self.epoch + 1),
        }
        if self.guard.skipped:
            metrics["train/skipped_steps"] = float(self.guard.skipped)
        self._log(metrics | self._peak_memory())
        return None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _peak_memory(self) -> dict[str, float]:
        """CUDA only: the peak allocated since the last epoch's end (its evaluation included),
        in GiB, as sys/max_memory_gb; then a fresh peak for the next epoch."""
        if self.device.type != "cuda":
            return {}
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.device)
        return {"sys/max_memory_gb": peak}
