"""A sweep's jobs side by side on this machine: one per GPU when there are several, CPU processes
otherwise, each with its share of the cores (configs/hydra/launcher/parallel.yaml)."""

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, configure_log, filter_overrides, setup_globals
from hydra.errors import HydraException
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

log = logging.getLogger(__name__)
CPU_JOBS = 2  # jobs=auto without several GPUs: this many processes (fewer with fewer cores)


@dataclass(frozen=True)
class Slot:
    """One worker process: the k-th of n, what GPU it sees and how many threads it uses."""

    index: int
    of: int
    threads: int
    gpu: str | None  # its CUDA_VISIBLE_DEVICES; None: the launcher's own (unchanged)

    def env(self) -> dict[str, str]:
        """Its environment, set before it starts, so torch reads it when CUDA initialises."""
        # dlrun.launch.threads reads these (DLRUN_NUM_THREADS: trainer.num_threads=null's count).
        out = {"DLRUN_NUM_THREADS": str(self.threads), "DLRUN_SLOT": f"{self.index}/{self.of}"}
        if self.gpu is not None:
            out["CUDA_VISIBLE_DEVICES"] = self.gpu
        return out


def count_gpus() -> int:
    """The GPUs this process sees (CUDA_VISIBLE_DEVICES applies); NVML counts them where torch can,
    without creating a CUDA context here."""
    import torch  # here, not at the top: Hydra imports every plugin module at each start

    return torch.cuda.device_count()


def plan(
    jobs: Any,
    gpus: Any,
    n_jobs: int,
    cores: int,
    visible: str | None = None,
    gpu_count: Callable[[], int] = count_gpus,
) -> list[Slot]:
    """The worker slots for `n_jobs` jobs; `jobs` and `gpus` as configured (an int or "auto");
    `visible` is the launcher's CUDA_VISIBLE_DEVICES. A bad setting is a HydraException."""
    if gpus == "auto":
        gpus = gpu_count()
    else:
        gpus = _setting("gpus", gpus, 0, "hydra.launcher.gpus=2")
        if gpus > 1 and gpus > (seen := gpu_count()):  # a job given a GPU that is not there
            log.warning(
                "hydra.launcher.gpus=%d, but torch sees %d GPU(s) here: a job whose GPU is "
                "missing finds none (device=auto: the CPU; device=cuda: an error)", gpus, seen
            )  # fmt: skip
    if jobs == "auto":
        jobs = gpus if gpus > 1 else min(CPU_JOBS, cores)
    jobs = _setting("jobs", jobs, 1, "hydra.launcher.jobs=4")
    if gpus > 1 and jobs > gpus:
        raise HydraException(
            f"hydra.launcher.jobs={jobs} with hydra.launcher.gpus={gpus}: the parallel launcher "
            f"runs one job per GPU, so at most {gpus} at once. Lower hydra.launcher.jobs, or run "
            "the jobs as CPU processes with hydra.launcher.gpus=0."
        )
    n = max(1, min(jobs, n_jobs))  # no idle workers: more threads each instead
    names = [v.strip() for v in visible.split(",")] if visible else []
    if gpus > 1:  # slot k sees only the k-th GPU (as cuda:0)
        gpu_of = [names[k] if k < len(names) else str(k) for k in range(n)]
    else:  # 0: no GPU at all; 1: the jobs share it
        gpu_of = ["" if gpus == 0 else None] * n
    return [Slot(k, n, max(1, cores // n), gpu_of[k]) for k in range(n)]


def _setting(key: str, value: Any, low: int, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise HydraException(
            f"hydra.launcher.{key} must be auto or an integer >= {low}, got {value!r}; e.g. "
            f"{example}."
        )
    return value


def cores() -> int:
    """The cores this process may use (as dlrun.launch.threads counts them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class ParallelLauncher(Launcher):
    """Runs a batch of jobs in worker processes, one per slot (see `plan`)."""

    def __init__(self, jobs: Any = "auto", gpus: Any = "auto") -> None:
        self.jobs, self.gpus = jobs, gpus
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from hydra_plugins.dlrun_parallel_launcher import _pool

        assert self.config is not None and self.hydra_context is not None
        assert self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        n_cores = cores()
        slots = plan(
            self.jobs,
            self.gpus,
            len(job_overrides),
            n_cores,
            os.environ.get("CUDA_VISIBLE_DEVICES"),
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        gpus = {s.gpu for s in slots}
        seen = (
            "one GPU each" if len(gpus) == len(slots) and None not in gpus and "" not in gpus
            else "no GPU" if gpus == {""} else "the GPUs as launched"
        )  # fmt: skip
        log.info(
            "Launching %d jobs, %d at a time (%s, %d of %d cores each), sweep output dir: %s",
            len(job_overrides), len(slots), seen, slots[0].threads, n_cores, sweep_dir,
        )  # fmt: skip
        jobs = []
        for k, overrides in enumerate(job_overrides):
            log.info("\t#%d : %s", initial_job_idx + k, " ".join(filter_overrides(overrides)))
            jobs.append((initial_job_idx + k, list(overrides)))
        return _pool.run(slots, jobs, self.hydra_context, self.config, self.task_function)
