"""CPU threads: a run's share of the cores, set before anything is built and kept on resume.

CPU float reductions (a matmul's sums, a loss's mean) split their work by thread, so the thread
count changes the order of additions and the last bits of the results. A run therefore keeps one
count from start to end, resume included: the checkpoint stores it (`restore`).
"""

import logging
import os

import torch

from dlrun.errors import UserError

log = logging.getLogger("dlrun")
# Set by a launcher that runs several dlrun processes side by side (the parallel sweep launcher,
# hydra_plugins/dlrun_parallel_launcher): each process's share of the cores.
SHARE = "DLRUN_NUM_THREADS"
SLOT = "DLRUN_SLOT"  # "k/n": the parallel launcher's worker k of n runs this job (for the log)


def cores() -> int:
    """The cores this process may run on: its affinity mask (taskset, a cgroup's cpuset), which
    can be fewer than the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity call
        return os.cpu_count() or 1


def auto() -> tuple[int, str]:
    """trainer.num_threads=null: the cores, shared out among the processes started together; and
    why, for the log."""
    n_cores = cores()
    share = os.environ.get(SHARE, "").strip()
    if share:
        if not share.isdigit() or int(share) < 1:
            raise UserError(
                f"The environment variable {SHARE}={share!r} must be a whole number >= 1 (the "
                "threads of each dlrun process); unset it, or set trainer.num_threads=N."
            )
        jobs = os.environ.get(SLOT, "").partition("/")[2]
        if jobs:
            return int(share), f"auto: {n_cores} cores shared by {jobs} parallel jobs"
        return int(share), f"auto: {SHARE}={share}"
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    local_n = int(local) if local.isdigit() else 1
    if local_n > 1:  # torchrun: the processes of this node share its cores
        return max(1, n_cores // local_n), f"auto: {n_cores} cores / {local_n} processes (LOCAL_WORLD_SIZE)"
    return n_cores, f"auto: the {n_cores} cores this process may use"


def apply(configured: int | None) -> int:
    """Set torch's intra-op threads from trainer.num_threads (null: `auto`) and log them.

    Called before data and model are built; validate.check_config has refused values < 1.
    """
    n, why = auto() if configured is None else (int(configured), "trainer.num_threads")
    torch.set_num_threads(n)
    slot = os.environ.get(SLOT)
    if slot:  # a parallel sweep's job: which worker, which GPU it sees
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpu = "(unset: every GPU)" if gpu is None else gpu or "'' (no GPU)"
        log.info("parallel sweep: slot %s, CUDA_VISIBLE_DEVICES=%s", slot.replace("/", " of "), gpu)
    log.info("threads: %d (%s)", n, why)
    return n


def restore(stored: int | None, configured: int | None) -> None:
    """resume=true: the run's own thread count, which the checkpoint holds (`stored`).

    An explicit trainer.num_threads wins, with a warning when it differs (the run continues, not
    bit-exact); null takes the stored count. A checkpoint without one (an older dlrun) keeps this
    process's count.
    """
    if stored is None:
        return
    now = torch.get_num_threads()
    if configured is not None:
        if configured != stored:
            log.warning(
                "trainer.num_threads=%d, but the run used %d threads: CPU float sums now add up "
                "in another order, so the continued run is not bit-exact",
                configured,
                stored,
            )
        return
    if stored != now:
        torch.set_num_threads(stored)
        log.info("threads: %d, as the run used (auto would give %d here)", stored, now)
