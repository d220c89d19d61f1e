"""model=yolo_v1 (YOLOv1): the four loss terms of hand-made outputs, the responsible box, one truth
per cell, decoding on a grid that does not divide the image, class-specific scores and per-class
NMS, training and an exact mid-epoch resume through the detection trainer, and the mistakes."""

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from dlrun.cli import build_trainer, run
from dlrun.errors import UserError
from dlrun.models.yolo_v1 import YOLOv1
from dlrun.tasks.detection.trainer import DetectionTrainer
from tests.conftest import stopped_at_step

TINY = ("model=yolo_v1", "data=mnist_det", "model.width=4", "model.hidden=32",
        "data.train_scenes=40", "data.test_scenes=12", "data.batch_size=8", "data.val_scenes=6",
        "data.val_objects=50")  # fmt: skip


@pytest.fixture(autouse=True)
def _threads(one_thread: None) -> None:
    """Tiny nets: one thread each (see conftest)."""


def net(**kw: object) -> YOLOv1:
    """Grid 2 on a 64 px image (32 px cells), B = 2, K = 3, unless told."""
    args = {"in_channels": 1, "image_size": 64, "num_classes": 3, "grid": 2, "boxes_per_cell": 2,
            "width": 4, "hidden": 8} | kw  # fmt: skip
    return YOLOv1(**args)  # type: ignore[arg-type]


def logit(*values: float) -> Tensor:
    """Raw outputs whose sigmoids are `values`."""
    return torch.logit(torch.tensor(values, dtype=torch.float64)).float()


def set_box(raw: Tensor, img: int, row: int, col: int, box: int, *values: float) -> None:
    """Raw outputs of one predictor whose sigmoids are (x, y, w, h, C)."""
    raw[img, row, col, 5 * box : 5 * box + 5] = logit(*values)


def set_classes(raw: Tensor, img: int, row: int, col: int, *probs: float) -> None:
    """Class outputs of one cell: the probabilities themselves (linear, the paper's)."""
    raw[img, row, col, -len(probs) :] = torch.tensor(probs)


# One truth, class 1: [32, 8, 48, 32], centre (40, 20) in cell (row 0, column 1); relative to that
# cell x^ = 40 / 32 - 1 = 0.25, y^ = 20 / 32 = 0.625; relative to the image w^ = 16 / 64 = 0.25,
# h^ = 24 / 64 = 0.375.
TRUTH = torch.tensor([[[32.0, 8.0, 48.0, 32.0]], [[0.0, 0.0, 0.0, 0.0]]])
TRUTH_LABELS = torch.tensor([[1], [-1]])  # image 1 holds nothing
# Two predictors for that cell, (x, y, w, h):
#   A = (0.5, 0.5, 0.25, 0.25): centre (48, 16), 16 x 16, [40, 8, 56, 24]: 8 x 16 = 128 inside the
#       truth, union 256 + 384 - 128 = 512: IoU 0.25
#   D = (0.25, 0.5, 0.25, 0.5): centre (40, 16), 16 x 32, [32, 0, 48, 32]: 16 x 24 = 384 inside,
#       union 512 + 384 - 384 = 512: IoU 0.75
A, D = (0.5, 0.5, 0.25, 0.25), (0.25, 0.5, 0.25, 0.5)


def outputs(first: tuple, second: tuple) -> Tensor:
    """Batch of 2; every predictor C = 0.1 except the truth's cell: box 0 `first` with C = 0.2,
    box 1 `second` with C = 0.6, class probabilities (0.2, 0.5, 0.3)."""
    raw = torch.zeros(2, 2, 2, 13)
    for img in range(2):
        for row in range(2):
            for col in range(2):
                for box in range(2):
                    set_box(raw, img, row, col, box, 0.5, 0.5, 0.5, 0.5, 0.1)
    set_box(raw, 0, 0, 1, 0, *first, 0.2)
    set_box(raw, 0, 0, 1, 1, *second, 0.6)
    set_classes(raw, 0, 0, 1, 0.2, 0.5, 0.3)
    return raw.requires_grad_(True)


