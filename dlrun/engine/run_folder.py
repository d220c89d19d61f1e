"""The run folder's files: checkpoints (last.pt, best.pt), metrics.json, and the run's config record,
which only this part stores (in every checkpoint) and compares (what resume=true may change)."""

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from dlrun.config import migrations
from dlrun.engine import checkpoint, dist
from dlrun.engine.loop_state import LoopState
from dlrun.errors import UserError, WriteFailed

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
    "trainer.log_every_s",
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
# What best.pt (and trainer.save_top_k's files) leave out of a checkpoint: the resume state, which
# only resume=true reads (optimizers, schedules, scaler, RNG states, mid-epoch progress, the hooks'
# states, the loop's counters). Everything else stays: what the modes (eval, predict, export,
# sample, translate, embed, verify), dlrun.load, ckpt= fine-tuning and the scoring readers
# (teacher.ckpt, metrics.fid.ckpt, metrics.domain.ckpt, style.features_ckpt) read: "model", "ema"
# (eval.weights=ema), "task" (a verification threshold), "config", "epoch", "step", "train_time",
# "metrics", "monitor", and any key a later change adds for them (kept unless listed here).
RESUME_ONLY = ("optimizer", "scheduler", "scaler", "taken", "rng", "rng_ranks", "progress",
               "hooks", "skipped", "last_eval_step", "max_steps", "num_threads")  # fmt: skip


