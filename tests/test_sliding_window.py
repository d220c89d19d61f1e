"""model=sliding_window: the loop over crops and the convolutional form score the same windows
with the same numbers; the fully connected layers become convolutions by reshaping; training
crops are labelled as their IoU says; it trains through the detection trainer; mistakes are
one-line UserErrors."""

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torchvision.ops import box_iou, roi_align

from dlrun.cli import run
from dlrun.errors import UserError
from dlrun.models.sliding_window import SlidingWindow

TINY = ("model=sliding_window", "data=mnist_det", "model.width=4", "data.train_scenes=40",
        "data.test_scenes=12", "data.batch_size=8", "data.val_scenes=6", "data.val_objects=50",
        "trainer.max_steps=3")  # fmt: skip


@pytest.fixture(autouse=True)
def _threads(one_thread: None) -> None:
    """Tiny nets: one thread each (see conftest)."""


def net(**kw: object) -> SlidingWindow:
    args = {"in_channels": 1, "image_size": 64, "num_classes": 3, "width": 4, "hidden": [8]} | kw
    return SlidingWindow(**args)  # type: ignore[arg-type]


def randomised(model: SlidingWindow) -> SlidingWindow:
    """Random weights and BatchNorm statistics, in eval mode: nothing left at a neutral value."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_roi_align_of_whole_pixel_windows_is_the_slice() -> None:
    """aligned=True, one sample per output pixel: a window of n px at whole pixels into n x n
    samples the pixel centres themselves, so the loop form's crop is the conv form's patch."""
    image = torch.randn(1, 2, 30, 40)
    rois = torch.tensor([[0.0, 4.0, 8.0, 24.0, 28.0], [0.0, 20.0, 0.0, 40.0, 20.0]])
    crops = roi_align(image, rois, 20, 1.0, sampling_ratio=1, aligned=True)
    assert torch.equal(crops[0], image[0, :, 8:28, 4:24])
    assert torch.equal(crops[1], image[0, :, 0:20, 20:40])


def test_both_forms_give_every_window_the_same_scores() -> None:
    """A random image and random weights; a window of input_size at scale 1 (exact pixels) and
    two resized pyramid levels per aspect (scale 0.75 upsamples, 1.25 downsamples)."""
    model = randomised(net(window=20, input_size=20, scales=[0.75, 1.0, 1.25], aspects=[1.0, 0.5]))
    images = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        loop, conv = model.scores(images, False), model.scores(images, True)
    windows = model.windows(64, 64)
    assert loop.shape == conv.shape == (2, len(windows), 4)
    assert (loop - conv).abs().max().item() < 1e-5
    assert loop.std() > 0.05  # not all one answer: the test can tell windows apart
    # At scale 1 (levels 3 and 4 of 6, after 17 x 17 and 17 x 38 windows at 0.75) window
    # (row 2, column 5) is the pixels [8, 28) x [20, 40), classified alone.
    first = 17 * 17 + 17 * 38 + 2 * 12 + 5
    assert windows[first].tolist() == [20.0, 8.0, 40.0, 28.0]
    alone = model.classify(images[:1, :, 8:28, 20:40]).softmax(-1)[0]
    assert torch.allclose(conv[0, first], alone, atol=1e-6)


def test_fully_connected_layers_become_convolutions_by_reshaping() -> None:
    model = net(input_size=20, window=20, hidden=[8])  # features (8, 2, 2) -> 8 -> 4
    first, second = (m for m in model.head if isinstance(m, nn.Linear))
    with torch.no_grad():
        first.weight.copy_(torch.arange(8 * 32.0).view(8, 32))
        second.weight.copy_(torch.arange(4 * 8.0).view(4, 8))
    conv1, conv2 = model.convolutional_layers()
    assert conv1.weight.shape == (8, 8, 2, 2) and conv2.weight.shape == (4, 8, 1, 1)
    # Flatten reads (C, h, w) row-major: input (c, i, j) is column c * 4 + i * 2 + j.
    assert conv1.weight[3, 5, 1, 0].item() == 3 * 32 + 5 * 4 + 1 * 2 + 0
    assert conv2.weight[2, 7, 0, 0].item() == 2 * 8 + 7
    assert torch.equal(conv1.bias, first.bias) and torch.equal(conv2.bias, second.bias)
    crop = torch.randn(3, 1, 20, 20)
    model.eval()
    assert torch.allclose(model.convolutional()(crop)[:, :, 0, 0], model.classify(crop), atol=1e-5)


def test_cost_counts_windows_and_flops_of_each_form() -> None:
    """By hand, width 4, hidden [8], K + 1 = 4 outputs, one window of 20 px: conv 5x5 1->4 at
    16 x 16, 4->8 at 4 x 4, then 32 -> 8 -> 4; a 24 px image has 2 x 2 windows at stride 4."""
    model = net(image_size=24, window=20, input_size=20, scales=[1.0], aspects=[1.0])
    one = 2 * (4 * 25 * 256 + 8 * 4 * 25 * 16 + 32 * 8 + 8 * 4)
    assert model.cost(False) == {"windows": 4, "flops": 4 * one}
    # One pass: 20 x 20 and 6 x 6 conv outputs, then the 2 x 2 and 1 x 1 convolutions at 2 x 2.
    shared = 2 * (4 * 25 * 400 + 8 * 4 * 25 * 36 + 4 * (32 * 8 + 8 * 4))
    assert model.cost(True) == {"windows": 4, "flops": shared}
    assert model.training  # left as it was


def test_default_windows_per_image() -> None:
    """The config's defaults on a 64 px scene: levels 85, 171 | 64, 128 | 51, 102 px wide."""
    model = net(window=20, input_size=20, scales=[0.75, 1.0, 1.25], aspects=[1.0, 0.5])
    assert model.levels(64, 64) == [(85, 85), (85, 171), (64, 64), (64, 128), (51, 51), (51, 102)]
    windows = model.windows(64, 64)
    assert len(windows) == 17 * 17 + 17 * 38 + 12 * 12 + 12 * 28 + 8 * 8 + 8 * 21
    # Scale 1, aspect 0.5 (the level twice as wide): row 0, column 1 is level x 4..24, y 0..20.
    assert windows[17 * 17 + 17 * 38 + 12 * 12 + 1].tolist() == [2.0, 0.0, 12.0, 20.0]
    # Scale 1.25, aspect 1 (51 px for 64): row 1, column 2 is level x 8..28, y 4..24.
    f = 64 / 51
    expected = [8 * f, 4 * f, 28 * f, 24 * f]
    assert windows[-8 * 21 - 8 * 8 + 8 + 2].tolist() == pytest.approx(expected)


