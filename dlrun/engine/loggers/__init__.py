"""Where a run's scalars go besides TensorBoard: the `logger` config group (docs/loggers.md).

`logger=[tensorboard,csv,mlflow,wandb]` picks several; each entry builds a `Logger`
(`logger.<name>._target_`), and `Loggers`, one hook, feeds them all from the places that feed
TensorBoard (run_logger.py: the header, every log window, every logged scalar), on rank 0 only,
and keeps their state (an MLflow or W&B run id) in the checkpoint under `"hooks"/"loggers"`.
"""

from dlrun.engine.loggers.csv_file import CsvLogger
from dlrun.engine.loggers.fanout import Logger, Loggers, RunInfo, build
from dlrun.engine.loggers.mlflow_run import MlflowLogger
from dlrun.engine.loggers.wandb_run import WandbLogger

__all__ = [
    "CsvLogger", "Logger", "Loggers", "MlflowLogger", "RunInfo", "WandbLogger", "build"
]  # fmt: skip