def test_the_four_terms_of_a_hand_made_case_and_the_responsible_box() -> None:
    model = net()
    raw = outputs(A, D)  # box 1 (D, IoU 0.75) is responsible
    terms = model.loss(raw, TRUTH, TRUTH_LABELS)
    assert set(terms) == {"coord", "conf_obj", "conf_noobj", "cls"}
    # Everything is summed over the batch, then divided by its size, 2.
    # coord: 5 * [(0.25 - 0.25)^2 + (0.5 - 0.625)^2 + (sqrt .25 - sqrt .25)^2
    #             + (sqrt .5 - sqrt .375)^2] / 2 = 5 * (0.015625 + 0.0089746) / 2
    coord = 5 * (0.125**2 + (math.sqrt(0.5) - math.sqrt(0.375)) ** 2) / 2
    # conf_obj: (0.6 - IoU 0.75)^2 / 2; conf_noobj: 0.5 * (box 0 of the cell, 0.2^2, + the 6 other
    # predictors of image 0 and the 8 of image 1 at 0.1^2) / 2 = 0.5 * (0.04 + 0.14) / 2
    # cls: (0.2 - 0)^2 + (0.5 - 1)^2 + (0.3 - 0)^2 = 0.38, / 2
    expected = {"coord": coord, "conf_obj": 0.0225 / 2, "conf_noobj": 0.045, "cls": 0.19}
    assert {k: v.item() for k, v in terms.items()} == pytest.approx(expected, abs=1e-6)
    # Only the responsible box's x, y, w, h learn coordinates.
    terms["coord"].backward()
    grad = raw.grad.abs().sum(-1)
    assert grad[0, 0, 1] > 0 and grad.sum() == grad[0, 0, 1]
    assert raw.grad[0, 0, 1, :5].abs().sum() == 0 and raw.grad[0, 0, 1, 5:9].abs().sum() > 0

    # Boxes swapped, confidences kept: box 0 (now D, C = 0.2) is responsible, box 1 (A, C = 0.6)
    # learns "no object". coord and cls stay; conf_obj (0.2 - 0.75)^2 / 2;
    # conf_noobj 0.5 * (0.6^2 + 0.14) / 2.
    swapped = model.loss(outputs(D, A), TRUTH, TRUTH_LABELS)
    expected |= {"conf_obj": 0.3025 / 2, "conf_noobj": 0.125}
    assert {k: v.item() for k, v in swapped.items()} == pytest.approx(expected, abs=1e-6)


def test_a_cell_learns_the_larger_of_two_truths_its_cell_found_by_floor() -> None:
    """Grid 7 on 64 px: cells of 9.14 px. Centres (10, 60) and (12, 58): column 1, row 6 both
    (10 / 9.14 = 1.09, 60 / 9.14 = 6.56; 1.31, 6.34). The larger box (12 x 12, class 2) wins over
    the smaller (8 x 8, class 0), whichever comes first."""
    model = net(grid=7)
    small, large = [6.0, 56.0, 14.0, 64.0], [6.0, 52.0, 18.0, 64.0]
    for boxes, labels in (([small, large], [0, 2]), ([large, small], [2, 0])):
        raw = torch.zeros(1, 7, 7, 13)
        set_classes(raw, 0, 6, 1, 0.2, 0.5, 0.3)
        raw.requires_grad_(True)
        terms = model.loss(raw, torch.tensor([boxes]), torch.tensor([labels]))
        # class 2: 0.2^2 + 0.5^2 + (0.3 - 1)^2 = 0.78 (class 0 would give 0.98)
        assert terms["cls"].item() == pytest.approx(0.78, abs=1e-6)
        terms["coord"].backward()
        grad = raw.grad.abs().sum(-1)
        assert grad[0, 6, 1] > 0 and grad.sum() == grad[0, 6, 1]
        # The default outputs: both boxes (x, y, w, h) = 0.5, the same box: the first is
        # responsible, and its x target is the larger truth's, 12 / 9.14 - 1 = 0.3125 (the
        # smaller's: 0.09375): d/dx 5 (sigmoid(x) - 0.3125)^2 = 5 * 2 * 0.1875 * sigmoid'(0) 0.25
        assert raw.grad[0, 6, 1, 0].item() == pytest.approx(5 * 2 * 0.1875 * 0.25, rel=1e-5)
    empty = model.loss(raw, torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.long))
    assert empty["coord"] == empty["conf_obj"] == empty["cls"] == 0
    assert empty["conf_noobj"].item() == pytest.approx(0.5 * 98 * 0.25)  # sigmoid(0) = 0.5


def test_decoding_on_a_grid_that_does_not_divide_the_image() -> None:
    model = net(grid=7, num_classes=10)  # 64 / 7 = 9.14 px cells
    assert model.raw(torch.zeros(2, 1, 64, 64)).shape == (2, 7, 7, 5 * 2 + 10)
    raw = torch.zeros(1, 7, 7, 20)
    set_box(raw, 0, 3, 2, 1, 0.5, 0.25, 0.25, 0.5, 0.9)  # row 3, column 2, box 1
    boxes = model.decode(model.split(raw)[0])
    # centre ((2 + 0.5) * 64 / 7, (3 + 0.25) * 64 / 7) = (160 / 7, 208 / 7); 0.25 * 64 x 0.5 * 64
    cx, cy = 160 / 7, 208 / 7
    assert boxes[0, 3, 2, 1].tolist() == pytest.approx([cx - 8, cy - 16, cx + 8, cy + 16])
    # sigmoid(0) = 0.5 everywhere else: the cell's centre, half the image wide
    assert boxes[0, 0, 0, 0].tolist() == pytest.approx([32 / 7 - 16] * 2 + [32 / 7 + 16] * 2)


