"""`logger=csv`: <run>/metrics.csv, every logged scalar as one row `step,tag,value` (long format).

Long, not one column per tag: a tag first logged late (val/* after the first epoch, test/* at the
end, a hook's metric) needs no new column, so the file is only ever appended to, a crash leaves
every row before it, and a resumed run continues the same file. One line of pandas makes it wide:
`pd.read_csv(f).pivot_table(index="step", columns="tag", values="value", aggfunc="last")`.
"""

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dlrun.engine.loggers.fanout import Logger, RunInfo

HEADER = ["step", "tag", "value"]


class CsvLogger(Logger):
    def __init__(self, file: str = "metrics.csv") -> None:
        self.file = file
        self.path: Path | None = None
        self.handle: Any = None

    def start(self, run: RunInfo, step: int, state: Mapping[str, Any]) -> None:
        self.path = run.run_dir / self.file
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file() and step > 0:
            # resume: drop the rows a killed run wrote after its checkpoint (as TensorBoard's
            # purge_step does), so that every step's rows are there once
            with self.path.open(newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
            keep = [r for r in rows if len(r) == 3 and r[0].isdigit() and int(r[0]) <= step]
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerows([HEADER, *keep])
        elif not self.path.is_file() or step == 0:
            self.path.write_text(",".join(HEADER) + "\n")
        self.handle = self.path.open("a", newline="")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.handle is None:
            return
        csv.writer(self.handle).writerows([step, tag, repr(float(v))] for tag, v in metrics.items())
        self.handle.flush()

    def finalize(self, metrics: Mapping[str, float], status: str) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
