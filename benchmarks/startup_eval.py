"""Start-up (from `dlrun` to the first training step) and a full-split evaluation, old code vs new.

    DLRUN_DATA=../shared/datasets python benchmarks/startup_eval.py --code /tmp/before . --rounds 3

Each `--code DIR` is a dlrun checkout (e.g. a `git worktree` of an older commit); its `dlrun`
runs as the console script does (`dlrun.entry:main`) with PYTHONPATH=DIR, a fresh process per measurement, the
checkouts alternating in every round; medians over the rounds.

- start-up: `dlrun model=resnet18 data=cifar10 trainer.max_steps=1 trainer.log_every_n_steps=1`
  (the data cache already filled by a first, untimed run): the seconds from starting the process to
  the TensorBoard event of step 1 (`train/lr`, written as that step ends), and the step's own share
  is not taken out: "the first step done" (its evaluation, after the timed part, on 10 images only).
  Imports alone: `python -c "import dlrun.entry"` timed
  the same way.
- evaluation: `dlrun mode=eval ckpt=<a ResNet-18 checkpoint> trainer.num_threads=1` on the 10,000
  CIFAR-10 test images, as a new user's first `mode=eval` on a laptop CPU runs it; the seconds of
  the evaluation itself, from the log's timestamps ("evaluating" start to the test/* line), and the
  whole process's wall time. The checkpoint is trained here for 20 steps by the last --code
  (its accuracy is beside the point: every checkout scores the same weights).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ENTRY = "import sys; from dlrun.entry import main; sys.argv[0] = 'dlrun'; sys.exit(main())"
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def dlrun(code: Path, args: list[str], cwd: Path, threads: int | None = None) -> tuple[float, str]:
    """Run dlrun from checkout `code`; (wall seconds, its merged output)."""
    env = dict(os.environ, PYTHONPATH=str(code.resolve()), PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.time()
    out = subprocess.run([sys.executable, "-c", ENTRY, *args], cwd=cwd, env=env,
                         capture_output=True, text=True)  # fmt: skip
    wall = time.time() - start
    if out.returncode != 0:
        raise RuntimeError(f"dlrun {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return wall, out.stdout + out.stderr


def first_step_time(run_dir: Path) -> float:
    """The wall time of the event of step 1 (train/lr: the loop writes it as each logged step ends)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for path in sorted(run_dir.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if event.step == 1 and any(v.tag == "train/lr" for v in event.summary.value):
                return event.wall_time
    raise RuntimeError(f"no train/lr event at step 1 under {run_dir}")


def startup(code: Path, work: Path, tag: str) -> float:
    run_dir = work / f"startup_{tag}_{time.time_ns()}"
    start = time.time()
    dlrun(code, ["model=resnet18", "data=cifar10", "trainer.max_steps=1",
                 "trainer.log_every_n_steps=1", "trainer.progress=false", "data.eval_subset=10",
                 f"hydra.run.dir={run_dir}"], work)  # fmt: skip
    return first_step_time(run_dir) - start


def imports(code: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(code.resolve()))
    start = time.time()
    subprocess.run([sys.executable, "-c", "import dlrun.entry"], env=env, check=True)
    return time.time() - start


def evaluation(code: Path, ckpt: Path, work: Path) -> tuple[float, float]:
    """(seconds of the evaluation from the log's timestamps, the process's wall seconds)."""
    wall, text = dlrun(code, ["mode=eval", f"ckpt={ckpt}", "trainer.num_threads=1",
                              "trainer.progress=false"], work)  # fmt: skip
    stamps = [(m.group(1), line) for line in text.splitlines() if (m := STAMP.match(line))]
    begin = next(s for s, line in stamps if "evaluating" in line or "decoding" in line)
    end = next(s for s, line in stamps if "test/acc=" in line)

    def at(s: str) -> float:
        return datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp()

    return at(end) - at(begin), wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--code", nargs="+", type=Path, required=True, help="dlrun checkouts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-eval", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="startup_eval_"))
    ckpt_run = work / "ckpt"
    dlrun(args.code[-1], ["model=resnet18", "data=cifar10", "trainer.max_steps=20",
                          "data.train_subset=2560", "trainer.progress=false",
                          f"hydra.run.dir={ckpt_run}"], work)  # fmt: skip
    ckpt = ckpt_run / "checkpoints" / "last.pt"
    for code in args.code:  # untimed: fills each checkout's data cache, warms the file cache
        startup(code, work, "warm")
    results: dict[str, dict[str, list[float]]] = {
        str(c): {"imports": [], "startup": [], "eval": [], "eval_wall": []} for c in args.code
    }
    for r in range(args.rounds):
        order = args.code if r % 2 == 0 else list(reversed(args.code))
        for code in order:
            row = results[str(code)]
            row["imports"].append(imports(code))
            row["startup"].append(startup(code, work, str(r)))
            if not args.skip_eval:
                seconds, wall = evaluation(code, ckpt, work)
                row["eval"].append(seconds)
                row["eval_wall"].append(wall)
            print(json.dumps({"round": r + 1, "code": str(code),
                              **{k: v[-1] for k, v in row.items() if v}}), flush=True)  # fmt: skip
    print("\n| checkout | imports s | to the first step done s | eval of 10,000 test images s "
          "(process wall s) |\n| --- | --- | --- | --- |")
    for code, row in results.items():
        med = {k: statistics.median(v) if v else float("nan") for k, v in row.items()}
        print(f"| {code} | {med['imports']:.2f} | {med['startup']:.2f} | {med['eval']:.1f} "
              f"({med['eval_wall']:.1f}) |")  # fmt: skip


if __name__ == "__main__":
    main()
