"""dlrun vs the usual DataLoader training scripts, one epoch each, side by side.

    DLRUN_DATA=../shared/datasets python benchmarks/vs_dataloader.py --repeats 3
    DLRUN_DATA=../shared/datasets python benchmarks/vs_dataloader.py --cases mnist_mlp --batch 256

Two cases, each the same network, optimizer (constant lr), batch size and one epoch on both sides:

- mnist_mlp: the course notes' loop verbatim -- MNISTNN (784-128-10, ReLU), Adam(lr=1e-3),
  `datasets.MNIST(transform=ToTensor())` through `DataLoader(batch_size=64, shuffle=True)` with the
  notes' num_workers=0 -- vs `dlrun model=mlp data=mnist optim=adam optim.lr=0.001 sched=none`.
- cifar_lenet: the torchvision tutorial's CIFAR-10 script -- an in-memory uint8 HWC array read
  per sample through PIL (what `torchvision.datasets.CIFAR10.__getitem__` does), RandomCrop(32, 4)
  + RandomHorizontalFlip + ToTensor + Normalize, `DataLoader(shuffle=True, num_workers=<cores>)`
  -- vs `dlrun model=lenet data=cifar10` with the same augmentation, both LeNet-5 (ReLU, max pool).
  The official CIFAR pickles are not on this machine, so the script's array is the decoded PNGs.

dlrun runs in this process through `dlrun.cli.run` (the command's code) and reports its own
`time/train_s`; the scripts are timed around their epoch loop (worker start-up included, as a
script pays it every epoch). Evaluation is outside every timing; test accuracy is printed.
"""

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).parent))
from overhead import compose_cfg, dlrun_run  # noqa: E402


class MNISTNN(nn.Module):  # verbatim from the notes
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 128)
        self.fc2 = nn.Linear(128, 10)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        x = self.relu(self.fc1(x))
        return self.fc2(x)


class ArrayDataset(Dataset):
    """torchvision.datasets.CIFAR10's in-memory layout and __getitem__: HWC uint8 -> PIL -> transform."""

    def __init__(self, images: np.ndarray, labels: list[int], transform: Callable) -> None:
        self.data, self.targets, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def script_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, train: DataLoader, test: DataLoader
) -> tuple[float, float]:
    """The scripts' loop: one epoch (timed), then test accuracy (not timed)."""
    criterion = nn.CrossEntropyLoss()
    start = time.perf_counter()
    model.train()
    running_loss = 0.0
    for images, labels in train:
        outputs = model(images)
        loss = criterion(outputs, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
    seconds = time.perf_counter() - start
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in test:
            correct += (model(images).argmax(1) == labels).sum().item()
            total += len(labels)
    return seconds, correct / total


def mnist_script(root: str, batch: int, workers: int) -> Callable[[], tuple[float, float]]:
    tf = transforms.ToTensor()
    train = datasets.MNIST(root, train=True, transform=tf)
    test = datasets.MNIST(root, train=False, transform=tf)

    def run() -> tuple[float, float]:
        torch.manual_seed(0)
        model = MNISTNN()
        loader = DataLoader(train, batch_size=batch, shuffle=True, num_workers=workers)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
        return script_epoch(model, optimizer, loader, DataLoader(test, batch_size=1000))

    return run


def cifar_script(cfg: DictConfig, batch: int, workers: int) -> Callable[[], tuple[float, float]]:
    data = instantiate(cfg.data)  # dlrun's decoded copy: uint8 (N, C, H, W) -> the HWC array
    norm = transforms.Normalize(list(cfg.data.mean), list(cfg.data.std))
    train_tf = transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
         transforms.ToTensor(), norm]
    )  # fmt: skip
    test_tf = transforms.Compose([transforms.ToTensor(), norm])
    hwc = lambda x: x.permute(0, 2, 3, 1).contiguous().numpy()  # noqa: E731
    train = ArrayDataset(hwc(data.train_x), data.train_y.tolist(), train_tf)
    test = ArrayDataset(hwc(data.val_x), data.val_y.tolist(), test_tf)

    def run() -> tuple[float, float]:
        torch.manual_seed(0)
        model = instantiate(cfg.model)
        loader = DataLoader(train, batch_size=batch, shuffle=True, num_workers=workers)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
        test_loader = DataLoader(test, batch_size=1000, num_workers=workers)
        return script_epoch(model, optimizer, loader, test_loader)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", default=["mnist_mlp", "cifar_lenet"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="batch size of both sides")
    parser.add_argument("--root", default=os.environ.get("DLRUN_DATA", "data"))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    same = ["optim=adam", "optim.lr=0.001", "sched=none", f"data.batch_size={args.batch}"]
    cases = {
        "mnist_mlp": (
            f"MNIST MLP: notes' DataLoader + ToTensor loop (num_workers=0), batch {args.batch}",
            lambda: mnist_script(args.root, args.batch, 0),
            compose_cfg(["model=mlp", "data=mnist", *same]),
        ),
        "cifar_lenet": (
            f"CIFAR-10 LeNet: DataLoader + RandomCrop/Flip/Normalize (num_workers={cores}), "
            f"batch {args.batch}",
            None,
            compose_cfg(
                ["model=lenet", "model.activation=relu", "model.pool=max", "data=cifar10", *same]
            ),
        ),
    }
    rows = []
    for name in args.cases:
        title, make_script, cfg = cases[name]
        script = make_script() if make_script else cifar_script(cfg, args.batch, cores)
        runs: dict[str, list[tuple[float, float]]] = {"script": [], "dlrun": []}
        for i in range(args.repeats):  # alternate, so drift on a shared machine hits both alike
            runs["script"].append(script())
            runs["dlrun"].append(dlrun_run(cfg))
            print(f"{name} repeat {i + 1}: " + ", ".join(
                f"{k} {v[-1][0]:.2f}s acc {v[-1][1]:.4f}" for k, v in runs.items()), flush=True)  # fmt: skip
        med = {k: [statistics.median(r[j] for r in v) for j in (0, 1)] for k, v in runs.items()}
        rows.append((title, *med["script"], *med["dlrun"]))
    print(
        f"\n| case | script s/epoch (median of {args.repeats}) | dlrun s/epoch | speed-up ", end=""
    )
    print("| script acc | dlrun acc |\n| --- | --- | --- | --- | --- | --- |")
    for title, script_s, script_acc, dlrun_s, dlrun_acc in rows:
        print(f"| {title} | {script_s:.2f} | {dlrun_s:.2f} | {script_s / dlrun_s:.1f}x "
              f"| {script_acc:.4f} | {dlrun_acc:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
