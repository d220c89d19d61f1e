"""Rerun the README's measured rows on the code that ships, and print them as the README's tables.

    DLRUN_DATA=../shared/datasets python benchmarks/readme_runs.py [--table defaults] [--force]

Each row is one `dlrun` command (whole process, in a fresh run folder) and the metrics.json keys
its README cell shows. Results are appended to benchmarks/results/readme_runs.jsonl with the
commit and the machine; a row already measured at this commit is skipped (so a long table can be
finished across sessions; --force measures again). Accuracies of seeded runs repeat exactly on
one machine (same CPU, same torch, same threads), not across machines: the machine is recorded
with each row. Add a row here when the README gains a measured one.
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import commit

RESULTS = Path(__file__).with_name("results") / "readme_runs.jsonl"
# table -> [(command after `dlrun`, metrics to show)]; `defaults` is the README's "Measured on
# real data with the defaults". The chapters' own tables (GANs, CycleGAN, distillation, metric
# learning, dense prediction, speed) are re-run by their benchmarks/ scripts and commands, each
# dated with its commit in the README.
FAST = "data=cifar10 data.train_subset=10000 trainer.max_epochs=5 trainer.val_every_n_epochs=5"
TABLES: dict[str, list[tuple[str, list[str]]]] = {
    "defaults": [
        ("model=lenet data=mnist trainer.max_epochs=2", ["val/acc", "test/acc", "time/train_s"]),
        ("model=lenet data=mnist trainer.max_epochs=2 model.activation=relu model.pool=max",
         ["val/acc", "test/acc", "time/train_s"]),
        ("model=mlp data=mnist optim=adam optim.lr=0.001 data.batch_size=64 trainer.max_epochs=1",
         ["val/acc", "test/acc", "time/train_s"]),
        ("model=lenet model.activation=relu model.pool=max data=cifar10 trainer.max_epochs=1",
         ["val/acc", "test/acc", "time/train_s"]),
        ("model=resnet18 data=cifar10 trainer.max_epochs=1 data.train_subset=10000",
         ["val/acc", "test/acc", "time/train_s"]),
        ("model=knn data=cifar10", ["val/acc", "test/acc", "time/train_s"]),
        ("model=knn data=mnist", ["val/acc", "test/acc", "time/train_s"]),
    ],
    # Issue 16: the weight average and mixing, same steps and seed, on a 10,000-image subset
    # (50 steps of 1,024), evaluated once at the end on the 10,000 test images.
    "ema_mix": [
        (f"experiment=cifar10_fast {FAST} trainer.ema.decay=0.99",
         ["val/acc", "val/acc_ema", "time/train_s"]),
        (f"experiment=cifar10_fast {FAST} data.mixup=0.2", ["val/acc", "time/train_s"]),
        (f"experiment=cifar10_fast {FAST} data.cutmix=1.0", ["val/acc", "time/train_s"]),
    ],
}  # fmt: skip


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def done_rows() -> list[dict]:
    if not RESULTS.is_file():
        return []
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]


def measure(command: str, keys: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "dlrun", *command.split(), "trainer.progress=false",
             f"hydra.run.dir={tmp}/run"], capture_output=True, text=True,
        )  # fmt: skip
        wall = time.perf_counter() - began
        if done.returncode:
            return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
        metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
    return {k: metrics.get(k) for k in keys} | {"wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--table", choices=sorted(TABLES), nargs="+", default=sorted(TABLES))
    parser.add_argument("--force", action="store_true", help="measure rows done at this commit")
    args = parser.parse_args()
    here, rows = commit(), done_rows()
    RESULTS.parent.mkdir(exist_ok=True)
    for table in args.table:
        print(f"\n{table}: | command | result | commit |\n| --- | --- | --- |")
        for command, keys in TABLES[table]:
            old = [r for r in rows if r["command"] == command and r["commit"] == here]
            if old and not args.force:
                row = old[-1]
            else:
                row = {"table": table, "command": command, "commit": here, "machine": machine(),
                       "date": time.strftime("%Y-%m-%d")} | measure(command, keys)  # fmt: skip
                with RESULTS.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            shown = ", ".join(f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else
                              f"{k}={row.get(k)}" for k in [*keys, "wall_s"] if k in row)  # fmt: skip
            print(
                f"| `dlrun {command}` | {row.get('error') or shown} | {row['commit']} |", flush=True
            )


if __name__ == "__main__":
    main()
