"""trainer.save_top_k=K: keep the K best checkpoints by trainer.monitor, besides last.pt.

Each kept file holds what best.pt holds (run_folder.eval_state: the weights and what evaluation,
the output modes and ckpt= fine-tuning read, not the resume state) of the checkpoint written right
after the evaluation that scored it, named `checkpoints/top/step=<step>-<monitor>=<value>.pt`
(Lightning's habit: the name says what it holds). Which files are kept is part of the run's state
(saved in last.pt), so a resumed run keeps managing the same set, and finishes the write a kill
interrupted.
"""

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlrun.engine import checkpoint, dist
from dlrun.engine.hooks.base import Hook
from dlrun.engine.run_folder import save_for_eval
from dlrun.errors import UserError

if TYPE_CHECKING:
    from dlrun.engine.loop import Trainer

log = logging.getLogger(__name__)


def check(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(
            f"trainer.save_top_k must be a positive number of checkpoints to keep (e.g. "
            f"trainer.save_top_k=3) or null, got {k!r}."
        )


def check_monitor(monitor: str | None) -> None:
    if monitor is None:
        raise UserError(
            "trainer.save_top_k keeps the best checkpoints by trainer.monitor, which is null: set "
            "trainer.monitor (e.g. trainer.monitor=val/acc) or drop trainer.save_top_k."
        )


class TopK(Hook):
    """The K best (score, step, file) so far, best first: before each checkpoint, an evaluation
    at its step may enter them; after it, last.pt's eval part is written and what fell out removed."""

    state_key = "top_k"

    def __init__(self, k: int) -> None:
        check(k)
        self.k = k
        self.kept: list[dict[str, Any]] = []  # {"score", "step", "file"}, best first
        self.last_step = -1  # the last evaluated step considered (each is considered once)
        self.saved_step = -1  # the step of the checkpoint being (or last) written
        self.pending: list[str] = []  # files to write from last.pt once it is saved
        self.evicted: list[str] = []

    def setup(self, trainer: "Trainer") -> None:
        check_monitor(trainer.monitor.name)
        self.last = trainer.last_path
        self.folder = self.last.parent / "top"
        self.monitor, self.mode = trainer.monitor.name, trainer.monitor.mode

    def before_save(self, trainer: "Trainer") -> None:
        self.saved_step = trainer.step_count
        if trainer.last_eval_step == trainer.step_count:
            self.consider(trainer.metrics.get(trainer.monitor.name), trainer.step_count)

    def after_save(self, trainer: "Trainer", last_path: Path) -> None:
        self.commit(last_path)

    def _key(self, entry: Mapping[str, Any]) -> tuple[float, int]:
        score = entry["score"] if self.mode == "max" else -entry["score"]
        return (-score, entry["step"])  # best first; of equal scores, the earlier step

    def consider(self, score: float | None, step: int) -> None:
        """Before last.pt is saved: does this evaluation's checkpoint belong to the K best?"""
        if score is None or step == self.last_step:
            return
        self.last_step = step
        tag = re.sub(r"[^A-Za-z0-9_.-]", "_", self.monitor)
        entry = {"score": float(score), "step": step, "file": f"step={step}-{tag}={score:.4f}.pt"}
        ranked = sorted([*self.kept, entry], key=self._key)
        self.kept, dropped = ranked[: self.k], ranked[self.k :]
        self.evicted += [e["file"] for e in dropped if e is not entry]
        if entry in self.kept:
            self.pending.append(entry["file"])

    def commit(self, last: Path) -> None:
        """After last.pt is saved: its eval part (as best.pt) into the new top-k file(s), each
        written atomically; then the evicted ones deleted."""
        self.folder.mkdir(parents=True, exist_ok=True)
        state = checkpoint.load(last) if self.pending else {}
        for name in self.pending:
            save_for_eval(self.folder / name, state, last)
        for name in self.evicted:
            (self.folder / name).unlink(missing_ok=True)
        self.pending, self.evicted = [], []

    def state_dict(self) -> dict[str, Any]:
        # "step": the checkpoint's own step, whose file a kill may have left unwritten.
        return {"kept": [dict(e) for e in self.kept], "last_step": self.last_step,
                "step": self.saved_step}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """On resume, from last.pt (at `state["step"]`). A kill between writing last.pt and
        writing its file leaves that file unwritten and the evicted ones in place: last.pt is
        that very checkpoint, so the file is written from it now, and files outside the set are
        removed."""
        if not state:
            return
        step, last = int(state["step"]), self.last
        self.saved_step = step
        self.kept = [dict(e) for e in state.get("kept", [])]
        self.last_step = int(state.get("last_step", -1))
        self.pending = [
            e["file"]
            for e in self.kept
            if e["step"] == step and not (self.folder / e["file"]).is_file()
        ]
        lost = [
            e["file"]
            for e in self.kept
            if e["step"] != step and not (self.folder / e["file"]).is_file()
        ]
        if lost:
            log.warning("save_top_k: %s missing from %s; dropped from the set", lost, self.folder)
            self.kept = [e for e in self.kept if e["file"] not in lost]
        names = {e["file"] for e in self.kept}
        if self.folder.is_dir():
            self.evicted = [p.name for p in self.folder.glob("*.pt") if p.name not in names]
        if dist.is_main():  # the process that writes the checkpoints
            self.commit(last)
