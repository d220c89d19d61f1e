"""fp32 vs bf16 training, side by side, one row per task family: final metric and time per step.

    DLRUN_DATA=../shared/datasets python benchmarks/precision_parity.py               # every row, 3 seeds
    DLRUN_DATA=../shared/datasets python benchmarks/precision_parity.py --rows lenet_mnist --seeds 3
    DLRUN_DATA=../shared/datasets python benchmarks/precision_parity.py --rows cyclegan_h2z64 \\
        --train-domain-ckpt                 # trains the horse/zebra classifier first (docs/gans.md)
    taskset -c 1 env OMP_NUM_THREADS=1 DLRUN_DATA=../shared/datasets \\
        python benchmarks/precision_parity.py --smoke --train-domain-ckpt   # every row, tiny, 1 seed

The method (issue 33). Each row is a dlrun command (a title, its overrides, the metric read from
the run's metrics.json and whether higher is better). For seed s in 0..N-1 the row runs twice,
`trainer.precision=fp32` and `trainer.precision=bf16` (autocast), in alternating order (even seeds
fp32 first, odd seeds bf16 first: drift on a shared machine hits both alike), each as a fresh
`python -m dlrun` process with nothing else changed:

    dlrun <overrides> seed=<s> trainer.precision=<p> trainer.progress=false \\
          hydra.run.dir=<out-dir>/<row>/<p>_s<s>

From each run's metrics.json: the metric, `time/train_s` (training only: set-up and evaluation
excluded) and `step`; time per step = time/train_s / step. Per row and precision: the metric's
mean, its spread (max - min) / 2 and the values, and the median time per step. The verdict:
"parity" when |bf16 mean - fp32 mean| <= the larger of the two spreads, or bf16 is better;
"worse" otherwise; ", slower" is added when the bf16 / fp32 time ratio is above 1.0. A run that
fails is a finding: its log's last lines are printed and recorded, and the row goes on.

Runs are kept (--out-dir, default /work/runs/parity): a run whose folder already holds a
metrics.json is read, not run again, so the script can be stopped and started again (a folder
without one, a run stopped midway, is moved aside to <folder>.incomplete<N>); a kept run made
with other overrides stops the script (use another --out-dir). Every run made is appended to
the JSONL file (--out) with the commit, date, machine and thread count. The console shows one
summary line per row as it ends and a Markdown table at the end.

--smoke: every row with tiny sizes (3 steps, small subsets and scene counts, 1 seed) into
<out-dir>_smoke and its own JSONL there: it checks that every command runs and that its metric
key exists, and measures nothing. --set KEY=VALUE ... adds (or replaces) overrides of every run.
Rows needing a checkpoint: dcgan_mnist scores its FID on a LeNet MNIST classifier (--digit-ckpt);
cyclegan_h2z64 scores translations with a horse/zebra classifier (--domain-ckpt, or
--train-domain-ckpt: `dlrun model=resnet18 model.variant=imagenet data=horse2zebra_domains
data.image_size=64 optim.lr=0.002 trainer.max_epochs=15`, as docs/gans.md, into
<out-dir>/domain_classifier, its best.pt); without one the row is skipped with a note.
"""

import argparse
import datetime
import difflib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import commit

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("results") / "precision_parity.jsonl"
OUT_DIR = Path("/work/runs/parity")
DIGIT_CKPT = Path("/work/runs/road/lenet/checkpoints/best.pt")
PRECISIONS = ("fp32", "bf16")
# The horse/zebra classifier of docs/gans.md ("Measured: horse2zebra at 64 px on the CPU").
DOMAIN_CLASSIFIER = (
    "model=resnet18", "model.variant=imagenet", "data=horse2zebra_domains", "data.image_size=64",
    "optim.lr=0.002", "trainer.max_epochs=15",
)  # fmt: skip
DOMAIN_SMOKE = ("trainer.max_steps=3", "data.train_subset=64")


@dataclass(frozen=True)
class Row:
    title: str
    overrides: tuple[str, ...]
    metric: str  # the key of the run's metrics.json
    higher_better: bool
    smoke: tuple[str, ...]  # --smoke: overrides that replace or join `overrides`
    # a checkpoint the row needs: (the override key it is given as, the flag that names it)
    ckpt: tuple[str, str] | None = None
    notes: str = field(default="")


