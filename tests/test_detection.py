"""YOLO and Faster R-CNN on digit scenes: decoding, loss assignment, NMS, training, predict mode."""

import json
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

from dlrun.anchors import kmeans_anchors
from dlrun.cli import build_trainer, run
from dlrun.detection_losses import DetectionObjective
from dlrun.errors import UserError
from dlrun.models.faster_rcnn import FasterRCNN
from dlrun.models.yolo import YOLO

TINY = ("model=yolo", "data=mnist_det", "model.width=4", "data.train_scenes=40",
        "data.test_scenes=12", "data.batch_size=8")  # fmt: skip
RCNN = ("model=faster_rcnn", *TINY[1:], "model.width=4", "model.representation=16",
        "model.rpn_proposals=20", "model.box_batch_size=16")  # fmt: skip


@pytest.fixture(autouse=True)
def _threads(one_thread: None) -> None:
    """Tiny nets: one thread each (see conftest)."""


def yolo(**kw: object) -> YOLO:
    args = {"in_channels": 1, "image_size": 64, "num_classes": 3, "width": 4,
            "anchors": [[10.0, 10.0], [20.0, 30.0]]} | kw  # fmt: skip
    return YOLO(**args)  # type: ignore[arg-type]


def test_iou_known_answers() -> None:
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    assert box_iou(a, b).tolist() == [[pytest.approx(50 / 150), 1.0, 0.0]]


def test_yolo_decodes_offsets_in_the_cell_and_sizes_from_the_anchor() -> None:
    net = yolo()
    raw = torch.zeros(1, 2, 8, 8, 8)  # sigmoid(0) = 0.5: the cell's centre; exp(0): the anchor
    boxes = net.decode_boxes(raw)
    # cell (row 2, column 3), anchor 1 (20 x 30): centre (3.5 * 8, 2.5 * 8) = (28, 20)
    assert boxes[0, 1, 2, 3].tolist() == [18.0, 5.0, 38.0, 35.0]
    assert boxes[0, 0, 0, 0].tolist() == [-1.0, -1.0, 9.0, 9.0]


def test_yolo_loss_makes_the_centre_cell_and_best_anchor_responsible() -> None:
    net = yolo()
    box = torch.tensor([[[18.0, 5.0, 38.0, 35.0], [0.0, 0.0, 0.0, 0.0]]])  # fits anchor 1 exactly
    labels = torch.tensor([[2, -1]])
    raw = torch.zeros(1, 2, 8, 8, 8, requires_grad=True)
    terms = net.loss(raw, box, labels)
    assert terms["box"].item() == pytest.approx(0, abs=1e-6)  # decoded box == the true box
    (terms["obj"] + terms["cls"]).backward()
    grad = raw.grad.abs().sum(-1)
    assert grad[0, 1, 2, 3] > 0 and grad.sum() == grad[0, 1, 2, 3]  # only that one prediction
    # With no boxes at all every prediction learns "no object" and nothing else.
    empty = net.loss(raw, box[:, 1:], labels[:, 1:])
    assert empty["box"] == 0 and empty["cls"] == 0 and empty["noobj"] > 0


def test_yolo_nms_keeps_the_best_of_overlapping_boxes_per_class() -> None:
    net = yolo(anchors=[[10.0, 10.0]])
    raw = torch.full((2, 1, 8, 8, 8), -20.0)
    raw[..., :4] = 0
    # Image 0: class 0 at cells (0, 0) and (0, 1), boxes 8 px apart (IoU 0.1): both stay.
    # Image 1: class 1 at cells (4, 4) and (4, 5), the second pulled 4 px back (IoU 60 / 140).
    raw[0, 0, 0, 0, 4], raw[0, 0, 0, 0, 5] = 5.0, 5.0
    raw[0, 0, 0, 1, 4], raw[0, 0, 0, 1, 5] = 4.0, 5.0
    raw[1, 0, 4, 4, 4], raw[1, 0, 4, 4, 6] = 5.0, 5.0
    raw[1, 0, 4, 5, 4], raw[1, 0, 4, 5, 6] = 3.0, 5.0
    raw[1, 0, 4, 5, 0] = -20.0  # pulled back to x offset 0: 4 px from the first, IoU 0.43
    dets = net.detect(raw)
    assert len(dets) == 2 and len(dets[0]["boxes"]) == 2 and (dets[0]["labels"] == 0).all()
    assert dets[0]["scores"][0] > dets[0]["scores"][1]  # best first
    assert len(dets[1]["boxes"]) == 2  # IoU 0.43 < nms_iou 0.5
    net.nms_iou = 0.4
    dets = net.detect(raw)
    assert len(dets[1]["boxes"]) == 1 and dets[1]["labels"].tolist() == [1]


def test_detection_objective_weighs_terms_and_names_a_wrong_one() -> None:
    terms = {"box": torch.tensor(2.0), "cls": torch.tensor(3.0)}
    out = DetectionObjective("detection", {"box": 0.5})(terms)
    assert out["box"].item() == 1.0 and out["cls"].item() == 3.0
    with pytest.raises(UserError, match="not a loss term of this detector; its terms are: box"):
        DetectionObjective("detection", {"bbox": 1.0})(terms)


