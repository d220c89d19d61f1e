"""`logger=mlflow` (pip install 'dlrun[mlflow]'): one MLflow run per dlrun run, through MlflowClient
(no global active run, so sweep jobs in one process never mix).

The flattened config as params, every scalar with its step, the final metrics, tags for the run
folder and the source commit. Tracking URI: `logger.mlflow.tracking_uri`, else MLflow's own
MLFLOW_TRACKING_URI, else sqlite:///<outputs>/mlflow.db (offline; `mlflow ui --backend-store-uri`
opens it). resume=true continues the same MLflow run (its id is in the checkpoint); every job of a
sweep is one run of the sweep's experiment.
"""

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from dlrun.engine.checkpoint import flatten
from dlrun.engine.loggers.fanout import Logger, RunInfo, need

log = logging.getLogger("dlrun")
BATCH = 100  # params per log_batch call (MLflow's limit); metrics go 1000 at a time
MAX_PARAM = 6000  # characters of a param's value MLflow stores


class MlflowLogger(Logger):
    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None) -> None:
        need("mlflow", "mlflow", "logger=mlflow")
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.client: Any = None
        self.run_id: str | None = None
        self.uri = ""
        self.logged: set[str] = set()

    def _uri(self, run: RunInfo) -> tuple[str, str | None]:
        """The tracking URI, and the artifact folder of a new experiment (the default database's
        neighbour; None: the server's own)."""
        if self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
            return str(self.tracking_uri or os.environ["MLFLOW_TRACKING_URI"]), None
        run.outputs.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{run.outputs / 'mlflow.db'}", (run.outputs / "mlartifacts").as_uri()

    def start(self, run: RunInfo, step: int, state: Mapping[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
            logging.getLogger(name).setLevel(logging.WARNING)  # the database's migrations
        self.uri, artifacts = self._uri(run)
        self.client = MlflowClient(tracking_uri=self.uri)
        if state.get("run_id") and state.get("tracking_uri", self.uri) == self.uri:
            try:
                self.client.update_run(state["run_id"], status="RUNNING")
                self.run_id = str(state["run_id"])
                self.logged = set(self.client.get_run(self.run_id).data.metrics)
                log.info("logger.mlflow: continuing run %s at %s", self.run_id, self.uri)
                return
            except Exception as err:  # the database moved or was cleared: a new run says so
                log.warning("logger.mlflow: run %s not found at %s (%s); starting a new run",
                            state["run_id"], self.uri, err)  # fmt: skip
        name = self.experiment or run.experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                exp_id = self.client.create_experiment(name, artifact_location=artifacts)
            except Exception:  # another job of the sweep created it first
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
                exp_id = experiment.experiment_id
        else:
            exp_id = experiment.experiment_id
        tags = {
            "dlrun.run_dir": str(run.run_dir),
            "dlrun.commit": run.commit,
            "mlflow.source.name": "dlrun",
        }
        if len(run.commit) == 40:  # a git revision: MLflow's UI shows it on the run's page
            tags["mlflow.source.git.commit"] = run.commit
        if run.sweep:
            tags["dlrun.sweep"] = run.sweep
        created = self.client.create_run(exp_id, run_name=run.run_dir.name, tags=tags)
        self.run_id = created.info.run_id
        log.info("logger.mlflow: run %s in experiment '%s' at %s", self.run_id, name, self.uri)

    def log_params(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(dict(config))
        params = [Param(str(k), str(v)[:MAX_PARAM]) for k, v in flat.items()]
        for i in range(0, len(params), BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(str(k), float(v), now, int(step)) for k, v in metrics.items()]
        self.logged |= set(metrics)
        for i in range(0, len(rows), 1000):
            self.client.log_batch(self.run_id, metrics=rows[i : i + 1000])

    def finalize(self, metrics: Mapping[str, float], status: str) -> None:
        """The final metrics that no step logged (params, flops, step, training time); the
        others' last points are their final values already. Then the run's status."""
        if self.run_id is None:
            return
        final = {k: v for k, v in metrics.items() if k not in self.logged}
        if final:
            self.log_metrics(final, int(metrics.get("step", 0)))
        self.client.set_terminated(self.run_id, status=status)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.uri} if self.run_id else {}
