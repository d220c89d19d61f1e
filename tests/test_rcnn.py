"""model=rcnn: the warp of a proposal to the CNN's input, the SVMs' hinge loss and targets and the
box regressors' targets by hand; training through the detection trainer and an exact resume."""

import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

from dlrun.cli import build_trainer, run
from dlrun.errors import UserError
from dlrun.models import rcnn_heads as heads
from dlrun.models.rcnn import RCNN
from dlrun.models.regions import label_regions
from dlrun.tasks.detection.trainer import DetectionTrainer
from tests.conftest import stopped_at_step

# 12 + 4 scenes (validation on the test split): selective search of them is most of the time.
TINY = ("model=rcnn", "data=mnist_det", "model.width=4", "model.features=16",
        "model.regions_per_image=4", "data.train_scenes=12", "data.test_scenes=4",
        "data.batch_size=4", "data.val_scenes=0")  # fmt: skip


@pytest.fixture(autouse=True)
def _threads(one_thread: None) -> None:
    """Tiny nets: one thread each (see conftest)."""


@pytest.fixture
def cached(data_root: Path) -> tuple[str, ...]:
    """The fixture scenes' proposals computed once per session, beside the fixture data."""
    return (f"data.cache_dir={data_root / 'cache'}",)


# ----- the warp -----------------------------------------------------------------------------------
def test_a_box_equal_to_the_input_reproduces_the_image_and_a_constant_box_warps_to_it() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 1, 32, 32)
    whole = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    out = heads.warp(images, torch.tensor([1]), whole, input_size=32)
    assert torch.allclose(out[0], images[1], atol=1e-6)  # image 1's pixels, not image 0's
    # A box inside a constant patch (its bilinear samples, half a pixel inside, read only 3s).
    images = torch.zeros(1, 1, 64, 64)
    images[0, 0, 6:26, 2:22] = 3.0
    box = torch.tensor([[4.0, 8.0, 20.0, 24.0]])
    assert torch.allclose(heads.warp(images, torch.tensor([0]), box, 32), torch.tensor(3.0))


def test_the_warp_resizes_a_ramp_by_hand_with_and_without_context() -> None:
    ramp = torch.arange(64.0).expand(64, 64)[None, None].contiguous()  # pixel (y, x) = x
    box = torch.tensor([[8.0, 8.0, 24.0, 24.0]])  # 16 px -> 32: each output pixel 1/2 px wide
    # Output column j samples x = 8 + (j + 1/2) / 2 - 1/2 (aligned: pixel i covers [i, i + 1)).
    out = heads.warp(ramp, torch.tensor([0]), box, 32)[0, 0]
    assert out[5].tolist() == pytest.approx([7.75 + 0.5 * j for j in range(32)], abs=1e-5)
    # context 4 at 32: the box grows by 32 / 24 about its centre 16, to [16 - 32/3, 16 + 32/3],
    # 2/3 px per output pixel: x_j = 16 - 32/3 + (j + 1/2) 2/3 - 1/2 = 31/6 + 2j/3, and the box
    # itself fills output columns 4..27.
    out = heads.warp(ramp, torch.tensor([0]), box, 32, context=4)[0, 0]
    assert out[5].tolist() == pytest.approx([31 / 6 + 2 * j / 3 for j in range(32)], abs=1e-4)


# ----- the SVMs and the box regressors ----------------------------------------------------------
def test_svm_hinge_by_hand() -> None:
    svm = torch.nn.Linear(2, 2)
    with torch.no_grad():
        svm.weight.copy_(torch.eye(2))
        svm.bias.copy_(torch.tensor([0.0, -0.5]))
    features = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.0]])
    scores = svm(features)  # [[1, 1.5], [0, -1.5], [3, -0.5]]
    targets = torch.tensor([[1.0, -1.0], [-1.0, 0.0], [-1.0, 1.0]])  # 0: left out
    # max(0, 1 - y s): row 0: 0 + 2.5; row 1: 1 (+ nothing); row 2: 4 + 1.5. Sum 9 over 3 rows.
    assert heads.svm_hinge(scores, targets).item() == pytest.approx(3.0)
    assert heads.svm_hinge(scores[:0], targets[:0]).item() == 0.0


