"""data.in_memory=true vs false on CIFAR-10's PNG folders: accuracy over seeds, and the time of both.

    DLRUN_DATA=../shared/datasets python benchmarks/in_memory_vs_streaming.py [--seeds 0 1 2]

Each seed trains a LeNet-5 for one epoch both ways (alternating, in-memory first), as whole
`dlrun` processes. The in-memory path's decode cache is warmed first (its one-off decode is not
what is compared). Prints each run's test accuracy, `time/train_s` and wall seconds, the two
means and standard deviations, and whether the streamed mean lies within two pooled standard
deviations of the in-memory one.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARGS = ["model=lenet", "data=cifar10", "trainer.max_epochs=1", "trainer.progress=false", "data.val_split=0",
        "device=cpu"]  # fmt: skip
PATHS = {"in memory": ["data.in_memory=true"],
         "streamed": ["data.in_memory=false", "data.num_workers=2"]}  # fmt: skip


def dlrun(*args: str, out: Path) -> tuple[dict, float]:
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "dlrun", *ARGS, *args, f"hydra.run.dir={out}"],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode:
        sys.exit(f"dlrun failed:\n{done.stderr[-2000:]}")
    return json.loads((out / "metrics.json").read_text()), time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    seeds = parser.parse_args().seeds
    with tempfile.TemporaryDirectory() as tmp:
        dlrun("data.in_memory=true", "trainer.max_steps=1", out=Path(tmp) / "warm")  # the cache
        rows = []
        for seed in seeds:
            for name, extra in PATHS.items():
                m, wall = dlrun(*extra, f"seed={seed}", out=Path(tmp) / f"{name}_{seed}")
                rows.append((name, seed, m["val/acc"], m["time/train_s"], wall))
                print(f"{name:10s} seed {seed}: test acc {m['val/acc']:.4f}, "
                      f"train {m['time/train_s']:.1f} s, wall {wall:.1f} s", flush=True)  # fmt: skip
    print("\n| path | seeds | test acc, mean ± sd | time/train_s, median | wall s, median |")
    print("| --- | --- | --- | --- | --- |")
    acc = {}
    for name in PATHS:
        mine = [r for r in rows if r[0] == name]
        acc[name] = [r[2] for r in mine]
        sd = statistics.stdev(acc[name]) if len(mine) > 1 else 0.0
        print(f"| {name} | {len(mine)} | {statistics.mean(acc[name]):.4f} ± {sd:.4f} | "
              f"{statistics.median(r[3] for r in mine):.1f} | "
              f"{statistics.median(r[4] for r in mine):.1f} |")  # fmt: skip
    if len(seeds) > 1:
        a, b = acc["in memory"], acc["streamed"]
        pooled = ((statistics.variance(a) + statistics.variance(b)) / 2) ** 0.5
        gap = abs(statistics.mean(a) - statistics.mean(b))
        print(
            f"\n|mean difference| {gap:.4f} vs two pooled sd {2 * pooled:.4f}: "
            f"{'within' if gap <= 2 * pooled else 'OUTSIDE'}"
        )


if __name__ == "__main__":
    main()
