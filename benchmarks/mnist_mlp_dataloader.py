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
    notes, ours = [], []
    for i in range(args.repeats):  # alternate, so drift on a shared machine hits both alike
        notes.append(notes_loop(args.root, args.workers))
        ours.append(dlrun_epoch(args.root))
        print(f"repeat {i + 1}: notes {notes[-1][0]:.2f}s acc {notes[-1][1]:.4f} | "
              f"dlrun {ours[-1][0]:.2f}s acc {ours[-1][1]:.4f}", flush=True)  # fmt: skip
    n_s, d_s = statistics.median(s for s, _ in notes), statistics.median(s for s, _ in ours)
    n_a, d_a = statistics.median(a for _, a in notes), statistics.median(a for _, a in ours)
    print(
        f"\n| MNIST MLP, 1 epoch, batch 64 | train s/epoch (median of {args.repeats}) | test acc |"
    )
    print("| --- | --- | --- |")
    print(
        f"| notes' DataLoader + ToTensor loop (num_workers={args.workers}) | {n_s:.2f} | {n_a:.4f} |"
    )
    print(f"| dlrun | {d_s:.2f} | {d_a:.4f} |")
    print(f"| **speed-up** | **{n_s / d_s:.1f}x** | |")


if __name__ == "__main__":
    main()
