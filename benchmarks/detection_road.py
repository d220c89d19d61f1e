"""The notes' road to detection in one table: every detector's run folder -> one markdown row.

    python benchmarks/detection_road.py runs/road/sliding_window runs/road/yolo_v1 ...

Per run: test mAP@0.5 and COCO mAP@[.5:.95] and training time from its metrics.json (the 2,000
fixed test scenes of data=mnist_det, scored by the final weights; best.pt chosen on the validation
scenes of held-out training digits), trainable parameters, and inference images per second,
measured here: the run's best.pt detecting the first `--timed` of those scenes (500) in batches
of 250, median of `--rounds` rounds, on this machine's threads. For R-CNN and Fast R-CNN the selective-search
proposals are precomputed (cached), as both papers time them; their own images per second is a
separate column, measured on 200 of the scenes.
"""

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

import dlrun
from dlrun.data import proposals
from dlrun.data.digit_scenes import SceneData


def scenes(root: str, with_proposals: dict | None) -> SceneData:
    data = SceneData(
        name="mnist_det", kind="detection", source="mnist", root=root, download=False,
        train_scenes=1, val_scenes=0, mean=[0.1], std=[0.25], cache_dir="~/.cache/dlrun",
    )  # fmt: skip
    data.setup(torch.device("cpu"), 0)
    if with_proposals is not None:
        data.attach_proposals(**with_proposals)
    return data


@torch.no_grad()
def images_per_second(model: torch.nn.Module, data: SceneData, rounds: int, n: int) -> float:
    batch = data.example_batch(n, "test")
    extra = "proposals" in batch
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(0, n, 250):
            kw = {"proposals": batch["proposals"][i : i + 250]} if extra else {}
            model(batch["image"][i : i + 250], **kw)
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


def row(run: Path, root: str, rounds: int, timed: int) -> str:
    metrics = json.loads((run / "metrics.json").read_text())
    model, _ = dlrun.load(run / "checkpoints" / "best.pt")
    model.eval()
    settings = getattr(model, "proposal_settings", None)
    data = scenes(root, dict(settings) if settings is not None else None)
    ips = images_per_second(model, data, rounds, timed)
    ss = "–"
    if settings is not None:
        images = data.scenes["test"].images[:200]
        start = time.perf_counter()
        proposals.selective_search(images, **dict(settings))
        ss = f"{200 / (time.perf_counter() - start):.0f}"
    overrides = (run / ".hydra" / "overrides.yaml").read_text().split("\n")
    command = "dlrun " + " ".join(o.removeprefix("- ").strip() for o in overrides if o.strip())
    name, params = type(model).__name__, f"{metrics['params']:,}"
    scores = f"{metrics['test/map_50']:.3f} | {metrics['test/map']:.3f}"
    out = (
        f"| {name} | {scores} | {ips:.1f} | {ss} | {metrics['time/train_s'] / 60:.1f} | "
        f"{params} | `{command}` |"
    )
    if hasattr(model, "conv_form"):  # the sliding window: its loop over crops too
        images = data.example_batch(100, "test")["image"]
        model.conv_form = False
        start = time.perf_counter()
        with torch.no_grad():
            for part in images.split(50):
                model(part)
        loop = 100 / (time.perf_counter() - start)
        model.conv_form = True
        out += (
            f"\n| {name}, loop over crops | (the same scores) | {loop:.1f} | – | (the same run) | "
            f"{params} | `... model.convolutional=false` (same checkpoint) |"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--root", default="../shared/datasets")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timed", type=int, default=500, help="test scenes timed per round")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(f"commit {commit}, {torch.get_num_threads()} threads")
    print("| detector | test mAP@0.5 | test mAP | images/s | proposals/s | train min | params | command |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in args.runs:
        print(row(run, args.root, args.rounds, args.timed), flush=True)


if __name__ == "__main__":
    main()