ROWS: dict[str, Row] = {
    "lenet_mnist": Row(
        "LeNet-5, MNIST, 1 epoch",
        ("model=lenet", "data=mnist", "trainer.max_epochs=1"),
        "test/acc", True,
        ("trainer.max_steps=3", "data.train_subset=512", "data.eval_subset=500"),
    ),
    "resnet18_cifar": Row(
        "ResNet-18, CIFAR-10 (2,500 train images), 2 epochs",
        ("model=resnet18", "data=cifar10", "data.train_subset=2500", "data.eval_subset=2000",
         "trainer.max_epochs=2", "data.batch_size=128"),
        "test/acc", True,
        ("trainer.max_steps=3", "data.train_subset=256", "data.eval_subset=200",
         "data.batch_size=32"),
    ),  # fmt: skip
    "dcgan_mnist": Row(
        "DCGAN, MNIST, 200 steps, FID on a LeNet's features",
        ("model=dcgan", "data=mnist", "trainer.max_steps=200", "metrics.fid.features=ckpt",
         "metrics.n=1000"),
        "val/fid_classifier", False,
        ("trainer.max_steps=3", "metrics.n=200"),
        ckpt=("metrics.fid.ckpt", "--digit-ckpt"),
    ),  # fmt: skip
    "cyclegan_h2z64": Row(
        "CycleGAN, horse2zebra 64 px, 150 steps, domain transfer",
        ("model=cyclegan", "data=horse2zebra", "data.image_size=64", "data.load_size=72",
         "trainer.max_steps=150"),
        "val/domain_transfer", True,
        ("trainer.max_steps=3", "data.train_subset=8"),
        ckpt=("metrics.domain.ckpt", "--domain-ckpt"),
    ),  # fmt: skip
    "unet_seg": Row(
        "U-Net, MNIST scenes (3,000), 1 epoch, segmentation",
        ("model=unet", "data=mnist_seg", "data.train_scenes=3000", "trainer.max_epochs=1",
         "data.val_scenes=500"),
        "test/miou", True,
        ("trainer.max_steps=3", "data.train_scenes=200", "data.val_scenes=50",
         "data.test_scenes=50"),
    ),  # fmt: skip
    "yolo_det": Row(
        "YOLO, MNIST scenes (10,000), 1 epoch, detection",
        ("model=yolo", "data=mnist_det", "data.train_scenes=10000", "trainer.max_epochs=1",
         "data.val_scenes=500"),
        "test/map_50", True,
        ("trainer.max_steps=3", "data.train_scenes=200", "data.val_scenes=50",
         "data.test_scenes=50"),
    ),  # fmt: skip
    "siamese_mnist": Row(
        "Siamese LeNet, MNIST pairs, 1 epoch, verification",
        ("experiment=siamese_mnist", "trainer.max_epochs=1"),
        "test/verify_acc", True,
        ("trainer.max_steps=3", "data.train_subset=6000", "data.eval_subset=500",
         "data.verify_pairs=500"),
    ),  # fmt: skip
}


def merge(*groups: Sequence[str]) -> list[str]:
    """Overrides in order, a later `key=value` replacing an earlier one of the same key."""
    merged: dict[str, str] = {}
    for group in groups:
        for item in group:
            merged[item.split("=", 1)[0]] = item
    return list(merged.values())


def default_data_root() -> Path:
    """DLRUN_DATA, else the shared data sets next to the checkout (or at /work/shared)."""
    if os.environ.get("DLRUN_DATA"):
        return Path(os.environ["DLRUN_DATA"])
    for root in (Path("/work/shared/datasets"), REPO.parent / "shared" / "datasets"):
        if root.is_dir():
            return root
    return REPO.parent / "shared" / "datasets"


