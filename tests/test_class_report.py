"""A classifier's TensorBoard beyond accuracy: per-class accuracy, confusion matrix, PR curves,
model graph, worst examples, peak device memory."""

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.tensorboard.summary import compute_curve

from dlrun.cli import run
from dlrun.engine.placement import Placement
from dlrun.models.lenet import LeNet5
from dlrun.tasks.classification import class_report
from dlrun.tasks.classification.class_report import PR_THRESHOLDS, EvalAccumulator, tag_names
from dlrun.tasks.classification.trainer import ClassificationTrainer

QUICK = ("model=lenet", "trainer.max_steps=4", "data.batch_size=50")  # one epoch, one validation
NAMES = [
    f"{i}_{w}" for i, w in enumerate("zero one two three four five six seven eight nine".split())
]


def predictions(trainer: ClassificationTrainer) -> tuple[Tensor, Tensor]:
    """The trained model's softmax and the labels on the validation split, computed directly."""
    trainer.model.eval()
    probs, labels = [], []
    with torch.no_grad():
        for batch in trainer.data.val_loader():
            probs.append(trainer.model(batch["image"]).softmax(1))
            labels.append(batch["label"])
    return torch.cat(probs), torch.cat(labels)


def test_a_run_shows_the_class_report(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}
    logged = ClassificationTrainer.log_evaluation

    def keep(self: ClassificationTrainer, writer: Any, prefix: str) -> None:
        seen["trainer"], seen["prefix"] = self, prefix
        logged(self, writer, prefix)

    monkeypatch.setattr(ClassificationTrainer, "log_evaluation", keep)
    # CUDA's peak memory, as a CUDA run reports it (this machine has no GPU)
    monkeypatch.setattr(Placement, "peak_memory", lambda self: {"sys/max_memory_gb": 1.25})
    run(make_cfg(*QUICK), tmp_path)
    trainer = seen["trainer"]
    assert seen["prefix"] == "val"

    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "tensors": 0}).Reload()
    tags = acc.Tags()
    assert {"val/confusion_matrix", "val/worst_examples"} <= set(tags["images"])
    assert tags["graph"]  # LeNet traces
    assert acc.Scalars("sys/max_memory_gb")[0].value == 1.25

    # the confusion matrix kept equals the one computed from the model's own predictions
    probs, labels = predictions(trainer)
    report = trainer.eval_reports["val"]
    direct = np.zeros((10, 10), dtype=np.int64)
    np.add.at(direct, (labels.numpy(), probs.argmax(1).numpy()), 1)
    np.testing.assert_array_equal(report.confusion, direct)
    assert report.names == NAMES

    # per-class accuracy: in metrics.json and as scalars, the diagonal over the row
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["sys/max_memory_gb"] == 1.25
    for i, name in enumerate(NAMES):
        expected = direct[i, i] / direct[i].sum()
        assert saved[f"val/class_acc/{name}"] == pytest.approx(expected)
        assert acc.Scalars(f"val/class_acc/{name}")[-1].value == pytest.approx(expected)
    assert saved["val/acc"] == pytest.approx(np.trace(direct) / direct.sum())

    # one PR curve per class, as add_pr_curve computes it from these probabilities
    for i, name in enumerate(NAMES):
        (event,) = acc.Tensors(f"val/pr/{name}")
        curve = np.array(event.tensor_proto.float_val).reshape(6, PR_THRESHOLDS)
        direct_curve = compute_curve(
            (labels == i).numpy(), probs[:, i].numpy(), num_thresholds=PR_THRESHOLDS
        )
        np.testing.assert_allclose(curve, direct_curve, rtol=1e-5, atol=1e-6)

    # images: the matrix has a cell per class pair; the worst examples a tile each
    (cm,) = acc.Images("val/confusion_matrix")
    assert Image.open(io.BytesIO(cm.encoded_image_string)).width >= 10 * 32
    (worst,) = acc.Images("val/worst_examples")
    assert worst.step == 4 and worst.height > 4 * 96 and worst.width > 4 * 96


def test_eval_mode_gives_the_test_splits_class_accuracy(make_cfg, tmp_path: Path) -> None:
    trained = run(make_cfg(*QUICK), tmp_path / "train")
    ckpt = tmp_path / "train" / "checkpoints" / "last.pt"
    tested = run(make_cfg("model=lenet", "mode=eval", f"ckpt={ckpt}"), tmp_path / "eval")
    per_class = {k: v for k, v in tested.items() if k.startswith("test/class_acc/")}
    assert sorted(per_class) == sorted(f"test/class_acc/{n}" for n in NAMES)
    # the fixture's validation split is its test split: the same model scores the same
    for name in NAMES:
        assert per_class[f"test/class_acc/{name}"] == pytest.approx(
            trained[f"val/class_acc/{name}"]
        )
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {k: saved[k] for k in per_class} == pytest.approx(per_class)


def test_a_model_that_does_not_trace_costs_one_warning_not_the_run(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    forward = LeNet5.forward

    def untraceable(self: LeNet5, x: Tensor) -> Any:
        out = forward(self, x)  # a string among the outputs: the tracer refuses it
        return (out, "not a tensor") if torch.jit.is_tracing() else out

    monkeypatch.setattr(LeNet5, "forward", untraceable)
    caplog.set_level("INFO")
    metrics = run(make_cfg(*QUICK), tmp_path)
    assert metrics["step"] == 4 and "val/acc" in metrics
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "graph" in r.message]
    assert len(warnings) == 1
    assert warnings[0].message.startswith("no model graph in TensorBoard: LeNet5 does not trace")
    assert not EventAccumulator(str(tmp_path)).Reload().Tags()["graph"]


