"""What each hot-loop option costs: dlrun with one option on, beside dlrun without it and the
plain loop of benchmarks/overhead.py (which has none of them), alternating, medians.

    DLRUN_DATA=../shared/datasets python benchmarks/overhead.py  # the plain-loop reference
    DLRUN_DATA=../shared/datasets python benchmarks/option_costs.py --repeats 3
    DLRUN_DATA=../shared/datasets python benchmarks/option_costs.py --options ema mixup

The case is LeNet-5 on CIFAR-10 (random crop + flip), batch 64, one epoch: a small network, so
the options' per-step work shows rather than hides behind the convolutions. Times are dlrun's
own `time/train_s` (evaluation excluded; the EMA's extra evaluation too).
"""

import argparse
import statistics

from overhead import compose_cfg, dlrun_run, plain_loop

CASE = ["model=lenet", "model.activation=relu", "model.pool=max", "data=cifar10"]
OPTIONS = {
    "none": [],
    "ema": ["trainer.ema.decay=0.999"],
    "mixup": ["data.mixup=0.2"],
    "cutmix": ["data.cutmix=1.0"],
    "randaugment": ["data.randaugment.num_ops=2", "data.randaugment.magnitude=9"],
    "trivialaugment": ["data.trivialaugment=true"],
    "random_erasing": ["data.random_erasing=0.25"],
    "deterministic": ["trainer.deterministic=true"],
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds")
    args = parser.parse_args()
    names = ["none", *[o for o in args.options if o != "none"]]
    plain = plain_loop(compose_cfg(CASE))
    times: dict[str, list[float]] = {"plain": [], **{n: [] for n in names}}
    accs: dict[str, list[float]] = {k: [] for k in times}
    for i in range(args.repeats):  # one of each per round: drift hits every contender alike
        s, acc = plain()
        times["plain"].append(s)
        accs["plain"].append(acc)
        for name in names:
            s, acc = dlrun_run(compose_cfg(CASE + OPTIONS[name]))
            times[name].append(s)
            accs[name].append(acc)
        print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
              flush=True)  # fmt: skip
    med = {k: statistics.median(v) for k, v in times.items()}
    print("\n| dlrun with | median s | / dlrun without | / plain loop | test acc |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| (plain loop) | {med['plain']:.2f} | – | 1.000x | {accs['plain'][-1]:.4f} |")
    for name in names:
        flags = " ".join(OPTIONS[name]) or "no option"
        print(f"| `{flags}` | {med[name]:.2f} | {med[name] / med['none']:.3f}x "
              f"| {med[name] / med['plain']:.3f}x | {accs[name][-1]:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