def kept_overrides(run_dir: Path) -> list[str] | None:
    """The overrides a kept run was made with (its .hydra/overrides.yaml), None if unreadable."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    import yaml

    loaded = yaml.safe_load(path.read_text())
    return [str(item) for item in loaded] if isinstance(loaded, list) else None


def move_aside(run_dir: Path) -> Path:
    """A run folder without metrics.json (stopped midway, or failed): renamed, never deleted."""
    n = 1
    while run_dir.with_name(f"{run_dir.name}.incomplete{n}").exists():
        n += 1
    target = run_dir.with_name(f"{run_dir.name}.incomplete{n}")
    run_dir.rename(target)
    return target


def log_tail(path: Path, lines: int = 12) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return "\n".join(text.strip().splitlines()[-lines:]) or "no output"


def dlrun(args: Sequence[str], run_dir: Path, log: Path, data_root: Path) -> tuple[int, float]:
    """One fresh `python -m dlrun` process, its output into `log`; (exit code, wall seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "dlrun", *args, f"hydra.run.dir={run_dir}"]
    began = time.perf_counter()
    with log.open("w") as out:
        out.write(" ".join(command) + "\n")
        out.flush()
        done = subprocess.run(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
            env=dict(os.environ) | {"DLRUN_DATA": str(data_root)},
        )  # fmt: skip
    return done.returncode, time.perf_counter() - began


def one_run(
    name: str, row: Row, overrides: list[str], precision: str, seed: int, out_dir: Path,
    data_root: Path, context: dict[str, Any],
) -> tuple[dict[str, Any], bool]:  # fmt: skip
    """Run (or read back) one seed at one precision; (its record, whether it was run now)."""
    args = merge(overrides, [f"seed={seed}", f"trainer.precision={precision}",
                             "trainer.progress=false"])  # fmt: skip
    run_dir = out_dir / name / f"{precision}_s{seed}"
    log = out_dir / name / f"{precision}_s{seed}.log"
    record: dict[str, Any] = {
        "row": name, "title": row.title, "precision": precision, "seed": seed,
        "run_dir": str(run_dir), "overrides": args, "metric_key": row.metric,
        "higher_better": row.higher_better, **context,
    }  # fmt: skip
    ran = False
    if (run_dir / "metrics.json").is_file():
        kept = kept_overrides(run_dir)
        kept = None if kept is None else [k for k in kept if not k.startswith("hydra.")]
        if kept is not None and set(kept) != set(args):
            differ = sorted(set(kept) ^ set(args))
            sys.exit(f"{run_dir} was made with other overrides ({', '.join(differ)}): use another "
                     "--out-dir, or move it away")  # fmt: skip
        print(f"  {name} {precision} seed {seed}: kept run {run_dir}", flush=True)
    else:
        if run_dir.exists():
            print(f"  {name}: {run_dir} has no metrics.json: moved to {move_aside(run_dir)}")
        print(f"  {name} {precision} seed {seed}: running ...", flush=True)
        code, wall = dlrun(args, run_dir, log, data_root)
        ran = True
        record |= {"wall_s": round(wall, 1), "returncode": code, "log": str(log)}
        if code:
            record["error"] = f"exit {code}:\n{log_tail(log)}"
            return record, ran
    log_text = (run_dir / "dlrun.log").read_text(errors="replace") \
        if (run_dir / "dlrun.log").is_file() else ""  # fmt: skip
    threads = re.search(r"threads: (\d+)", log_text)
    record["threads"] = int(threads.group(1)) if threads else None
    metrics = json.loads((run_dir / "metrics.json").read_text())
    record["train_s"] = metrics.get("time/train_s")
    record["step"] = metrics.get("step")
    if record["train_s"] is not None and record["step"]:
        record["s_per_step"] = record["train_s"] / record["step"]
    record["scores"] = {
        k: v for k, v in sorted(metrics.items())
        if k.startswith(("val/", "test/")) and isinstance(v, int | float) and "class_acc" not in k
    }  # fmt: skip
    if row.metric in metrics:
        record["metric"] = float(metrics[row.metric])
    else:
        near = difflib.get_close_matches(row.metric, list(metrics), n=5, cutoff=0.4)
        record["error"] = f"no {row.metric} in {run_dir}/metrics.json (close: {', '.join(near)})"
    return record, ran


