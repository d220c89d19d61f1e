"""dlrun's first run on CUDA: a time-boxed list of real `dlrun` runs, with partial results kept.

    python benchmarks/gpu_check.py --out DIR [--device cuda|cpu] [--quick] [--budget-s 390]
                                   [--data ROOT] [--runs-dir /tmp/gpu_runs]

Records the environment (torch, torchvision, GPU, capability, bf16, cuDNN, NCCL), then runs each
check as its own subprocess (`python -m dlrun ... hydra.run.dir=<runs>/<name>`) in priority order,
each with a timeout, skipping (and recording as skipped) whatever no longer fits in --budget-s.
After every check it rewrites DIR/gpu_check.json and DIR/gpu_check.md, so a kill keeps what ran.

Only the two summaries are written to --out (the machine that runs this returns a handful of
files from there); run folders, logs, the decode and compile caches and temporary files go to a
fresh folder under --runs-dir. `--quick` shrinks every check to a few steps on data subsets: a
dry run of the whole list on a small CPU in a few minutes. Needs torch; dlrun's own dependencies
(hydra-core, omegaconf) only in the child processes.
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TIMING = ("time/", "images_per_s")  # what may differ between equal runs (as tests/test_faults.py)
TAIL_LINES = 40
# Each MNIST check in --quick: a 12-step epoch (batch 128) and a 500-image evaluation.
MNIST_QUICK = {"data.train_subset": "1536", "data.eval_subset": "500"}


@dataclass
class Check:
    name: str
    what: str
    overrides: dict[str, str] = field(default_factory=dict)  # dlrun's key=value, in order
    quick: dict[str, str] = field(default_factory=dict)  # replaces/extends overrides in --quick
    kind: str = "dlrun"  # dlrun | resume | dist | overhead
    timeout_s: float = 60.0
    min_s: float = 15.0  # started only while at least this much of the budget is left
    fid_ckpt: bool = False  # GANs: FID on the mnist_fast LeNet (no Inception weights offline)


def checks() -> list[Check]:
    """The checks in priority order (the budget cuts from the end)."""
    fast = {"experiment": "mnist_fast"}
    # data.val_split=0: every training image, the workloads of issue 11 (the default holds 10% out)
    lenet = {"model": "lenet", "data": "mnist", "data.val_split": "0"}
    # 4,800 images = 75 steps of 64: max_steps=150 is exactly 2 epochs, and metrics.json's
    # images_per_s (the last epoch's) is then a warm epoch: cudnn.benchmark and compile done.
    resnet = {
        "model": "resnet18",
        "data": "cifar10",
        "data.train_subset": "4800",
        "data.val_split": "0",
        "trainer.max_steps": "150",
    }
    # --quick: 2 epochs of 1 step (the warm-epoch path) at batch 32, 100 test images.
    resnet_quick = {
        "data.train_subset": "32",
        "data.batch_size": "32",
        "trainer.max_steps": "2",
        "data.eval_subset": "100",
    }
    bf16, cl = {"trainer.precision": "bf16"}, {"trainer.channels_last": "true"}
    dcgan = {"model": "dcgan", "data": "mnist", "trainer.max_steps": "300", "data.val_split": "0"}
    dcgan_quick = {
        "data.train_subset": "384",
        "data.eval_subset": "500",
        "trainer.max_steps": "4",
        "metrics.n": "200",
    }
    compile_ = {"trainer.compile": "true"}
    yolo = {"model": "yolo", "data": "mnist_det"}
    det_quick = {"data.train_scenes": "256", "data.test_scenes": "100", "trainer.max_steps": "4"}
    return [
        Check(
            "mnist_fast",
            "experiment=mnist_fast as is (precision=auto: bf16 on CUDA, fp32 on CPU); "
            "README target >= 0.99 in <= 2 s of training",
            fast,
            MNIST_QUICK,
            min_s=20,
        ),
        Check(
            "mnist_fast_fp32",
            "mnist_fast, trainer.precision=fp32",
            fast | {"trainer.precision": "fp32"},
            MNIST_QUICK,
        ),
        Check("mnist_fast_bf16", "mnist_fast, trainer.precision=bf16", fast | bf16, MNIST_QUICK),
        Check(
            "mnist_fast_bf16_cl", "mnist_fast, bf16 + channels_last", fast | cl | bf16, MNIST_QUICK
        ),
        Check(
            "mnist_fast_compile",
            "mnist_fast + trainer.compile=true (train_s includes compiling)",
            fast | compile_,
            MNIST_QUICK,
            timeout_s=150,
            min_s=45,
        ),
        Check(
            "lenet_fp16",
            "LeNet-5 1 epoch, fp16 autocast + grad scaler",
            lenet | {"trainer.max_epochs": "1", "trainer.precision": "fp16"},
            MNIST_QUICK,
        ),
        Check(
            "lenet_2ep",
            "LeNet-5 (sigmoid, avg-pool) 2 epochs: README default row (0.9839 on CPU)",
            lenet | {"trainer.max_epochs": "2"},
            MNIST_QUICK,
        ),
        Check(
            "resnet18_fp32",
            "ResNet-18 CIFAR-10, 2 epochs of 75 steps, batch 64, fp32",
            resnet,
            resnet_quick,
            timeout_s=120,
            min_s=25,
        ),
        Check("resnet18_bf16", "ResNet-18, bf16", resnet | bf16, resnet_quick, min_s=15),
        Check(
            "resnet18_bf16_cl", "ResNet-18, bf16 + channels_last", resnet | bf16 | cl, resnet_quick
        ),
        Check(
            "resnet18_bf16_cl_compile",
            "ResNet-18, bf16 + channels_last + compile (epoch 2 is warm)",
            resnet | bf16 | cl | compile_,
            resnet_quick,
            timeout_s=180,
            min_s=60,
        ),
        Check(
            "cifar10_fast",
            "experiment=cifar10_fast (airbench-style, 10 epochs) on the carried CIFAR-10 subset",
            {"experiment": "cifar10_fast"},
            {
                "data.train_subset": "512",
                "data.batch_size": "256",
                "trainer.max_steps": "2",
                "data.eval_subset": "200",
            },
            timeout_s=120,
            min_s=25,
        ),
        Check(
            "dcgan",
            "DCGAN MNIST 300 steps, FID on the mnist_fast LeNet's features",
            dcgan,
            dcgan_quick,
            fid_ckpt=True,
            min_s=20,
        ),
        Check(
            "dcgan_compile",
            "DCGAN + trainer.compile=true (at d0b9ca1 the GAN trainer called the plain networks)",
            dcgan | compile_,
            dcgan_quick,
            fid_ckpt=True,
            timeout_s=90,
            min_s=20,
        ),
        Check("dcgan_bf16", "DCGAN, bf16", dcgan | bf16, dcgan_quick, fid_ckpt=True, min_s=20),
        Check(
            "yolo_bf16",
            "YOLO on mnist_det (scenes made on the GPU), 300 steps, bf16: CPU README row "
            "0.9798 test mAP@0.5 after 1,565 steps",
            yolo | {"trainer.max_steps": "300"} | bf16,
            det_quick,
            timeout_s=120,
            min_s=25,
        ),
        Check(
            "faster_rcnn_bf16",
            "torchvision Faster R-CNN on mnist_det, 5,000 scenes, 150 steps, bf16 autocast",
            {
                "model": "faster_rcnn",
                "data": "mnist_det",
                "data.train_scenes": "5000",
                "trainer.max_steps": "150",
                "optim.lr": "0.002",
            }
            | bf16,
            det_quick,
            timeout_s=150,
            min_s=30,
        ),
        Check(
            "resume",
            "SIGTERM mid-run, resume=true: same metrics.json as an uninterrupted run?",
            lenet | {"trainer.max_epochs": "1", "trainer.checkpoint_every_n_steps": "100"},
            {
                "data.train_subset": "4000",
                "data.eval_subset": "1000",
                "trainer.checkpoint_every_n_steps": "8",
            },
            kind="resume",
            timeout_s=150,
            min_s=35,
        ),
        Check(
            "nccl",
            "torch.distributed.run, 1 process: init_process_group + all_reduce "
            "(gloo on --device cpu)",
            kind="dist",
            timeout_s=60,
            min_s=15,
        ),
        Check(
            "overhead",
            "benchmarks/overhead.py: dlrun vs a plain loop (it has no device option: "
            "CUDA whenever torch sees one)",
            kind="overhead",
            timeout_s=300,
            min_s=40,
        ),
    ]


# ----- running things -----------------------------------------------------------------------------
LIVE: set[subprocess.Popen] = set()  # children running now: a stop signal to us ends them too


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group: compile workers and torchrun's workers too."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    LIVE.discard(proc)


def start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    # stdout+stderr to a file, not a pipe: no pipe to fill, and the log survives a kill. Its own
    # process group (killpg reaches compile and torchrun workers) but not its own session, so
    # whoever ends this script's session still ends the children.
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, preexec_fn=os.setpgrp
        )
    LIVE.add(proc)
    return proc


def run_logged(
    cmd: list[str], log: Path, env: dict[str, str], cwd: Path, timeout: float
) -> tuple[int | None, float, bool]:
    """Run to completion or timeout: (exit code or None, wall seconds, timed out)."""
    begin = time.perf_counter()
    proc = start(cmd, log, env, cwd)
    try:
        rc: int | None = proc.wait(timeout=max(1.0, timeout))
        timed_out = False
        LIVE.discard(proc)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        rc, timed_out = None, True
    return rc, time.perf_counter() - begin, timed_out


def tail(log: Path, n: int = TAIL_LINES) -> list[str]:
    try:
        return log.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None


def stable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}


def data_lines(log: Path) -> list[str]:
    """dlrun's own 'data NAME: N train, ...' and 'decoding N images' lines, without the prefix."""
    pattern = re.compile(r"\] - ((?:data \w+: |decoding ).*)$")
    return [m.group(1) for line in tail(log, 10_000) if (m := pattern.search(line))]


