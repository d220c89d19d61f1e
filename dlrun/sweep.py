"""Sweeps that survive a bad trial: a failed job is recorded in its folder, the sweep goes on."""

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from dlrun.errors import UserError

log = logging.getLogger("dlrun")
FAILED = "failed.json"  # in a failed job's folder: its exit code, error and overrides


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


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


def failures(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every failed.json under a sweep folder, in job order."""
    found = []
    for path in sorted(sweep_dir.glob(f"*/{FAILED}"), key=lambda p: _job_number(p.parent.name)):
        try:
            found.append(json.loads(path.read_text()) | {"job": path.parent.name})
        except (OSError, ValueError):
            found.append({"job": path.parent.name, "exit_code": -1, "error": "unreadable record"})
    return found


def _job_number(name: str) -> int:
    return int(name) if name.isdigit() else 1 << 30


class SweepSummary(Callback):
    """At the end of `dlrun -m`: which jobs failed and why, one line each (stderr)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = failures(sweep_dir)
        if not failed:
            return
        jobs = len([p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()])
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
