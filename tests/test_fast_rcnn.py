"""Fast R-CNN (model=fast_rcnn): how it calls RoI pooling, eq. 1's two loss terms and the
detections' decoding and NMS, each checked by hand; then through the detection trainer on
selective-search proposals: training, an exact mid-epoch resume, and its users' mistakes."""

import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

from dlrun.cli import build_trainer, run
from dlrun.errors import UserError
from dlrun.models.fast_rcnn import FastRCNN
from dlrun.tasks.detection.trainer import DetectionTrainer
from tests.conftest import stopped_at_step

# Few scenes: selective search costs ~30 ms a scene on a fresh cache (CI's). model.score_threshold
# 0.1: an untrained head's near-uniform softmax (1/11 a class) would send every proposal's 10
# classes through NMS and mAP at the default 0.01, seconds of a test's time.
TINY = ("model=fast_rcnn", "data=mnist_det", "model.width=4", "model.representation=16",
        "model.rois_per_image=16", "model.score_threshold=0.1", "data.train_scenes=24",
        "data.test_scenes=8", "data.batch_size=8", "data.val_scenes=6",
        "data.val_objects=50")  # fmt: skip


@pytest.fixture(autouse=True)
def _threads(one_thread: None) -> None:
    """Tiny nets: one thread each (see conftest)."""


def net(**kw: object) -> FastRCNN:
    args = {"in_channels": 1, "image_size": 64, "num_classes": 2, "width": 4,
            "representation": 8} | kw  # fmt: skip
    return FastRCNN(**args)  # type: ignore[arg-type]


def test_roi_pooling_scales_pixel_boxes_by_the_stride_and_reads_each_boxs_own_image() -> None:
    """An 8 x 8 map of stride 4 (a 32 px canvas), value 8 r + c at row r, column c in image 0
    and its negative in image 1. The box [8, 4, 23, 19] px times 1/4 is x 2 .. 5.75, y 1 ..
    4.75, which roi_pool rounds to columns 2..6 and rows 1..5 (both ends inside: 5 x 5 cells).
    A 2 x 2 output splits 5 into bins of 2.5: [floor(0), ceil(2.5)) = cells 0-2 and
    [floor(2.5), ceil(5)) = cells 2-4 of the box, i.e. rows 1-3 | 3-5 and columns 2-4 | 4-6.
    Image 0's maxima sit at each bin's bottom-right cell: 8*3+4 = 28, 8*3+6 = 30, 8*5+4 = 44,
    8*5+6 = 46; image 1's (-8r-c) at its top-left: -(8+2), -(8+4), -(24+2), -(24+4)."""
    model = net(image_size=32, stride=4, pool_size=2)
    grid = torch.arange(64.0).view(1, 1, 8, 8)
    features = torch.cat([grid, -grid])
    box = torch.tensor([[8.0, 4.0, 23.0, 19.0]] * 2)
    out = model.pool(features, torch.tensor([0, 1]), box)
    assert out.shape == (2, 1, 2, 2)
    assert out[0, 0].tolist() == [[28.0, 30.0], [44.0, 46.0]]
    assert out[1, 0].tolist() == [[-10.0, -12.0], [-26.0, -28.0]]


def test_the_multitask_loss_of_one_foreground_and_one_background_region_by_hand() -> None:
    """Eq. 1 over R = 2 sampled regions. Region 0: class 2 (u = 2), logits (0, 0, 0): CE ln 3;
    region 1: background (u = 0), logits (ln 2, 0, 0): p_0 = 2 / 4, CE ln 2. cls = (ln 3 + ln 2)
    / 2. Region 0's proposal [0, 0, 10, 10] and truth [2, 1, 12, 13] encode to v = (2, 2, 0,
    5 ln 1.2) (tests/test_regions.py); its class-2 deltas t = (2.5, 0, 0, 0) differ by (0.5, -2,
    0, -5 ln 1.2 = -0.912): smooth L1 (beta 1) 0.5 * 0.5^2 + (2 - 0.5) + 0 + 0.5 * 0.912^2,
    divided by R = 2. Every other row of deltas is 100: only t^u of a foreground region counts."""
    model = net(box_weight=1.0)
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0]])
    deltas = torch.full((2, 3, 4), 100.0)
    deltas[0, 2] = torch.tensor([2.5, 0.0, 0.0, 0.0])
    deltas.requires_grad_(True)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [30.0, 30.0, 40.0, 40.0]])
    truth = torch.tensor([[2.0, 1.0, 12.0, 13.0], [0.0, 0.0, 0.0, 0.0]])
    u = torch.tensor([2, 0])
    terms = model.terms(logits, deltas, u, boxes, truth)
    assert set(terms) == {"cls", "box"}
    assert terms["cls"].item() == pytest.approx((math.log(3) + math.log(2)) / 2, rel=1e-6)
    dh = 5 * math.log(1.2)
    expected = (0.5 * 0.5**2 + 1.5 + 0.5 * dh**2) / 2
    assert terms["box"].item() == pytest.approx(expected, rel=1e-5)
    terms["box"].backward()
    touched = (deltas.grad != 0).any(-1)
    assert touched.tolist() == [[False, False, True], [False, False, False]]
    model.box_weight = 2.0  # lambda
    assert model.terms(logits, deltas, u, boxes, truth)["box"].item() == pytest.approx(2 * expected)
    # Background only: no box term; no region at all: zeros, not 0 / 0.
    assert model.terms(logits[1:], deltas[1:], u[1:], boxes[1:], truth[1:])["box"].item() == 0
    empty = model.terms(logits[:0], deltas[:0], u[:0], boxes[:0], truth[:0])
    assert empty["cls"].item() == 0 and empty["box"].item() == 0


