"""dlrun vs a plain PyTorch loop over the same device tensors: what the tool costs per epoch.

    DLRUN_DATA=../shared/datasets python benchmarks/overhead.py --repeats 5
    DLRUN_DATA=../shared/datasets python benchmarks/overhead.py --cases mnist_mlp --repeats 3

For each case, dlrun runs in this process through `dlrun.cli.run` (the same code as the command;
its own `time/train_s` is the training time, evaluation and set-up excluded), and the plain loop
trains the same network (same config, same seed, same initial weights) with the same optimizer
(dlrun's fused choice included), learning-rate schedule, loss, precision, memory layout, batch
size, number of steps and data augmentation kernels, on the very tensors dlrun loaded. The loop
has no metrics, no logging, no progress bar: the floor a tool can reach. The two alternate;
medians are compared. Both sides' test accuracy is printed too (evaluation is outside the timing).
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from dlrun.cli import CONFIG_DIR, run
from dlrun.data.transforms import RandomCrop, RandomHFlip
from dlrun.engine.introspect import count_flops
from dlrun.engine.optimize import build_optimizer
from dlrun.engine.precision import resolve_precision
from dlrun.tasks.classification.trainer import ClassificationTrainer


@dataclass
class Case:
    title: str
    overrides: list[str]


CASES = {
    "mnist_mlp": Case("MLP, MNIST, batch 128, 1 epoch", ["model=mlp", "data=mnist"]),
    "mnist_lenet": Case("LeNet-5, MNIST, batch 128, 1 epoch", ["model=lenet", "data=mnist"]),
    "cifar_lenet": Case(
        "LeNet-5, CIFAR-10 (crop+flip), batch 64, 1 epoch", ["model=lenet", "data=cifar10"]
    ),
    "cifar_resnet18": Case(
        "ResNet-18, CIFAR-10 (crop+flip), batch 64, 30 steps",
        ["model=resnet18", "data=cifar10", "trainer.max_steps=30", "data.eval_subset=2000"],
    ),
    "notes_mlp": Case(
        "the notes' recipe: MLP, MNIST, Adam 1e-3, batch 64, 1 epoch (938 steps)",
        ["model=mlp", "data=mnist", "optim=adam", "optim.lr=0.001", "data.batch_size=64"],
    ),
    "mnist_fast": Case("experiment=mnist_fast (LeNet-BN, 1 epoch)", ["experiment=mnist_fast"]),
    "cifar10_fast": Case(
        "experiment=cifar10_fast (AirNet, batch 1024), 8 steps",
        ["experiment=cifar10_fast", "trainer.max_steps=8", "data.eval_subset=2000"],
    ),
}
SLOW = ("cifar_resnet18", "cifar10_fast")
# data.val_split=0: every training image, as the plain loops train on (the default holds 10% out)
COMMON = ["trainer.max_epochs=1", "trainer.progress=false", "data.val_split=0"]


def compose_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=COMMON + overrides)


def dlrun_run(cfg: DictConfig) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as out:
        metrics = run(cfg, out)
    return metrics["time/train_s"], metrics["val/acc"]


def plain_loop(cfg: DictConfig) -> Callable[[], tuple[float, float]]:
    """A hand-written loop over dlrun's own device tensors, built once, timed per call."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    data = instantiate(cfg.data)
    data.setup(device, cfg.seed)
    x_all, y_all = data.train_x, data.train_y
    std = torch.tensor(list(cfg.data.std), device=device).view(1, -1, 1, 1)
    mean = torch.tensor(list(cfg.data.mean), device=device).view(1, -1, 1, 1)
    batch, pad, flip = cfg.data.batch_size, cfg.data.crop_padding, cfg.data.hflip
    per_epoch = len(x_all) // batch + (len(x_all) % batch > 0)
    steps = min(cfg.trainer.max_steps or per_epoch, per_epoch)
    # the precision dlrun resolves for this network (auto: bf16 on a bf16 CPU for >= 10 MFLOPs)
    probe = instantiate(cfg.model)
    flops = count_flops(probe, tuple(data.describe()["input_shape"]), device)
    dtype = resolve_precision(
        cfg.trainer.precision, device, ClassificationTrainer.cpu_bf16, flops, "the plain loop"
    )
    layout = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    loss_fn = instantiate(cfg.loss)

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return ((x.float() / 255 - mean) / std).contiguous(memory_format=layout)

    crop, hflip = RandomCrop(padding=pad, keys=("image",)), RandomHFlip(keys=("image",))

    def epoch() -> tuple[float, float]:
        torch.manual_seed(cfg.seed)
        model = instantiate(cfg.model)
        if hasattr(model, "init_from_data"):
            model.init_from_data(normalize(x_all[:5000]).cpu())
        model = model.to(device, memory_format=layout).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(instantiate(cfg.optim), params)
        sched = instantiate(cfg.sched)(optimizer, total_steps=steps, steps_per_epoch=per_epoch)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        order = torch.randperm(len(x_all), device=device, generator=gen)
        for i in range(steps):
            idx = order[i * batch : (i + 1) * batch]
            xb, yb = x_all[idx], y_all[idx]
            if pad:
                xb = crop({"image": xb}, gen)["image"]
            if flip:
                xb = hflip({"image": xb}, gen)["image"]
            xb = normalize(xb)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = model(xb)
                loss = loss_fn(out[0] if isinstance(out, tuple) else out, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if sched is not None and i + 1 < steps:
                sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            correct = sum(
                (model(normalize(x)).argmax(1) == y).sum()
                for x, y in zip(data.val_x.split(1000), data.val_y.split(1000), strict=True)
            )
        return seconds, int(correct) / len(data.val_y)

    return epoch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=8, help="alternating pairs per case")
    parser.add_argument(
        "--slow-repeats", type=int, default=3, help="repeats of the ResNet-18 and AirNet cases"
    )
    args = parser.parse_args()
    rows = []
    for name in args.cases:
        case = CASES[name]
        cfg = compose_cfg(case.overrides)
        plain = plain_loop(cfg)
        runs: dict[str, list[tuple[float, float]]] = {"plain": [], "dlrun": []}
        repeats = args.slow_repeats if name in SLOW else args.repeats
        for i in range(repeats):  # alternate, so drift on a shared machine hits both alike
            runs["plain"].append(plain())
            runs["dlrun"].append(dlrun_run(cfg))
            print(f"{name} repeat {i + 1}: " + ", ".join(
                f"{k} {v[-1][0]:.2f}s acc {v[-1][1]:.4f}" for k, v in runs.items()), flush=True)  # fmt: skip
        med = {k: [statistics.median(r[j] for r in v) for j in (0, 1)] for k, v in runs.items()}
        rows.append((case.title, *med["plain"], *med["dlrun"]))
    print("\n| case | plain loop s (median) | dlrun s (median) | dlrun / plain ", end="")
    print("| plain acc | dlrun acc |\n| --- | --- | --- | --- | --- | --- |")
    for title, plain_s, plain_acc, dlrun_s, dlrun_acc in rows:
        print(f"| {title} | {plain_s:.2f} | {dlrun_s:.2f} | {dlrun_s / plain_s:.3f}x "
              f"| {plain_acc:.4f} | {dlrun_acc:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
