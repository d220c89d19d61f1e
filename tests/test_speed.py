"""The speed options: fused optimizers, precision, channels_last, compile, flip TTA, no per-step sync."""

import functools
from pathlib import Path

import pytest
import torch
from torch import nn

from dlrun.cli import run
from dlrun.engine.optimize import build_optimizer
from dlrun.engine.precision import resolve_precision
from dlrun.errors import UserError
from dlrun.models.airbench import AirNet
from dlrun.tasks.classification.trainer import ClassificationTrainer

QUICK = ("model=lenet", "model.activation=relu", "data.batch_size=50", "trainer.max_steps=3")


def test_optimizers_get_their_fused_kernel_unless_the_config_chose() -> None:
    params = [nn.Parameter(torch.randn(3, 3))]
    assert build_optimizer(functools.partial(torch.optim.Adam, lr=0.1), params).defaults["fused"]
    assert build_optimizer(functools.partial(torch.optim.SGD, lr=0.1), params).defaults["fused"]
    chosen = build_optimizer(functools.partial(torch.optim.Adam, lr=0.1, foreach=True), params)
    assert chosen.defaults["foreach"] and not chosen.defaults["fused"]


def test_an_optimizer_without_a_fused_kernel_falls_back() -> None:
    class Plain(torch.optim.SGD):  # no `fused` argument at all
        def __init__(self, params: list, lr: float) -> None:
            super().__init__(params, lr=lr)

    opt = build_optimizer(functools.partial(Plain, lr=0.1), [nn.Parameter(torch.randn(2))])
    assert not opt.defaults["fused"]


def test_precision_auto_is_fp32_for_a_task_without_cpu_bf16_and_unknown_names_are_errors() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, cpu_bf16=False, flops=10**9) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(UserError, match="trainer.precision must be one of auto, fp32"):
        resolve_precision("fp8", cpu)


@pytest.mark.parametrize(
    ("precision", "channels_last"), [("bf16", True), ("fp16", True), ("auto", False)]
)
def test_precision_and_layout_run_on_cpu(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str, channels_last: bool
) -> None:
    seen: list[torch.Tensor] = []
    step = ClassificationTrainer.step

    def spy(self: ClassificationTrainer, batch: tuple) -> dict:
        seen.append(self.layout(batch["image"]))
        assert self.model.features[0].weight.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
        return step(self, batch)

    monkeypatch.setattr(ClassificationTrainer, "step", spy)
    cfg = make_cfg(
        *QUICK, f"trainer.precision={precision}", f"trainer.channels_last={channels_last}"
    )
    metrics = run(cfg, tmp_path)
    assert metrics["step"] == 3 and metrics["val/loss"] == metrics["val/loss"]  # not NaN
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert all(x.is_contiguous(memory_format=fmt) for x in seen)


def test_compiled_channels_last_run_resumes_into_a_plain_one(make_cfg, tmp_path: Path) -> None:
    """compile + channels_last change no number and write plain keys: a plain model scores it.

    (resume=true itself refuses a changed trainer.compile / channels_last, as the README says.)
    """
    first = ("trainer.max_epochs=2", "trainer.max_steps=null", "data.train_subset=100")
    compiled = run(
        make_cfg(*QUICK, *first, "trainer.compile=true", "trainer.channels_last=true"),
        tmp_path / "compiled",
    )
    plain = run(make_cfg(*QUICK, *first, "trainer.channels_last=true"), tmp_path / "plain")
    for key in ("train/loss", "val/loss"):  # the same run: CPU inductor's rounding only
        assert compiled[key] == pytest.approx(plain[key], rel=1e-4), key
    assert compiled["val/acc"] == plain["val/acc"] and compiled["step"] == plain["step"] == 4
    ckpt = tmp_path / "compiled" / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    assert not any("_orig_mod" in k for k in state["model"])
    # A plain, contiguous model scores the compiled NHWC run's weights as that run did
    # (val is the test split by default).
    metrics = run(make_cfg(*QUICK, "mode=eval", f"ckpt={ckpt}"), tmp_path / "eval")
    assert metrics["test/loss"] == pytest.approx(compiled["val/loss"], rel=1e-4)
    assert metrics["test/acc"] == compiled["val/acc"]