def test_the_accumulator_equals_a_direct_computation() -> None:
    torch.manual_seed(0)
    k, batches = 5, [(torch.randn(n, 5) * 3, torch.randint(0, 5, (n,))) for n in (7, 30, 1)]
    images = [torch.rand(len(y), 1, 4, 4) for _, y in batches]
    gathered = EvalAccumulator(torch.device("cpu"), keep=4)
    for (logits, y), x in zip(batches, images, strict=True):
        gathered.add(logits, y, x)
    loss, report = gathered.finish(torch.tensor(2.5), ["a", "b b", "c"])
    logits = torch.cat([b[0] for b in batches])
    y, x = torch.cat([b[1] for b in batches]), torch.cat(images)
    assert loss == 2.5 and report.names == ["a", "b_b", "c", "3", "4"]
    direct = np.zeros((k, k), dtype=np.int64)
    np.add.at(direct, (y.numpy(), logits.argmax(1).numpy()), 1)
    np.testing.assert_array_equal(report.confusion, direct)
    probs = logits.softmax(1)
    for c in range(k):
        np.testing.assert_allclose(
            class_report.pr_counts(report.pr[c]),
            compute_curve((y == c).numpy(), probs[:, c].numpy(), num_thresholds=PR_THRESHOLDS),
            rtol=1e-6,
        )
    losses = F.cross_entropy(logits, y, reduction="none")
    top = losses.topk(4).indices
    worst = report.worst
    torch.testing.assert_close(worst.losses, losses[top])
    torch.testing.assert_close(worst.images, x[top])
    assert worst.labels.tolist() == y[top].tolist()
    assert worst.preds.tolist() == logits[top].argmax(1).tolist()
    torch.testing.assert_close(worst.probs, probs[top].max(1).values)


def test_evaluate_reads_the_device_once_however_many_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No per-batch host sync: the same reads for 2 batches as for 20."""
    trainer = ClassificationTrainer.__new__(ClassificationTrainer)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    trainer.model, trainer.nets, trainer.tta = net, {"model": net}, "none"
    trainer.device, trainer.dtype = torch.device("cpu"), None
    trainer.memory_format, trainer.loss = torch.contiguous_format, F.cross_entropy
    trainer.data = type("Data", (), {"describe": lambda self: {"classes": ["a", "b", "c"]}})()
    reads: list[str] = []
    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__"):
        original = getattr(Tensor, name)
        patched = (lambda f, n: lambda *a, **kw: reads.append(n) or f(*a, **kw))(original, name)
        monkeypatch.setattr(Tensor, name, patched)
    counts = []
    for n in (2, 20):
        loader = [{"image": torch.rand(8, 1, 4, 4), "label": torch.randint(0, 3, (8,))}] * n
        reads.clear()
        trainer.evaluate(loader, "val")
        counts.append(len(reads))
    monkeypatch.undo()
    assert counts[0] == counts[1] <= 2


def test_class_names_become_tensorboard_tags() -> None:
    assert tag_names(["0 - zero", "sea lion", "", "a", "a/b", "a"], 7) == [
        "0_zero", "sea_lion", "2", "a", "a_b", "a_5", "6",
    ]  # fmt: skip


def test_peak_memory_is_read_and_reset_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(
        torch.cuda, "max_memory_allocated", lambda d: calls.append("max") or 3 * 2**29
    )
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append("reset"))
    assert Placement(torch.device("cpu")).peak_memory() == {} and calls == []
    placement = Placement(torch.device("cuda", 0))
    assert placement.peak_memory() == {"sys/max_memory_gb": 1.5}
    assert calls == ["max", "reset"]  # the next epoch's peak starts afresh


def test_many_classes_keep_bounded_pr_curves() -> None:
    """1,000 classes would write 1,000 curves an evaluation: the first PR_MAX_CLASSES get one."""
    k = class_report.PR_MAX_CLASSES + 20
    gathered = EvalAccumulator(torch.device("cpu"))
    gathered.add(torch.randn(64, k), torch.randint(0, k, (64,)), torch.rand(64, 3, 8, 8))
    _, report = gathered.finish(torch.tensor(0.0), [])
    assert report.confusion.shape == (k, k) and report.confusion.sum() == 64
    assert report.pr.shape == (class_report.PR_MAX_CLASSES, 2, PR_THRESHOLDS)
    assert report.pr.sum() == 64 * class_report.PR_MAX_CLASSES  # each image once per class
    image = class_report.confusion_image(report.confusion, report.names)
    assert image.shape[2] == 3 and min(image.shape[:2]) >= k * 3  # a cell per class pair


def test_eval_mode_draws_the_test_confusion_matrix(make_cfg, tmp_path):
    run(make_cfg(*QUICK), tmp_path / "train")
    ckpt = tmp_path / "train" / "checkpoints" / "last.pt"
    run(make_cfg("model=lenet", "mode=eval", f"ckpt={ckpt}"), tmp_path / "eval")
    # Files, not TensorBoard events: a mode's folder sits inside its run (engine/result_files.py).
    assert not list((tmp_path / "eval").glob("events.out.tfevents*"))
    image = np.asarray(Image.open(tmp_path / "eval" / "confusion_matrix.png"))
    assert image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) >= 3 * len(NAMES)
    with open(tmp_path / "eval" / "pr_curves.csv", newline="") as f:
        curves = {row["class"] for row in csv.DictReader(f)}
    assert curves <= set(NAMES) and curves  # one curve per class with positives