class Session:
    """The run folders, the child environment, the budget, and the result files."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + args.budget_s
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        root = Path(args.runs_dir).resolve()
        # A fresh folder per invocation (dlrun refuses a run folder that holds a run); the caches
        # are shared, so a second invocation skips the PNG decode and reuses compiled kernels.
        self.work = root / datetime.now().strftime("run-%Y%m%d-%H%M%S")
        self.runs = self.work / "runs"
        self.logs = self.work / "logs"
        cache = root / "cache"
        for d in (self.runs, self.logs, cache, self.work / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        path = os.environ.get("PYTHONPATH", "")
        self.env |= {
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), path) if p),
            "DLRUN_DATA": str(Path(args.data).resolve()),
            # Everything a child might write outside its run folder lands under --runs-dir.
            "DLRUN_CACHE": str(cache / "dlrun"),
            "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
            "TRITON_CACHE_DIR": str(cache / "triton"),
            "TORCH_HOME": str(cache / "torch"),
            "XDG_CACHE_HOME": str(cache / "xdg"),
            "MPLCONFIGDIR": str(cache / "mpl"),
            "TMPDIR": str(self.work / "tmp"),
            "TQDM_DISABLE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("HYDRA_FULL_ERROR", None)  # dlrun's own one-paragraph errors
        self.results: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def dlrun_cmd(self, overrides: dict[str, str], run_dir: Path, *extra: str) -> list[str]:
        common = {"device": self.args.device, "trainer.progress": "false", "data.download": "false"}
        items = [f"{k}={v}" for k, v in (overrides | common).items()]
        return [sys.executable, "-m", "dlrun", *items, *extra, f"hydra.run.dir={run_dir}"]

    def overrides_of(self, check: Check) -> dict[str, str]:
        # One dict, so a --quick value replaces a key rather than repeating it (Hydra refuses that).
        over = dict(check.overrides) | (check.quick if self.args.quick else {})
        folder = self.runs / "mnist_fast" / "checkpoints"
        ckpt = next((p for p in (folder / "best.pt", folder / "last.pt") if p.is_file()), None)
        if check.fid_ckpt and ckpt is not None:
            over |= {"metrics.fid.features": "ckpt", "metrics.fid.ckpt": str(ckpt)}
        return over

    def save(self) -> None:
        doc = {
            "tool": "benchmarks/gpu_check.py",
            "args": vars(self.args),
            "repo": str(REPO),
            "work_dir": str(self.work),
            "elapsed_s": round(self.elapsed(), 1),
            "budget_s": self.args.budget_s,
            **self.info,
            "checks": self.results,
        }
        write_atomic(self.out / "gpu_check.json", json.dumps(doc, indent=2, default=str) + "\n")
        write_atomic(self.out / "gpu_check.md", markdown(doc))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----- the environment ----------------------------------------------------------------------------
PROBE = r"""
import json, platform, sys
out = {"python": sys.version.split()[0], "executable": sys.executable,
       "platform": platform.platform()}
