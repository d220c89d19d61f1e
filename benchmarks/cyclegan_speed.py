"""CycleGAN training speed, side by side: the authors' code against `dlrun model=cyclegan`.

    python benchmarks/cyclegan_speed.py --size 128 --iters 20 --warmup 3 --rounds 3
    python benchmarks/cyclegan_speed.py --size 256 --iters 10 --warmup 2 --rounds 3
    python benchmarks/cyclegan_speed.py --size 128 --iters 2 --warmup 1 --rounds 1 \
        --threads 1                                  # smoke test of all three contenders
    python benchmarks/cyclegan_speed.py --size 128 --iters 3 --warmup 1 --rounds 1 \
        --threads 1 --only peer                      # smoke test of the authors' side

The authors' side is the `cycle_gan` model of their CUT repository
(github.com/taesungp/contrastive-unpaired-translation), checked out OUTSIDE this repository
(--peer, default /work/peer/cut) with `dominate` installed. Nothing of it is copied here: this
script only starts both programs as fresh processes and reads what they report.

Both train the same thing: batch 1, on the CPU, LSGAN, cycle weight 10, identity 0.5, an
image pool of 50 per discriminator, horse2zebra resized to --load-size and randomly cropped to
--size, the ResNet generator (6 blocks at 128 px, 9 at 256) and the 70x70 PatchGAN. Their
cycle_gan defaults to anti-aliased (blurred) down- and up-sampling and Xavier init; the original
CycleGAN networks, which dlrun builds, use stride-2 and transposed convolutions and N(0, 0.02),
so their command gets `--no_antialias --no_antialias_up --init_type normal`. Theirs computes in
fp32: their code has no bf16 option for the CPU (cycle_gan's only mixed-precision path is NVIDIA
apex's `amp.scale_loss` behind `opt.amp`, which no option defines). dlrun runs once per entry of
--dlrun-precisions (default `fp32 bf16`) with `trainer.precision=<p>`: fp32, and bf16 autocast
(fp32 weights and Adam, the convolutions in bf16 under torch.autocast, the losses in fp32);
`auto` is also accepted and the log's choice is shown. Data loading runs in the training
process on both sides (--loader-workers 0: their --num_threads, dlrun's data.num_workers); the
torch threads come from OMP_NUM_THREADS / MKL_NUM_THREADS.

Their train.py cannot run `--model cycle_gan` as committed (their issue #41): train.py calls
`model.data_dependent_initialize(data)`, which CycleGANModel defines without the argument, and
CycleGANModel reads `opt.amp`, which no option defines. Their files are left untouched: they are
started through a small launcher (`PEER_LAUNCHER` below, this script's own code) that gives that
method the argument (it does nothing, as the base class's) and sets `opt.amp = False`, then runs
their train.py unchanged as __main__.

The iteration cap, without changing their files: `--max_dataset_size W+N` keeps the first W+N
images of each domain, so with `--n_epochs 1 --n_epochs_decay 0` their loop ends after exactly
W+N iterations (one epoch; the learning rate is constant in it). dlrun: trainer.max_steps=W+N.

Timing, seconds per iteration, start-up and the first W iterations excluded:
- theirs: with `--print_freq 1` train.py prints one `(epoch: 1, iters: k, time: ...)` line per
  iteration; this script timestamps each line as it arrives (python -u, unbuffered) and takes the
  N gaps between lines W..W+N: wall time per iteration, data loading included. Their `time:`
  (t_comp) is NOT the last iteration's compute time: train.py keeps an exponential average,
  t = 0.995 t + 0.005 x, started at 0.1 (and prints it to 3 decimals). Inverting it,
  x_k = 200 t_k - 199 t_(k-1), gives the compute-only time (set_input + optimize_parameters, no
  data loading); its mean over the N timed iterations is shown as a second row (the rounding
  leaves about +-0.2/N s, too noisy per iteration for a median).
- dlrun: the same gaps from the TensorBoard event file: with trainer.log_every_n_steps=1 the loop
  writes `train/lr` (and the train/*_step scalars) once per step; the events' wall times between
  steps W..W+N give wall time per step, data loading included.

Each round runs their side once and dlrun once per precision, as fresh processes, the order
rotating between rounds (round i starts with contender i: theirs, dlrun fp32, dlrun bf16, ...,
so with at least as many rounds as contenders each goes first once); the table gives each
contender's median over the rounds of its per-round median, and each dlrun precision's ratio
dlrun / theirs. It is printed twice: with the full command lines (and their compute-only row),
then as the markdown rows of benchmarks/README.md (size, contender and command, median, rounds,
ratio). --threads 1,2 first runs their side once at each thread count and keeps the faster for
every round (all contenders); both are shown.
"""

