"""Sweeps that survive a bad trial: a failed job is recorded in its folder, the sweep goes on."""

import csv
import hashlib
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dlrun.engine import dist
from dlrun.errors import UserError

log = logging.getLogger("dlrun")
FAILED = "failed.json"  # in a failed job's folder: its exit code, error and overrides
SUMMARY = "summary"  # <sweep>/summary.csv and summary.md: every job's overrides, status, metrics
SHOWN = ("val/", "test/")  # the metrics a summary lists, besides step and training time
PRUNED = "pruned.json"  # in a trial's folder that the sweeper's pruner stopped early
TRIAL_HOOK = "DLRUN_TRIAL_HOOK"  # module:Class of a hook a sweeper runs in each of its jobs


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def first_in_sweep(message: str) -> bool:
    """Whether this job gives `message` (a warning): outside a sweep always; in one (`dlrun -m`),
    only the first job to ask, on its main process. The record is a file in the sweep folder
    (hydra.sweep.dir), `.warned-<hash of message>`, created exclusively (O_EXCL): that holds for
    jobs in one process (Hydra's basic launcher) and in many (joblib, submitit's jobs on a shared
    file system) alike, where a flag in memory would not; it also holds the message."""
    if not in_multirun():
        return True
    if not dist.is_main():  # torchrun: rank 0's log is the job's
        return False
    digest = hashlib.sha1(message.encode()).hexdigest()[:12]
    marker = Path(HydraConfig.get().sweep.dir) / f".warned-{digest}"
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        with marker.open("x") as f:
            f.write(message + "\n")
    except FileExistsError:
        return False
    except OSError:  # no record possible: warn rather than stay silent
        return True
    return True


def trial_hooks() -> list[Any]:
    """The hook a sweeper asks each job to run (dlrun's Optuna sweeper: its pruning), named by
    DLRUN_TRIAL_HOOK=module:Class, which the sweeper sets per job (hydra.job.env_set), so that it
    reaches a job in another process or on another node; built without arguments."""
    spec = os.environ.get(TRIAL_HOOK)
    if not spec or not in_multirun():
        return []
    module, _, name = spec.partition(":")
    return [getattr(importlib.import_module(module), name)()]


def record_failure(run_dir: Path, err: UserError) -> None:
    """Write <job>/failed.json; the job's log line says the same."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    record = {"exit_code": err.exit_code, "kind": type(err).__name__, "error": str(err),
              "overrides": overrides}  # fmt: skip
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / FAILED).write_text(json.dumps(record, indent=2) + "\n")
    except OSError as os_err:  # the sweep goes on; the summary then lacks this job's reason
        log.warning("could not record the failure in %s: %s", run_dir, os_err)
    log.error("job %s failed (exit code %d): %s", " ".join(overrides), err.exit_code, err)


def _job_name(folder: Path) -> str:
    """A job as summaries name it: its number."""
    return str(job_number(folder.name))


def failures(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every failed.json under a sweep folder, in job order."""
    found = []
    for path in sorted(sweep_dir.glob(f"*/{FAILED}"), key=lambda p: _job_number(p.parent.name)):
        try:
            found.append(json.loads(path.read_text()) | {"job": _job_name(path.parent)})
        except (OSError, ValueError):
            found.append({"job": _job_name(path.parent), "exit_code": -1, "error": "unreadable record"})
    return found


SUBDIR_CHARS = 120  # a job folder's name: its number, then its overrides cut to this many


def subdir(num: int | str, overrides: str = "") -> str:
    """A sweep job's folder name: `<num>_<overrides>` (Hydra's override_dirname, a `/` in a value
    made `_`, cut to SUBDIR_CHARS), so TensorBoard's HParams tab names each trial by what it
    varies; the number alone when there are none. The number comes first: it orders the jobs."""
    name = str(overrides).replace("/", "_").replace("\\", "_")
    if len(name) > SUBDIR_CHARS:
        name = name[: SUBDIR_CHARS - 3] + "..."
    return f"{num}_{name}" if name else str(num)