def version(name):
    try:
        return __import__(name).__version__
    except Exception as err:
        return f"absent ({type(err).__name__})"
for name in ("torchvision", "hydra", "omegaconf", "numpy", "tensorboard", "triton", "PIL"):
    out[name] = version(name)
try:
    import torch
    out |= {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "cpu_threads": torch.get_num_threads(),
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out |= {"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                "bf16_supported": torch.cuda.is_bf16_supported(),
                "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                "multiprocessors": p.multi_processor_count}
        try:
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as err:
            out["nccl"] = f"unknown ({type(err).__name__})"
except Exception as err:
    out["torch_error"] = f"{type(err).__name__}: {err}"
print("PROBE " + json.dumps(out))
"""


def probe_environment(session: Session) -> dict[str, Any]:
    """Versions and the GPU, read in a child process so this one never holds a CUDA context."""
    env: dict[str, Any] = {"host": platform.node(), "cpu_count": os.cpu_count()}
    log = session.logs / "env.log"
    rc, wall, timed_out = run_logged(
        [sys.executable, "-c", PROBE], log, session.env, session.work, min(90, session.left())
    )
    lines = [line for line in tail(log, 200) if line.startswith("PROBE ")]
    if lines:
        env |= json.loads(lines[-1][len("PROBE ") :])
    else:
        env["probe_error"] = {"rc": rc, "timed_out": timed_out, "tail": tail(log)}
    env["probe_s"] = round(wall, 1)
    if shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            )
            env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            env["nvidia_smi"] = f"failed: {err}"
    return env


def source_info() -> dict[str, Any]:
    """Which dlrun ran: the git commit where .git came along, and what run.sh said."""
    info: dict[str, Any] = {"dlrun_source": os.environ.get("GPU_CHECK_SOURCE", "working tree")}
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode == 0:
            info["git_head"] = head.stdout.strip()
            info["git_changed_files"] = len(dirty.stdout.splitlines())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def data_info(root: Path) -> dict[str, Any]:
    """What the data root holds: the CIFAR-10 copy is a subset, so its size goes in the report."""
    out: dict[str, Any] = {"root": str(root)}
    raw = root / "MNIST" / "raw"
    out["mnist_raw_files"] = sorted(p.name for p in raw.glob("*-ubyte")) if raw.is_dir() else []
    for split in ("train", "test"):
        folder = root / "cifar10" / split
        if folder.is_dir():
            out[f"cifar10_{split}_images"] = sum(1 for _ in folder.glob("*/*.png"))
    return out


# ----- the checks ---------------------------------------------------------------------------------
def summarize(metrics: dict[str, Any] | None) -> dict[str, Any]:
    keys = (
        "val/acc",
        "val/map_50",
        "time/train_s",
        "train/images_per_s",
        "train/loss",
        "train/loss_d",
        "train/loss_g",
        "val/fid",
        "val/fid_tv",
        "val/fid_classifier",
        "val/mode_coverage",
        "step",
        "epoch",
    )
    return {k: metrics[k] for k in keys if metrics and k in metrics}


def run_dlrun(session: Session, check: Check, timeout: float) -> dict[str, Any]:
    run_dir = session.runs / check.name
    log = session.logs / f"{check.name}.log"
    cmd = session.dlrun_cmd(session.overrides_of(check), run_dir)
    rc, wall, timed_out = run_logged(cmd, log, session.env, session.work, timeout)
    metrics = read_metrics(run_dir)
    res: dict[str, Any] = {
        "cmd": " ".join(cmd),
        "rc": rc,
        "wall_s": round(wall, 1),
        "timed_out": timed_out,
        "metrics": metrics,
        **summarize(metrics),
    }
    res["data"] = data_lines(log)
    res["status"] = "ok" if rc == 0 and metrics else ("timeout" if timed_out else "failed")
    notes = []
    if check.name == "mnist_fast" and metrics and not session.args.quick:
        acc, secs = metrics.get("val/acc", 0.0), metrics.get("time/train_s", 1e9)
        met = acc >= 0.99 and secs <= 2.0
        notes.append(f"target >=0.99 in <=2 s: {'MET' if met else 'MISSED'}")
    if check.fid_ckpt:
        over = session.overrides_of(check)
        notes.append("FID on mnist_fast LeNet" if "metrics.fid.ckpt" in over else "FID: auto")
        if any("no FID/KID" in line for line in tail(log, 10_000)):
            notes.append("no FID (warned)")
    res["notes"] = notes
    if res["status"] != "ok":
        res["tail"] = tail(log)
    return res


def run_resume(session: Session, check: Check, timeout: float) -> dict[str, Any]:
    """An uninterrupted run; the same run SIGTERMed just after its first step checkpoint; resumed."""
    end = time.perf_counter() + timeout
    over = session.overrides_of(check)
    ref_dir, sig_dir = session.runs / "resume_ref", session.runs / "resume_sig"
    logs = {k: session.logs / f"resume_{k}.log" for k in ("ref", "sig", "resumed")}
    cmds = {
        "ref": session.dlrun_cmd(over, ref_dir),
        "sig": session.dlrun_cmd(over, sig_dir),
        "resumed": session.dlrun_cmd(over, sig_dir, "resume=true"),
    }
    res: dict[str, Any] = {"cmd": [" ".join(c) for c in cmds.values()], "notes": []}
    begin = time.perf_counter()

    def fail(status: str, what: str, log: Path) -> dict[str, Any]:
        res.update(status=status, wall_s=round(time.perf_counter() - begin, 1))
        res["notes"].append(what)
        res["tail"] = tail(log)
        return res

    rc, _, timed_out = run_logged(
        cmds["ref"], logs["ref"], session.env, session.work, end - time.perf_counter()
    )
    ref = read_metrics(ref_dir)
    res["rc_ref"] = rc
    if rc != 0 or ref is None:
        return fail("timeout" if timed_out else "failed", "uninterrupted run failed", logs["ref"])

    # The signal goes out as soon as the first step checkpoint (checkpoint_every_n_steps) exists,
    # so it lands mid-epoch however fast the device is; 1.5 s after training starts at the latest.
    proc = start(cmds["sig"], logs["sig"], session.env, session.work)
    last = sig_dir / "checkpoints" / "last.pt"
    training_since: float | None = None
    sent_at: float | None = None
    while proc.poll() is None and time.perf_counter() < end:
        now = time.perf_counter()
        if training_since is None and any(sig_dir.glob("events.out.tfevents.*")):
            training_since = now  # dlrun opens the TensorBoard file right before training
        if last.is_file() or (training_since is not None and now - training_since > 1.5):
            proc.send_signal(signal.SIGTERM)
            sent_at = now
            break
        time.sleep(0.01)
    try:
        rc = proc.wait(timeout=max(1.0, min(60.0, end - time.perf_counter())))
        LIVE.discard(proc)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return fail("timeout", "signalled run did not stop in time", logs["sig"])
    sig_log = "\n".join(tail(logs["sig"], 10_000))
    stopped = re.search(r"stopped after step (\d+)", sig_log)
    res |= {
        "rc_signalled": rc,
        "signal_after_training_s": round(sent_at - training_since, 2)
        if sent_at is not None and training_since is not None
        else None,
        "stopped_after_step": int(stopped.group(1)) if stopped else None,
        "exit_143": rc == 143,
    }
    if sent_at is None or rc == 0:
        return fail(
            "failed",
            "the signal landed after the run had finished (or was never sent): nothing to resume",
            logs["sig"],
        )
    if rc != 143:
        return fail("failed", f"SIGTERM gave exit code {rc}, not 143", logs["sig"])

    rc, _, timed_out = run_logged(
        cmds["resumed"], logs["resumed"], session.env, session.work, end - time.perf_counter()
    )
    res["rc_resumed"] = rc
    resumed_line = [line for line in tail(logs["resumed"], 10_000) if "resumed from" in line]
    res["resumed_line"] = resumed_line[-1].split("] - ")[-1] if resumed_line else None
    got = read_metrics(sig_dir)
    if rc != 0 or got is None:
        return fail("timeout" if timed_out else "failed", "resumed run failed", logs["resumed"])
    a, b = stable(ref), stable(got)
    diffs = {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    res |= {
        "status": "ok",
        "wall_s": round(time.perf_counter() - begin, 1),
        "metrics": got,
        "metrics_ref": ref,
        **summarize(got),
        "exact": not diffs,
        "val_acc_equal": a.get("val/acc") == b.get("val/acc"),
        "train_loss_equal": a.get("train/loss") == b.get("train/loss"),
        "diffs": diffs,
    }
    res["notes"].append(
        f"SIGTERM at step {res['stopped_after_step']}; resumed metrics "
        + ("EXACT" if not diffs else f"differ in {len(diffs)} key(s)")
    )
    return res


DIST_SCRIPT = """
import json, os, sys, torch, torch.distributed as dist
backend = sys.argv[1]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
if backend == "nccl":
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group(backend, device_id=device)
else:
    device = torch.device("cpu")
    dist.init_process_group(backend)
t = torch.arange(4, dtype=torch.float32, device=device) + rank + 1
dist.all_reduce(t)
if device.type == "cuda":
    torch.cuda.synchronize()
expected = [world * i + world * (world + 1) / 2 for i in range(4)]
print("ALLREDUCE " + json.dumps({"backend": backend, "rank": rank, "world": world,
      "device": str(device), "result": t.tolist(), "ok": t.tolist() == expected}), flush=True)
dist.barrier()
dist.destroy_process_group()
"""


def run_dist(session: Session, check: Check, timeout: float) -> dict[str, Any]:
    backend = "nccl" if session.args.device == "cuda" else "gloo"
    script = session.work / "allreduce.py"
    script.write_text(DIST_SCRIPT)
    log = session.logs / f"{check.name}.log"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        str(script),
        backend,
    ]
    rc, wall, timed_out = run_logged(cmd, log, session.env, session.work, timeout)
    found = [line for line in tail(log, 10_000) if line.startswith("ALLREDUCE ")]
    result = json.loads(found[-1][len("ALLREDUCE ") :]) if found else None
    ok = rc == 0 and bool(result and result.get("ok"))
    res: dict[str, Any] = {
        "cmd": " ".join(cmd),
        "rc": rc,
        "wall_s": round(wall, 1),
        "timed_out": timed_out,
        "allreduce": result,
        "status": "ok" if ok else ("timeout" if timed_out else "failed"),
        "notes": [
            f"{backend} all_reduce -> {result['result']}" if result else f"{backend}: no result"
        ],
    }
    if not ok:
        res["tail"] = tail(log)
    return res


def run_overhead(session: Session, check: Check, timeout: float) -> dict[str, Any]:
    # Every case when the budget allows; else the three quick ones, so a table still comes out.
    if session.args.quick:
        cases, repeats = ["mnist_mlp"], "1"
    elif timeout >= 200:
        cases = ["mnist_mlp", "mnist_lenet", "mnist_fast", "cifar_lenet", "cifar_resnet18"]
        cases, repeats = [*cases, "cifar10_fast"], "3"
    else:
        cases, repeats = ["mnist_mlp", "mnist_fast", "cifar_lenet"], "3"
    opts = ["--cases", *cases, "--repeats", repeats, "--slow-repeats", repeats]
    env = dict(session.env)
    if session.args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # its only way to stay on the CPU
    log = session.logs / f"{check.name}.log"
    cmd = [sys.executable, str(REPO / "benchmarks" / "overhead.py"), *opts]
    rc, wall, timed_out = run_logged(cmd, log, env, session.work, timeout)
    lines = tail(log, 10_000)
    header = ("| case", "| ---")
    rows = [line for line in lines if line.startswith("| ") and not line.startswith(header)]
    repeats = [line for line in lines if " repeat " in line and line.split()[0] != "|"]
    return {
        "cmd": " ".join(cmd),
        "rc": rc,
        "wall_s": round(wall, 1),
        "timed_out": timed_out,
        "status": "ok" if rc == 0 and rows else ("timeout" if timed_out else "failed"),
        "table": rows,
        "repeats": repeats,
        "notes": [f"{len(rows)} case(s)"] + (["partial: see repeats"] if timed_out else []),
        **({"tail": lines[-TAIL_LINES:]} if rc != 0 else {}),
    }


RUNNERS: dict[str, Callable[[Session, Check, float], dict[str, Any]]] = {
    "dlrun": run_dlrun,
    "resume": run_resume,
    "dist": run_dist,
    "overhead": run_overhead,
}


# ----- the report ---------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def markdown(doc: dict[str, Any]) -> str:
    env = doc.get("env", {})
    args = doc["args"]
    lines = [
        "# dlrun GPU check",
        "",
        f"device={args['device']} quick={args['quick']} budget={args['budget_s']} s, "
        f"elapsed {doc['elapsed_s']} s; dlrun: {doc.get('dlrun_source')} "
        f"{doc.get('git_head', '')[:12]}",
        "",
        f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), torchvision "
        f"{env.get('torchvision')}, Python {env.get('python')}, hydra {env.get('hydra')}, "
        f"omegaconf {env.get('omegaconf')}",
        f"- cuda_available={env.get('cuda_available')} GPU: {env.get('gpu', '-')} "
        f"(capability {env.get('capability', '-')}, {env.get('gpu_memory_gib', '-')} GiB, "
        f"bf16={env.get('bf16_supported', '-')}), cuDNN {env.get('cudnn')}, NCCL "
        f"{env.get('nccl', '-')}; nvidia-smi: {env.get('nvidia_smi', '-')}",
        f"- data: {json.dumps(doc.get('data', {}))}",
        "",
        "| # | check | status | rc | wall s | train s | val/acc | img/s | train/loss | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(doc["checks"], 1):
        rc = r.get("rc", r.get("rc_resumed"))
        notes = list(r.get("notes", []))
        if r.get("train/loss_d") is not None:
            notes.append(f"loss_d {fmt(r['train/loss_d'])} loss_g {fmt(r.get('train/loss_g'))}")
        for key in ("val/fid_classifier", "val/fid", "val/fid_tv"):
            if r.get(key) is not None:
                notes.append(f"{key.split('/')[1]} {fmt(r[key])}")
        if r.get("reason"):
            notes.append(r["reason"])
        note = "; ".join(notes).replace("|", "/")
        lines.append(
            f"| {i} | {r['name']} | {r['status']} | {fmt(rc)} | {fmt(r.get('wall_s'))} "
            f"| {fmt(r.get('time/train_s'))} | {fmt(r.get('val/acc'))} "
            f"| {fmt(r.get('train/images_per_s'))} | {fmt(r.get('train/loss'))} | {note} |"
        )
    for r in doc["checks"]:
        if r["name"] == "overhead" and r.get("table"):
            lines += [
                "",
                "overhead.py:",
                "",
                "| case | plain loop s | dlrun s | dlrun / plain | plain acc | dlrun acc |",
                "| --- | --- | --- | --- | --- | --- |",
                *r["table"],
            ]
        if r["name"] == "resume" and r.get("diffs"):
            lines += ["", f"resume differences (uninterrupted, resumed): {json.dumps(r['diffs'])}"]
    return "\n".join(lines) + "\n"


def one_line(r: dict[str, Any], elapsed: float) -> str:
    parts = [f"[{elapsed:6.1f}s] {r['name']:<26} {r['status']:<8}"]
    for key, label in (
        ("rc", "rc"),
        ("wall_s", "wall"),
        ("time/train_s", "train_s"),
        ("val/acc", "acc"),
        ("val/map_50", "mAP50"),
        ("train/images_per_s", "img/s"),
        ("train/loss", "loss"),
    ):
        if r.get(key) is not None:
            parts.append(f"{label}={fmt(r[key])}")
    if r.get("notes"):
        parts.append("| " + "; ".join(r["notes"]))
    if r.get("reason"):
        parts.append("| " + r["reason"])
    return " ".join(parts)


# ----- main ---------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="where gpu_check.json / .md are written")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="a few steps on subsets: a dry run")
    parser.add_argument("--budget-s", type=float, default=390.0, help="for all checks together")
    parser.add_argument(
        "--data",
        default=os.environ.get("DLRUN_DATA", "data"),
        help="data root (MNIST/raw, cifar10/); default $DLRUN_DATA",
    )
    parser.add_argument(
        "--runs-dir", default="/tmp/gpu_runs", help="run folders, logs and caches (not under --out)"
    )
    parser.add_argument("--only", nargs="+", help="run just these checks (by name)")
    args = parser.parse_args()

    session = Session(args)
    in_flight: dict[str, Any] = {}  # the check running now, for the record if we are stopped

    def stop(signum: int, frame: object) -> None:
        # Killed from outside (a wall-clock limit): end the children, keep what was measured.
        for proc in list(LIVE):
            kill_group(proc)
        session.info["stopped_by"] = signal.Signals(signum).name
        if in_flight:
            session.results.append(in_flight | {"status": "killed", "reason": "gpu_check stopped"})
        session.save()
        print(f"gpu_check: stopped by {signal.Signals(signum).name}", flush=True)
        sys.exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    print(
        f"gpu_check: device={args.device} quick={args.quick} budget={args.budget_s:.0f}s "
        f"out={session.out} work={session.work}",
        flush=True,
    )
    session.info = {
        "started": datetime.now().isoformat(timespec="seconds"),
        **source_info(),
        "data": data_info(Path(args.data).resolve()),
    }
    session.save()
    session.info["env"] = env = probe_environment(session)
    print("env: " + json.dumps(env), flush=True)
    session.save()
    no_cuda = args.device == "cuda" and env.get("cuda_available") is False

    for check in checks():
        if args.only and check.name not in args.only:
            continue
        left = session.left()
        result: dict[str, Any] = {"name": check.name, "what": check.what, "kind": check.kind}
        if no_cuda:
            result |= {"status": "skipped", "reason": "--device cuda but torch sees no CUDA"}
        elif left < check.min_s:
            result |= {
                "status": "skipped",
                "reason": f"budget: {left:.0f} s left, needs >= {check.min_s:.0f} s",
            }
        else:
            timeout = min(check.timeout_s, left)
            print(
                f"[{session.elapsed():6.1f}s] -> {check.name} (timeout {timeout:.0f}s)", flush=True
            )
            in_flight = result | {"timeout_s": round(timeout, 1)}
            try:
                result |= RUNNERS[check.kind](session, check, timeout)
            except Exception as err:  # a bug here must not lose the other checks' results
                result |= {"status": "error", "reason": f"gpu_check: {type(err).__name__}: {err}"}
            result["timeout_s"] = round(timeout, 1)
            in_flight = {}
        session.results.append(result)
        session.save()
        print(one_line(result, session.elapsed()), flush=True)

    counts: dict[str, int] = {}
    for r in session.results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(
        f"gpu_check done in {session.elapsed():.1f}s: {counts}; {session.out / 'gpu_check.md'}",
        flush=True,
    )


if __name__ == "__main__":
    main()
