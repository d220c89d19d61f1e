"""Object localisation and landmark detection (model=localizer, model=landmark_net): the notes'
losses, the landmarks of hand-drawn masks, IoU and distances, the canvases, an oracle through
the trainer's evaluation, tiny runs, mode=predict, a mid-epoch resume and the user's mistakes."""

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dlrun.cli import build_trainer, run
from dlrun.data.scene_layout import pixel_boxes
from dlrun.data.single_digit import SingleDigitData, ink_landmarks
from dlrun.errors import UserError
from dlrun.models.localizer import Localizer
from dlrun.tasks.localization import metrics as m
from dlrun.tasks.localization.losses import LandmarkLoss, LocalizationLoss
from dlrun.tasks.localization.trainer import LocalizationTrainer, check_task
from tests.conftest import stopped_at_step

# The fixture's 200 training digits: the last 50 for the validation canvases.
LOC = ("model=localizer", "data=mnist_loc", "model.width=4", "data.train_scenes=40",
       "data.test_scenes=12", "data.batch_size=8", "data.val_scenes=6",
       "data.val_objects=50")  # fmt: skip
MARKS = ("model=landmark_net", "data=mnist_landmarks", *LOC[2:])


@pytest.fixture(autouse=True)
def _threads(one_thread: None) -> None:
    """Tiny nets: one thread each (see conftest)."""


# ----- losses ------------------------------------------------------------------------------------
# Two classes. Canvas 0 holds a digit of class 1 at (bx, by, bh, bw) = (0.4, 0.5, 0.2, 0.3);
# canvas 1 holds none, and whatever its box and class outputs say costs nothing.
OUT = torch.tensor([[0.5, 0.5, 0.5, 0.2, 0.2, 1.0, 0.0], [0.3, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0]])
PRESENT = torch.tensor([True, False])
BOX = torch.tensor([[0.4, 0.5, 0.2, 0.3], [0.0, 0.0, 0.0, 0.0]])
LABEL = torch.tensor([1, -1])


def test_the_notes_squared_loss_of_a_present_and_an_absent_digit() -> None:
    out = OUT.clone().requires_grad_(True)
    loss = LocalizationLoss(class_loss="squared")(out, PRESENT, BOX, LABEL)
    # present: (0.5 - 1)^2 + (0.1^2 + 0 + 0 + 0.1^2) + ((1 - 0)^2 + (0 - 1)^2) = 2.27
    # absent: (0.3 - 0)^2 = 0.09; the mean of the two
    assert loss.item() == pytest.approx((2.27 + 0.09) / 2)
    loss.backward()
    assert out.grad[1, 1:].abs().sum() == 0 and out.grad[1, 0] != 0  # Pc alone when absent
    assert LocalizationLoss().presence(OUT).tolist() == pytest.approx([0.5, 0.3])  # raw Pc
    # loss.box_weight=5: the box's 0.02 counts 0.1; the absent canvas is unchanged.
    weighted = LocalizationLoss(box_weight=5.0)(OUT, PRESENT, BOX, LABEL)
    assert weighted.item() == pytest.approx((2.27 + 4 * 0.02 + 0.09) / 2)


def test_the_cross_entropy_option_is_logistic_on_pc_and_softmax_on_the_class() -> None:
    out = OUT.clone()
    out[:, 0] = 0.0  # logit 0: log 2 either way
    loss = LocalizationLoss(class_loss="cross_entropy")(out, PRESENT, BOX, LABEL)
    # present: log 2 + 0.02 + -log softmax([1, 0])[1] = log(1 + e); absent: log 2
    expected = (math.log(2) + 0.02 + math.log(1 + math.e) + math.log(2)) / 2
    assert loss.item() == pytest.approx(expected)
    presence = LocalizationLoss(class_loss="cross_entropy").presence(torch.tensor([[2.0] * 7]))
    assert presence.item() == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())


def test_the_landmark_loss_sums_the_ten_squared_errors_per_canvas() -> None:
    truth = torch.full((2, 5, 2), 0.5)
    out = torch.zeros(2, 10)
    out[1] = 0.5  # canvas 1 exact: the mean of 10 * 0.25 and 0
    assert LandmarkLoss()(out, truth).item() == pytest.approx(2.5 / 2)


