"""The one training loop: the trainer holds its parts, each given what it needs as arguments, and
calls the task (its subclass) through `step`, `evaluate` and the methods a task overrides."""

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.tensorboard import SummaryWriter

from dlrun.data import described
from dlrun.data.module import check_kind
from dlrun.engine import checkpoint, dist, introspect, loop_state, run_modes
from dlrun.engine.evaluation import Evaluation
from dlrun.engine.guards import NonFiniteGuard, StopSignals
from dlrun.engine.hooks import state as hook_state
from dlrun.engine.hooks.base import Hook, Hooks
from dlrun.engine.loop_state import Cadence, EpochProgress, LoopState, RunLength, Sums, batch_items
from dlrun.engine.monitor import Monitor
from dlrun.engine.optimize import Optimization
from dlrun.engine.placement import Placement
from dlrun.engine.precision import check_precision, check_resume, precision_name, resolve_precision
from dlrun.engine.run_folder import FORMAT, RunFolder, rank_rngs, restore_rngs
from dlrun.engine.run_logger import RunLogger
from dlrun.engine.steps import OptimizerSteps
from dlrun.engine.stops import Stops
from dlrun.launch import mode_dir, threads

__all__ = ["Sums", "Trainer", "batch_items"]
log = logging.getLogger(__name__)