OmegaConf.register_new_resolver("sweep_subdir", subdir, replace=True)


def job_number(name: str) -> int | None:
    """The job number a sweep job's folder name starts with; None for any other folder."""
    head = name.split("_", 1)[0]
    return int(head) if head.isdigit() else None


def job_folders(sweep_dir: Path) -> list[Path]:
    """A sweep's job folders, in job order."""
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and job_number(p.name) is not None]
    return sorted(jobs, key=lambda p: job_number(p.name) or 0)


def job_folder(sweep_dir: Path, num: int) -> Path:
    """Job `num`'s folder (whatever its overrides made its name)."""
    found = [p for p in job_folders(sweep_dir) if job_number(p.name) == num]
    if not found:
        raise FileNotFoundError(f"no folder of job {num} in {sweep_dir}")
    return found[0]


def _job_number(name: str) -> int:
    number = job_number(name)
    return number if number is not None else 1 << 30


def _overrides(job: Path) -> list[str]:
    """A job's command-line overrides, from the .hydra/overrides.yaml dlrun wrote."""
    try:
        return [str(o) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())]
    except (OSError, yaml.YAMLError, TypeError):
        return []


def summary_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder: job, overrides, status (ok | failed (exit N) | incomplete), the
    monitor's value, step, training seconds and every val/ and test/ metric of metrics.json."""
    failed = {f["job"]: f for f in failures(sweep_dir)}
    rows = []
    for job in job_folders(sweep_dir):
        row: dict[str, Any] = {"job": _job_name(job)}
        record = failed.get(row["job"])
        row["overrides"] = " ".join(record["overrides"] if record else _overrides(job))
        try:
            metrics = json.loads((job / "metrics.json").read_text())
        except (OSError, ValueError):
            metrics = {}
        if record:
            row["status"] = f"failed (exit {record.get('exit_code')})"
        else:
            row["status"] = "ok" if metrics else "incomplete"
            if metrics and (job / PRUNED).exists():  # stopped early by the Optuna pruner
                row["status"] = "pruned"
        row["step"] = metrics.get("step")
        row["time/train_s"] = metrics.get("time/train_s")
        row |= {k: v for k, v in sorted(metrics.items()) if k.startswith(SHOWN)}
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path) -> tuple[Path, Path]:
    """<sweep>/summary.csv and summary.md from the job folders (rewritten whole each time)."""
    rows = summary_rows(sweep_dir)
    columns = ["job", "overrides", "status", "step", "time/train_s"]
    columns += sorted({k for r in rows for k in r} - set(columns))
    csv_path, md_path = sweep_dir / f"{SUMMARY}.csv", sweep_dir / f"{SUMMARY}.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    cell = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    md_path.write_text(f"# Sweep {sweep_dir}\n\n" + "\n".join(lines) + "\n")
    return csv_path, md_path


class SweepSummary(Callback):
    """At the end of `dlrun -m`: summary.csv and summary.md at the sweep folder's top, and which
    jobs failed and why, one line each (stderr)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            try:
                csv_path, _ = write_summary(sweep_dir)
                log.info("sweep summary: %s (and summary.md)", csv_path)
            except OSError as err:  # the jobs ran; only the summary is missing
                log.warning("could not write the sweep summary in %s: %s", sweep_dir, err)
        failed = failures(sweep_dir)
        if not failed:
            return
        jobs = len(job_folders(sweep_dir))
        lines = [f"dlrun: sweep {sweep_dir}: {len(failed)} of {jobs} job(s) failed:"]
        for f in failed:
            first = str(f.get("error", "")).split(". ")[0]
            lines.append(
                f"  job {f['job']} ({' '.join(f.get('overrides', []))}): exit {f['exit_code']}, "
                f"{first}"
            )
        print("\n".join(lines), file=sys.stderr)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """Nothing: failures are recorded where they happen (record_failure)."""
