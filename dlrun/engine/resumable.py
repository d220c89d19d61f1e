"""Checkpoints of a run and resuming it: what is saved, what resume=true may change, fresh folders."""

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from dlrun.config import migrations
from dlrun.engine import checkpoint, dist
from dlrun.engine.hooks import state as hook_state
from dlrun.errors import UserError, WriteFailed
from dlrun.launch import threads

log = logging.getLogger(__name__)
# 2: data modules (order and augmentation generators, loader positions), metric counts, monitor.
FORMAT = 2
# What resume=true may change in a run's config: how long it trains, what and how often it logs,
# where the data and caches live. Anything else would make the continued run a different run.
RESUMABLE_CHANGES = (
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.log_every_n_steps",
    "trainer.progress",
    "trainer.checkpoint_every_n_steps",
    "trainer.on_nonfinite",
    "trainer.sample_every_n_steps",
    "trainer.num_threads",  # the checkpoint's count is used unless one is given (threads.restore)
    "data.root",
    "data.download",
    "data.num_workers",
    "data.source.cache_dir",
    "data.source.workers",
    "resume",
    "ckpt",
    "mode",
    "predict",  # the output modes' options: they never touch training
    "export",
    "eval.weights",
)
# Keys that later versions of dlrun added, with the value that leaves a run as it was: a run saved
# before a key existed continues with that value (dlrun.config.resume), and refuses another one.
NEUTRAL = {
    "trainer.ema.decay": None, "trainer.ema.warmup": True, "trainer.save_top_k": None,
    "trainer.profile": None, "trainer.deterministic": False, "data.mixup": 0.0,
    "data.cutmix": 0.0, "data.mix_switch_prob": 0.5, "data.randaugment.num_ops": 0,
    "data.randaugment.magnitude": 9, "data.trivialaugment": False, "data.random_erasing": 0.0,
}  # fmt: skip


@dataclass
class EpochProgress:
    """Where a run is inside an epoch: what a mid-epoch checkpoint needs to continue exactly."""

    batch: int = 0  # batches of this epoch done
    position: dict[str, Any] | None = None  # the train loader's position() (order, aug RNGs)
    sums: dict[str, Tensor] = field(default_factory=dict)  # up to the last logging point
    counts: dict[str, Any] = field(default_factory=dict)  # items each sum covers (int or Tensor)
    window: dict[str, Tensor] = field(default_factory=dict)  # since the last logging point
    window_counts: dict[str, Any] = field(default_factory=dict)
    seen: int = 0  # items (images) trained on: images/s
    window_seen: int = 0
    elapsed: float = 0.0  # seconds of training in this epoch so far

    def add(self, out: Mapping[str, tuple[Tensor, Any]]) -> None:
        """One step's (sum, count) per metric; in-place adds: no host sync, no allocation."""
        for k, (value, count) in out.items():
            if k in self.window:
                self.window[k] += value
                self.window_counts[k] = self.window_counts[k] + count
            else:
                self.window[k] = value.clone()
                self.window_counts[k] = count.clone() if isinstance(count, Tensor) else count

    def fold(self) -> None:
        """The window into the epoch's sums (at each logging point and at the epoch's end)."""
        for k, v in self.window.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            n = self.window_counts[k]
            self.counts[k] = self.counts[k] + n if k in self.counts else n
        self.window, self.window_counts, self.window_seen = {}, {}, 0

    @staticmethod
    def means(sums: Mapping[str, Tensor], counts: Mapping[str, Any]) -> dict[str, float]:
        """Each metric's mean over the items it counted (the host sync); none for a zero count."""
        totals = {
            k: dist.all_reduce_sum(v.clone()) if dist.initialized() else v for k, v in sums.items()
        }
        out = {}
        for k, v in totals.items():
            n = counts[k]
            n = (
                float(dist.all_reduce_sum(torch.as_tensor(n, device=v.device).clone()))
                if dist.initialized()
                else n
            )
            n = n.item() if isinstance(n, Tensor) else n
            if n:
                out[k] = v.item() / n
        return out