# ----- landmarks, boxes, IoU, distances -----------------------------------------------------------
def test_landmarks_of_hand_drawn_masks() -> None:
    on = torch.zeros(3, 9, 9, dtype=torch.bool)
    on[0, 1:8, 4:6] = True  # a plus sign: a 2 px wide vertical bar, rows 1..7, columns 4 and 5
    on[0, 4, 1:8] = True  # and a 1 px bar across, row 4, columns 1..7
    on[1, 6, 2] = True  # one pixel, at x 2, y 6
    got = ink_landmarks(on)  # mask 2 is empty
    # top and bottom: ties between columns 4 and 5 -> x 4.5; left, right: the bar's ends.
    # Centroid: 19 pixels (14 of the vertical bar, 5 more across); x sums to 7 * 4 + 7 * 5 +
    # 1 + 2 + 3 + 6 + 7 = 82, y to 2 * (1 + ... + 7) + 5 * 4 = 76.
    expected = torch.tensor([[4.5, 1], [4.5, 7], [1, 4], [7, 4], [82 / 19, 4]])
    assert torch.allclose(got[0], expected)
    assert got[1].tolist() == [[2.0, 6.0]] * 5
    assert got[2].tolist() == [[0.0, 0.0]] * 5


def test_boxes_in_the_notes_form_and_their_iou() -> None:
    box = torch.tensor([[16.0, 8.0, 48.0, 24.0]])  # x 16..48, y 8..24 on a 64 x 64 canvas
    rel = m.relative_box(box, 64, 64)
    assert rel.tolist() == [[0.5, 0.25, 0.25, 0.5]]  # bx, by, bh, bw
    assert torch.equal(m.pixel_box(rel, 64, 64), box)
    a = torch.tensor([[0.0, 0, 10, 10]] * 4)
    b = torch.tensor([[5.0, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    a[3] = b[3] = torch.tensor([3.0, 3, 3, 3])  # two empty boxes
    assert m.paired_iou(a, b).tolist() == pytest.approx([1 / 3, 1, 0, 0])


def test_localization_and_landmark_scores_of_a_hand_made_batch() -> None:
    # Canvases: 0 and 1 hold digits (class 0, class 1), 2 holds none. Pc: right, wrong, right.
    out = torch.zeros(3, 7)
    out[:, 0] = torch.tensor([0.9, 0.2, 0.1])
    out[0, 1:5] = m.relative_box(torch.tensor([[5.0, 0, 15, 10]]), 64, 64)  # IoU 1/3
    out[1, 1:5] = m.relative_box(torch.tensor([[0.0, 0, 10, 10]]), 64, 64)  # IoU 1
    out[0, 5], out[1, 5], out[2, 6] = 1.0, 1.0, 1.0  # class 0 twice: canvas 1's is wrong
    box = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 0, 0]])
    sums = m.localization_sums(
        out[:, 0], out, torch.tensor([True, True, False]), torch.tensor([0, 1, -1]), box, (64, 64)
    )
    scores = m.localization_scores(sums)
    assert scores == pytest.approx({"presence_acc": 2 / 3, "class_acc": 0.5, "box_iou": 2 / 3})
    truth = torch.zeros(1, 5, 2)
    pred = truth.clone()
    pred[0, 0] = torch.tensor([3.0, 4.0])  # 5 px off
    pred[0, 1] = torch.tensor([3.0, 0.0])  # 3 px off: within 3 px
    assert m.landmark_scores(m.landmark_sums(pred, truth)) == pytest.approx(
        {"mean_px_error": 8 / 5, "within_3px": 4 / 5}
    )


# ----- the canvases ------------------------------------------------------------------------------
def canvases(root: Path, seed: int, **kw: object) -> SingleDigitData:
    args = {"name": "mnist_loc", "kind": "localization", "source": "mnist", "root": str(root),
            "train_scenes": 40, "test_scenes": 12, "val_scenes": 6, "val_objects": 50} | kw  # fmt: skip
    data = SingleDigitData(**args)  # type: ignore[arg-type]
    data.setup(torch.device("cpu"), seed)
    return data


def test_canvases_hold_one_digit_or_none_with_its_box_and_landmarks(data_root: Path) -> None:
    data = canvases(data_root, 0)
    for split, n, empty in (("train", 40, 10), ("val", 6, 2), ("test", 12, 3)):
        c = data.scenes[split]
        assert len(c.images) == n and int((~c.present).sum()) == empty  # round(n / 4)
        assert (c.images[~c.present] == 0).all() and (c.labels[~c.present] == -1).all()
        assert (c.labels[c.present] >= 0).all()
        # Box and landmarks are those of the digit's pixels >= 0.5 (uint8 >= 128 once rounded).
        on = c.images[:, 0] >= 128
        box, has = pixel_boxes(on)
        assert torch.equal(has, c.present) and torch.equal(box[has], c.boxes[has])
        assert torch.equal(ink_landmarks(on), c.landmarks)
    other = canvases(data_root, 1)  # another seed: the same test and validation canvases
    assert torch.equal(other.scenes["test"].images, data.scenes["test"].images)
    assert torch.equal(other.scenes["val"].images, data.scenes["val"].images)
    assert not torch.equal(other.scenes["train"].images, data.scenes["train"].images)
    batch = next(iter(data.train_loader()))
    assert set(batch) == {"image", "present", "box", "label", "landmarks"}
    assert batch["image"].dtype == torch.float32 and batch["landmarks"].shape[1:] == (5, 2)