def test_detections_decode_the_class_box_clip_drop_background_and_nms_per_image_and_class() -> None:
    """K = 2. Image 0: proposals A [0, 0, 20, 20], B [2, 0, 22, 20] (IoU 360 / 440 = 0.82 with
    A), C [40, 40, 60, 60], one padding row; image 1: A again. A and B say class 1 (logits 3 and
    2), C class 2 (logit 4) with its class-2 dx 10 (x 1/10 x 20 px: moved 20 px right, [60, 40,
    80, 60], clipped to the 64 px canvas). Kept (score > 0.1): A (B drops under NMS, same image
    and class), C, and image 1's A (another image: not suppressed by image 0's)."""
    model = net(score_threshold=0.1)
    pad = [-1.0] * 4
    proposals = torch.tensor([[[0.0, 0, 20, 20], [2, 0, 22, 20], [40, 40, 60, 60], pad],
                              [[0.0, 0, 20, 20], pad, pad, pad]])  # fmt: skip
    logits = torch.tensor([[0.0, 3, 0], [0, 2, -1], [0, -5, 4], [0, 3, 0]])
    deltas = torch.zeros(4, 3, 4)
    deltas[2, 2, 0] = 10.0
    deltas[2, 1] = 50.0  # class 1's box of C: its score is below the threshold anyway
    seen = {}

    def predict(images, image, boxes):  # noqa: ANN001, ANN202
        seen["image"], seen["boxes"] = image, boxes
        return logits, deltas

    model.predict = predict  # type: ignore[method-assign]
    dets = model.eval()(torch.zeros(2, 1, 64, 64), proposals=proposals)
    assert seen["image"].tolist() == [0, 0, 0, 1]  # every valid proposal, padding dropped
    p = logits.softmax(1)
    assert len(dets) == 2
    assert dets[0]["labels"].tolist() == [1, 0]  # C (0.98) then A (0.91): best first, 0-based
    assert dets[0]["boxes"].tolist() == [[60.0, 40.0, 64.0, 60.0], [0.0, 0.0, 20.0, 20.0]]
    assert dets[0]["scores"].tolist() == pytest.approx([p[2, 2].item(), p[0, 1].item()])
    assert dets[1]["labels"].tolist() == [0] and dets[1]["boxes"].tolist() == [[0, 0, 20, 20]]
    model.max_detections = 1
    assert [len(d["scores"]) for d in model(torch.zeros(2, 1, 64, 64), proposals=proposals)] == [
        1, 1,
    ]  # fmt: skip


TIMING = ("time/", "images_per_s")


def stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}


def test_it_trains_on_proposals_and_resumes_mid_epoch_as_an_uninterrupted_run(
    make_cfg, opencv_contrib: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the detection trainer on selective-search proposals: 2 epochs of 3 steps (24
    scenes, batches of 8) under one-cycle, last.pt every 2 steps. The cut run dies in step 5,
    its last.pt from step 4 (one batch into epoch 2): after resume, the regions sampled from the
    global RNG are those of the whole run, and so are its scores and weights."""
    steps = (*TINY, "sched=onecycle", "trainer.max_epochs=2",
             "trainer.checkpoint_every_n_steps=2")  # fmt: skip
    whole = run(make_cfg(*steps), tmp_path / "w")
    assert whole["step"] == 6 and 0 <= whole["val/map_50"] <= 1
    assert 0 <= whole["val/map"] <= whole["val/map_50"]
    # Eq. 1's two terms, logged by name, make the loss.
    assert whole["train/loss"] == pytest.approx(
        whole["train/loss_cls"] + whole["train/loss_box"], rel=1e-5
    )
    stopped_at_step(make_cfg(*steps), tmp_path / "r", DetectionTrainer, 4, monkeypatch)
    saved = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == 4 and saved["epoch"] == 1 and saved["progress"]["batch"] == 1
    resumed = run(make_cfg(*steps, "resume=true"), tmp_path / "r")
    assert resumed["step"] == 6
    assert stable(resumed) == stable(whole)
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True)["model"]
            for d in (tmp_path / "r", tmp_path / "w"))  # fmt: skip
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"pool_size": 0}, r"^model.pool_size must be >= 1 \("),
        ({"stride": 6}, r"^model.stride must be one of 2, 4, 8, 16 and divide the image size 64 "),
        ({"image_size": 60, "stride": 8}, r"divide the image size 60 "),
        ({"rois_per_image": 0}, r"^model.rois_per_image must be > 0, got 0\.$"),
        ({"score_threshold": 2.0}, r"model.score_threshold in \[0, 1\], got 1.0 and 2.0\.$"),
        ({"proposals": {"upscal": 3}}, r"^model.proposals takes upscale, max_boxes, strategy, not upscal "),
    ],
)
def test_model_mistakes_are_one_clear_error(kw: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as err:
        net(**kw)
    assert "\n" not in str(err.value)


def test_a_model_mistake_reaches_the_command_line_as_it_is(make_cfg) -> None:
    """The CLI's build passes a constructor's UserError on unwrapped: the same one line."""
    with pytest.raises(UserError, match=r"^model.pool_size must be >= 1 \(each region's side"):
        build_trainer(make_cfg(*TINY, "model.pool_size=0"), "unused")