def eval_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint less its RESUME_ONLY keys, marked `"resumable": False` (resume=true refuses
    it by name)."""
    return {k: v for k, v in state.items() if k not in RESUME_ONLY} | {"resumable": False}


def save_for_eval(path: Path, state: Mapping[str, Any], last: Path) -> None:
    """`eval_state(state)` at `path`, atomically (checkpoint.save); a failed write says that the
    previous file at `path` and `last` are intact."""
    existed = path.is_file()
    try:
        checkpoint.save(path, eval_state(state))
    except WriteFailed as err:
        cause = err.__cause__
        reason = (getattr(cause, "strerror", None) or cause) if cause else err
        kept = f"the previous {path.name} is intact and " if existed else ""
        raise WriteFailed(
            f"Could not write {path} ({reason}); {kept}{last} is up to date. Free disk space or "
            "make the run folder writable, then continue with resume=true."
        ) from cause or err


class RunFolder:
    """`run_dir`'s checkpoints and metrics.json, and `config_record`: the composed config of the
    run, kept as an opaque record (checkpoint["config"]) that resume compares with the saved one."""

    def __init__(self, run_dir: str | Path, config_record: Mapping[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.record = dict(config_record)

    @property
    def last_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    def check_fresh(self) -> None:
        """A new run never writes over another run's checkpoint or metrics."""
        taken = [p.name for p in (self.last_path, self.run_dir / "metrics.json") if p.exists()]
        if taken:
            raise UserError(
                f"The run folder {self.run_dir} already holds a run ({', '.join(taken)}): a new "
                "run would overwrite it. Continue it with resume=true, or give the new run its "
                "own folder (leave hydra.run.dir at its default, or pick another)."
            )

    def clear_torn(self) -> None:
        """Remove the temporary files a process killed mid-write left."""
        for torn in self.last_path.parent.glob(".*.tmp*"):
            torn.unlink(missing_ok=True)

    def prepare(self, resume: bool) -> dict[str, Any] | None:
        """Before the folder is touched: resume=true's checkpoint (`resumable`), or a check that a
        new run writes over no other."""
        if resume:
            return self.resumable()
        self.check_fresh()
        return None

    # ----- resume -------------------------------------------------------------------------------
    def resumable(self) -> dict[str, Any] | None:
        """resume=true: last.pt, checked (format, config); None for a run killed before its first
        checkpoint, which starts over with the same config."""
        saved_config = self.run_dir / ".hydra" / "config.yaml"
        if not self.last_path.is_file() and saved_config.is_file():
            # Hydra writes config.yaml unresolved (${data.channels}); the run's config is
            # resolved: compare like with like, or every interpolated key reads as changed.
            saved = OmegaConf.to_container(OmegaConf.load(saved_config), resolve=True)
            self.refuse_changes(saved, saved_config)  # type: ignore[arg-type]
            log.warning(
                "resume=true: %s has no checkpoint yet; starting it from step 0", self.run_dir
            )
            return None
        path = self.last_path
        if not path.is_file():
            raise UserError(
                f"resume=true found no checkpoint at {path}. Pass the run folder to continue as "
                "hydra.run.dir=<run folder> (e.g. hydra.run.dir=outputs/2026-01-01/12-00-00), "
                "or drop resume=true to start a new run."
            )
        state = checkpoint.load(path)
        if state.get("resumable") is False:  # best.pt or a top-k file put in last.pt's place
            raise UserError(
                f"resume=true: {path} holds weights for evaluation (what best.pt keeps), not the "
                "optimizer, schedule and data-order state a resumed run needs. Evaluate it with "
                f"mode=eval ckpt={path}, or start a new run from its weights with ckpt={path}."
            )
        if state.get("format", 1) < FORMAT:
            raise UserError(
                f"resume=true: {path} was written by an earlier dlrun (checkpoint format "
                f"{state.get('format', 1)}, before data modules), whose data-order and "
                f"augmentation states this version cannot continue exactly. Its weights still "
                f"work: evaluate it with mode=eval ckpt={path}, or start a new run from them "
                f"with ckpt={path}."
            )
        self.refuse_changes(state.get("config", {}), path)
        return state

    def refuse_changes(self, saved: Mapping[str, Any], source: Path) -> None:
        """resume=true must continue the same run: name every setting that differs from it.

        The last check: through `dlrun`, dlrun.config.resume has given every key the run had its
        value back and refused an override that contradicts it. Compared under today's names (a
        moved key is no difference); a key on one side only was added since (no difference,
        unless NEUTRAL knows the run's value) or no longer exists.
        """
        was = migrations.migrate(checkpoint.flatten(saved))
        was = {k: v for k, v in NEUTRAL.items() if k not in was} | was
        now = checkpoint.flatten(self.record)
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

    def check_length(
        self, state: Mapping[str, Any], now: int, sched: Callable[..., Any], trains: bool
    ) -> None:
        """Cosine and one-cycle lay the lr out over the planned steps (dlrun.engine.sched marks
        them): a run (checkpoint `state`) cannot resume with another length. A task that trains
        no weights has no schedule."""
        planned = state.get("max_steps")
        func = getattr(sched, "func", None)  # the schedule function the config's partial binds
        if planned == now or not trains or not getattr(func, "needs_total_steps", False):
            return
        name = getattr(func, "__name__", "?")  # the config's sched._target_, its last part
        raise UserError(
            f"resume=true with a new length: the run planned {planned} steps, this config {now}, "
            f"but its schedule (sched={name}) is laid out over the planned steps. Keep "
            f"trainer.max_epochs/max_steps, or start a new run from its weights with "
            f"ckpt={self.last_path}."
        )

    def load_weights(self, model: nn.Module, state: Mapping[str, Any], path: str | Path) -> None:
        """A checkpoint's "model" weights into `model`; a mismatch also names the model.* and
        data.* settings in which the checkpoint's config differs from this run's."""
        checkpoint.load_model_state(model, state, path, config=self.record)

    def load_for_mode(
        self, model: nn.Module, ckpt: str, weights: str
    ) -> tuple[dict[str, Any], str]:
        """An output mode's checkpoint `ckpt` into `model`: its weights, or (eval.weights=ema) its
        weight average. Returns the checkpoint and which weights the model holds."""
        state = checkpoint.load(ckpt)
        self.load_weights(model, state, ckpt)
        if weights not in ("model", "ema"):
            raise UserError(f"eval.weights must be model or ema, got '{weights}'.")
        if weights == "model":
            return state, "model"
        if not state.get("ema"):
            raise UserError(
                f"eval.weights=ema: {ckpt} holds no weight average (it was trained without "
                "trainer.ema.decay); use eval.weights=model."
            )
        self.load_weights(model, {**state, "model": state["ema"]}, ckpt)
        log.info("evaluating the weight average (eval.weights=ema) of %s", ckpt)
        return state, "ema"

    # ----- writing ------------------------------------------------------------------------------
    def save(self, state: Mapping[str, Any], after: Callable[[Path], None], best: bool) -> None:
        """last.pt, written atomically (a kill mid-write leaves the previous one); then `after`
        (the hooks' after_save) and, when the monitor improved (`best`), best.pt."""
        checkpoint.save(self.last_path, dict(state))
        after(self.last_path)
        if best:
            self.save_best(state)

    def save_best(self, state: Mapping[str, Any]) -> None:
        """best.pt (after an evaluation that improved the monitor): what evaluation, the output
        modes and fine-tuning read of `state` (eval_state), not its resume state. A best.pt of an
        older dlrun, a full copy of last.pt, still serves every reader alike."""
        save_for_eval(self.last_path.with_name("best.pt"), state, self.last_path)

    def write_metrics(
        self, metrics: Mapping[str, float], params: int, flops: int, state: LoopState
    ) -> dict[str, float]:
        """metrics.json (the main process's): the last value of every logged scalar, plus params,
        flops, epoch, step and training time; returns what it holds."""
        out = dict(metrics) | {
            "params": params,
            "flops": flops,
            "epoch": state.epoch,
            "step": state.step,
            "time/train_s": state.train_time,
        }
        text = json.dumps(out, indent=2, sort_keys=True) + "\n"
        if dist.is_main():
            checkpoint.write_text_atomic(self.run_dir / "metrics.json", text)
        return out


def rank_rngs(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    """A checkpoint's RNG states: every rank's (its augmentation generator differs), in rank
    order ("rng_ranks"), and rank 0's ("rng", what older readers know)."""
    ranks = dist.gather_objects(checkpoint.rng_state(generators))
    return {"rng": ranks[0], "rng_ranks": ranks}


def restore_rngs(state: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    """This rank's RNG states from a checkpoint; with another number of processes, rank 0's."""
    ranks = state.get("rng_ranks") or [state["rng"]]
    same_world = len(ranks) == dist.world_size()
    checkpoint.set_rng_state(ranks[dist.rank()] if same_world else ranks[0], generators)
    if not same_world:
        log.warning(
            "resumed with %d processes from a run of %d: training continues from the same "
            "weights and step, but the data order and augmentation draws are not those of an "
            "uninterrupted run (not bit-exact)", dist.world_size(), len(ranks),
        )  # fmt: skip


def saved_step(path: Path) -> int | None:
    """The step of the checkpoint at `path`, for messages; None where there is none."""
    try:
        return int(checkpoint.load(path)["step"]) if path.is_file() else None
    except (UserError, KeyError, TypeError, ValueError):
        return None