# ----- the trainer's evaluation, on an oracle ------------------------------------------------------
def oracle(
    data: SingleDigitData, kind: str, shift: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The net's outputs for the validation canvases (found by their image) as the truth gives
    them; boxes moved right by `shift` times their width, landmarks by (3, 4) px times `shift`."""
    batch = data.example_batch(len(data.scenes["val"].images), "val")
    images = batch["image"].flatten(1)
    if kind == "landmarks":
        truth = (batch["landmarks"] + shift * torch.tensor([3.0, 4.0])) / 64
        targets = truth.flatten(1)
    else:
        box = batch["box"].clone()
        box[:, [0, 2]] += shift * (box[:, 2] - box[:, 0])[:, None]
        hot = F.one_hot(batch["label"].clamp_min(0), 10).float()
        targets = torch.cat(
            [batch["present"].float()[:, None], m.relative_box(box, 64, 64), hot], 1
        )

    def forward(x: torch.Tensor) -> torch.Tensor:
        gap = (images[None] - x.flatten(1)[:, None]).abs().amax(2)  # (B, N)
        assert (gap.amin(1) == 0).all(), "the oracle was asked about an image of no canvas"
        return targets[gap.argmin(1)]

    return forward


EXACT = {"presence_acc": 1.0, "class_acc": 1.0, "box_iou": 1.0, "loss": 0.0}
HALF_A_BOX_OFF = {"presence_acc": 1.0, "class_acc": 1.0, "box_iou": 1 / 3}
LANDMARKS_EXACT = {"mean_px_error": 0.0, "within_3px": 1.0, "loss": 0.0}
LANDMARKS_5PX_OFF = {"mean_px_error": 5.0, "within_3px": 0.0}  # (3, 4) px off


@pytest.mark.parametrize(
    ("keys", "expected"),
    [(LOC, (EXACT, HALF_A_BOX_OFF)), (MARKS, (LANDMARKS_EXACT, LANDMARKS_5PX_OFF))],
    ids=["localization", "landmarks"],
)
def test_the_trainer_scores_an_oracle(make_cfg, keys: tuple, expected: tuple) -> None:
    """The whole path of val/*: the trainer's outputs, targets and sums over the validation
    canvases. Half a box's width off, a box keeps half its area in the true one: IoU 1/3."""
    trainer = build_trainer(make_cfg(*keys), "unused")
    shifts = (0.0, 0.5) if trainer.kind == "localization" else (0.0, 1.0)
    for shift, known in zip(shifts, expected, strict=True):
        trainer.nets = {"model": oracle(trainer.data, trainer.kind, shift)}
        scores = trainer.evaluate(trainer.data.val_loader(), "val")
        assert {k: scores[f"val/{k}"] for k in known} == pytest.approx(known, abs=1e-5)


# ----- runs --------------------------------------------------------------------------------------
def test_a_localizer_trains_draws_and_predicts(make_cfg, data_root: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = run(make_cfg(*LOC, "trainer.max_steps=3"), tmp_path / "t")
    assert metrics["step"] == 3
    events = EventAccumulator(str(tmp_path / "t"), size_guidance={"images": 0}).Reload()
    assert {"test/truth", "val/predictions", "test/predictions"} <= set(events.Tags()["images"])
    ckpt = tmp_path / "t" / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["monitor"]["name"] == "val/box_iou"
    out = run(make_cfg(*LOC, "mode=predict", f"ckpt={ckpt}", "predict.n=3"), tmp_path / "p")
    assert out["predict/items"] == 3
    records = json.loads((tmp_path / "p" / "predict" / "predictions.json").read_text())
    assert [r["name"] for r in records] == ["test_000000", "test_000001", "test_000002"]
    # Pc is the checkpoint's net's first output on the first test canvas.
    net = Localizer(in_channels=1, image_size=64, num_classes=10, width=4).eval()
    net.load_state_dict(state["model"])
    image = canvases(data_root, 0, mean=[0.1], std=[0.25]).example_batch(1, "test")["image"]
    assert records[0]["pc"] == pytest.approx(net(image)[0, 0].item(), abs=1e-4)
    assert records[0]["present"] == (records[0]["pc"] > 0.5)
    assert (tmp_path / "p" / "predict" / "test_000002.png").is_file()
    # test/* are the final weights' scores: the trainer's evaluation of last.pt gives them again.
    trainer = build_trainer(make_cfg(*LOC), "unused")
    trainer.nets = {"model": net}
    again = trainer.evaluate(trainer.data.test_loader(), "test")
    for key in ("presence_acc", "class_acc", "box_iou"):
        assert metrics[f"test/{key}"] == pytest.approx(again[f"test/{key}"], abs=1e-6), key


TIMING = ("time/", "images_per_s")


def test_resume_mid_epoch_under_a_schedule_ends_as_an_uninterrupted_run(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A landmark net: one-cycle over 2 epochs of 3 steps; last.pt every 2 steps; the cut run
    dies in step 5, its last.pt from step 4 (one batch into epoch 2)."""
    steps = (*MARKS, "sched=onecycle", "data.train_scenes=24", "trainer.max_epochs=2",
             "trainer.checkpoint_every_n_steps=2")  # fmt: skip
    whole = run(make_cfg(*steps), tmp_path / "w")
    assert whole["val/mean_px_error"] > 0 and 0 <= whole["test/within_3px"] <= 1
    stopped_at_step(make_cfg(*steps), tmp_path / "r", LocalizationTrainer, 4, monkeypatch)
    saved = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == 4 and saved["epoch"] == 1 and saved["progress"]["batch"] == 1
    resumed = run(make_cfg(*steps, "resume=true"), tmp_path / "r")
    stable = lambda d: {k: v for k, v in d.items() if not any(t in k for t in TIMING)}  # noqa: E731
    assert resumed["step"] == whole["step"] == 6 and stable(resumed) == stable(whole)
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True)
            for d in (tmp_path / "r", tmp_path / "w"))  # fmt: skip
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scheduler"] == b["scheduler"]
    assert a["monitor"]["name"] == "val/mean_px_error" and a["data"]["kind"] == "landmarks"


# ----- the user's mistakes -------------------------------------------------------------------------
SIZES = LOC[3:]  # the data sizes of the tiny runs


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (("model=localizer", "data=mnist", "model.width=4"),
         "trainer=localization trains on canvases of one digit, but data=mnist is classification"),
        (("model=landmark_net", "data=mnist_loc", "model.width=4", *SIZES),
         "LandmarkNet predicts landmarks, but data=mnist_loc is localization data: use model="),
    ],
)  # fmt: skip
def test_a_model_on_the_wrong_data_is_one_clear_error(make_cfg, keys: tuple, message: str) -> None:
    with pytest.raises(UserError, match=message) as err:
        build_trainer(make_cfg(*keys), "unused")
    assert "\n" not in str(err.value)


def test_the_other_mistakes_are_one_clear_error_each(data_root: Path) -> None:
    """What the constructors refuse before any work (the CLI passes their UserError on as is)."""
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: canvases(data_root, 0, empty_share=1), r"data.empty_share must be in \[0, 1\)"),
        (lambda: canvases(data_root, 0, empty_share=-0.1), r"without a digit\), got -0.1\.$"),
        (lambda: canvases(data_root, 0, kind="landmarks"), "needs a digit on every canvas"),
        (lambda: canvases(data_root, 0, kind="boxes"), "must be localization or landmarks"),
        (lambda: LocalizationLoss(class_loss="hinge"), "must be squared or cross_entropy"),
        (lambda: LocalizationLoss(box_weight=0.0), "loss.box_weight must be > 0, got 0.0"),
        (lambda: Localizer(in_channels=1, image_size=64, num_classes=10, width=0),
         "model.width must be a positive integer, got 0"),
    ]  # fmt: skip
    loc = SimpleNamespace(kind="localization", name="mnist_loc")
    marks = SimpleNamespace(kind="landmarks", name="mnist_landmarks")
    net = Localizer(in_channels=1, image_size=64, num_classes=10, width=1)
    cases += [
        (lambda: check_task(net, marks, LocalizationLoss()),
         "Localizer predicts localization, but data=mnist_landmarks is landmarks data"),
        (lambda: check_task(net, loc, LandmarkLoss()),
         "data=mnist_loc \\(localization\\) trains with loss=localization, not loss=landmarks"),
        (lambda: check_task(torch.nn.Linear(1, 1), loc, LocalizationLoss()),
         "Linear is not a localisation network: use model=localizer with data=mnist_loc"),
    ]  # fmt: skip
    for make, message in cases:
        with pytest.raises(UserError, match=message) as err:
            make()
        assert "\n" not in str(err.value)
