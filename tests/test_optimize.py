"""Optimisation (dlrun/engine/optimize.py): clipping, accumulation, the grad scaler, schedules by
role, and the closure path (L-BFGS) of `Trainer.optimize_closure`."""

import functools
import math
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from torch import nn

from dlrun.cli import build_trainer, run
from dlrun.data.samplers import RandomSampler, SequentialSampler
from dlrun.data.tensor_loader import TensorLoader
from dlrun.engine import checkpoint
from dlrun.engine.guards import Interrupted
from dlrun.engine.loop import Trainer
from dlrun.errors import UserError
from dlrun.tasks.classification.trainer import ClassificationTrainer

TIMING = ("time/", "images_per_s")
# Plain SGD on the linear classifier: an update is exactly -lr * gradient.
SGD = ("model=linear", "optim=sgd", "optim.momentum=0", "optim.weight_decay=0", "sched=none")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread each (conftest)


def stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's event files: tag -> [(step, value), ...] in logging order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(f)).Load():
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "scalars":
                    out.setdefault(v.tag, []).append((event.step, v.tensor.float_val[0]))
    return out


def weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path)["model"]


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The Euclidean norm of the difference of two state dicts, all tensors together."""
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))


# ----- 1. gradient clipping -------------------------------------------------------------------------
def test_grad_clip_bounds_each_sgd_update_and_logs_the_gradient_norm(
    make_cfg, tmp_path: Path
) -> None:
    lr, clip, steps = 0.1, 1e-6, 3
    args = (*SGD, f"optim.lr={lr}", "data.batch_size=50", "trainer.log_every_n_steps=1",
            f"trainer.max_steps={steps}")  # fmt: skip
    start = {k: v.clone() for k, v in build_trainer(make_cfg(*args), tmp_path / "x").model
             .state_dict().items()}  # fmt: skip
    clipped = run(make_cfg(*args, f"trainer.grad_clip={clip}"), tmp_path / "clip")
    free = run(make_cfg(*args), tmp_path / "free")
    moved = distance(start, weights(tmp_path / "clip" / "checkpoints" / "last.pt"))
    assert 0 < moved <= steps * lr * clip * (1 + 1e-4)
    # Unclipped, the same steps move the weights by orders of magnitude more.
    assert distance(start, weights(tmp_path / "free" / "checkpoints" / "last.pt")) > 1e3 * moved
    # train/grad_norm is the norm before clipping (the true one), per optimizer step.
    assert clipped["train/grad_norm"] > 1e3 * clip
    assert "train/grad_norm" not in free
    logged = scalars(tmp_path / "clip")
    assert [s for s, _ in logged["train/grad_norm_step"]] == [1, 2, 3]
    assert [s for s, _ in logged["train/grad_norm"]] == [3]  # the epoch mean, at the epoch's end
    mean = sum(v for _, v in logged["train/grad_norm_step"]) / steps
    assert logged["train/grad_norm"][0][1] == pytest.approx(mean, rel=1e-5)


def test_fp16_clips_the_unscaled_gradients(make_cfg, tmp_path: Path) -> None:
    args = (*SGD, "data.batch_size=50", "trainer.max_steps=2", "trainer.grad_clip=1e-6")
    fp32 = run(make_cfg(*args), tmp_path / "fp32")
    fp16 = run(make_cfg(*args, "trainer.precision=fp16"), tmp_path / "fp16")
    # Scaled gradients would be 65536 times larger; the true ones agree up to fp16 rounding.
    assert fp16["train/grad_norm"] == pytest.approx(fp32["train/grad_norm"], rel=0.02)
    scaler = checkpoint.load(tmp_path / "fp16" / "checkpoints" / "last.pt")["scaler"]
    assert scaler["scale"] == 2.0**16  # the scaler was in use (no step was skipped)


# ----- 2. gradient accumulation -------------------------------------------------------------------
def test_accumulating_two_half_batches_equals_one_full_batch(make_cfg, tmp_path: Path) -> None:
    """SGD, a mean loss: 2 x 50 accumulated is one step on the same 100 images (the sampler draws
    one randperm of the 200 images per epoch either way, so the batches hold the same images)."""
    base = (*SGD, "optim.lr=0.5", "trainer.max_epochs=2")
    full = run(make_cfg(*base, "data.batch_size=100"), tmp_path / "full")
    accumulated = run(make_cfg(*base, "data.batch_size=50", "trainer.accumulate_grad_batches=2"),
                      tmp_path / "acc")  # fmt: skip
    halves = run(make_cfg(*base, "data.batch_size=50"), tmp_path / "halves")  # 2x the steps
    assert full["step"] == accumulated["step"] == 4 and halves["step"] == 8
    a = weights(tmp_path / "full" / "checkpoints" / "last.pt")
    b = weights(tmp_path / "acc" / "checkpoints" / "last.pt")
    c = weights(tmp_path / "halves" / "checkpoints" / "last.pt")
    assert distance(a, b) < 1e-5
    assert distance(a, c) > 1e-2  # the tolerance above tells these apart
    assert accumulated["train/loss"] == pytest.approx(full["train/loss"], rel=1e-5)
    assert accumulated["val/loss"] == pytest.approx(full["val/loss"], rel=1e-5)


@pytest.mark.parametrize(("k", "per_epoch"), [(1, 4), (2, 2), (3, 2), (4, 1)])
def test_step_counts_optimizer_steps(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, k: int, per_epoch: int
) -> None:
    """200 images in batches of 50: 4 batches an epoch, an optimizer step every k of them (and at
    the epoch's last batch)."""
    batches: list[int] = []
    step = ClassificationTrainer.step

    def counted(self: ClassificationTrainer, batch: dict) -> Any:
        batches.append(1)
        return step(self, batch)

    monkeypatch.setattr(ClassificationTrainer, "step", counted)
    base = (*SGD, "data.batch_size=50", f"trainer.accumulate_grad_batches={k}")
    metrics = run(make_cfg(*base, "trainer.max_epochs=2"), tmp_path / "epochs")
    assert (metrics["step"], metrics["epoch"], len(batches)) == (2 * per_epoch, 2, 8)
    taken = checkpoint.load(tmp_path / "epochs" / "checkpoints" / "last.pt")["taken"]
    assert taken == {"model": 2 * per_epoch}
    batches.clear()
    metrics = run(make_cfg(*base, "trainer.max_steps=1", "trainer.max_epochs=5"),
                  tmp_path / "steps")  # fmt: skip
    assert (metrics["step"], metrics["epoch"], len(batches)) == (1, 1, min(k, 4))


def test_max_steps_counts_optimizer_steps_across_epochs(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = []
    step = ClassificationTrainer.step
    monkeypatch.setattr(ClassificationTrainer, "step",
                        lambda self, batch: batches.append(1) or step(self, batch))  # fmt: skip
    cfg = make_cfg(*SGD, "data.batch_size=50", "trainer.accumulate_grad_batches=2",
                   "trainer.max_steps=3", "trainer.log_every_n_steps=1")  # fmt: skip
    metrics = run(cfg, tmp_path)
    assert (metrics["step"], metrics["epoch"], len(batches)) == (3, 2, 6)
    assert [s for s, _ in scalars(tmp_path)["train/loss_step"]] == [1, 2, 3]


# 200 images in batches of 25: 8 batches an epoch; k=3: optimizer steps after batches 3, 6 and 8.
ACCUMULATED = ("model=linear", "data.batch_size=25", "trainer.accumulate_grad_batches=3",
               "trainer.max_epochs=2", "trainer.log_every_n_steps=2")  # fmt: skip


class Killed(BaseException):
    pass


def test_checkpoints_fall_on_optimizer_steps_and_resume_is_exact(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = (*ACCUMULATED, "trainer.checkpoint_every_n_steps=1")
    whole = run(make_cfg(*args), tmp_path / "whole")
    save, saved = checkpoint.save, []

    def save_then_die(path: Path, state: dict) -> None:  # killed right after the 5th checkpoint
        save(path, state)
        if path.name != "last.pt":  # best.pt (evaluation's weights, no resume state)
            return
        saved.append((state["step"], (state["progress"] or {}).get("batch")))
        if len(saved) == 5:
            raise Killed

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        run(make_cfg(*args), tmp_path / "split")
    # Mid-epoch checkpoints at batches 3 and 6 (never inside an accumulation), one at the end.
    assert saved == [(1, 3), (2, 6), (3, None), (4, 3), (5, 6)]
    monkeypatch.setattr(checkpoint, "save", save)
    resumed = run(make_cfg(*args, "resume=true"), tmp_path / "split")
    assert stable(resumed) == stable(whole)
    assert resumed["step"] == 6
    a = weights(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = weights(tmp_path / "split" / "checkpoints" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_inside_an_accumulation_waits_for_its_optimizer_step(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = run(make_cfg(*ACCUMULATED), tmp_path / "whole")
    step = ClassificationTrainer.step

    def signalled(self: ClassificationTrainer, batch: dict) -> Any:
        if self.step_count == 1 and self.opt.micro == 1:  # batch 5: second of step 2's three
            self.stop.received = signal.SIGTERM
        return step(self, batch)

    monkeypatch.setattr(ClassificationTrainer, "step", signalled)
    with pytest.raises(Interrupted, match="stopped after step 2"):
        run(make_cfg(*ACCUMULATED), tmp_path / "split")
    state = checkpoint.load(tmp_path / "split" / "checkpoints" / "last.pt")
    assert state["step"] == 2 and state["progress"]["batch"] == 6
    monkeypatch.setattr(ClassificationTrainer, "step", step)
    resumed = run(make_cfg(*ACCUMULATED, "resume=true"), tmp_path / "split")
    assert stable(resumed) == stable(whole)


# ----- 3. the grad scaler -------------------------------------------------------------------------
@pytest.fixture
def scaler_updates(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    update = torch.amp.GradScaler.update

    def counted(self: torch.amp.GradScaler, new_scale: Any = None) -> None:
        calls.append(1)
        update(self, new_scale)

    monkeypatch.setattr(torch.amp.GradScaler, "update", counted)
    return calls


def test_a_gan_updates_the_grad_scaler_once_per_step(
    make_cfg, tmp_path: Path, scaler_updates: list[int], no_fid: None
) -> None:
    cfg = make_cfg("model=gan", "model.g_hidden=[32,64]", "model.d_hidden=[64,32]",
                   "data.batch_size=50", "trainer.precision=fp16", "trainer.max_steps=5",
                   "metrics.fid.features=auto")  # fmt: skip
    metrics = run(cfg, tmp_path)
    assert metrics["step"] == 5 and len(scaler_updates) == 5  # not 10: two networks, one update


def test_accumulation_updates_the_grad_scaler_once_per_optimizer_step(
    make_cfg, tmp_path: Path, scaler_updates: list[int]
) -> None:
    cfg = make_cfg(*SGD, "data.batch_size=25", "trainer.accumulate_grad_batches=4",
                   "trainer.precision=fp16", "trainer.max_epochs=1")  # fmt: skip
    metrics = run(cfg, tmp_path)
    assert metrics["step"] == 2 and len(scaler_updates) == 2  # 8 batches, 2 optimizer steps


# ----- 4. a schedule per role ---------------------------------------------------------------------
WGAN = ("model=dcgan", "loss=wgan_gp", "model.g_width=8", "model.d_width=8", "data.batch_size=10",
        "trainer.max_steps=20", "metrics.fid.features=auto")  # fmt: skip


@pytest.mark.parametrize("sched", ["cosine", "onecycle"])
def test_each_role_schedule_spans_the_steps_it_takes(
    make_cfg, tmp_path: Path, no_fid: None, sched: str
) -> None:
    """WGAN-GP: 5 critic steps per generator step; 20 steps: the generator takes 4."""
    cfg = make_cfg(*WGAN, f"sched={sched}")
    trainer = build_trainer(cfg, tmp_path / "setup")
    assert trainer.opt.total == {"generator": 4, "discriminator": 20}
    g, d = trainer.opt.schedulers["generator"], trainer.opt.schedulers["discriminator"]
    if sched == "cosine":
        assert (g.T_max, d.T_max) == (3, 19)  # steps - 1: the last step gets min_lr
    else:
        assert (g.total_steps, d.total_steps) == (4, 20)
    lr = cfg.optim.lr
    metrics = run(make_cfg(*WGAN, f"sched={sched}"), tmp_path / "run")
    assert metrics["step"] == 20
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["taken"] == {"generator": 4, "discriminator": 20}
    final = {
        r: state["optimizer"][r]["param_groups"][0]["lr"] for r in ("generator", "discriminator")
    }
    # Each role ends on the last point of its own curve: its scheduler stepped (its steps - 1) times.
    assert state["scheduler"]["generator"]["last_epoch"] == 3
    assert state["scheduler"]["discriminator"]["last_epoch"] == 19
    if sched == "cosine":  # the last point of each cosine: min_lr (0); over 20 points the
        # generator's would still be 0.95 lr at its 4th
        assert final["generator"] == pytest.approx(0.0, abs=1e-12)
        assert final["discriminator"] == pytest.approx(0.0, abs=1e-12)
        g_mid = state["scheduler"]["generator"]
        assert g_mid["T_max"] == 3 and g_mid["_last_lr"] == [pytest.approx(0.0, abs=1e-12)]
    else:  # one-cycle ends at lr / (div_factor * final_div_factor)
        assert final["generator"] == pytest.approx(lr / 25 / 1e4)
        assert final["discriminator"] == pytest.approx(lr / 25 / 1e4)


# ----- 5. the closure path (L-BFGS) ---------------------------------------------------------------
W_TRUE, B_TRUE = [1.5, -2.0, 0.5], 0.25


class Regression:
    """A data module (dlrun/data/module.py's protocol) of noiseless y = x . w + b, 3 features."""

    name = "regression"

    def __init__(self, n: int = 64, batch_size: int = 64) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=gen)
        self.y = self.x @ torch.tensor(W_TRUE).unsqueeze(1) + B_TRUE
        self.batch_size = self.eval_batch_size = batch_size

    def setup(self, device: torch.device, seed: int, rank: int = 0, world_size: Any = None) -> None:
        self.x, self.y = self.x.to(device), self.y.to(device)
        self.order = torch.Generator(device=device).manual_seed(seed)

    def generators(self) -> dict[str, torch.Generator]:
        return {"order": self.order, "aug": self.order}

    def _loader(self, sampler: Any) -> TensorLoader:
        return TensorLoader({"x": self.x, "y": self.y}, sampler,
                            order_generator=self.order, aug_generator=self.order)  # fmt: skip

    def train_loader(self, **_: Any) -> TensorLoader:
        return self._loader(RandomSampler(len(self.x), self.batch_size))

    def val_loader(self) -> TensorLoader:
        return self._loader(SequentialSampler(len(self.x), self.eval_batch_size))

    test_loader = val_loader

    def example_batch(self, n: int, split: str = "val", **_: Any) -> dict[str, torch.Tensor]:
        return {"x": self.x[:n], "y": self.y[:n]}

    def describe(self) -> dict[str, Any]:
        n = len(self.x)
        return {"name": self.name, "input_shape": (3,), "num_classes": 0, "classes": [],
                "sizes": {"train": n, "val": n, "test": n}, "val_is_test": False}  # fmt: skip


class LeastSquares(Trainer):
    """Fits a linear regression with an optimizer that re-evaluates the loss (L-BFGS)."""

    default_monitor = "val/mse"
    takes_closures = True

    def logged_metrics(self) -> list[str]:
        return ["val/mse", "train/mse"]

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
        x, y = batch["x"], batch["y"]

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad()
            with self.autocast():
                loss = nn.functional.mse_loss(self.net()(x).float(), y)
            loss.backward()
            return loss

        loss = self.optimize_closure(closure)  # the loss before this step's update
        return {"mse": (loss.detach() * len(y), len(y))}

    @torch.no_grad()
    def evaluate(self, loader: Any, prefix: str) -> dict[str, float]:
        total, n = 0.0, 0
        for batch in loader:
            total += float(((self.net()(batch["x"]) - batch["y"]) ** 2).sum())
            n += len(batch["y"])
        return {f"{prefix}/mse": total / n}


def least_squares(run_dir: Path, **kwargs: Any) -> LeastSquares:
    """Built with the keyword arguments dlrun.cli.build_trainer passes, then set up."""
    torch.manual_seed(0)
    data = Regression()
    data.setup(torch.device("cpu"), 0)
    trainer = LeastSquares(
        model=nn.Linear(3, 1),
        data=data,
        optim=functools.partial(torch.optim.LBFGS, lr=1, max_iter=20),
        sched=lambda optimizer, **_: None,
        run_dir=run_dir,
        device=torch.device("cpu"),
        config_record={"trainer": {"max_epochs": 3}},
        hparams={"model": "linear_regression"},
        freeze=None,
        max_epochs=3,
        log_every_n_steps=1,
        progress=False,
        monitor="auto",
        monitor_mode="min",
        **kwargs,
    )
    trainer.setup()
    return trainer


def test_a_closure_optimizer_fits_a_linear_regression(tmp_path: Path) -> None:
    trainer = least_squares(tmp_path)
    with torch.no_grad():
        before = float(((trainer.model(trainer.data.x) - trainer.data.y) ** 2).mean())
    metrics = trainer.fit()
    assert before > 1.0  # a real fit: the start is far off
    assert metrics["val/mse"] < 1e-8 and metrics["step"] == 3 and metrics["epoch"] == 3
    weight, bias = trainer.model.weight.detach()[0], float(trainer.model.bias.detach())
    assert torch.allclose(weight, torch.tensor(W_TRUE), atol=1e-4)
    assert bias == pytest.approx(B_TRUE, abs=1e-4)
    assert (tmp_path / "checkpoints" / "best.pt").is_file()
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["taken"] == {"model": 3}


@pytest.mark.parametrize(
    "setting",
    [{"precision": "fp16"}, {"on_nonfinite": "skip"}, {"accumulate_grad_batches": 2}],
    ids=["fp16", "skip", "accumulate"],
)
def test_the_closure_path_refuses_what_it_cannot_do(tmp_path: Path, setting: dict) -> None:
    """fp16 grad scaling (and the skip scaler, and accumulation) cannot wrap a closure step."""
    trainer = least_squares(tmp_path, **setting)
    key = {"precision": "fp16", "on_nonfinite": "on_nonfinite=skip"}.get(
        next(iter(setting)), "accumulate_grad_batches"
    )
    with pytest.raises(UserError, match=f"closure optimizer.*{key}"):
        trainer.fit()
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.grad_clip=0", "trainer.grad_clip must be a number > 0 or inf or null, got 0"),
        (
            "trainer.accumulate_grad_batches=0",
            "trainer.accumulate_grad_batches must be an integer >= 1",
        ),
    ],
)
def test_bad_clip_or_accumulation_is_a_user_error(
    make_cfg, tmp_path: Path, override: str, message: str
):
    with pytest.raises(UserError, match=re.escape(message)):
        run(make_cfg(*SGD, override), tmp_path)


def test_accumulation_on_a_gan_is_refused_naming_the_key(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("model=gan", "trainer.accumulate_grad_batches=2")
    with pytest.raises(UserError, match="trainer.accumulate_grad_batches must be 1 for a GAN"):
        run(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()
