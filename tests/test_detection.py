"""YOLO and Faster R-CNN on digit scenes: decoding, loss assignment, NMS, training, predict mode;
mAP through the trainer's evaluation against an oracle, learning, and a mid-epoch resume."""

import json
import math
import time
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

from dlrun.cli import build_trainer, run
from dlrun.data.digit_scenes import SceneData
from dlrun.data.in_memory import Splits
from dlrun.errors import UserError
from dlrun.models.anchors import kmeans_anchors
from dlrun.models.faster_rcnn import FasterRCNN
from dlrun.models.yolo import YOLO
from dlrun.tasks.detection.losses import DetectionObjective
from dlrun.tasks.detection.trainer import DetectionTrainer
from tests.conftest import stopped_at_step

# Validation scenes of held-out training digits, as data=mnist_det makes them by default (the
# fixture's 200 training digits: the last 50 for them).
TINY = ("model=yolo", "data=mnist_det", "model.width=4", "data.train_scenes=40",
        "data.test_scenes=12", "data.batch_size=8", "data.val_scenes=6",
        "data.val_objects=50")  # fmt: skip
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


def test_yolo_ignore_rule_spares_other_predictions_on_a_true_box_of_their_own_image() -> None:
    """YOLOv3's rule: a prediction that is not responsible but already overlaps a true box of its
    image by IoU > ignore_iou (0.5) gets no "no object" penalty; the rest of them do."""
    net = yolo()  # anchors 10 x 10 and 20 x 30, stride 8: an 8 x 8 grid
    # Image 0: one box that fits anchor 1 at cell (row 2, column 3), centre (28, 20); image 1: none.
    box = torch.tensor([[[18.0, 5.0, 38.0, 35.0]], [[0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2], [-1]])
    raw = torch.zeros(2, 2, 8, 8, 8)  # every box anchor-sized at its cell's centre, objectness 0
    # Anchor 1 at (2, 4) pulled 4 px left, centre x 32: [22, 5, 42, 35], IoU 480 / 720 = 0.67.
    raw[:, 1, 2, 4, 0] = -30.0
    raw.requires_grad_(True)
    net.loss(raw, box, labels)["noobj"].backward()
    grad = raw.grad[..., 4]
    # Ignored in image 0: (2, 4) and, unmoved, (1, 3) and (3, 3) (8 px up or down: IoU 440 / 760);
    # (2, 3) is the responsible one, which learns "object" instead.
    spared = [(2, 4), (1, 3), (3, 3), (2, 3)]
    assert [grad[0, 1, r, c].item() for r, c in spared] == [0.0] * 4
    # Penalised: overlapping by IoU <= 0.5 (8 px left: 360 / 840 = 0.43; 16 px right: 0.11), the
    # other anchor (100 / 600), and in image 1 the same boxes: image 0's box is not theirs.
    assert grad[0, 1, 2, 2] > 0 and grad[0, 1, 2, 5] > 0 and grad[0, 0, 2, 3] > 0
    assert all(grad[1, 1, r, c] > 0 for r, c in spared), grad[1, 1]
    # BCE(0, "no object") = log 2 for each of the 2 * 2 * 8 * 8 - 4 others, times noobj_weight 0.5
    # over the one true box.
    expected = 0.5 * (2 * 2 * 8 * 8 - 4) * math.log(2)
    assert net.loss(raw, box, labels)["noobj"].item() == pytest.approx(expected, rel=1e-6)


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


# ----- mAP through the trainer's evaluation: an oracle ------------------------------------------
def oracle(data: SceneData, shift: float) -> object:
    """YOLO.forward with the eval-mode answer of an oracle: each image is found among the scenes
    of `data` (every split, normalised as the loaders give them) and its true boxes come back,
    moved right and down by `shift` times their width and height. Train mode stays YOLO's own."""
    batches = [data.example_batch(len(data.scenes[s].images), s) for s in ("train", "val", "test")]
    images = torch.cat([b["image"] for b in batches]).flatten(1)
    truths = [
        {"boxes": box[lab >= 0], "labels": lab[lab >= 0]}  # its own reading of the padding
        for b in batches
        for box, lab in zip(b["boxes"], b["box_labels"], strict=True)
    ]
    real = YOLO.forward

    def forward(self: YOLO, x: torch.Tensor, boxes=None, labels=None):  # noqa: ANN001, ANN202
        if boxes is not None:
            return real(self, x, boxes, labels)
        out = []
        for image in x.flatten(1):
            if image.min() == image.max():  # the FLOP count's blank input: nothing there
                out.append({"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                            "labels": torch.zeros(0, dtype=torch.long)})  # fmt: skip
                continue
            gap = (images - image).abs().amax(1)
            i = int(gap.argmin())
            assert gap[i] < 1e-5, "the oracle was asked about an image of no split"
            t = truths[i]
            size = (t["boxes"][:, 2:] - t["boxes"][:, :2]).repeat(1, 2)
            scores = 1.0 - 0.1 * torch.arange(len(t["labels"]), dtype=torch.float32)
            out.append({"boxes": t["boxes"] + shift * size, "scores": scores,
                        "labels": t["labels"]})  # fmt: skip
        return out

    return forward


@pytest.mark.parametrize(("shift", "expected"), [(0.0, 1.0), (0.5, 0.0)])
def test_the_trainer_scores_an_oracle_1_and_the_oracle_moved_by_half_a_box_0(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shift: float, expected: float
) -> None:
    """The whole path of a run's val/map_50: the trainer's detect and evaluate (the validation
    scenes' truth, padding dropped) and detection_metrics. Moved by half its width and height,
    a box keeps 1/4 of its area in the true one: IoU (1/4) / (7/4) = 1/7, below every threshold."""
    data = build_trainer(make_cfg(*TINY), "unused").data  # the scenes the run will make
    monkeypatch.setattr(YOLO, "forward", oracle(data, shift))
    metrics = run(make_cfg(*TINY, "trainer.max_steps=1"), tmp_path)
    assert metrics["val/map_50"] == expected and metrics["val/map"] == expected
    # val/* is held out, so the test scenes are scored once at the end, by the same oracle
    assert metrics["test/map_50"] == expected
    val = data.scenes["val"]
    assert len(val.images) == 6  # the held-out scenes, not the 12 test ones
    per_image = (val.box_labels >= 0).sum().item() / 6
    assert metrics["val/boxes_per_image"] == pytest.approx(per_image)


# ----- learning: a handful of scenes overfitted ---------------------------------------------------
def blocks(root: Path, download: bool) -> Splits:
    """10 classes of 28 px objects (a `data.source` loader): a grey square, which is the box, with
    a white 6 px dot at one of 9 places (class 9: none), so that the class survives any scale.
    (The fixture's MNIST digits are 2 px bars: thinner than Faster R-CNN's stride-4 anchor rows.)"""
    splits = []
    for n in (40, 10):
        labels = torch.arange(n) % 10
        x = torch.full((n, 1, 28, 28), 140, dtype=torch.uint8)
        for i, k in enumerate(labels.tolist()):
            if k < 9:
                r, c = 3 + 8 * (k // 3), 3 + 8 * (k % 3)
                x[i, 0, r : r + 6, c : c + 6] = 255
        splits += [x, labels]
    return Splits(*splits, [str(k) for k in range(10)])


LEARN = {  # detector, its settings, and the seconds the run may take
    "yolo": (("model=yolo", "model.width=4", "optim.lr=0.02", "trainer.max_steps=60"), 30),
    "faster_rcnn": (("model=faster_rcnn", "model.width=8", "model.representation=32",
                     "model.box_batch_size=16", "optim.lr=0.01", "trainer.max_steps=100"), 60),
}  # fmt: skip


@pytest.mark.parametrize("detector", list(LEARN))
def test_a_detector_overfits_a_handful_of_scenes(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, detector: str
) -> None:
    """4 training scenes (2 to 4 objects each), one batch, scored by the run itself on the same
    4 scenes: mAP@0.5 > 0.9 within the time limit (an untrained net scores about 0)."""
    real = SceneData.setup

    def validate_on_the_training_scenes(self: SceneData, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        real(self, *args, **kwargs)
        self.scenes["val"] = self.scenes["train"]

    monkeypatch.setattr(SceneData, "setup", validate_on_the_training_scenes)
    keys, limit = LEARN[detector]
    source = f"data.source={{_target_:{__name__}.blocks,_partial_:true}}"
    start = time.perf_counter()
    metrics = run(
        make_cfg(*keys, "data=mnist_det", source, "data.train_scenes=4", "data.batch_size=4",
                 "data.val_scenes=1", "data.val_objects=10", "data.test_scenes=1",
                 "trainer.val_every_n_epochs=1000"),  # evaluated once, at the end
        tmp_path,
    )  # fmt: skip
    took = time.perf_counter() - start
    assert metrics["val/map_50"] > 0.9, metrics
    assert took < limit, f"{detector} took {took:.1f} s to overfit 4 scenes (limit {limit} s)"


# ----- resume ------------------------------------------------------------------------------------
TIMING = ("time/", "images_per_s")


def stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}


@pytest.mark.parametrize("keys", [TINY, RCNN], ids=["yolo", "faster_rcnn"])
def test_resume_mid_epoch_under_a_schedule_ends_as_an_uninterrupted_run(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keys: tuple
) -> None:
    """One-cycle over 2 epochs of 3 steps; last.pt every 2 steps; the cut run dies in step 5, its
    last.pt from step 4 (one batch into epoch 2). Faster R-CNN samples anchors and proposals from
    the global RNG: resume restores it."""
    steps = (*keys, "sched=onecycle", "data.train_scenes=24", "trainer.max_epochs=2",
             "trainer.checkpoint_every_n_steps=2")  # fmt: skip
    whole = run(make_cfg(*steps), tmp_path / "w")
    stopped_at_step(make_cfg(*steps), tmp_path / "r", DetectionTrainer, 4, monkeypatch)
    saved = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == 4 and saved["epoch"] == 1 and saved["progress"]["batch"] == 1
    assert saved["scheduler"]["last_epoch"] == 4  # the schedule is 4 of its 6 steps in
    resumed = run(make_cfg(*steps, "resume=true"), tmp_path / "r")
    assert resumed["step"] == whole["step"] == 6
    assert stable(resumed) == stable(whole)  # val/map_50, val/map, train/loss, train/lr, ...
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True)
            for d in (tmp_path / "r", tmp_path / "w"))  # fmt: skip
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scheduler"] == b["scheduler"]
