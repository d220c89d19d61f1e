"""dlrun vs the course notes' MNIST MLP loop (DataLoader + ToTensor), one epoch each, side by side.

    DLRUN_DATA=../shared/datasets python benchmarks/mnist_mlp_dataloader.py --repeats 3

Both train the notes' MNISTNN (784-128-10, ReLU) with Adam(lr=1e-3), batch 64, one epoch, on the
same machine, alternating, and the medians are compared. dlrun runs as the real `dlrun` command
and reports its training time (`time/train_s` in metrics.json); the notes' loop is timed around its
epoch loop. Evaluation is outside both timings.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn, optim
from torch.utils.data import DataLoader
from torchvision import datasets, transforms


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


def notes_loop(root: str, workers: int) -> tuple[float, float]:
    """The notes' loop for one epoch: (seconds, test accuracy)."""
    torch.manual_seed(0)
    tf = transforms.ToTensor()
    train = datasets.MNIST(root, train=True, transform=tf)
    test = datasets.MNIST(root, train=False, transform=tf)
    train_loader = DataLoader(train, batch_size=64, shuffle=True, num_workers=workers)
    model = MNISTNN()
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(model.parameters(), lr=0.001)
    start = time.perf_counter()
    model.train()
    running_loss = 0.0
    for images, labels in train_loader:
        outputs = model(images)
        loss = criterion(outputs, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
    seconds = time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in DataLoader(test, batch_size=1000):
            correct += (model(images).argmax(1) == labels).sum().item()
    return seconds, correct / len(test)


def plain_loop(root: str) -> tuple[float, float]:
    """The floor: the same model and optimizer over pre-normalized tensors, shuffled by index."""
    torch.manual_seed(0)
    train, test = datasets.MNIST(root, train=True), datasets.MNIST(root, train=False)
    x, y = (train.data[:, None].float() / 255 - 0.1307) / 0.3081, train.targets
    model = MNISTNN()
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(model.parameters(), lr=0.001)
    start = time.perf_counter()
    perm = torch.randperm(len(x))
    for i in range(0, len(x), 64):
        idx = perm[i : i + 64]
        loss = criterion(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        xt = (test.data[:, None].float() / 255 - 0.1307) / 0.3081
        acc = (model(xt).argmax(1) == test.targets).float().mean().item()
    return seconds, acc


def dlrun_epoch(root: str) -> tuple[float, float]:
    """The same epoch as the real `dlrun` command: (training seconds, test accuracy)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "dlrun", "model=mlp", "data=mnist", "optim=adam", "optim.lr=0.001",
               "data.batch_size=64", "trainer.max_epochs=1", f"data.root={root}", f"hydra.run.dir={out}"]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, TQDM_DISABLE="1"))
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    return metrics["time/train_s"], metrics["val/acc"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default=os.environ.get("DLRUN_DATA", "data"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--workers", type=int, default=0, help="DataLoader workers of the notes' loop"
    )
    args = parser.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {
        f"notes' DataLoader + ToTensor loop (num_workers={args.workers})": [],
        "plain PyTorch loop over tensors": [],
        "dlrun": [],
    }
    loops = [
        lambda: notes_loop(args.root, args.workers),
        lambda: plain_loop(args.root),
        lambda: dlrun_epoch(args.root),
    ]
    for i in range(args.repeats):  # alternate, so drift on a shared machine hits all alike
        for (name, results), loop in zip(runs.items(), loops, strict=True):
            results.append(loop())
            print(f"repeat {i + 1}: {name}: {results[-1][0]:.2f}s, acc {results[-1][1]:.4f}")
    med = {name: statistics.median(s for s, _ in r) for name, r in runs.items()}
    print(
        f"\n| MNIST MLP, 1 epoch, batch 64, Adam 1e-3 | s/epoch (median of {args.repeats}) ", end=""
    )
    print("| time / dlrun's | test acc |\n| --- | --- | --- | --- |")
    for name, results in runs.items():
        acc = statistics.median(a for _, a in results)
        print(f"| {name} | {med[name]:.2f} | {med[name] / med['dlrun']:.2f}x | {acc:.4f} |")


if __name__ == "__main__":
    main()
