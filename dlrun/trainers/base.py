"""The one training loop: devices, precision, compile, epochs, evaluation, TensorBoard, checkpoints, resume."""

import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from dlrun import checkpoint, introspect
from dlrun.errors import OutOfMemory, TrainingDiverged, UserError
from dlrun.tb import HParam, log_config, log_hparams
from dlrun.trainers.guards import Interrupted, NonFiniteGuard, StopSignals
from dlrun.trainers.state import EpochProgress, ResumableRun, saved_step

log = logging.getLogger(__name__)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TTA = ("none", "flip")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype; `auto` is bf16 where the hardware has it (CUDA), fp32 elsewhere."""
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else None
    if precision not in DTYPES:
        raise UserError(
            f"trainer.precision must be one of auto, {', '.join(DTYPES)}, got '{precision}'."
        )
    return DTYPES[precision]


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


class Trainer(ResumableRun):
    """Owns the loop; a task subclass implements `step(batch) -> sums` and `evaluate(loader)`."""

    monitor = "val/acc"  # the metric that picks best.pt
    higher_is_better = True

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
        hparams: Mapping[str, HParam],
        max_epochs: int = 10,
        max_steps: int | None = None,
        precision: str = "fp32",
        channels_last: bool = False,
        compile: bool = False,
        tta: str = "none",
        metrics_cfg: Mapping[str, Any] | None = None,  # sample-quality metrics: generative tasks
        log_every_n_steps: int = 50,
        checkpoint_every_n_steps: int | None = None,
        on_nonfinite: str = "stop",
        progress: bool | None = None,
    ) -> None:
        if tta not in TTA:
            raise UserError(f"eval.tta must be one of {', '.join(TTA)}, got '{tta}'.")
        if max_epochs < 1 or (max_steps is not None and max_steps < 1):
            raise UserError("trainer.max_epochs and trainer.max_steps must be positive integers.")
        self.device, self.data = device, data
        self.config, self.hparams = dict(run_config), dict(hparams)
        self.run_dir = Path(run_dir)
        self.dtype = resolve_precision(precision, device)
        # NHWC: what tensor cores and oneDNN convolutions want; batches follow in `layout`.
        self.channels_last = channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format)
        self.tta = tta
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.params = sum(p.numel() for p in trainable)
        self.flops = self.count_flops()
        self.sched_factory = sched
        self.steps_per_epoch = len(self.train_loader())
        self.max_steps = max_steps or max_epochs * self.steps_per_epoch
        self.max_epochs = -(-self.max_steps // self.steps_per_epoch)
        # One optimizer (and schedule) per network role; a single-network task has role "model".
        self.optimizers: dict[str, Optimizer] = {}
        self.schedulers: dict[str, LRScheduler | None] = {}
        for role, params in self.param_groups_by_role().items():
            if params:  # a model with nothing to train (k-NN) has no optimizer and no schedule
                opt = self.optimizers[role] = build_optimizer(optim, params)
                self.schedulers[role] = sched(
                    opt, total_steps=self.max_steps, steps_per_epoch=self.steps_per_epoch
                )
        self.optimizer = next(iter(self.optimizers.values()), None)  # the one train/lr shows
        self.scheduler = next(iter(self.schedulers.values()), None)
        self.log_every = max(1, log_every_n_steps)
        self.guard = NonFiniteGuard(on_nonfinite, self.log_every, list(self.optimizers), device)
        fp16 = self.dtype == torch.float16
        # Skipping a step without a host sync: a GradScaler fixed at scale 1 checks the gradients
        # and hands a found-inf flag to the (fused) optimizer, which then leaves the weights alone.
        self.skip_scaler = on_nonfinite == "skip" and not fp16
        self.scaler = torch.amp.GradScaler(
            device.type,
            init_scale=1.0 if self.skip_scaler else 2.0**16,
            enabled=fp16 or self.skip_scaler,
        )
        self.forward_model = torch.compile(self.model) if compile else self.model
        self.checkpoint_every = checkpoint_every_n_steps
        self.progress = progress
        self.epoch = self.step_count = 0
        self.train_time = 0.0
        self.metrics: dict[str, float] = {}
        self.best: float | None = None
        self.writer: SummaryWriter | None = None
        self.resumed_progress: EpochProgress | None = None  # set by a mid-epoch resume
        self.stop = StopSignals()
        self.phase = "train"  # or "eval": which batch size an out-of-memory message names
        self.prepared = False
        self.resumed = False  # True once a checkpoint has been restored

    # ----- what a task provides -----------------------------------------------------------------
    def param_groups_by_role(self) -> dict[str, list[nn.Parameter]]:
        """The trainable parameters of each network that gets its own optimizer."""
        return {"model": [p for p in self.model.parameters() if p.requires_grad]}

    def count_flops(self) -> int:
        """Forward FLOPs of one input, as the run folder reports them."""
        return introspect.count_flops(self.model, tuple(self.data.val_x.shape[1:]), self.device)

    def train_loader(self) -> Any:
        return self.data.train_loader()

    def step(self, batch: Any) -> dict[str, Tensor]:
        """One optimisation step; returns batch *sums* (detached) to be averaged over the epoch."""
        raise NotImplementedError

    def evaluate(self, loader: Any, prefix: str) -> dict[str, float]:
        raise NotImplementedError

    def log_start(self, writer: SummaryWriter) -> None:
        """Anything a task logs once at the start of a fresh run (e.g. an image grid)."""

    def extra_state(self) -> dict[str, Any]:
        """Task state beyond models, optimizers and RNGs that resume needs (e.g. a step counter)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned."""

    # ----- helpers for tasks ----------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def layout(self, x: Tensor) -> Tensor:
        """An image batch in the model's memory format.

        Not a formality: the batched random crop gathers in NHWC, and a convolution fed an NHWC
        batch runs NHWC whatever its weights are. A no-op for a batch already in the format.
        """
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    def optimize(self, loss: Tensor, role: str = "model") -> None:
        optimizer, scheduler = self.optimizers[role], self.schedulers[role]
        self.guard.watch(loss, self.step_count, role)
        optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():  # fp16 (or on_nonfinite=skip): skip steps with inf/NaN grads
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update(1.0 if self.skip_scaler else None)
        else:
            loss.backward()
            optimizer.step()
        # Not after the very last step: the schedule ends there, and one-cycle would extrapolate.
        if scheduler is not None and self.step_count + 1 < self.max_steps:
            scheduler.step()

    # ----- the loop -------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, float]:
        if not self.prepared:
            self.prepare(resume)
        for torn in self.last_path.parent.glob(".*.tmp*"):  # left by a process killed mid-write
            torn.unlink(missing_ok=True)
        self._open_writer(self.resumed)
        with self.stop:
            try:
                while (
                    self.epoch < self.max_epochs and self.step_count < self.max_steps
                ) or self.resumed_progress is not None:
                    if self._train_epoch():
                        self._stop_now()
                    self.epoch += 1
                    self.phase = "eval"
                    self._log(self.evaluate(self.data.val_loader(), "val"))
                    self.phase = "train"
                    self._save_checkpoints()
                    unfinished = self.epoch < self.max_epochs and self.step_count < self.max_steps
                    if self.stop.received and unfinished:
                        self._stop_now(mid_epoch=False)
            except torch.OutOfMemoryError:
                raise self._out_of_memory() from None
        self.log_end(self.writer)
        self.writer.close()
        return self.write_metrics()

    def _open_writer(self, resume: bool) -> None:
        # purge_step drops events a killed run logged after its last checkpoint (all of them, for
        # a run killed before its first).
        old_events = any(self.run_dir.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(
            str(self.run_dir), purge_step=self.step_count if old_events else None
        )
        log.info(
            "%s: %d trainable parameters, %s forward FLOPs per image",
            type(checkpoint.unwrap(self.model)).__name__,
            self.params,
            f"{self.flops:,}",
        )
        if not resume:
            log_config(self.writer, OmegaConf.to_yaml(self.config))
            log_hparams(self.writer, self.hparams, [self.monitor, "val/loss"])
            self.writer.add_scalar("model/params", self.params, 0)
            self.writer.add_scalar("model/flops", self.flops, 0)
            self.log_start(self.writer)

    def log_end(self, writer: SummaryWriter) -> None:
        """Anything a task logs once when training ends (e.g. what the network learned to see)."""

    def _batches(self, progress: EpochProgress) -> Iterator[Any]:
        loader = self.train_loader()
        gen = self.data.generator
        if progress.batch:  # resumed mid-epoch: replay the epoch's shuffle, then skip what ran
            now = gen.get_state() if gen is not None else None
            if gen is not None and progress.rng_start is not None:
                gen.set_state(progress.rng_start)
            batches = loader.iterate(progress.batch, now)
        else:
            progress.rng_start = gen.get_state() if gen is not None else None
            batches = iter(loader)
        bar = tqdm(
            batches,
            total=len(loader),
            initial=progress.batch,
            desc=f"epoch {self.epoch + 1}/{self.max_epochs}",
            disable=(not self.progress) if self.progress is not None else None,
            leave=False,
        )
        self._bar = bar
        yield from bar

    def _train_epoch(self) -> bool:
        """One epoch (or its rest, after a mid-epoch resume); True if a stop signal cut it short."""
        self.model.train()
        p, self.resumed_progress = self.resumed_progress or EpochProgress(), None
        self._sync()
        start = time.perf_counter() - p.elapsed
        for batch in self._batches(p):
            if self.step_count >= self.max_steps:
                break
            out = self.step(batch)
            if self.guard.policy == "skip":
                out = self.guard.masked(out, self.step_count)
            p.window_seen += len(batch[0])
            p.batch += 1
            self.step_count += 1
            for k, v in out.items():  # one add per value: no host sync, no allocation per step
                if k in p.window:
                    p.window[k] += v
                else:
                    p.window[k] = v.clone()
            if self.step_count % self.log_every == 0 or self.step_count >= self.max_steps:
                p.seen += p.window_seen
                self._flush(p, p.seen / (time.perf_counter() - start))
            if self.step_count >= self.max_steps:
                break
            if self.stop.received or (
                self.checkpoint_every and self.step_count % self.checkpoint_every == 0
            ):
                if p.batch < self.steps_per_epoch:  # an epoch end checkpoints anyway
                    self._sync()
                    p.elapsed = time.perf_counter() - start
                    self._save_checkpoints(p)
                    if self.stop.received:
                        return True
        p.seen += p.window_seen
        for k, v in p.window.items():
            p.sums[k] = p.sums[k] + v if k in p.sums else v
        self._sync()
        elapsed = time.perf_counter() - start
        self.train_time += elapsed
        self._check_finite()
        metrics = {f"train/{k}": v.item() / max(1, p.seen) for k, v in p.sums.items()}
        metrics |= {
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/images_per_s": p.seen / max(elapsed, 1e-9),
            "time/epoch_s": elapsed,
            "epoch": float(self.epoch + 1),
        }
        if self.guard.skipped:
            metrics["train/skipped_steps"] = float(self.guard.skipped)
        self._log(metrics)
        return False

    def _flush(self, p: EpochProgress, rate: float) -> None:
        """Every log_every_n_steps: the one host sync, step scalars to TensorBoard, the bar."""
        self._check_finite()
        means = {k: v.item() / p.window_seen for k, v in p.window.items()}
        for k, v in means.items():
            self.writer.add_scalar(f"train/{k}_step", v, self.step_count)
        self.writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.step_count)
        self._bar.set_postfix(loss=f"{means.get('loss', 0):.4f}", img_s=f"{rate:.0f}")
        for k, v in p.window.items():
            p.sums[k] = p.sums[k] + v if k in p.sums else v
        p.window, p.window_seen = {}, 0

    def _check_finite(self) -> None:
        """Stop (or count the skipped steps) where a loss was NaN/inf, naming the step."""
        bad = self.guard.bad_steps(self.step_count)
        if not bad:
            return
        step = bad[0][0]
        roles = [r for s, r in bad if s == step and r != "model"]
        which = f" ({', '.join(roles)})" if roles else ""
        later = sorted({s for s, _ in bad if s != step})
        more = f" and at {len(later)} later step(s) up to step {later[-1]}" if later else ""
        if self.guard.policy == "skip":
            self.guard.skipped += len({s for s, _ in bad})
            log.warning(
                "non-finite loss%s at step %d%s: those updates were skipped "
                "(trainer.on_nonfinite=skip; %d skipped so far)",
                which, step, more, self.guard.skipped,
            )  # fmt: skip
            return
        saved = saved_step(self.last_path)
        kept = (
            f"The last good checkpoint, {self.last_path} (step {saved}), is untouched"
            if saved is not None
            else "No checkpoint had been written yet"
        )
        lr = self.optimizer.param_groups[0].get("initial_lr", self.optimizer.param_groups[0]["lr"])
        fp16 = (
            " fp16 overflow (use trainer.precision=bf16 or fp32);"
            if self.dtype == torch.float16
            else ""
        )
        raise TrainingDiverged(
            f"The loss{which} became NaN or infinite at step {step} (epoch {self.epoch + 1}){more}; "
            f"training stopped. {kept}. Likely causes: a learning rate too high (optim.lr={lr:g}: "
            f"try 10x lower);{fp16} a loss that takes log(0); NaN or inf values in the data. Start "
            f"again from the last good weights with ckpt={self.last_path} and a lower optim.lr, or "
            "set trainer.on_nonfinite=skip to skip such steps."
        )

    def _stop_now(self, mid_epoch: bool = True) -> None:
        name = signal.Signals(self.stop.received).name
        where = f"epoch {self.epoch + 1}, mid-epoch" if mid_epoch else f"end of epoch {self.epoch}"
        self.writer.flush()
        raise Interrupted(
            f"{name}: stopped after step {self.step_count} ({where}) with a checkpoint in "
            f"{self.last_path}. Continue with the same options plus resume=true "
            f"hydra.run.dir={self.run_dir}",
            self.stop.received,
        )

    def _out_of_memory(self) -> OutOfMemory:
        key = "data.eval_batch_size" if self.phase == "eval" else "data.batch_size"
        size = self.data.eval_batch_size if self.phase == "eval" else self.data.batch_size
        saved = saved_step(self.last_path)
        kept = (
            f"The checkpoint {self.last_path} (step {saved}) is intact."
            if saved is not None
            else "No checkpoint had been written yet."
        )
        return OutOfMemory(
            f"{self.device} ran out of memory at step {self.step_count} ({self.phase}) with "
            f"{key}={size}. Lower it (e.g. {key}={max(1, size // 2)}), or use "
            "trainer.precision=bf16, or a smaller model. " + kept + " A smaller batch makes a "
            "different run: start it from those weights with ckpt=PATH."
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _log(self, metrics: Mapping[str, float]) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, self.step_count)
        self.metrics.update(metrics)
        if any(k.startswith("val/") for k in metrics):
            shown = ", ".join(
                f"{k}={v:.4f}" for k, v in self.metrics.items() if "/" in k and "_s" not in k
            )
            log.info("epoch %d step %d: %s", self.epoch, self.step_count, shown)
