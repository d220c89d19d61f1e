"""The worker processes of the parallel launcher, and the loop that hands them jobs.

Each worker is started (spawn: no CUDA state inherited) with its slot's environment, runs one job
at a time as Hydra's own launchers do (`_execute`), and sends back the job's JobReturn. The loop
gives a job only to an idle worker, so a slot's GPU never holds two jobs. Workers run in sessions
of their own: a Ctrl-C or SIGTERM reaches this process, which forwards it to the running jobs (they
checkpoint and stop) and starts no more. A worker that dies mid-job (killed, out of memory) leaves
failed.json in the job's folder, as dlrun does for a failed job, and is replaced.
"""

import contextlib
import importlib
import io
import json
import logging
import math
import multiprocessing
import os
import pickle
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from multiprocessing import connection
from multiprocessing.context import SpawnContext
from pathlib import Path
from types import FrameType
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, run_job, setup_globals
from hydra.errors import HydraException
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict
from omegaconf.basecontainer import BaseContainer

from dlrun.launch.sweep import FAILED  # a failed job's record, which the sweep summary reads
from hydra_plugins.dlrun_parallel_launcher.parallel_launcher import Slot

log = logging.getLogger(__name__)
Job = tuple[int, list[str]]  # (job number, its overrides)


# ----- in a worker ------------------------------------------------------------------------------
def work(conn: connection.Connection, payload: bytes) -> None:
    """A worker's life: jobs in, JobReturns out, until the launcher sends None or goes away."""
    os.setsid()  # terminal signals go to the launcher only; it forwards them to running jobs
    hydra_context, config, task, instances = pickle.loads(payload)
    task_function = _resolve(task)  # imports the app (torch with it) before saying ready
    conn.send_bytes(_dumps(("ready", None)))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the launcher is gone
            return
        if job is None:
            return
        try:
            msg = (
                "done",
                _execute(conn, *job, hydra_context, config, task_function, instances),
            )
        except BaseException as err:  # a stop signal (dlrun: a checkpoint was written): sweep ends
            msg = ("raised", err)
        conn.send_bytes(_dumps(msg))
        if msg[0] == "raised":
            return


def _execute(
    conn: connection.Connection,
    idx: int,
    overrides: list[str],
    hydra_context: HydraContext,
    config: DictConfig,
    task_function: TaskFunction,
    instances: dict[Any, Any],
) -> JobReturn:
    """One job, as hydra-joblib-launcher's execute_job runs it; the launcher hears its folder."""
    setup_globals()
    Singleton.set_state({"instances": instances, "omegaconf_resolvers": BaseContainer._resolvers})
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = idx  # as Hydra's basic launcher numbers them
        sweep_config.hydra.job.num = idx
    HydraConfig.instance().set_config(sweep_config)
    job_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
    conn.send_bytes(_dumps(("started", str(job_dir))))
    return run_job(
        hydra_context=hydra_context,
        task_function=task_function,
        config=sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )


# ----- what crosses between processes -----------------------------------------------------------
def _task_ref(fn: TaskFunction) -> Any:
    """How a worker finds the task function: @hydra.main's wrapper is what the module holds (so
    pickle cannot name `fn`), hence (module, name, unwrap) where that fits, else `fn` itself."""
    obj: Any = sys.modules.get(fn.__module__)
    for part in fn.__qualname__.split("."):
        obj = getattr(obj, part, None)
    if obj is fn or getattr(obj, "__wrapped__", None) is fn:
        return ("ref", fn.__module__, fn.__qualname__, obj is not fn)
    return fn


def _resolve(task: Any) -> TaskFunction:
    if not (isinstance(task, tuple) and task and task[0] == "ref"):
        return task
    _, module, qualname, unwrap = task
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj.__wrapped__ if unwrap else obj


