"""The extension point is real: a new task (trainer, data module, model, configs) defined here,
outside dlrun/ and configs/, trains, checkpoints, resumes and evaluates through `dlrun`."""

import json
import textwrap
from pathlib import Path

import pytest

from tests.test_cli import dlrun

# A denoising autoencoder on fake images. Its loss is per pixel and a second metric counts only
# the bright pixels (a count that changes from batch to batch), so neither is "per image".
TASK = '''
import json
from pathlib import Path

import torch
from torch import nn

from dlrun.data.samplers import RandomSampler, SequentialSampler
from dlrun.data.tensor_loader import TensorLoader
from dlrun.data.transforms import Normalize, RandomHFlip
from dlrun.engine.loop import Trainer


class NoisyImages:
    """Random 8x8 grey images: the input is the image plus noise, the target the image."""

    def __init__(self, *, name: str, n_train: int, n_val: int, batch_size: int) -> None:
        gen = torch.Generator().manual_seed(123)
        self.x = torch.randint(0, 256, (n_train + n_val, 1, 8, 8), generator=gen, dtype=torch.uint8)
        self.name, self.n_train, self.n_val = name, n_train, n_val
        self.batch_size, self.eval_batch_size = batch_size, 16

    def setup(self, device, seed, rank=0, world_size=1):
        self.x = self.x.to(device)
        self.order = torch.Generator(device=device).manual_seed(seed)
        self.aug = torch.Generator(device=device).manual_seed(seed + 1)

    def generators(self):
        return {"order": self.order, "aug": self.aug}

    def _loader(self, x, sampler, transforms):
        return TensorLoader({"image": x}, sampler, transforms=transforms,
                            order_generator=self.order, aug_generator=self.aug)

    def train_loader(self, **_):
        x = self.x[: self.n_train]
        return self._loader(x, RandomSampler(len(x), self.batch_size),
                            [RandomHFlip(keys=("image",)), Normalize([0.0], [1.0])])

    def val_loader(self):
        x = self.x[self.n_train :]
        return self._loader(x, SequentialSampler(len(x), self.eval_batch_size), [Normalize([0.0], [1.0])])

    test_loader = val_loader

    def example_batch(self, n, split="val", **_):
        return {"image": self.x[:n].float() / 255}

    def describe(self):
        return {"name": self.name, "input_shape": (1, 8, 8), "num_classes": 0, "classes": [],
                "sizes": {"train": self.n_train, "val": self.n_val, "test": self.n_val},
                "val_is_test": False}


class DAE(nn.Module):
    def __init__(self, *, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 64))

    def forward(self, x):  # (B, 1, 8, 8) -> (B, 1, 8, 8)
        return self.net(x).view_as(x)


class DenoiseTrainer(Trainer):
    default_monitor = "val/mse"

    def __init__(self, *, loss, noise: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.noise, self.record = noise, []

    def logged_metrics(self):
        return ["val/mse", "train/mse"]

    def step(self, batch):
        clean = batch["image"]
        noise = torch.randn(clean.shape, generator=self.data.generators()["aug"])
        err = (self.net()(clean + self.noise * noise) - clean) ** 2
        self.optimize(err.mean())
        bright = clean > 0.5
        out = {"mse": (err.detach().sum(), err.numel()),
               "bright_mse": ((err.detach() * bright).sum(), bright.sum())}
        self.record.append({k: [float(s), float(n)] for k, (s, n) in out.items()})
        return out

    @torch.no_grad()
    def evaluate(self, loader, prefix):
        self.model.eval()
        total, n = 0.0, 0
        for batch in loader:
            total += float(((self.net()(batch["image"]) - batch["image"]) ** 2).sum())
            n += batch["image"].numel()
        return {f"{prefix}/mse": total / n}

    def log_end(self, writer):
        path = self.run_dir / "steps.jsonl"
        with open(path, "a") as f:
            for row in self.record:
                f.write(json.dumps(row) + "\\n")
'''

CONFIGS = {
    "data/noisy.yaml": """
        _target_: dae_task.NoisyImages
        name: noisy
        n_train: 40
        n_val: 16
        batch_size: 8
    """,
    "model/dae.yaml": """
        defaults:
          - override /trainer@_global_.trainer: denoise
          - override /sched@_global_.sched: none
        _target_: dae_task.DAE
        hidden: 16
    """,
    "trainer/denoise.yaml": """
        _target_: dae_task.DenoiseTrainer
        max_epochs: 2
        max_steps: null
        log_every_n_steps: 2
        checkpoint_every_n_steps: null
        monitor: auto
        monitor_mode: min
        noise: 0.3
    """,
}


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    root = tmp_path / "task"
    for name, text in CONFIGS.items():
        (root / "configs" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "configs" / name).write_text(textwrap.dedent(text))
    (root / "dae_task.py").write_text(TASK)
    return root


def test_a_new_task_trains_resumes_and_evaluates_through_dlrun(task_dir: Path, tmp_path: Path):
    env = {"PYTHONPATH": str(task_dir)}
    base = (f"hydra.searchpath=[file://{task_dir / 'configs'}]", "model=dae", "data=noisy",
            "device=cpu", "optim=sgd", "optim.lr=0.05")  # fmt: skip

    def run(*args: str) -> None:
        done = dlrun(*base, *args, data=tmp_path, cwd=tmp_path, env_extra=env)
        assert done.returncode == 0, done.stderr

    whole, part = tmp_path / "whole", tmp_path / "part"
    run(f"hydra.run.dir={whole}")
    run(f"hydra.run.dir={part}", "trainer.max_epochs=1")
    run(f"hydra.run.dir={part}", "trainer.max_epochs=2", "resume=true")
    run(f"hydra.run.dir={tmp_path / 'eval'}", "mode=eval", f"ckpt={whole}/checkpoints/best.pt")

    metrics = json.loads((whole / "metrics.json").read_text())
    resumed = json.loads((part / "metrics.json").read_text())
    assert metrics["train/mse"] == resumed["train/mse"] and metrics["val/mse"] == resumed["val/mse"]
    assert metrics["step"] == 10 and (whole / "checkpoints" / "best.pt").is_file()
    # The epoch means, by hand: the last epoch's (sum, count) pairs as the step returned them.
    steps = [json.loads(line) for line in (whole / "steps.jsonl").read_text().splitlines()]
    last_epoch = steps[5:]
    for key in ("mse", "bright_mse"):
        by_hand = sum(s[key][0] for s in last_epoch) / sum(s[key][1] for s in last_epoch)
        assert metrics[f"train/{key}"] == pytest.approx(by_hand, rel=1e-5)
    assert metrics["train/mse"] != pytest.approx(metrics["train/bright_mse"])
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["test/mse"] <= metrics["val/mse"] * (1 + 1e-6)  # best.pt: the lowest val/mse
