"""The one training loop: devices, precision, compile, epochs, evaluation, TensorBoard, checkpoints, resume."""

import contextlib
import json
import logging
import shutil
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
from dlrun.errors import UserError
from dlrun.tb import HParam, log_config, log_hparams

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


class Trainer:
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
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.forward_model = torch.compile(self.model) if compile else self.model
        self.log_every = max(1, log_every_n_steps)
        self.progress = progress
        self.epoch = self.step_count = 0
        self.train_time = 0.0
        self.metrics: dict[str, float] = {}
        self.best: float | None = None
        self.writer: SummaryWriter | None = None

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
        optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():  # fp16: scale the loss, unscale and skip steps on overflow
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        # Not after the very last step: the schedule ends there, and one-cycle would extrapolate.
        if scheduler is not None and self.step_count + 1 < self.max_steps:
            scheduler.step()

    # ----- the loop -------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, float]:
        if self.optimizer is None:
            raise UserError(
                "There is nothing to train: every parameter is frozen. Freeze fewer stages "
                "(model.freeze=N or model.freeze=null)."
            )
        if resume:
            self._restore(self.run_dir / "checkpoints" / "last.pt")
        self._open_writer(resume)
        while self.epoch < self.max_epochs and self.step_count < self.max_steps:
            self._train_epoch()
            self.epoch += 1
            self._log(self.evaluate(self.data.val_loader(), "val"))
            self._save_checkpoints()
        self.log_end(self.writer)
        self.writer.close()
        return self.write_metrics()

    def _open_writer(self, resume: bool) -> None:
        # purge_step drops events a killed run logged after its last checkpoint.
        self.writer = SummaryWriter(
            str(self.run_dir), purge_step=self.step_count if resume else None
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

    def _save_checkpoints(self) -> None:
        last = self.run_dir / "checkpoints" / "last.pt"
        checkpoint.save(last, self._state())
        score = self.metrics.get(self.monitor)
        if score is not None and not self.higher_is_better:
            score = -score  # e.g. FID: lower is better
        if score is not None and (self.best is None or score > self.best):
            self.best = score
            tmp = last.with_name(".best.tmp")
            shutil.copyfile(last, tmp)
            tmp.replace(last.with_name("best.pt"))

    def log_end(self, writer: SummaryWriter) -> None:
        """Anything a task logs once when training ends (e.g. what the network learned to see)."""

    def _batches(self) -> Iterator[Any]:
        loader = self.train_loader()
        bar = tqdm(
            loader,
            total=len(loader),
            desc=f"epoch {self.epoch + 1}/{self.max_epochs}",
            disable=(not self.progress) if self.progress is not None else None,
            leave=False,
        )
        self._bar = bar
        yield from bar

    def _train_epoch(self) -> None:
        self.model.train()
        sums: dict[str, Tensor] = {}  # the epoch so far, up to the last logging point
        window: dict[str, Tensor] = {}  # since the last logging point; stays on the device
        seen = window_seen = 0
        self._sync()
        start = time.perf_counter()
        for batch in self._batches():
            out = self.step(batch)
            window_seen += len(batch[0])
            self.step_count += 1
            for k, v in out.items():  # one add per value: no host sync, no allocation per step
                if k in window:
                    window[k] += v
                else:
                    window[k] = v.clone()
            if self.step_count % self.log_every == 0 or self.step_count >= self.max_steps:
                seen += window_seen
                self._flush(window, window_seen, sums, seen / (time.perf_counter() - start))
                window, window_seen = {}, 0
            if self.step_count >= self.max_steps:
                break
        if window:
            seen += window_seen
            for k, v in window.items():
                sums[k] = sums[k] + v if k in sums else v
        self._sync()
        elapsed = time.perf_counter() - start
        self.train_time += elapsed
        metrics = {f"train/{k}": v.item() / max(1, seen) for k, v in sums.items()}
        metrics |= {
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/images_per_s": seen / elapsed,
            "time/epoch_s": elapsed,
            "epoch": float(self.epoch + 1),
        }
        self._log(metrics)

    def _flush(
        self, window: dict[str, Tensor], n: int, sums: dict[str, Tensor], rate: float
    ) -> None:
        """Every log_every_n_steps: the one host sync, step scalars to TensorBoard, the bar."""
        means = {k: v.item() / n for k, v in window.items()}
        for k, v in means.items():
            self.writer.add_scalar(f"train/{k}_step", v, self.step_count)
        self.writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.step_count)
        self._bar.set_postfix(loss=f"{means.get('loss', 0):.4f}", img_s=f"{rate:.0f}")
        for k, v in window.items():
            sums[k] = sums[k] + v if k in sums else v

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

    # ----- checkpoints and metrics ----------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "model": checkpoint.unwrap(self.model).state_dict(),
            "optimizer": self._roles(self.optimizers),
            "scheduler": self._roles(self.schedulers),
            "scaler": self.scaler.state_dict(),
            "rng": checkpoint.rng_state(self.data.generator),
            "epoch": self.epoch,
            "step": self.step_count,
            "max_steps": self.max_steps,
            "train_time": self.train_time,
            "metrics": self.metrics,
            "best": self.best,
            "config": self.config,
        }

    @staticmethod
    def _roles(objects: Mapping[str, Any]) -> dict[str, Any]:
        """State dicts by role; a single network's stay unnested (the checkpoint format of 1.0)."""
        states = {role: obj.state_dict() if obj is not None else {} for role, obj in objects.items()}
        return next(iter(states.values())) if len(states) == 1 else states

    def _restore(self, path: Path) -> None:
        if not path.is_file():
            raise UserError(
                f"resume=true found no checkpoint at {path}. Pass the run folder to continue as "
                "hydra.run.dir=<run folder> (e.g. hydra.run.dir=outputs/2026-01-01/12-00-00), "
                "or drop resume=true to start a new run."
            )
        state = checkpoint.load(path)
        if state.get("max_steps") != self.max_steps:
            raise UserError(
                f"resume=true continues the run in {self.run_dir} as it was configured, but its "
                f"checkpoint plans {state.get('max_steps')} steps and this config {self.max_steps} "
                "(trainer.max_epochs, trainer.max_steps, data.batch_size or data.train_subset changed). "
                "Resume with the run's own settings, or start a new run from its weights with ckpt=PATH."
            )
        checkpoint.load_model_state(self.model, state, path)
        for key, objects in (("optimizer", self.optimizers), ("scheduler", self.schedulers)):
            saved = state[key] if len(objects) > 1 else {next(iter(objects)): state[key]}
            for role, obj in objects.items():
                if obj is not None:
                    obj.load_state_dict(saved[role])
        self.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"], self.data.generator)
        self.epoch, self.step_count = state["epoch"], state["step"]
        self.train_time, self.metrics, self.best = (
            state["train_time"],
            state["metrics"],
            state["best"],
        )
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step_count)

    def write_metrics(self, extra: Mapping[str, float] | None = None) -> dict[str, float]:
        """metrics.json: the last value of every logged scalar, plus params, epoch, step, train time."""
        out = dict(self.metrics) | dict(extra or {})
        out |= {
            "params": self.params,
            "flops": self.flops,
            "epoch": self.epoch,
            "step": self.step_count,
            "time/train_s": self.train_time,
        }
        (self.run_dir / "metrics.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
        return out