import argparse
import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# The authors' train.py run as __main__ after two fixes made in memory (see the docstring).
PEER_LAUNCHER = """
import runpy, sys
sys.path.insert(0, '.')
from models import cycle_gan_model as m
m.CycleGANModel.data_dependent_initialize = lambda self, data=None: None
_init = m.CycleGANModel.__init__
def _init_amp(self, opt):
    if not hasattr(opt, 'amp'):
        opt.amp = False
    _init(self, opt)
m.CycleGANModel.__init__ = _init_amp
sys.argv = ['train.py'] + sys.argv[1:]
runpy.run_path('train.py', run_name='__main__')
"""

PEER_LINE = re.compile(r"^\(epoch: (\d+), iters: (\d+), time: ([0-9.]+), data: ([0-9.]+)\)")
AUTO_LINE = re.compile(r"trainer\.precision=auto: (.*)$")  # dlrun's log of what `auto` chose
PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # trainer.precision's values
LOAD_SIZE = {128: 143, 256: 286}  # the authors' resize-then-crop sizes
BLOCKS = {128: 6, 256: 9}


@dataclass
class Result:
    per_iter: list[float]  # wall seconds of each timed iteration
    compute_mean: float | None = None  # theirs only: mean compute-only seconds (t_comp inverted)
    extra: dict = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.per_iter)


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stream(cmd: list[str], cwd: Path | None, env: dict, log_path: Path, timeout: float):
    """Run cmd, stdout and stderr merged; yields (arrival time, line); the whole output is logged."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    with (
        open(log_path, "w") as log,
        subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter()
            log.write(line)
            yield now, line
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"timed out after {timeout:.0f} s; see {log_path}")
        rc = proc.wait()
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"exit status {rc}: {' '.join(cmd)}\n{tail}")


# --- the authors' side ---------------------------------------------------------------------------


def peer_cmd(a: argparse.Namespace, workdir: Path) -> list[str]:
    return [
        "--dataroot", str(Path(a.data) / "horse2zebra"),
        "--name", f"cyclegan_speed_{a.size}",
        "--checkpoints_dir", str(workdir),
        "--model", "cycle_gan",
        "--dataset_mode", "unaligned",
        "--netG", f"resnet_{BLOCKS[a.size]}blocks",
        "--load_size", str(a.load_size), "--crop_size", str(a.size),
        "--batch_size", "1",
        "--lambda_identity", "0.5", "--pool_size", "50", "--gan_mode", "lsgan",
        "--no_antialias", "--no_antialias_up", "--init_type", "normal",
        "--gpu_ids", "-1",
        "--display_id", "0", "--no_html", "--display_freq", "100000000",
        "--print_freq", "1",
        "--save_latest_freq", "100000000", "--save_epoch_freq", "100000000",
        "--n_epochs", "1", "--n_epochs_decay", "0",
        "--max_dataset_size", str(a.warmup + a.iters),
        "--num_threads", str(a.loader_workers),
        *a.peer_extra.split(),
    ]  # fmt: skip


def run_peer(a: argparse.Namespace, threads: int, tag: str) -> Result:
    workdir = Path(a.workdir) / tag / "peer"
    cmd = [sys.executable, "-u", "-c", PEER_LAUNCHER, *peer_cmd(a, workdir)]
    stamps: list[float] = []
    averages: list[float] = []
    for now, line in stream(cmd, Path(a.peer), thread_env(threads), workdir / "out.log", a.timeout):
        m = PEER_LINE.match(line)
        if m:
            stamps.append(now)
            averages.append(float(m.group(3)))
    total = a.warmup + a.iters
    if len(stamps) != total:
        raise RuntimeError(f"their run printed {len(stamps)} iteration lines, expected {total}")
    w = a.warmup  # line w-1 (0-based) ends iteration w; the timed gaps follow it
    per_iter = [stamps[k] - stamps[k - 1] for k in range(w, total)]
    compute = [200 * averages[k] - 199 * averages[k - 1] for k in range(w, total)]
    return Result(per_iter, statistics.fmean(compute), {"t_comp_printed": averages})


# --- the dlrun side (ADAPT HERE) -----------------------------------------------------------------
# The CycleGAN trainer is unfinished: check the overrides and the per-step tag once it runs.
# Assumed: trainer.log_every_n_steps=1 makes the loop write `train/lr` once per optimizer step
# (RunLogger.window), and each event's wall_time is time.time() when it was written.
DLRUN_STEP_TAG = "train/lr"


def dlrun_cmd(a: argparse.Namespace, run_dir: Path, precision: str) -> list[str]:
    return [
        "dlrun", "model=cyclegan", "data=horse2zebra",
        f"data.image_size={a.size}", f"data.load_size={a.load_size}",
        f"data.num_workers={a.loader_workers}",
        f"trainer.max_steps={a.warmup + a.iters}",
        "trainer.log_every_n_steps=1", "trainer.val_every_n_epochs=1000",
        "trainer.progress=false", f"trainer.precision={precision}",
        f"hydra.run.dir={run_dir}",
        *a.dlrun_extra.split(),
    ]  # fmt: skip


def step_wall_times(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    times: dict[int, float] = {}
    for path in sorted(run_dir.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if any(v.tag == tag for v in event.summary.value):
                times[event.step] = event.wall_time
    return times


def run_dlrun(a: argparse.Namespace, threads: int, tag: str, precision: str) -> Result:
    run_dir = Path(a.workdir) / tag / f"dlrun_{precision}"
    env = thread_env(threads)
    env["DLRUN_DATA"] = a.data
    log_path = run_dir.parent / f"dlrun_{precision}.log"
    chosen = None
    for _, line in stream(dlrun_cmd(a, run_dir, precision), None, env, log_path, a.timeout):
        m = AUTO_LINE.search(line.rstrip())
        if m:
            chosen = m.group(1)
    times = step_wall_times(run_dir, DLRUN_STEP_TAG)
    total = a.warmup + a.iters
    missing = [s for s in range(a.warmup, total + 1) if s not in times]
    if missing:
        raise RuntimeError(f"dlrun: no {DLRUN_STEP_TAG!r} event at steps {missing[:5]}...")
    per_iter = [times[s] - times[s - 1] for s in range(a.warmup + 1, total + 1)]
    return Result(per_iter, extra={"auto": chosen} if chosen else {})


# --- the comparison ------------------------------------------------------------------------------


def fmt(xs: list[float]) -> str:
    return ", ".join(f"{x:.3f}" for x in xs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, choices=(128, 256), default=128)
    p.add_argument("--iters", type=int, default=20, help="timed iterations per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed first iterations (>= 1)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--peer", default="/work/peer/cut", help="their repository's work tree")
    p.add_argument("--data", default=os.environ.get("DLRUN_DATA", "/work/shared/datasets"))
    p.add_argument(
        "--threads",
        default="1,2",
        help="torch threads for both; a list (1,2): their side is tried once at each, the faster "
        "is used for every round",
    )
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader workers, both sides")
    p.add_argument(
        "--dlrun-precisions",
        nargs="+",
        choices=PRECISIONS,
        default=["fp32", "bf16"],
        metavar="P",
        help="dlrun runs once per round at each (trainer.precision=P; one of "
        f"{', '.join(PRECISIONS)}); theirs stays fp32. Default: fp32 bf16",
    )
    p.add_argument("--only", choices=("peer", "dlrun"), help="run one side (smoke tests)")
    p.add_argument("--peer-extra", default="", help="extra options for their train.py")
    p.add_argument("--dlrun-extra", default="", help="extra Hydra overrides for dlrun")
    p.add_argument("--workdir", default=f"/tmp/cyclegan_speed/{time.strftime('%Y%m%d-%H%M%S')}")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--json", help="also write the raw timings here")
    a = p.parse_args()
    if a.warmup < 1:
        p.error("--warmup must be >= 1: the first iteration includes their model set-up")
    a.load_size = LOAD_SIZE[a.size]
    if len(set(a.dlrun_precisions)) != len(a.dlrun_precisions):
        p.error("--dlrun-precisions lists a precision twice")
    n_train = min(
        len(list((Path(a.data) / "horse2zebra" / d).iterdir())) for d in ("trainA", "trainB")
    )
    if a.warmup + a.iters > n_train:
        p.error(f"--warmup + --iters must be <= {n_train} (one epoch of their loop)")

    raw: dict = {"args": {k: v for k, v in vars(a).items()}, "calibration": {}, "rounds": []}
    thread_options = [int(t) for t in a.threads.split(",")]
    threads = thread_options[0]
    if len(thread_options) > 1 and a.only != "dlrun":
        print("Their side, thread counts (one run each):")
        best = math.inf
        for t in thread_options:
            r = run_peer(a, t, f"threads{t}")
            raw["calibration"][t] = r.per_iter
            print(f"  OMP_NUM_THREADS={t}: median {r.median:.3f} s/it ({fmt(r.per_iter)})")
            if r.median < best:
                best, threads = r.median, t
        print(f"  -> {threads} threads for every round\n")

    # The contenders: theirs, then dlrun at each precision, in the order given.
    sides: dict[str, Callable[[argparse.Namespace, int, str], Result]] = {}
    if a.only != "dlrun":
        sides["theirs"] = run_peer
    if a.only != "peer":
        for prec in a.dlrun_precisions:
            sides[f"dlrun {prec}"] = functools.partial(run_dlrun, precision=prec)
    names = list(sides)
    results: dict[str, list[Result]] = {name: [] for name in names}
    for i in range(a.rounds):
        k = i % len(names)  # rotating: round i starts with contender i
        for name in names[k:] + names[:k]:
            r = sides[name](a, threads, f"round{i}")
            results[name].append(r)
            extra = ""
            if r.compute_mean is not None:
                extra = f", compute-only mean {r.compute_mean:.3f}"
            if "auto" in r.extra:
                extra = f", auto: {r.extra['auto']}"
            print(f"round {i + 1}/{a.rounds} {name}: median {r.median:.3f} s/it{extra}")
        raw["rounds"].append({n: results[n][-1].__dict__ for n in names})

    medians = {n: [r.median for r in rs] for n, rs in results.items()}
    overall = {n: statistics.median(m) for n, m in medians.items()}
    dlrun_names = [n for n in names if n != "theirs"]
    ratios: dict[str, tuple[float, list[float]]] = {}  # dlrun contender: (overall, per round)
    if "theirs" in overall:
        for n in dlrun_names:
            per_round = [d / t for d, t in zip(medians[n], medians["theirs"], strict=True)]
            ratios[n] = (overall[n] / overall["theirs"], per_round)
    env_show = f"OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}"
    peer_args = peer_cmd(a, Path(a.workdir) / "<round>" / "peer")
    peer_show = " ".join([env_show, "python -u -c $PEER_LAUNCHER", *peer_args])

    def dlrun_args(n: str) -> list[str]:
        prec = n.removeprefix("dlrun ")
        return dlrun_cmd(a, Path(a.workdir) / "<round>" / f"dlrun_{prec}", prec)

    precisions = "dlrun " + "/".join(a.dlrun_precisions)
    if a.only != "dlrun":
        precisions = "fp32" if a.only == "peer" else f"theirs fp32, {precisions}"
    print(
        f"\nCycleGAN, horse2zebra, {a.size} px (load {a.load_size}), {BLOCKS[a.size]} blocks, "
        f"batch 1, {precisions}, CPU, OMP_NUM_THREADS={threads}; {a.iters} timed iterations "
        f"after {a.warmup}, {a.rounds} round(s), fresh processes, order rotating.\n"
    )
    print("| contender | command line | median s/iteration | all rounds | dlrun / theirs |")
    print("| --- | --- | --- | --- | --- |")
    if "theirs" in overall:
        print(
            f"| theirs (CUT repo, cycle_gan), wall | `{peer_show}` | {overall['theirs']:.3f} "
            f"| {fmt(medians['theirs'])} | 1 |"
        )
        comp = [r.compute_mean or math.nan for r in results["theirs"]]
        print(
            f"| theirs, compute only (t_comp inverted; mean) | same | {statistics.median(comp):.3f} "
            f"| {fmt(comp)} | |"
        )
    for n in dlrun_names:
        ratio = ""
        if n in ratios:
            ratio = f"{ratios[n][0]:.3f}x (per round: {fmt(ratios[n][1])})"
        dlrun_show = " ".join([env_show, f"DLRUN_DATA={a.data}", *dlrun_args(n)])
        print(f"| {n}, wall | `{dlrun_show}` | {overall[n]:.3f} | {fmt(medians[n])} | {ratio} |")

    # The same rows as benchmarks/README.md writes them: bookkeeping options (paths, run folder,
    # display/save frequencies, progress bar) left out, later dlrun rows as "the same with ...".
    size = f"{a.size} px, {BLOCKS[a.size]} blocks"
    n_rounds = f"{a.rounds} round{'s' if a.rounds != 1 else ''}"
    print("\nAs in benchmarks/README.md:\n")
    print(f"| size | contender | median s/iteration ({n_rounds}) | rounds | dlrun / theirs |")
    print("| --- | --- | --- | --- | --- |")
    if "theirs" in overall:
        hidden = {"--name", "--checkpoints_dir", "--display_freq"}
        hidden |= {"--save_latest_freq", "--save_epoch_freq"}
        shown: list[str] = []
        for k, arg in enumerate(peer_args):
            if arg in hidden or (k and peer_args[k - 1] in hidden):
                continue
            shown.append(".../horse2zebra" if k and peer_args[k - 1] == "--dataroot" else arg)
        cmd = " ".join([f"OMP_NUM_THREADS={threads}", "python -u -c $PEER_LAUNCHER", *shown])
        print(
            f"| {size} | theirs, `{cmd}` (and huge `--display_freq`/`--save_*_freq`) "
            f"| {overall['theirs']:.3f} | {fmt(medians['theirs'])} | 1 |"
        )
    first: list[str] | None = None
    for n in dlrun_names:
        shown = [
            x for x in dlrun_args(n) if not x.startswith(("hydra.run.dir=", "trainer.progress="))
        ]
        if first is None:
            first = shown
            what = f"`{' '.join([f'OMP_NUM_THREADS={threads}', *shown])}`"
        else:
            what = f"the same with `{' '.join(x for x in shown if x not in first)}`"
        ratio = ""
        if n in ratios:
            ratio = f"**{ratios[n][0]:.3f}x** (per round {fmt(ratios[n][1])})"
        print(f"| {size} | {n}, {what} | {overall[n]:.3f} | {fmt(medians[n])} | {ratio} |")
    print(f"\nLogs and run folders: {a.workdir}")
    if a.json:
        Path(a.json).write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