def test_flip_tta_averages_the_logits_of_image_and_mirror(make_cfg, tmp_path: Path) -> None:
    plain = run(make_cfg(*QUICK), tmp_path / "plain")
    ckpt = tmp_path / "plain" / "checkpoints" / "last.pt"
    evals = {
        tta: run(make_cfg(*QUICK, "mode=eval", f"ckpt={ckpt}", f"eval.tta={tta}"), tmp_path / tta)
        for tta in ("none", "flip")
    }
    assert evals["none"]["test/loss"] == pytest.approx(plain["val/loss"])
    assert evals["flip"]["test/loss"] != pytest.approx(evals["none"]["test/loss"])


def test_flip_tta_predict_is_the_mean_of_both_views() -> None:
    trainer = ClassificationTrainer.__new__(ClassificationTrainer)
    net = nn.Sequential(nn.Flatten(), nn.Linear(8, 2))
    trainer.nets = {"model": net}
    x = torch.randn(3, 1, 2, 4)
    trainer.tta = "flip"
    expected = (net(x) + net(x.flip(3))) / 2
    torch.testing.assert_close(trainer.predict(x), expected)


def test_unknown_tta_is_a_user_error(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="eval.tta must be one of none, flip, got 'crop'"):
        run(make_cfg(*QUICK, "eval.tta=crop"), tmp_path)


def test_the_loop_reads_the_device_only_every_log_every_n_steps(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loss and accuracy accumulate on the device: one read per logged window, not per step."""
    calls = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: calls.append(1) or item(t))
    trainer_run = ClassificationTrainer._train_epoch

    def counted(self: ClassificationTrainer) -> None:
        calls.clear()
        trainer_run(self)
        counted.reads = len(calls)

    monkeypatch.setattr(ClassificationTrainer, "_train_epoch", counted)
    # 200 images, batch 10: 20 steps; windows end at steps 8, 16 and 20 (the last, partial one is
    # logged too): 3 windows x 2 values (loss, acc), plus the 2 epoch means.
    cfg = make_cfg(
        *QUICK, "trainer.max_steps=20", "data.batch_size=10", "trainer.log_every_n_steps=8"
    )
    run(cfg, tmp_path)
    assert counted.reads == 3 * 2 + 2


def test_airbench_whitening_stem_decorrelates_patches() -> None:
    torch.manual_seed(0)
    mix = torch.randn(3, 3)  # correlated colour channels
    images = torch.einsum("ij,bjhw->bihw", mix, torch.randn(64, 3, 16, 16))
    net = AirNet()
    net.init_from_data(images)
    out = net.whiten(images)[:, :12]  # the 12 directions (the other 12 are their negatives)
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    cov = torch.cov(flat)
    torch.testing.assert_close(cov, torch.eye(12), atol=0.05, rtol=0)
    assert not net.whiten.weight.requires_grad and net.whiten.bias.requires_grad


def test_airbench_gets_its_whitening_from_the_training_images(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("model=airbench", "data=cifar10", "data.batch_size=16", "trainer.max_steps=2")
    run(cfg, tmp_path)
    weight = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"]
    fresh = AirNet().state_dict()["whiten.weight"]
    assert not torch.allclose(weight["whiten.weight"], fresh)
    assert torch.allclose(weight["whiten.weight"][:12], -weight["whiten.weight"][12:])


def test_evaluations_run_in_inference_mode(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # inference_mode, not only no_grad: no version counters, no autograd bookkeeping at all
    modes: list[tuple[str, bool]] = []
    evaluate = ClassificationTrainer.evaluate

    def spy(self: ClassificationTrainer, loader: object, prefix: str) -> dict:
        modes.append((prefix, torch.is_inference_mode_enabled()))
        return evaluate(self, loader, prefix)

    monkeypatch.setattr(ClassificationTrainer, "evaluate", spy)
    run(make_cfg(*QUICK, "data.val_split=0.2"), tmp_path)  # val, then the test split at the end
    assert modes == [("val", True), ("test", True)]
    assert not torch.is_inference_mode_enabled()
