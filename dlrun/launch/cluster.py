"""Runs inside a submitit job (hydra/launcher=slurm): its warning signal, its requeue, its ranks.

SLURM sends a signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise) some time before the
job's limit, and SIGTERM on a preemption. submitit's own handler would requeue at once, in the
middle of a step, losing everything since the last checkpoint; dlrun's StopSignals takes the
signal first (`stop_signals`), finishes the step, writes the checkpoint, and then `after_stop`
hands it back to submitit, which pickles the resumable submission and requeues it.
"""

import logging
import os
import signal

log = logging.getLogger(__name__)


def in_job() -> bool:
    """True inside a job that submitit started (SLURM, or its local executor)."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def preempt_signal() -> signal.Signals | None:
    """The signal submitit asked SLURM to send before the time limit, inside such a job."""
    if not in_job():
        return None
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, f"SIG{name}", None)


def stop_signals() -> tuple[int, ...]:
    """What StopSignals turns into 'checkpoint, then stop': SIGTERM, SIGINT, and the preemption
    warning inside a submitit job."""
    extra = preempt_signal()
    return (signal.SIGTERM, signal.SIGINT) + ((extra,) if extra is not None else ())


def after_stop(signum: int) -> None:
    """The checkpoint is written: let submitit requeue (its warning signal) or prepare to be
    requeued by SLURM (SIGTERM of a preemption: the pickled job then resumes).

    The warning signal is raised again now that dlrun's handler is gone: submitit's handler
    calls the launcher's checkpoint() (which adds resume=true), saves that submission, requeues
    the job and exits the process.
    """
    if not in_job():
        return
    if signum == preempt_signal():
        log.warning("requeueing the job: it resumes from this checkpoint")
        signal.raise_signal(signum)
    elif signum == signal.SIGTERM:
        _save_resumable_submission()


def _save_resumable_submission() -> None:
    from submitit import JobEnvironment
    from submitit.core.job_environment import _checkpoint
    from submitit.core.utils import DelayedSubmission

    env = JobEnvironment()
    if env.global_rank != 0:
        return
    path = env.paths.submitted_pickle
    delayed = DelayedSubmission.load(path)
    if hasattr(delayed.function, "checkpoint"):
        _checkpoint(delayed, path, delayed._timeout_countdown)
        log.warning("saved the job's resumable submission: if SLURM requeues it, it resumes")


def export_torch_env() -> None:
    """Several tasks in one submitit job (tasks_per_node > 1 or nodes > 1): the RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT that torchrun would set, from SLURM's variables."""
    if not in_job():
        return
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks > 1 and "WORLD_SIZE" not in os.environ:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