def test_yolo_trains_fits_anchors_logs_boxes_and_scores_map(make_cfg, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = run(make_cfg(*TINY, "trainer.max_steps=3"), tmp_path)
    assert metrics["step"] == 3 and 0 <= metrics["val/map_50"] <= 1
    assert 0 <= metrics["val/map"] <= metrics["val/map_50"]
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0}).Reload()
    assert {"test/truth", "val/predictions"} <= set(events.Tags()["images"])
    assert {"train/loss_box", "train/loss_noobj"} <= set(events.Tags()["scalars"])
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    wh = build_trainer(make_cfg(*TINY), "unused").data.box_sizes("train")
    fitted = kmeans_anchors(wh, 3, torch.Generator().manual_seed(0))
    assert torch.equal(state["model"]["anchors"], fitted) and (fitted > 0).all()


def test_faster_rcnn_trains_through_the_same_trainer(make_cfg, tmp_path: Path) -> None:
    metrics = run(make_cfg(*RCNN, "trainer.max_steps=2"), tmp_path)
    assert metrics["step"] == 2 and 0 <= metrics["val/map_50"] <= 1
    # The fitted anchors come back with the checkpoint, into torchvision's anchor generator.
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    net = FasterRCNN(in_channels=1, image_size=64, num_classes=10, width=4, representation=16,
                     stride=4)  # fmt: skip
    net.load_state_dict(state["model"])
    cells = net.detector.rpn.anchor_generator.cell_anchors[0]
    assert torch.allclose(cells[:, 2:] - cells[:, :2], state["model"]["anchors"], atol=1.0)


def test_faster_rcnn_keeps_the_canvas_size_and_counts_classes_from_zero() -> None:
    torch.manual_seed(0)
    net = FasterRCNN(in_channels=1, image_size=64, num_classes=3, width=4, representation=16,
                     anchors=[[12.0, 20.0], [24.0, 30.0]])  # fmt: skip
    assert net.detector.transform.min_size == (64,) and net.detector.transform.max_size == 64
    boxes = torch.tensor([[[10.0, 10.0, 30.0, 40.0], [0.0, 0.0, 0.0, 0.0]]])
    terms = net.train()(torch.rand(1, 1, 64, 64), boxes, torch.tensor([[0, -1]]))
    assert set(terms) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    dets = net.eval()(torch.rand(2, 1, 64, 64))
    assert len(dets) == 2 and all(((d["labels"] >= 0) & (d["labels"] < 3)).all() for d in dets)


def test_predict_mode_draws_boxes_and_writes_json(make_cfg, tmp_path: Path) -> None:
    run(make_cfg(*TINY, "trainer.max_steps=1"), tmp_path / "train")
    ckpt = tmp_path / "train" / "checkpoints" / "last.pt"
    keys = (
        *TINY,
        "mode=predict",
        f"ckpt={ckpt}",
        "predict.n=3",
        "predict.score=0",
        "model.score_threshold=0",
    )
    out = run(make_cfg(*keys), tmp_path / "p")
    assert out["predict/items"] == 3
    records = json.loads((tmp_path / "p" / "predict" / "predictions.json").read_text())
    assert [r["name"] for r in records] == ["test_000000", "test_000001", "test_000002"]
    first = records[0]["boxes"][0]
    assert (
        len(first["box"]) == 4
        and first["label"].startswith(tuple("0123456789"))
        and 0 <= first["score"] <= 1
    )
    assert (tmp_path / "p" / "predict" / "test_000000.png").is_file()


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (("loss=cross_entropy",), "Detection trains with the detector's own loss terms"),
        (("data=mnist_seg",), "is segmentation data"),
        (("model.stride=5",), "model.stride must be 4, 8, 16 or 32"),
        (("+loss.weights.bbox=2",), "not a loss term of this detector"),
        (("model=lenet", "trainer=detection", "loss=detection"), "is not a detector"),
        (("predict.score=2", "mode=predict", "ckpt=CKPT"), r"predict.score must be in \[0, 1\]"),
    ],
)
def test_user_mistakes_are_one_clear_error(
    make_cfg, tmp_path: Path, keys: tuple, message: str
) -> None:
    if "ckpt=CKPT" in keys:
        run(make_cfg(*TINY, "trainer.max_steps=1"), tmp_path / "train")
        ckpt = tmp_path / "train" / "checkpoints" / "last.pt"
        keys = tuple(k.replace("CKPT", str(ckpt)) for k in keys)
        with pytest.raises(UserError, match=message):
            run(make_cfg(*TINY, *keys), tmp_path / "p")
        return
    base = TINY[1:2] + TINY[3:] if keys[0].startswith("model=") else TINY
    with pytest.raises(UserError, match=message):
        if "bbox" in keys[0]:
            run(make_cfg(*base, *keys, "trainer.max_steps=1"), tmp_path)
        else:
            build_trainer(make_cfg(*base, *keys), "unused")


@pytest.mark.parametrize("keys", [TINY, RCNN], ids=["yolo", "faster_rcnn"])
def test_resume_ends_as_an_uninterrupted_run(make_cfg, tmp_path: Path, keys: tuple) -> None:
    # Faster R-CNN samples anchors and proposals from the global RNG: resume restores it.
    steps = (*keys, "sched=none", "data.train_scenes=16")
    run(make_cfg(*steps, "trainer.max_epochs=1"), tmp_path / "r")
    resumed = run(make_cfg(*steps, "trainer.max_epochs=2", "resume=true"), tmp_path / "r")
    whole = run(make_cfg(*steps, "trainer.max_epochs=2"), tmp_path / "w")
    assert resumed["step"] == whole["step"] == 4
    assert resumed["val/map_50"] == whole["val/map_50"]
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True)["model"]
            for d in (tmp_path / "r", tmp_path / "w"))  # fmt: skip
    assert all(torch.equal(a[k], b[k]) for k in a)
