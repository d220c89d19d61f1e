"""Where a CycleGAN training step spends its time, and what memory layout makes it fastest.

    DLRUN_DATA=../shared/datasets python benchmarks/cyclegan_profile.py --size 128 --steps 6
    DLRUN_DATA=../shared/datasets python benchmarks/cyclegan_profile.py --size 128 --profile

Builds the real trainer (`dlrun model=cyclegan data=horse2zebra`, as the CLI does) once per
variant and times `trainer.step(batch)` on real batches: the variants alternate, each round
runs every variant for --steps steps after one warm-up step, and the table gives the median of
the per-round medians. --profile prints torch.profiler's table of the slowest operators for the
first variant instead.
"""

import argparse
import statistics
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from hydra import compose, initialize_config_dir

from dlrun.cli import CONFIG_DIR, build_trainer


def trainer_for(size: int, overrides: list[str], run_dir: Path):  # noqa: ANN201
    load = {256: 286, 128: 143, 64: 72}.get(size, size + size // 8)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            "model=cyclegan", "data=horse2zebra", f"data.image_size={size}",
            f"data.load_size={load}", "device=cpu", "trainer.progress=false",
            "metrics.fid.features=none", *overrides,
        ])  # fmt: skip
    trainer = build_trainer(cfg, run_dir)
    trainer.train_mode()
    return trainer


def time_steps(trainer, batches: list[dict], steps: int) -> list[float]:  # noqa: ANN001
    times = []
    for batch in batches[: steps + 1]:
        start = time.perf_counter()
        trainer.opt.begin(True)
        trainer.step(batch)
        trainer.opt.end()
        times.append(time.perf_counter() - start)
        trainer.step_count += 1
    return times[1:]  # the first step warms up (allocations, oneDNN primitive caches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--variants",
        default="trainer.channels_last=false;trainer.channels_last=true",
        help="';'-separated override sets, ',' between overrides of one set",
    )
    args = parser.parse_args()
    variants = [v.split(",") if v else [] for v in args.variants.split(";")]
    with TemporaryDirectory() as tmp:
        trainers = [trainer_for(args.size, v, Path(tmp) / str(i)) for i, v in enumerate(variants)]
        loader = trainers[0].train_loader()
        batches = [b for _, b in zip(range(args.steps + 1), loader.iterate(), strict=False)]
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            time_steps(trainers[0], batches, 1)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                time_steps(trainers[0], batches, args.steps)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
            return
        medians: list[list[float]] = [[] for _ in variants]
        for r in range(args.rounds):
            order = range(len(variants)) if r % 2 == 0 else reversed(range(len(variants)))
            for i in order:
                medians[i].append(statistics.median(time_steps(trainers[i], batches, args.steps)))
        base = statistics.median(medians[0])
        print(f"| variant ({args.size} px, batch 1, {torch.get_num_threads()} threads) "
              "| s/step, median of rounds | rounds | ratio |")  # fmt: skip
        print("| --- | --- | --- | --- |")
        for v, m in zip(variants, medians, strict=True):
            med = statistics.median(m)
            rounds = ", ".join(f"{x:.3f}" for x in m)
            print(f"| {' '.join(v) or 'defaults'} | {med:.3f} | {rounds} | {med / base:.3f} |")


if __name__ == "__main__":
    main()