class Trainer:
    """Owns the loop. A task implements `step(batch) -> {metric: (sum, count)}` and `evaluate`,
    maybe roles, modes (`mode_*`), `extra_state`, start/end logging and a model check. The
    constructor only stores; `setup()` (after every subclass constructor) calls those methods."""

    default_monitor: str | None = "val/acc"
    data_kinds: tuple[str, ...] = ("classification",)  # the data it trains on, by module `kind`
    frozen_roles: frozenset[str] = frozenset()  # e.g. a teacher: eval mode, no optimizer
    scores_test_at_end: bool = False  # test/* at the end when val/* is held out of training
    cpu_bf16: bool = False  # trainer.precision=auto may pick bf16 on the CPU (docs/precision.md)
    takes_closures: bool = False  # L-BFGS re-evaluates the loss: the task steps by closure
    trains_weights: bool = True  # False (k-NN): `step` is all it trains, no optimizer, no steps
    modes: tuple[str, ...] = ("train", "eval")
    # Modes that read no data set (data/described.py), by the option naming their input (None: never)
    data_free_modes: Mapping[str, str | None] = {}

    def __init__(
        self, *, model: nn.Module, data: Any, run_dir: str | Path, device: torch.device,
        optim: Callable[..., Optimizer], sched: Callable[..., LRScheduler | None],
        hparams: Mapping[str, Any], config_record: Mapping[str, Any] | None = None,
        mode: str = "train", seed: int = 0, model_spec: Mapping[str, Any] | None = None,
        num_threads: int | None = None, deterministic: bool = False,
        max_epochs: int = 10, max_steps: int | None = None,
        precision: str = "fp32", channels_last: bool = False, compile: bool = False,
        sync_batchnorm: bool = False, freeze: str | int | None = None,
        log_every_n_steps: int = 50, progress: bool | None = None, log_every_s: float | None = 30,
        checkpoint_every_n_steps: int | None = None, on_nonfinite: str = "stop",
        grad_clip: float | None = None, accumulate_grad_batches: int = 1,
        val_every_n_epochs: int = 1, val_every_n_steps: int | None = None,
        monitor: str | None = "auto", monitor_mode: str = "max", hooks: Sequence[Hook] = (),
    ) -> None:  # fmt: skip
        self.length = RunLength(max_epochs, max_steps, accumulate_grad_batches)
        self.cadence = Cadence(
            val_every_n_epochs, val_every_n_steps, log_every_n_steps, checkpoint_every_n_steps
        )
        check_kind(data, self.data_kinds, type(self).__name__)
        self.device, self.data, self.model, self.hparams = device, data, model, dict(hparams)
        # model_spec: the model's resolved _target_ and arguments (what rebuilds it). The threads
        # and determinism are set before any tensor work (launch/process.py); resume keeps threads.
        self.mode, self.seed, self.model_spec = mode, int(seed), dict(model_spec or {})
        self.num_threads, self.deterministic = num_threads, bool(deterministic)
        self.run_dir = Path(run_dir)
        # The composed config: an opaque record that only the run folder stores and compares.
        self.folder = RunFolder(self.run_dir, config_record or {})
        self.placement = Placement(device, channels_last, compile, sync_batchnorm, freeze)
        self.precision, self.dtype = check_precision(precision), None  # resolved in setup()
        self.memory_format, self.accumulate = self.placement.memory_format, accumulate_grad_batches
        self.optim_factory, self.sched_factory = optim, sched
        self.grad_clip, self.on_nonfinite = grad_clip, on_nonfinite
        self.monitor = Monitor(monitor, monitor_mode)
        self.hooks = Hooks(hooks, owner=self)
        # The weights the model holds while a task evaluates: "model", or "ema" (trainer.ema's
        # average swapped in, eval.weights=ema): a task fitting a threshold keeps one per set.
        self.scored_weights = "model"
        self.state = LoopState()
        self.logger = RunLogger(self.run_dir, progress, log_every_s, self.state, self.length)
        self.resumed_progress: EpochProgress | None = None  # set by a mid-epoch resume
        self.stop = StopSignals()
        self.evaluation = Evaluation(
            data, self.cadence, self.hooks, self.logger, self.monitor, self.stop
        )
        self.prepared = self.resumed = self.is_setup = False
        self.checkpoint_path: str | None = None  # an output mode's ckpt=, once it runs

    # The loop's counters (LoopState) and parts' values, under the names tasks and hooks read.
    epoch, step_count = loop_state.state_field("epoch"), loop_state.state_field("step")
    train_time, metrics = loop_state.state_field("train_time"), loop_state.state_field("metrics")
    last_eval_step = loop_state.state_field("last_eval_step")
    writer = loop_state.delegated("logger", "writer")  # rank 0, while `fit` runs; else None
    last_path = loop_state.delegated("folder", "last_path")  # <run>/checkpoints/last.pt

    # ----- what a task provides -----------------------------------------------------------------
    def roles(self) -> dict[str, nn.Module]:
        """The task's networks by role; `trainer.compile` wraps each one the task calls."""
        return {"model": self.model}

    def role_steps(self, role: str) -> tuple[int, int]:
        """(total, per epoch) optimizer steps a role takes: what its schedule is laid over."""
        return self.max_steps, self.steps_per_epoch

    def check_model(self) -> None: ...  # checks, data-dependent init: before the model is placed

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

    def log_start(self, writer: SummaryWriter) -> None: ...  # once, as a fresh run starts
    def log_end(self, writer: SummaryWriter) -> None: ...  # once, as training ends

    def log_evaluation(self, writer: SummaryWriter, prefix: str) -> None:
        """What an evaluation shows beyond scalars (images, PR curves), from what `evaluate` kept."""

    def extra_state(self) -> dict[str, Any]:
        """Task state beyond models, optimizers and RNGs that resume needs (e.g. a step counter)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None: ...  # what extra_state returned

    # ----- set-up: after every constructor ------------------------------------------------------
    def setup(self, start_from: str | None = None) -> None:
        """Check the model, load starting weights, freeze, place, and build the optimisation."""
        if self.is_setup:
            return
        self.check_model()
        self.model = self.placement.place(self.model, start_from)
        roles = self.roles()
        trainable = self.placement.trainable(roles, self.frozen_roles)
        self.params = sum(p.numel() for ps in trainable.values() for p in ps)
        self.flops = self.count_flops()
        self.dtype = resolve_precision(self.precision, self.device, self.cpu_bf16, self.flops,
                                       type(self).__name__)  # fmt: skip
        self.batches_per_epoch = n = len(self.train_loader())
        self.steps_per_epoch, self.max_steps, self.max_epochs = self.length.plan(n)
        fp16 = self.dtype == torch.float16
        self.opt = Optimization(
            optim=self.optim_factory, sched=self.sched_factory, params=trainable,
            role_steps={role: self.role_steps(role) for role in trainable}, device=self.device,
            fp16=fp16, skip_nonfinite=self.on_nonfinite == "skip",
            grad_clip=self.grad_clip, accumulate=self.accumulate, closures=self.takes_closures,
            task=type(self).__name__,
        )  # fmt: skip
        self.optimizers, self.scaler = self.opt.optimizers, self.opt.scaler
        self.optimizer = next(iter(self.optimizers.values()), None)  # the one train/lr shows
        self.cadence.fit(self.max_steps)
        self.guard = NonFiniteGuard(self.on_nonfinite, self.cadence.log_every,
                                    list(self.optimizers), self.device)  # fmt: skip
        self.stops = Stops(self.guard, self.opt, self.folder, self.logger, self.data, self.device,
                           fp16)  # fmt: skip
        self.steps = OptimizerSteps(
            self.opt, self.guard, self.hooks, self.logger, self.placement, self.cadence,
            self.stops, self.accumulate, self.trains_weights,
        )  # fmt: skip
        self.nets = self.placement.wrap(roles, [r for r, ps in trainable.items() if ps])
        self.monitor.resolve(self.default_monitor)
        self.hooks.setup()  # the model placed, the optimizers and the monitor settled
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
        self.placement.train_mode(self.roles(), self.frozen_roles)

    # ----- the loop -----------------------------------------------------------------------------
    def prepare(self, resume: bool) -> None:
        """Every check before the run folder is touched: a resumable checkpoint, or a fresh folder."""
        if self.trains_weights:
            self.opt.check_trains()  # a network frozen whole has nothing to train
        if (state := self.folder.prepare(resume)) is not None:  # resume=true, from last.pt
            self.load_state_dict(state)
            self.resumed = True
        self.prepared = True

    def fit(self, resume: bool = False) -> dict[str, float]:
        if not self.prepared:
            self.prepare(resume)
        self.folder.clear_torn()
        # From here on a stop signal ends in a checkpoint, not a kill (and trainer.profile records).
        with self.stop, self.hooks.running():
            self._open_writer()
            try:
                self._pending_validation()
                while not self.finished() or self.resumed_progress is not None:
                    if self._train_epoch() == "signal":
                        raise self.stops.interrupted(self.stop.received, self.state, True)
                    self.epoch += 1
                    due = self.evaluation.due(self.state, True, self.finished())
                    if due and self.last_eval_step != self.step_count:
                        self.evaluation.validate(self.evaluate, self.log_evaluation, self.state)
                    self._save_checkpoints()
                    cut = self.last_eval_step != self.step_count and due
                    if self.stop.received and (not self.finished() or cut):
                        raise self.stops.interrupted(self.stop.received, self.state, False)
                if self.scores_test_at_end:
                    self.evaluation.test_split(self.evaluate, self.log_evaluation, self.state)
            except torch.OutOfMemoryError:
                raise self.stops.out_of_memory(self.step_count, self.evaluation.phase) from None
        if self.writer is not None:
            self.log_end(self.writer)
            self.logger.close()
        return self.write_metrics()

    def finished(self) -> bool:
        return self.length.done(self.state) or self.monitor.stopped_early

    def _train_epoch(self) -> str | None:
        """One epoch (or its rest, after a mid-epoch resume); "signal" if a stop signal cut it."""
        self.train_mode()
        p, self.resumed_progress = self.resumed_progress or EpochProgress(), None
        loader, steps, cadence = self.train_loader(), self.steps, self.cadence
        n_batches, desc = len(loader), f"epoch {self.epoch + 1}/{self.max_epochs}"
        for _ in steps.run(loader, p, self.state, self.max_steps, desc, self.step):
            mid_epoch = p.batch < n_batches  # an epoch's end evaluates and saves anyway
            val_due = self.evaluation.due(self.state, False, False)
            if val_due and mid_epoch:
                with steps.paused():  # evaluation time is not training time
                    self.evaluation.validate(self.evaluate, self.log_evaluation, self.state)
                self.train_mode()
                if self.monitor.stopped_early:
                    break
            stop = self.stop.on_every_rank(self.device)  # every rank stops at the same step
            if (stop or val_due or cadence.checkpoints_at(self.step_count)) and mid_epoch:
                p.elapsed, p.position = steps.elapsed(), loader.position()
                with steps.paused():  # writing is not training time
                    self._save_checkpoints(p)
                if stop:
                    return "signal"
        elapsed = steps.finish(p)
        self.train_time += elapsed
        self.stops.check_finite(self.state)
        metrics = p.summary(elapsed, self.opt.lr(), self.epoch + 1, self.guard.skipped)
        self.logger.log(metrics | self.placement.peak_memory(), self.state)
        return None

    def _pending_validation(self) -> None:
        """A resumed run whose evaluation a stop signal cut short (StopSignals) runs it first:
        then its log, monitor, best.pt and metrics are the uninterrupted run's."""
        at_epoch_end = self.resumed_progress is None
        pending = self.resumed and self.last_eval_step != self.step_count
        if pending and self.evaluation.due(self.state, at_epoch_end, self.finished()):
            log.info("evaluating step %d first: a stop signal cut it short", self.step_count)
            self.evaluation.validate(self.evaluate, self.log_evaluation, self.state)
            if at_epoch_end:
                self._save_checkpoints()

    def _save_checkpoints(self, progress: EpochProgress | None = None) -> None:
        """last.pt (at an epoch end, or mid-epoch with `progress`); best.pt when the monitor improved."""
        self.stops.check_finite(self.state)  # never replace a good checkpoint with diverged weights
        self.hooks.before_save()  # trainer.save_top_k: this evaluation may enter the top k
        state = self.state_dict(progress)  # every rank takes part (its RNG states)
        if dist.is_main():
            best, self.monitor.improved = self.monitor.improved, False
            self.folder.save(state, self.hooks.after_save, best)

    # ----- checkpoints --------------------------------------------------------------------------
    def state_dict(self, progress: EpochProgress | None = None) -> dict[str, Any]:
        """What a checkpoint holds, from every part (the layout older readers know, key for key)."""
        return {
            "format": FORMAT,
            "model": checkpoint.unwrap(self.model).state_dict(),
            **self.opt.state_dict(),
            **rank_rngs(self.data.generators()),  # "rng", "rng_ranks": every rank takes part
            "epoch": self.epoch,
            "step": self.step_count,
            "max_steps": self.max_steps,
            "train_time": self.train_time,
            "metrics": self.metrics,
            "monitor": self.monitor.state_dict(),
            "last_eval_step": self.last_eval_step,
            "config": self.folder.record,
            "task": self.extra_state(),
            "skipped": self.guard.skipped,
            "progress": None if progress is None else vars(progress),
            "num_threads": torch.get_num_threads(),  # CPU float sums depend on it
            "precision": precision_name(self.dtype),  # as `auto` resolved it
            # "data", "choices": what the modes need to build the task without its data set.
            **described.saved(self.data, getattr(self, "batches_per_epoch", None), self.hparams),
            **hook_state.saved(self.hooks),  # "hooks": each hook's state; "ema": the average
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from what `state_dict` saved (checked by `folder.resumable`): every part's."""
        threads.restore(state.get("num_threads"), self.num_threads)
        check_resume(state, self.dtype, self.last_path)
        self.folder.check_length(state, self.max_steps, self.sched_factory, self.trains_weights)
        self.folder.load_weights(self.model, state, self.last_path)
        self.opt.load_state_dict(state, state["step"])
        restore_rngs(state, self.data.generators())
        self.state.load(state)
        self.monitor.load_state_dict(state.get("monitor") or {})
        self.load_extra_state(state.get("task") or {})
        hook_state.restore(self.hooks, state)
        self.guard.skipped, self.guard.checked = state.get("skipped", 0), self.step_count
        if state.get("progress"):  # a mid-epoch checkpoint: its partial sums go back on the device
            self.resumed_progress = EpochProgress(**state["progress"]).on(self.device)
        p, n = self.resumed_progress, self.batches_per_epoch
        where = f"epoch {self.epoch + 1}, batch {p.batch} of {n}" if p else f"end of epoch {self.epoch}"
        log.info("resumed from %s at step %d (%s)", self.last_path, self.step_count, where)

    def write_metrics(self, extra: Mapping[str, float] | None = None) -> dict[str, float]:
        """metrics.json: the last value of every logged scalar, plus params, epoch, step, train time."""
        metrics = dict(self.metrics) | dict(extra or {})
        return self.folder.write_metrics(metrics, self.params, self.flops, self.state)

    # ----- modes (what they share: run_modes.py) ------------------------------------------------
    def check_mode(self, mode: str, ckpt: str | None,
                   options: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        """Before any work: the mode is the task's and has its checkpoint (and, say, `options`)."""
        run_modes.check_mode(self.modes, mode, ckpt, type(self).__name__)

    def run_mode(self, mode: str, *, ckpt: str | None, resume: bool, options: Mapping[str, Any],
                 commit: Callable[[], None], weights: str = "model") -> dict[str, float]:  # fmt: skip
        """Train, or run `mode_<mode>` on checkpoint `ckpt` (its `weights`: eval.weights)."""
        if mode == "train":
            self.prepare(resume=resume)
            commit()
            return self.fit(resume=resume)
        state, self.scored_weights = self.folder.load_for_mode(self.model, str(ckpt), weights)
        self.checkpoint_path = ckpt
        commit()
        return getattr(self, f"mode_{mode}")(state, dict(options))

    def mode_eval(self, state: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, float]:
        """Score the checkpoint on the test split: test/* in metrics.json and the log."""
        self.epoch, self.step_count = state.get("epoch", 0), state.get("step", 0)
        self.train_time = state.get("train_time", 0.0)
        scored = self.evaluation.checkpoint(self.evaluate, self.log_evaluation, self.run_dir)
        return self.write_metrics(scored)

    def output_dir(self, mode: str) -> Path:
        """<run>/<mode>/NNN itself (launch/mode_dir.py), or <run_dir>/<mode> of a hydra.run.dir."""
        return self.run_dir if mode_dir.is_mode_dir(self.run_dir) else self.run_dir / mode

    def _open_writer(self) -> None:
        """TensorBoard; a fresh run's header (run_logger.py) and the task's first images."""
        net = checkpoint.unwrap(self.model)
        writer = self.logger.open(self.step_count, type(net).__name__, self.params, self.flops)
        declared: list[str] = []  # the hint wants a val/* curve: a GAN without FID logs none
        if writer is not None and not self.resumed:
            declared = self.logged_metrics()  # first: a task may settle its metric networks here
            self.logger.header(self.folder.record, self.hparams, declared, self.monitor.name)
            self.log_start(writer)
        curves = any(t.startswith("val/") for t in [*declared, self.monitor.name or ""])
        if self.trains_weights and curves and not (self.resumed or self.cadence.val_every_steps):
            self.logger.hint_short_run(self.max_steps, self.max_epochs)
