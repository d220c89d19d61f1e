"""What keeps a long run safe: stop signals honoured between steps, non-finite losses caught."""

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import torch
from torch import Tensor

from dlrun.engine import dist
from dlrun.errors import UserError
from dlrun.launch import cluster

log = logging.getLogger(__name__)
NONFINITE = ("stop", "skip")


class Interrupted(UserError):
    """SIGTERM or SIGINT stopped the run after a checkpoint: exit code 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


class EvaluationCut(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """A stop signal arrived during an evaluation: it ends there, and the run resumes it."""


class StopSignals:
    """SIGTERM / SIGINT (and a submitit job's warning signal) set a flag the loop reads after
    each step; a second signal acts at once.

    A cluster's preemption (SIGTERM) or a Ctrl-C then costs at most the step in flight: the loop
    finishes it, writes a checkpoint and exits. An evaluation (`evaluating`) is cut at once
    instead: it changes no state, and a large network's can run for minutes, longer than a
    cluster's grace period. The handlers are only installed in the main thread (Python allows no
    other), and the previous ones come back on exit.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.evaluating = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in cluster.stop_signals():
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        self._restore()  # a second Ctrl-C / SIGTERM: the default action, for a run that hangs
        name = signal.Signals(signum).name
        if self.evaluating:  # raised where the evaluation's Python code is, within a kernel
            log.warning("%s received: cutting the evaluation short, writing a checkpoint", name)
            raise EvaluationCut(name)
        log.warning(
            "%s received: finishing this step, then writing a checkpoint and stopping "
            "(send it again to stop at once)",
            name,
        )

    def on_every_rank(self, device: torch.device) -> bool:
        """Whether a stop signal arrived, here or (under DDP) on any rank: one all-reduce."""
        received = self.received is not None
        return dist.any_rank(received, device) if dist.initialized() else received

    @contextlib.contextmanager
    def cuttable(self) -> Iterator[dict[str, bool]]:
        """An evaluation that a stop signal ends at once (`EvaluationCut`, which stops here):
        the yielded dict's "cut" says whether one did."""
        outcome = {"cut": False}
        self.evaluating = True
        try:
            yield outcome
        except EvaluationCut:
            outcome["cut"] = True
        finally:
            self.evaluating = False

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def __exit__(self, *exc: object) -> None:
        self._restore()


class NonFiniteGuard:
    """Keeps, on the device, the loss of each recent step; read where the loop syncs anyway.

    `watch` is one copy into a preallocated slot (about 2 us on a CPU, no host sync);
    `bad_steps` (every log_every_n_steps and before each checkpoint) says which steps were NaN/inf.
    """

    def __init__(self, policy: str, window: int, roles: list[str], device: torch.device) -> None:
        if policy not in NONFINITE:
            raise UserError(
                f"trainer.on_nonfinite must be one of {', '.join(NONFINITE)}, got '{policy}'."
            )
        self.policy, self.window, self.roles = policy, window, roles
        self.losses = torch.zeros(window, len(roles), device=device)
        # Views made once: indexing per step would cost more than the copy itself.
        self.slots = [dict(zip(roles, row.unbind(0), strict=True)) for row in self.losses.unbind(0)]
        self.checked = 0  # the last step whose losses have been read
        self.skipped = 0

    def watch(self, loss: Tensor, step: int, role: str, add: bool = False) -> None:
        """Keep the loss of 0-based step `step` (no sync); `add`: a later accumulated batch of it."""
        slot = self.slots[step % self.window][role]
        slot.add_(loss.detach()) if add else slot.copy_(loss.detach())

    def masked(
        self, out: dict[str, tuple[Tensor, Any]], step: int
    ) -> dict[str, tuple[Tensor, Any]]:
        """skip: step `step`'s sums as zeros (counts kept) where its loss was bad: means stay finite."""
        ok = torch.isfinite(self.losses[step % self.window]).all()
        return {k: (torch.where(ok, v, torch.zeros_like(v)), n) for k, (v, n) in out.items()}

    def bad_steps(self, step_count: int) -> list[tuple[int, str]]:
        """(1-based step, role) of every bad loss since the last call."""
        if step_count <= self.checked:
            return []
        bad: list[tuple[int, str]] = []
        finite = torch.isfinite(self.losses)
        # The one sync; under DDP one rank's NaN stops (or skips on) every rank alike.
        if dist.any_rank(not bool(finite.all()), self.losses.device):
            flags = finite.cpu()
            for step in range(self.checked + 1, step_count + 1):
                for r, role in enumerate(self.roles):
                    if not flags[(step - 1) % self.window, r]:
                        bad.append((step, role))
            self.losses.zero_()  # a role that skips steps (a GAN's G) must not report one twice
        self.checked = step_count
        return bad