def iou_with(rois: Tensor, boxes: Tensor) -> Tensor:
    return box_iou(rois[:, 1:], boxes)


def test_sampled_crops_are_labelled_by_their_iou() -> None:
    torch.manual_seed(0)
    model = net(aspects=[1.0, 0.5], positives=32, negatives=256, negative_iou=0.3)
    boxes = torch.tensor([[[10.0, 12.0, 30.0, 34.0], [40.0, 30.0, 48.0, 52.0]],
                          [[5.0, 40.0, 25.0, 60.0], [0.0, 0.0, 0.0, 0.0]]])  # fmt: skip
    labels = torch.tensor([[2, 1], [0, -1]])
    rois, target = model.sample(boxes, labels, 64, 64)
    inside = (rois[:, 1:] >= 0).all() and (rois[:, 3:] <= 64).all()
    assert inside and len(rois) == len(target)
    for image, truth, classes in ((0, boxes[0], [2, 1]), (1, boxes[1, :1], [0])):
        mine = rois[:, 0] == image
        iou = iou_with(rois[mine], truth)
        for slot, cls in enumerate(classes):
            pos = target[mine] == cls
            assert pos.sum() >= 4, (image, cls)  # of 32 draws (the narrow box: aspect 0.5 only)
            assert (iou[pos, slot] >= 0.5).all()
        neg = target[mine] == 3  # background: the last index
        assert neg.sum() >= 64 and (iou[neg] < 0.3).all()
    assert set(target.tolist()) == {0, 1, 2, 3}