def scenes() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two images: image 0 holds A (class 3, [0, 0, 10, 10]) and B (class 5, [20, 20, 30, 30]),
    image 1 holds C (class 3, A's box); proposals p0..p3 in image 0, p4, p5 in image 1."""
    pad = [-1.0] * 4
    proposals = torch.tensor([
        [[0, 0, 10, 8], [0, 0, 10, 5], [0, 0, 10, 2], [20, 20, 30, 27]],
        [[0, 0, 10, 10], [20, 20, 30, 30], pad, pad],
    ], dtype=torch.float32)  # fmt: skip
    boxes = torch.tensor([[[0, 0, 10, 10], [20, 20, 30, 30]], [[0, 0, 10, 10], [0, 0, 0, 0]]])
    return proposals, boxes.float(), torch.tensor([[3, 5], [3, -1]])


def test_svm_and_box_regression_targets_by_hand() -> None:
    proposals, boxes, labels = scenes()
    regions = label_regions(proposals, boxes, labels, fg_iou=0.5, bg_iou=(0.0, 0.5), add_truth=True)
    truth_class = torch.tensor([-1] * 6 + [3, 5, 3])  # p0..p5, then A, B, C
    y = heads.svm_targets(regions, truth_class, boxes, labels, num_classes=6)
    # Best IoU with class 3 in the region's own image: p0 0.8, p1 0.5, p2 0.2, p3 0, p4 1 (C),
    # p5 0; with class 5: p3 0.7, p5 0 (B's box, but B is in the other image), the rest 0.
    # Positives: the true boxes only (p4 equals C and stays left out); left out: IoU >= 0.3.
    expected = torch.full((9, 6), -1.0)
    for row, cls in [(6, 3), (7, 5), (8, 3)]:
        expected[row, cls] = 1.0
    for row, cls in [(0, 3), (1, 3), (3, 5), (4, 3)]:
        expected[row, cls] = 0.0
    assert torch.equal(y, expected)
    rows, classes, targets = heads.box_targets(regions, truth_class)
    # IoU >= 0.6 and a proposal: p0 (0.8, A), p3 (0.7, B), p4 (1.0, C); p1 at 0.5 is not, nor
    # are the true boxes. p0: centre (5, 4) 10 x 8 onto (5, 5) 10 x 10: t_y = 1/8, t_h =
    # log(10/8); p3: centre (25, 23.5) 10 x 7 onto (25, 25): t_y = 1.5/7, t_h = log(10/7);
    # scaled by (10, 10, 5, 5).
    assert rows.tolist() == [0, 3, 4] and classes.tolist() == [3, 5, 3]
    assert targets.tolist() == [
        pytest.approx([0.0, 1.25, 0.0, 5 * math.log(1.25)], abs=1e-5),
        pytest.approx([0.0, 15 / 7, 0.0, 5 * math.log(10 / 7)], abs=1e-5),
        pytest.approx([0.0] * 4, abs=1e-6),
    ]
    # The loss reads the regressor of each row's class: deltas equal to the targets cost 0.
    deltas = torch.zeros(9, 6, 4)
    deltas[rows, classes] = targets
    assert heads.box_loss(deltas.view(9, 24), rows, classes, targets).item() == 0.0
    assert heads.box_loss(torch.zeros(9, 24), rows, classes, targets).item() == pytest.approx(
        (targets**2).sum().item() / 3
    )


def test_inference_scores_by_the_svms_moves_by_the_class_s_regressor_and_suppresses() -> None:
    """Known features (2 per region), SVM k = feature k, class 0's regressor moving boxes 1/10 of
    their width right, class 1's not at all."""
    net = RCNN(in_channels=1, image_size=64, num_classes=2, width=4, features=2,
               score_threshold=0.1).eval()  # fmt: skip
    with torch.no_grad():
        net.svm.weight.copy_(torch.eye(2))
        net.svm.bias.zero_()
        net.box.bias.copy_(torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]))  # t_x 1.0 / scale 10
    # p1 overlaps p0 by IoU 90 / 110 = 0.82 (> nms_iou 0.3); p2 is elsewhere; p3 is padding.
    proposals = torch.tensor([[[0.0, 0, 10, 10], [1, 0, 11, 10], [30, 30, 40, 40], [-1] * 4]])
    feats = torch.tensor([[3.0, -3.0], [2.0, -3.0], [-3.0, 1.0]])
    net.features = lambda images, image, boxes: feats  # type: ignore[method-assign]
    (found,) = net(torch.zeros(1, 1, 64, 64), proposals=proposals)
    # Scores sigmoid(margin): class 0 p0 0.953, p1 0.881 (suppressed by p0), p2 0.047 (< 0.1);
    # class 1 p2 0.731, p0 and p1 0.047. p0 moved 1 px right by class 0's regressor.
    assert found["labels"].tolist() == [0, 1]
    assert found["scores"].tolist() == pytest.approx(
        [1 / (1 + math.exp(-3)), 1 / (1 + math.exp(-1))]
    )
    assert found["boxes"].tolist() == [
        pytest.approx([1.0, 0.0, 11.0, 10.0]),
        pytest.approx([30.0, 30.0, 40.0, 40.0]),
    ]