class _Pickler(pickle.Pickler):
    """Exceptions by their class, args and attributes: one whose __init__ takes other arguments
    than its args (dlrun's Interrupted) would not unpickle the default way. Classes by name:
    Hydra's plugin scan runs plugin modules again in each job, so the structured-config classes
    in a job's config are no longer the ones their module holds, which pickle refuses."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, BaseException):
            return _rebuild, (type(obj), obj.args, dict(vars(obj)))
        if isinstance(obj, type) and obj.__module__ in sys.modules and "<" not in obj.__qualname__:
            return _class, (obj.__module__, obj.__qualname__)
        return NotImplemented


def _class(module: str, qualname: str) -> type:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _rebuild(cls: type[BaseException], args: tuple, state: dict[str, Any]) -> BaseException:
    err = cls.__new__(cls, *args)
    err.args = args
    vars(err).update(state)
    return err


def _dumps(obj: Any) -> bytes:
    """Pickled for the other side; what cannot be pickled (a job's odd exception) becomes text."""
    try:
        buf = io.BytesIO()
        _Pickler(buf).dump(obj)
        return buf.getvalue()
    except Exception as err:  # anything: a user's return value or exception
        kind, value = obj
        if isinstance(value, JobReturn):
            text = f"{type(value._return_value).__name__}: {value._return_value}"
            value = JobReturn(overrides=value.overrides, working_dir=value.working_dir,
                              task_name=value.task_name, status=JobStatus.FAILED,
                              _return_value=RuntimeError(text))  # fmt: skip
        else:
            value = RuntimeError(f"{type(value).__name__}: {value} (not picklable: {err})")
        return _dumps((kind, value))


# ----- in the launcher ----------------------------------------------------------------------------
class _Worker:
    """One worker process, the slot it holds and the job it runs."""

    def __init__(self, ctx: SpawnContext, slot: Slot, payload: bytes) -> None:
        self.slot = slot
        self.conn, child = ctx.Pipe()
        with _environ(slot.env()):  # the child's environment from its first instruction
            self.process = ctx.Process(
                target=work, args=(child, payload), name=f"dlrun-slot-{slot.index}"
            )
            self.process.start()
        child.close()
        self.ready = self.closed = False
        self.job: Job | None = None
        self.job_dir: Path | None = None

    def give(self, job: Job | None) -> None:
        self.job, self.job_dir = job, None
        self.closed = job is None
        with contextlib.suppress(OSError):  # died meanwhile: its sentinel tells
            self.conn.send(job)

    def receive(self) -> tuple[str, Any]:
        try:
            return pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError):
            return ("gone", None)

    def shutdown(self) -> None:
        if self.process.is_alive() and not self.closed:
            self.give(None)
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()  # SIGTERM: a dlrun job checkpoints and stops
            self.process.join(timeout=30)
        self.conn.close()


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Forward:
    """SIGINT/SIGTERM to the launcher: forwarded to the workers running a job; no new jobs."""

    def __init__(self, workers: list[_Worker]) -> None:
        self.workers, self.received = workers, None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_Forward":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        for w in self.workers:
            if w.job is not None and w.process.pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(w.process.pid, signum)

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def run(
    slots: Sequence[Slot],
    jobs: Sequence[Job],
    hydra_context: HydraContext,
    config: DictConfig,
    task_function: TaskFunction,
) -> list[JobReturn]:
    """Run `jobs` on one worker per slot; their JobReturns in job order."""
    # OmegaConf's resolvers are closures that pickle cannot send: a worker registers its own
    # (Hydra's in setup_globals, the app's when its module is imported) and keeps those.
    instances = Singleton.get_state()["instances"]
    payload = pickle.dumps((hydra_context, config, _task_ref(task_function), instances))
    ctx = multiprocessing.get_context("spawn")
    pending, results, raised = deque(jobs), {}, []
    workers = [_Worker(ctx, slot, payload) for slot in slots]
    stop = _Forward(workers)
    try:
        with stop:
            started = False  # the first jobs wait for every worker: job k starts on slot k
            while True:
                stopping = bool(raised) or stop.received is not None
                started = started or all(w.ready for w in workers)
                for w in workers if started else ():
                    if w.ready and w.job is None and not w.closed:
                        w.give(pending.popleft() if pending and not stopping else None)
                        if w.job is not None:
                            log.info("#%d on slot %d", w.job[0], w.slot.index)
                if not any(w.job for w in workers) and (stopping or not pending):
                    break
                waited = [w.conn for w in workers] + [w.process.sentinel for w in workers]
                ready = connection.wait(waited, timeout=1.0)
                for w in list(workers):
                    if w.conn in ready or w.process.sentinel in ready:
                        _handle(w, workers, results, raised, pending, stopping, ctx, payload)
    finally:
        for w in workers:
            w.shutdown()
    if raised:  # a stop signal: every interrupted job's message, then the first one's for dlrun
        for err in raised[1:]:
            log.error("%s", err)
        raise raised[0]
    if stop.received is not None:
        raise KeyboardInterrupt("")
    return [results[idx] for idx, _ in jobs]


def _handle(
    w: _Worker,
    workers: list[_Worker],
    results: dict[int, JobReturn],
    raised: list[BaseException],
    pending: deque,
    stopping: bool,
    ctx: SpawnContext,
    payload: bytes,
) -> None:
    """One message from a worker, or its end."""
    kind, value = w.receive() if not w.conn.closed else ("gone", None)
    if kind == "ready":
        w.ready = True
    elif kind == "started":
        w.job_dir = Path(value)
    elif kind == "done":
        results[w.job[0]] = value
        w.job = None
    elif kind == "raised":
        raised.append(value)
        w.job, w.closed = None, True
    else:  # its pipe closed: the process ended
        w.process.join(timeout=30)
        workers.remove(w)
        w.conn.close()
        if w.job is not None:
            results[w.job[0]] = _died(w)
        elif not w.ready and not w.closed and not stopping:
            raise HydraException(
                f"A worker process of the parallel launcher (slot {w.slot.index}) ended before "
                f"it could take a job (exit code {w.process.exitcode}); its error is above."
            )
        if pending and not (stopping or raised):
            workers.append(_Worker(ctx, w.slot, payload))


def _died(w: _Worker) -> JobReturn:
    """A job whose worker died: failed.json in its folder, as dlrun writes for a failed job."""
    assert w.job is not None
    idx, overrides = w.job
    code = w.process.exitcode or 0
    if code < 0:
        name = signal.Signals(-code).name
        why = f"was killed by {name}" + (
            " (the kernel's out-of-memory killer sends SIGKILL; lower data.batch_size or "
            "hydra.launcher.jobs)"
            if -code == signal.SIGKILL
            else ""
        )
        code = 128 - code
    else:
        why = f"exited with code {code}"
    message = f"The job's worker process (slot {w.slot.index}) {why} before the job ended."
    log.error("job #%d (%s) failed: %s", idx, " ".join(overrides), message)
    record = {"exit_code": code, "kind": "WorkerDied", "error": message, "overrides": overrides}
    if w.job_dir is not None:
        with contextlib.suppress(OSError):
            w.job_dir.mkdir(parents=True, exist_ok=True)
            (w.job_dir / FAILED).write_text(json.dumps(record, indent=2) + "\n")
    # NaN: a sweeper records a failed trial; dlrun's summary lists the job as failed.
    return JobReturn(
        overrides=overrides,
        working_dir=None if w.job_dir is None else str(w.job_dir),
        status=JobStatus.COMPLETED,
        _return_value=math.nan,
    )