class ResumableRun:
    """The checkpoint side of `Trainer`: prepare (checks), save, restore, metrics.json."""

    def prepare(self, resume: bool) -> None:
        """Every check before the run folder is touched: a resumable checkpoint, or a fresh folder."""
        if self.optimizer is None:
            raise UserError(
                "There is nothing to train: every parameter is frozen. Freeze fewer stages "
                "(freeze=N or freeze=null)."
            )
        saved_config = self.run_dir / ".hydra" / "config.yaml"
        if resume and not self.last_path.is_file() and saved_config.is_file():
            # Killed before its first checkpoint: nothing to continue, so start over, same config.
            # Hydra writes config.yaml unresolved (${data.channels}); the run's config is
            # resolved: compare like with like, or every interpolated key reads as changed.
            saved = OmegaConf.to_container(OmegaConf.load(saved_config), resolve=True)
            self._refuse_changes(saved, saved_config)
            log.warning(
                "resume=true: %s has no checkpoint yet; starting it from step 0", self.run_dir
            )
        elif resume:
            self._restore(self.last_path)
            self.resumed = True
        else:
            self.check_fresh_folder()
        self.prepared = True

    def check_fresh_folder(self) -> None:
        """A new run never writes over another run's checkpoint or metrics."""
        taken = [p.name for p in (self.last_path, self.run_dir / "metrics.json") if p.exists()]
        if taken:
            raise UserError(
                f"The run folder {self.run_dir} already holds a run ({', '.join(taken)}): a new "
                "run would overwrite it. Continue it with resume=true, or give the new run its "
                "own folder (leave hydra.run.dir at its default, or pick another)."
            )

    @property
    def last_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    def _pending_validation(self) -> None:
        """A resumed run whose evaluation a stop signal cut short (StopSignals) runs it first:
        then its log, monitor, best.pt and metrics are the uninterrupted run's."""
        if not self.resumed or self.last_eval_step == self.step_count:
            return
        if self.resumed_progress is None:  # at an epoch's end
            due = self.epoch % self.val_every_epochs == 0 or self.finished()
        else:
            due = bool(self.val_every_steps) and self.step_count % self.val_every_steps == 0
        if due:
            log.info("evaluating step %d first: a stop signal cut it short", self.step_count)
            self._validate()
            if self.resumed_progress is None:
                self._save_checkpoints()

    def _save_checkpoints(self, progress: EpochProgress | None = None) -> None:
        """last.pt (at an epoch end, or mid-epoch with `progress`); best.pt when the monitor improved."""
        self._check_finite()  # never replace a good checkpoint with diverged weights
        for hook in self.hooks:  # trainer.save_top_k: this step's evaluation may enter the top k
            hook.before_save(self)
        state = self._state(progress)  # every rank takes part (its RNG states)
        if not dist.is_main():
            return
        checkpoint.save(self.last_path, state)
        for hook in self.hooks:
            hook.after_save(self, self.last_path)
        if not self.monitor.improved:
            return
        self.monitor.improved = False
        best = self.last_path.with_name("best.pt")
        tmp = best.with_name(".best.tmp")
        try:
            shutil.copyfile(self.last_path, tmp)
            tmp.replace(best)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise WriteFailed(
                f"Could not write {best} ({err.strerror or err}); the previous best.pt is "
                f"intact and {self.last_path} is up to date. Free disk space or make the run "
                "folder writable, then continue with resume=true."
            ) from err

    # ----- checkpoints and metrics ----------------------------------------------------------------
    def _state(self, progress: EpochProgress | None = None) -> dict[str, Any]:
        # Every rank's RNG states (its augmentation generator differs), in rank order.
        rngs = dist.gather_objects(checkpoint.rng_state(self.data.generators()))
        return {
            "format": FORMAT,
            "model": checkpoint.unwrap(self.model).state_dict(),
            **self.opt.state_dict(),
            "rng": rngs[0],
            "rng_ranks": rngs,
            "epoch": self.epoch,
            "step": self.step_count,
            "max_steps": self.max_steps,
            "train_time": self.train_time,
            "metrics": self.metrics,
            "monitor": self.monitor.state_dict(),
            "last_eval_step": self.last_eval_step,
            "config": self.config,
            "task": self.extra_state(),
            "skipped": self.guard.skipped,
            "progress": None if progress is None else vars(progress),
            "num_threads": torch.get_num_threads(),  # CPU float sums depend on it
            **hook_state.saved(self.hooks),  # "hooks": each hook's state; "ema": the average
        }

    def _restore(self, path: Path) -> None:
        if not path.is_file():
            raise UserError(
                f"resume=true found no checkpoint at {path}. Pass the run folder to continue as "
                "hydra.run.dir=<run folder> (e.g. hydra.run.dir=outputs/2026-01-01/12-00-00), "
                "or drop resume=true to start a new run."
            )
        state = checkpoint.load(path)
        if state.get("format", 1) < FORMAT:
            raise UserError(
                f"resume=true: {path} was written by an earlier dlrun (checkpoint format "
                f"{state.get('format', 1)}, before data modules), whose data-order and "
                f"augmentation states this version cannot continue exactly. Its weights still "
                f"work: evaluate it with mode=eval ckpt={path}, or start a new run from them "
                f"with ckpt={path}."
            )
        self._refuse_changes(state.get("config", {}), path)
        threads.restore(state.get("num_threads"), self.config.get("trainer", {}).get("num_threads"))
        if state.get("max_steps") != self.max_steps and self._schedule_needs_length():
            raise UserError(
                f"resume=true with a new length: the run planned {state.get('max_steps')} steps, "
                f"this config {self.max_steps}, but its schedule (sched={self._sched_name()}) "
                "is laid out over the planned steps. Keep trainer.max_epochs/max_steps, or start a "
                f"new run from its weights with ckpt={path}."
            )
        checkpoint.load_model_state(self.model, state, path, config=self.config)
        self.opt.load_state_dict(state, state["step"])
        ranks = state.get("rng_ranks") or [state["rng"]]
        same_world = len(ranks) == dist.world_size()
        checkpoint.set_rng_state(
            ranks[dist.rank()] if same_world else ranks[0], self.data.generators()
        )
        if not same_world:
            log.warning(
                "resumed with %d processes from a run of %d: training continues from the same "
                "weights and step, but the data order and augmentation draws are not those of an "
                "uninterrupted run (not bit-exact)", dist.world_size(), len(ranks),
            )  # fmt: skip
        self.epoch, self.step_count = state["epoch"], state["step"]
        self.train_time, self.metrics = state["train_time"], state["metrics"]
        self.monitor.load_state_dict(state.get("monitor") or {})
        self.last_eval_step = state.get("last_eval_step", -1)
        self.load_extra_state(state.get("task") or {})
        hook_state.restore(self.hooks, state)
        self.guard.skipped = state.get("skipped", 0)
        self.guard.checked = self.step_count
        if state.get("progress"):  # a mid-epoch checkpoint: its partial sums go back on the device
            progress = dict(state["progress"])
            for part in ("sums", "window", "counts", "window_counts"):
                progress[part] = {
                    k: v.to(self.device) if isinstance(v, Tensor) else v
                    for k, v in progress[part].items()
                }
            self.resumed_progress = EpochProgress(**progress)
        where = (
            f"epoch {self.epoch + 1}, batch {self.resumed_progress.batch} of "
            f"{self.batches_per_epoch}"
            if self.resumed_progress
            else f"end of epoch {self.epoch}"
        )
        log.info("resumed from %s at step %d (%s)", path, self.step_count, where)

    def _refuse_changes(self, saved: Mapping[str, Any], source: Path) -> None:
        """resume=true must continue the same run: name every setting that differs from it.

        The last check: through `dlrun`, dlrun.config.resume has given every key the run had its value
        back and refused an override that contradicts it. Compared under today's names (a moved
        key is no difference); a key on one side only was added since (no difference, unless
        NEUTRAL knows the run's value) or no longer exists.
        """
        was = migrations.migrate(checkpoint.flatten(saved))
        was = {k: v for k, v in NEUTRAL.items() if k not in was} | was
        now = checkpoint.flatten(self.config)
        changed = [
            k for k in checkpoint.config_diff(was, now, RESUMABLE_CHANGES) if k in was and k in now
        ]
        if not changed:
            return
        shown = "; ".join(checkpoint.describe_diff(was, now, changed[:6], ("run", "now")))
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise UserError(
            f"resume=true continues the run in {self.run_dir} as it was configured, but "
            f"{len(changed)} setting(s) differ: {shown}{more}. Resume with the run's own settings "
            f"(recorded in {source}), or start a new run from its weights with ckpt=PATH. Only "
            "trainer.max_epochs/max_steps, logging and data locations may change on resume."
        )

    def _schedule_needs_length(self) -> bool:
        """Cosine and one-cycle lay the lr out over the planned steps (dlrun.engine.sched marks them)."""
        return getattr(getattr(self.sched_factory, "func", None), "needs_total_steps", False)

    def _sched_name(self) -> str:
        return str(self.config.get("sched", {}).get("_target_", "?")).rsplit(".", 1)[-1]

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
        text = json.dumps(out, indent=2, sort_keys=True) + "\n"
        if dist.is_main():
            checkpoint.write_text_atomic(self.run_dir / "metrics.json", text)
        return out


def saved_step(path: Path) -> int | None:
    """The step of the checkpoint at `path`, for messages; None where there is none."""
    try:
        return int(checkpoint.load(path)["step"]) if path.is_file() else None
    except (UserError, KeyError, TypeError, ValueError):
        return None