def test_sampling_without_jitter_gives_the_box_square(monkeypatch: pytest.MonkeyPatch) -> None:
    """rand -> 0.5: no size change, no shift. A 10 x 20 box's square is 20 x 20 about its
    centre, IoU 200 / 400 = 0.5: kept; the negative is the scales' middle-sized window in the
    middle of the image, away from the box."""
    monkeypatch.setattr(torch, "rand", lambda *size, device=None: torch.full(size, 0.5))
    model = net(aspects=[1.0], scales=[1.0], positives=1, negatives=1)
    rois, target = model.sample(
        torch.tensor([[[0.0, 2.0, 10.0, 22.0]]]), torch.tensor([[1]]), 64, 64
    )
    assert target.tolist() == [1, 3]
    assert rois[0].tolist() == [0.0, 0.0, 2.0, 20.0, 22.0]  # [-5, 2, 15, 22] moved inside
    # Side log-uniform over [window / 1.2, window * 1.2]: at 0.5 their geometric mean, 20; the
    # corner at half the room left, (64 - 20) / 2.
    assert rois[1].tolist() == pytest.approx([0.0, 22.0, 22.0, 42.0, 42.0])
    model.positive_iou = 0.51  # the square overlaps by exactly 0.5: now refused
    _, target = model.sample(torch.tensor([[[20.0, 2.0, 30.0, 22.0]]]), torch.tensor([[1]]), 64, 64)
    assert target.tolist() == [3]


def test_training_loss_and_detections_keep_the_contract() -> None:
    torch.manual_seed(0)
    model = net()
    boxes = torch.tensor([[[10.0, 12.0, 30.0, 34.0]], [[5.0, 40.0, 25.0, 60.0]]])
    terms = model.train()(torch.randn(2, 1, 64, 64), boxes, torch.tensor([[2], [0]]))
    assert set(terms) == {"cls"} and terms["cls"].requires_grad
    terms["cls"].backward()
    assert all(p.grad is not None for p in model.parameters())
    model.score_threshold, model.max_detections = 0.0, 7
    dets = model.eval()(torch.randn(2, 1, 64, 64))
    assert len(dets) == 2 and all(len(d["boxes"]) == 7 for d in dets)
    assert all(((d["labels"] >= 0) & (d["labels"] < 3)).all() for d in dets)  # no background
    assert (dets[0]["scores"].diff() <= 0).all()  # best first
    windows = {tuple(w) for w in model.windows(64, 64).tolist()}
    assert all(tuple(b) in windows for b in dets[1]["boxes"].tolist())  # a box is a window


def test_trains_through_the_detection_trainer_in_both_forms(make_cfg, tmp_path: Path) -> None:
    """The same seed trains the same weights and the forms score the same: the same mAP. One
    scale (a resized level, 232 windows a scene, not 1,647) keeps the loop form quick."""
    few = (*TINY, "model.scales=[1.25]")
    conv = run(make_cfg(*few), tmp_path / "conv")
    loop = run(make_cfg(*few, "model.convolutional=false"), tmp_path / "loop")
    assert conv["step"] == 3 and 0 <= conv["val/map_50"] <= 1 and "train/loss_cls" in conv
    assert loop["val/map_50"] == conv["val/map_50"] and loop["test/map"] == conv["test/map"]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"window": 40, "scales": [1.0, 2.0]},
            "window=40 at scale 2.0, aspect 1.0 is a 80 x 80 px",
        ),
        ({"stride": 0, "convolutional": False}, "model.stride must be >= 1 px"),
        ({"stride": 2}, "model.convolutional=true scores windows at the network's total stride 4"),
        ({"input_size": 12}, "model.input_size=12 is too small"),
        ({"aspects": []}, "model.scales and model.aspects must be non-empty"),
        ({"negative_iou": 0.6}, "model.negative_iou <= model.positive_iou"),
    ],
)
def test_mistakes_are_one_line_user_errors(kw: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        net(**kw)
    assert "\n" not in str(info.value)


def test_a_mistake_in_the_config_stops_the_run(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="larger than the 64 x 64 px image"):
        run(make_cfg(*TINY, "model.window=70"), tmp_path)