def train_domain_classifier(out_dir: Path, smoke: bool, data_root: Path) -> Path | None:
    """docs/gans.md's horse/zebra classifier in <out-dir>/domain_classifier (kept if done)."""
    run_dir = out_dir / "domain_classifier"
    best = run_dir / "checkpoints" / "best.pt"
    if (run_dir / "metrics.json").is_file() and best.is_file():
        print(f"domain classifier: kept {best}")
        return best
    if run_dir.exists():
        print(f"domain classifier: {run_dir} has no metrics.json: moved to {move_aside(run_dir)}")
    args = merge(DOMAIN_CLASSIFIER, DOMAIN_SMOKE if smoke else (),
                 ["seed=0", "trainer.precision=fp32", "trainer.progress=false"])  # fmt: skip
    print(f"domain classifier: training ({' '.join(args)}) ...", flush=True)
    code, wall = dlrun(args, run_dir, out_dir / "domain_classifier.log", data_root)
    if code or not best.is_file():
        print(f"domain classifier failed (exit {code}, {wall:.0f} s):\n"
              f"{log_tail(out_dir / 'domain_classifier.log')}")  # fmt: skip
        return None
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(f"domain classifier: {wall:.0f} s, test/acc {metrics.get('test/acc')}: {best}")
    return best


def spread(values: Sequence[float]) -> float:
    return (max(values) - min(values)) / 2


def num(value: float) -> str:
    return f"{value:.4g}"


def summarise(name: str, row: Row, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per precision: the metric's values, mean and spread, the median time per step; verdict."""
    side: dict[str, dict[str, Any]] = {}
    for p in PRECISIONS:
        mine = [r for r in records if r["precision"] == p]
        values = [r["metric"] for r in mine if "metric" in r]
        steps = [r["s_per_step"] for r in mine if "s_per_step" in r and "metric" in r]
        side[p] = {
            "values": values,
            "mean": statistics.fmean(values) if values else None,
            "spread": spread(values) if values else None,
            "s_per_step": statistics.median(steps) if steps else None,
            "errors": [r for r in mine if "error" in r],
        }
    fp32, bf16 = side["fp32"], side["bf16"]
    summary: dict[str, Any] = {"row": name, "title": row.title, "metric": row.metric,
                               "higher_better": row.higher_better, **side}  # fmt: skip
    if fp32["mean"] is None or bf16["mean"] is None:
        failed = [p for p in PRECISIONS if side[p]["mean"] is None]
        summary["verdict"] = f"no result ({', '.join(failed)})"
        return summary
    diff = bf16["mean"] - fp32["mean"]
    better = diff > 0 if row.higher_better else diff < 0
    verdict = "parity" if better or abs(diff) <= max(fp32["spread"], bf16["spread"]) else "worse"
    ratio = None
    if fp32["s_per_step"] and bf16["s_per_step"]:
        ratio = bf16["s_per_step"] / fp32["s_per_step"]
        if ratio > 1.0:
            verdict += ", slower"
    if any(side[p]["errors"] for p in PRECISIONS):
        verdict += " (some runs failed)"
    summary |= {"diff": diff, "ratio": ratio, "verdict": verdict}
    return summary


def side_text(side: dict[str, Any]) -> str:
    if side["mean"] is None:
        return "-"
    values = ", ".join(num(v) for v in side["values"])
    return f"{num(side['mean'])} +- {num(side['spread'])} [{values}]"


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f} ms"


def print_summary(s: dict[str, Any]) -> None:
    better = "higher" if s["higher_better"] else "lower"
    print(f"{s['row']}: {s['metric']} ({better} is better)\n"
          f"  fp32 {side_text(s['fp32'])}\n  bf16 {side_text(s['bf16'])}")  # fmt: skip
    if "diff" in s:
        ratio = "-" if s["ratio"] is None else f"{s['ratio']:.3f}x"
        print(f"  bf16 - fp32 {s['diff']:+.4g}; time/step fp32 {ms(s['fp32']['s_per_step'])}, "
              f"bf16 {ms(s['bf16']['s_per_step'])}, bf16/fp32 {ratio}")  # fmt: skip
    print(f"  verdict: {s['verdict']}", flush=True)
    for p in PRECISIONS:
        for r in s[p]["errors"]:
            print(f"  {p} seed {r['seed']} FAILED: {r['error']}")