def test_scores_are_confidence_times_class_probability_with_nms_per_class() -> None:
    model = net()
    raw = torch.zeros(2, 2, 2, 13)
    raw[..., [4, 9]] = -20.0  # every confidence ~ 2e-9: nothing, except below
    for img in range(2):  # the same in both images: NMS must not mix them
        set_box(raw, img, 0, 0, 0, 0.5, 0.5, 0.5, 0.5, 0.9)  # [0, 0, 32, 32]
        set_box(raw, img, 0, 0, 1, 0.5, 0.5, 0.5, 0.5, 0.5)  # the same box, less sure
        set_classes(raw, img, 0, 0, 0.1, 0.6, 0.3)
        set_box(raw, img, 1, 1, 0, 0.5, 0.5, 0.75, 0.75, 0.8)  # [24, 24, 72, 72]: clipped
        set_classes(raw, img, 1, 1, 0.98, 0.01, 0.01)
    dets = model.detect(raw)
    # 0.8 * 0.98; then [0, 0, 32, 32] under each class (0.9 x 0.6, 0.3, 0.1): per-class NMS keeps
    # the one box in every class and drops its less sure twin (0.5 x ...) in each; 0.8 * 0.01
    # is below the threshold (0.01).
    for det in dets:
        assert det["scores"].tolist() == pytest.approx([0.784, 0.54, 0.27, 0.09], abs=1e-6)
        assert det["labels"].tolist() == [0, 1, 2, 0]
        expected = [[24.0, 24.0, 64.0, 64.0]] + [[0.0, 0.0, 32.0, 32.0]] * 3
        assert det["boxes"].flatten().tolist() == pytest.approx(sum(expected, []), abs=1e-5)
    model.score_threshold, model.max_detections = 0.1, 2
    assert [d["labels"].tolist() for d in model.detect(raw)] == [[0, 1]] * 2


def test_it_trains_through_the_detection_trainer(make_cfg, tmp_path: Path) -> None:
    metrics = run(make_cfg(*TINY, "trainer.max_steps=3"), tmp_path)
    assert metrics["step"] == 3 and 0 <= metrics["val/map_50"] <= 1
    assert {f"train/loss_{t}" for t in ("coord", "conf_obj", "conf_noobj", "cls")} <= set(metrics)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert "anchors" not in state["model"]  # nothing fitted
    # The default head is the notes' output volume: convolutions, no Linear layer.
    assert not any(k.startswith("head.") and v.dim() == 2 for k, v in state["model"].items())


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("grid=0", "model.grid must be between 1 and the image size 64, got 0"),
        ("boxes_per_cell=0", "model.boxes_per_cell must be >= 1, got 0"),
    ],
)
def test_a_bad_grid_or_box_count_is_one_clear_error(make_cfg, key: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        net(**{key.split("=")[0]: 0})
    with pytest.raises(UserError, match=f"The model config could not be built .*{message}"):
        build_trainer(make_cfg(*TINY, f"model.{key}"), "unused")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"grid": 65}, "model.grid must be between 1 and the image size 64, got 65"),
        ({"width": 0}, "model.width and model.hidden must be >= 1, got 0, 8"),
        ({"hidden": 0}, "model.width and model.hidden must be >= 1, got 4, 0"),
        ({"dropout": 1.0}, r"model.dropout must be in \[0, 1\), got 1.0"),
        ({"head": "dense"}, "model.head must be one of conv, fc, got dense"),
    ],
)
def test_the_other_bad_sizes_are_named(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        net(**kw)


def test_resume_mid_epoch_ends_as_an_uninterrupted_run(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/test_detection.py's resume test for yolo_v1, whose dropout draws from the global RNG:
    one-cycle over 2 epochs of 3 steps, last.pt every 2 steps, the cut run dies in step 5."""
    steps = (*TINY, "model.head=fc", "sched=onecycle", "data.train_scenes=24",
             "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=2")  # fmt: skip
    whole = run(make_cfg(*steps), tmp_path / "w")
    stopped_at_step(make_cfg(*steps), tmp_path / "r", DetectionTrainer, 4, monkeypatch)
    resumed = run(make_cfg(*steps, "resume=true"), tmp_path / "r")
    assert resumed["step"] == whole["step"] == 6

    def stable(metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if "time/" not in k and "images_per_s" not in k}

    assert stable(resumed) == stable(whole)
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True)["model"]
            for d in (tmp_path / "r", tmp_path / "w"))  # fmt: skip
    assert all(torch.equal(a[k], b[k]) for k in a)