def test_the_svms_and_regressors_learn_on_detached_features_and_the_cnn_from_its_softmax() -> None:
    torch.manual_seed(0)
    net = RCNN(in_channels=1, image_size=64, num_classes=6, width=4, features=8).train()
    proposals, boxes, labels = scenes()
    terms = net(torch.rand(2, 1, 64, 64), boxes, labels, proposals=proposals)
    assert set(terms) == {"cnn", "svm", "box"}
    (terms["svm"] + terms["box"]).backward()
    assert all(p.grad is None for p in net.cnn.parameters())
    assert net.svm.weight.grad.abs().sum() > 0 and net.box.bias.grad.abs().sum() > 0
    net.zero_grad(set_to_none=True)
    terms["cnn"].backward()
    assert net.svm.weight.grad is None and net.cnn.classify.weight.grad.abs().sum() > 0
    # The paper's later stages (model.stage=heads): the CNN frozen, in eval mode, no "cnn" term.
    net.stage = "heads"
    net.zero_grad(set_to_none=True)
    terms = net(torch.rand(2, 1, 64, 64), boxes, labels, proposals=proposals)
    assert set(terms) == {"svm", "box"} and not net.cnn.training
    (terms["svm"] + terms["box"]).backward()
    assert all(p.grad is None for p in net.cnn.parameters())
    with pytest.raises(UserError, match="model.stage must be one of joint, heads, got svm"):
        RCNN(in_channels=1, image_size=64, num_classes=6, stage="svm")


# ----- through the trainer ----------------------------------------------------------------------
TIMING = ("time/", "images_per_s")


def stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}


def test_trains_and_resumes_mid_epoch_as_an_uninterrupted_run(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opencv_contrib: ModuleType,
    cached: tuple[str, ...],
) -> None:  # fmt: skip
    """2 epochs of 3 steps under one-cycle; last.pt every 2 steps; the cut run dies in step 5
    (its last.pt from step 4, one batch into epoch 2). The "cnn" term samples regions from the
    global RNG: resume restores it, so the two runs end equal."""
    steps = (*TINY, *cached, "sched=onecycle", "trainer.max_epochs=2",
             "trainer.checkpoint_every_n_steps=2")  # fmt: skip
    whole = run(make_cfg(*steps), tmp_path / "w")
    assert whole["step"] == 6 and 0 <= whole["val/map_50"] <= 1
    assert 0 <= whole["val/map"] <= whole["val/map_50"]
    assert all(whole[f"train/loss_{t}"] > 0 for t in ("cnn", "svm", "box")), whole
    stopped_at_step(make_cfg(*steps), tmp_path / "r", DetectionTrainer, 4, monkeypatch)
    saved = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == 4 and saved["epoch"] == 1 and saved["progress"]["batch"] == 1
    resumed = run(make_cfg(*steps, "resume=true"), tmp_path / "r")
    assert stable(resumed) == stable(whole)
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True)
            for d in (tmp_path / "r", tmp_path / "w"))  # fmt: skip
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # Stage 2-3 from that run: the SVMs and regressors move, the CNN (and its BN stats) do not.
    ckpt = tmp_path / "w" / "checkpoints" / "last.pt"
    heads_run = (*TINY, *cached, f"ckpt={ckpt}", "model.stage=heads", "trainer.max_steps=2")
    metrics = run(make_cfg(*heads_run), tmp_path / "h")
    assert "train/loss_cnn" not in metrics and metrics["train/loss_svm"] > 0
    after = torch.load(tmp_path / "h" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(after[k], b["model"][k]) for k in b["model"] if k.startswith("cnn."))
    assert not torch.equal(after["svm.weight"], b["model"]["svm.weight"])


def test_a_mistake_is_one_clear_error(make_cfg) -> None:
    with pytest.raises(UserError, match="model.input_size must be at least 8"):
        build_trainer(make_cfg(*TINY, "model.input_size=4"), "unused")
    args = {"in_channels": 1, "image_size": 64, "num_classes": 2}
    with pytest.raises(UserError, match=r"model.svm_c and model.box_ridge are L2 penalties, >= 0"):
        RCNN(**args, svm_c=-1.0)
    with pytest.raises(UserError, match="model.proposals takes upscale, max_boxes, strategy, not "):
        RCNN(**args, proposals={"scale": 2})