def table(summaries: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| row | metric | fp32: mean +- spread [values] | bf16: mean +- spread [values] "
        "| bf16 - fp32 | time/step fp32 | time/step bf16 | bf16 / fp32 | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        metric = f"`{s['metric']}` ({'higher' if s['higher_better'] else 'lower'} better)"
        diff = f"{s['diff']:+.4g}" if "diff" in s else "-"
        ratio = f"{s['ratio']:.3f}x" if s.get("ratio") is not None else "-"
        lines.append(
            f"| {s['title']} | {metric} | {side_text(s['fp32'])} | {side_text(s['bf16'])} "
            f"| {diff} | {ms(s['fp32']['s_per_step'])} | {ms(s['bf16']['s_per_step'])} "
            f"| {ratio} | {s['verdict']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (--smoke: 1)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help=f"run folders, kept (default {OUT_DIR}; --smoke: {OUT_DIR}_smoke)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSONL of every run made, appended (default {RESULTS}; --smoke: "
                             "<out-dir>/precision_parity_smoke.jsonl)")
    parser.add_argument("--digit-ckpt", type=Path, default=DIGIT_CKPT,
                        help="LeNet MNIST classifier for dcgan_mnist's FID (metrics.fid.ckpt)")
    parser.add_argument("--domain-ckpt", type=Path, default=None,
                        help="horse/zebra classifier for cyclegan_h2z64 (metrics.domain.ckpt)")
    parser.add_argument("--train-domain-ckpt", action="store_true",
                        help="no --domain-ckpt: train docs/gans.md's classifier into "
                             "<out-dir>/domain_classifier (kept) and use its best.pt")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, 1 seed: every command runs, every metric key exists")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides added to (or replacing those of) every run")
    args = parser.parse_args()  # fmt: skip
    seeds = 1 if args.smoke else args.seeds
    out_dir = args.out_dir or (OUT_DIR.with_name(OUT_DIR.name + "_smoke") if args.smoke else OUT_DIR)
    out = args.out or (out_dir / "precision_parity_smoke.jsonl" if args.smoke else RESULTS)
    data_root = default_data_root().resolve()
    context = {
        "commit": commit(), "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.node()}", "smoke": args.smoke,
        "affinity": len(os.sched_getaffinity(0)),
    }  # fmt: skip
    ckpts = {"--digit-ckpt": args.digit_ckpt, "--domain-ckpt": args.domain_ckpt}
    if "cyclegan_h2z64" in args.rows and args.domain_ckpt is None and args.train_domain_ckpt:
        ckpts["--domain-ckpt"] = train_domain_classifier(out_dir, args.smoke, data_root)
    print(f"data {data_root}, runs in {out_dir}, records to {out}, commit {context['commit']}, "
          f"{context['affinity']} cores, seeds {seeds}{', SMOKE' if args.smoke else ''}")  # fmt: skip
    summaries = []
    for name in args.rows:
        row = ROWS[name]
        extra: list[str] = []
        if row.ckpt is not None:
            key, flag = row.ckpt
            path = ckpts[flag]
            if path is None or not Path(path).is_file():
                print(f"{name}: skipped, no checkpoint for {key} ({flag} {path or 'not given'}"
                      f"{'; --train-domain-ckpt trains one' if flag == '--domain-ckpt' else ''})")
                continue  # fmt: skip
            extra = [f"{key}={Path(path).resolve()}"]
        overrides = merge(row.overrides, extra, row.smoke if args.smoke else (), args.set)
        print(f"{name}: {row.title}: {' '.join(overrides)}", flush=True)
        records = []
        for seed in range(seeds):
            order = PRECISIONS if seed % 2 == 0 else PRECISIONS[::-1]
            for precision in order:
                record, ran = one_run(name, row, overrides, precision, seed, out_dir, data_root,
                                      context)  # fmt: skip
                records.append(record)
                if ran:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with out.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                shown = f"{record['metric']:.4g}" if "metric" in record else "-"
                per_step = ms(record.get("s_per_step"))
                print(f"  {name} {precision} seed {seed}: {row.metric} {shown}, {per_step}/step"
                      + (f", FAILED: {record['error']}" if "error" in record else ""), flush=True)
        summary = summarise(name, row, records)
        print_summary(summary)
        summaries.append(summary)
    if summaries:
        print("\n" + table(summaries))


if __name__ == "__main__":
    main()
