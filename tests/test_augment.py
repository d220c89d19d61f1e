"""data.randaugment / trivialaugment / random_erasing / mixup / cutmix: per-image ops on the
device, equal to torchvision's own op image by image, replayable from the generator, and exact
through a mid-epoch resume (in memory and streamed)."""

import math
from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from dlrun.cli import build, run
from dlrun.data.augment import (
    BINS,
    OPS,
    Augmentation,
    AutoAugment,
    MixCut,
    RandomErasing,
    apply_ops,
    magnitude_table,
)
from dlrun.data.streamed import StreamingClassificationData
from dlrun.engine import checkpoint
from dlrun.errors import UserError
from tests.fixtures import write_png_folder
from tests.test_streaming import cfg_of
from tests.test_train import stable

QUICK = ("model=lenet", "model.activation=relu", "optim=sgd", "sched=none",
         "data.batch_size=50", "trainer.log_every_n_steps=2")  # fmt: skip


def torchvision_op(image: Tensor, name: str, m: float) -> Tensor:
    """One image through torchvision's op, as v2.RandAugment calls it (_apply_image_or_video_transform)."""
    shear = math.degrees(math.atan(m))
    return {
        "Identity": lambda: image,
        "ShearX": lambda: TF.affine(image, 0.0, [0, 0], 1.0, [shear, 0.0], center=[0, 0]),
        "ShearY": lambda: TF.affine(image, 0.0, [0, 0], 1.0, [0.0, shear], center=[0, 0]),
        "TranslateX": lambda: TF.affine(image, 0.0, [int(m), 0], 1.0, [0.0, 0.0]),
        "TranslateY": lambda: TF.affine(image, 0.0, [0, int(m)], 1.0, [0.0, 0.0]),
        "Rotate": lambda: TF.rotate(image, m),
        "Brightness": lambda: TF.adjust_brightness(image, 1.0 + m),
        "Color": lambda: TF.adjust_saturation(image, 1.0 + m),
        "Contrast": lambda: TF.adjust_contrast(image, 1.0 + m),
        "Sharpness": lambda: TF.adjust_sharpness(image, 1.0 + m),
        "Posterize": lambda: TF.posterize(image, int(m)),
        "Solarize": lambda: TF.solarize(image, 255.0 * m),
        "AutoContrast": lambda: TF.autocontrast(image),
        "Equalize": lambda: TF.equalize(image),
    }[name]()


def images(b: int, c: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 200, (b, c, 32, 32), dtype=torch.uint8, generator=g)
    x[:, :, 8:12] = 250  # a bar, so that the geometric ops visibly move something
    return x


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("wide", [False, True])
def test_each_image_gets_its_own_op_exactly_as_torchvision_applies_it(
    channels: int, wide: bool
) -> None:
    x = images(56, channels)
    aug = AutoAugment(1, None if wide else 9, wide=wide)
    ops, mags = aug.draw(x, torch.Generator().manual_seed(1))
    op, mag = ops[0], mags[0]
    assert len(set(op.tolist())) >= 10  # one batch, many different ops
    out = apply_ops(x, op, mag)
    for i in range(len(x)):
        ref = torchvision_op(x[i], OPS[int(op[i])], float(mag[i]))
        assert torch.equal(out[i], ref), (i, OPS[int(op[i])], float(mag[i]))
    # Every op kind on its own, at every sign, against torchvision (the draw above is random).
    table, signed = magnitude_table(wide, 32, 32)
    every = torch.arange(len(OPS)).repeat(2)
    m = table[every, torch.full_like(every, 20)]
    m = torch.where(signed[every] & (torch.arange(len(every)) >= len(OPS)), -m, m)
    out = apply_ops(x[: len(every)], every, m)
    for i, (k, v) in enumerate(zip(every.tolist(), m.tolist(), strict=True)):
        assert torch.equal(out[i], torchvision_op(x[i], OPS[k], v)), (OPS[k], v)


def test_randaugment_replays_from_the_generator_and_draws_per_image() -> None:
    x = images(32, 3)
    aug = AutoAugment(2, 9, wide=False)
    batch = {"image": x, "label": torch.zeros(32, dtype=torch.long)}
    a = aug(batch, torch.Generator().manual_seed(5))["image"]
    b = aug(batch, torch.Generator().manual_seed(5))["image"]
    c = aug(batch, torch.Generator().manual_seed(6))["image"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    ops, _ = aug.draw(x, torch.Generator().manual_seed(5))
    assert ops.shape == (2, 32) and len(set(ops[0].tolist())) > 1
    # Two ops in sequence: the same as the first op's pass, then the second's.
    twice = apply_ops(apply_ops(x, ops[0], aug.draw(x, torch.Generator().manual_seed(5))[1][0]),
                      ops[1], aug.draw(x, torch.Generator().manual_seed(5))[1][1])  # fmt: skip
    assert torch.equal(a, twice)
    assert not torch.equal(a, x)


def test_random_erasing_erases_a_box_in_some_images_and_replays() -> None:
    x = torch.zeros(64, 3, 32, 32)
    erase = RandomErasing(0.5)
    boxes = erase.boxes(x, torch.Generator().manual_seed(0))
    hit = boxes.flatten(1).any(1)
    assert 15 < int(hit.sum()) < 50  # p = 0.5, per image
    area = boxes.flatten(1).float().mean(1)[hit]
    assert area.min() >= 0.015 and area.max() <= 0.34  # scale (0.02, 0.33), rounded sides
    for i in torch.nonzero(hit).flatten().tolist():  # one rectangle each
        rows, cols = boxes[i].any(1), boxes[i].any(0)
        assert int(boxes[i].sum()) == int(rows.sum()) * int(cols.sum())
    out = erase({"image": x}, torch.Generator().manual_seed(0))["image"]
    again = erase({"image": x}, torch.Generator().manual_seed(0))["image"]
    assert torch.equal(out, again)
    assert torch.equal(out != 0, boxes[:, None].expand_as(out))


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixup_and_cutmix_targets_sum_to_one_and_match_the_mixing(
    mixup: float, cutmix: float
) -> None:
    b, k = 32, 10
    # Image i is the constant i: each output pixel says which image it came from.
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 16, 16).clone()
    y = torch.arange(b) % k
    out = MixCut(mixup, cutmix, 0.5, k)({"image": x, "label": y}, torch.Generator().manual_seed(3))
    target, image, label = out["target"], out["image"], out["label"]
    assert target.shape == (b, k) and target.dtype == torch.float32
    torch.testing.assert_close(target.sum(1), torch.ones(b))
    partner = torch.arange(b).roll(1)
    own = target[torch.arange(b), y]
    # The share of image i in its output (mixup: lam; cutmix: the pixels kept), from the pixels.
    share = torch.where(image == x, 1.0, 0.0).mean((1, 2, 3))
    lam_pixels = (image - x.roll(1, 0)) / (x - x.roll(1, 0))  # per pixel: the weight on image i
    kept = torch.where(share.bool(), share, lam_pixels.mean((1, 2, 3)))
    same = y == y[partner]
    torch.testing.assert_close(own[~same], kept[~same], atol=1e-5, rtol=0)
    torch.testing.assert_close(own[same], torch.ones(int(same.sum())))
    dominant = torch.where(own >= 0.5, y, y[partner])
    assert torch.equal(label, dominant) and label.dtype == torch.int64
    if mixup and cutmix:  # per image, some of each
        pure = ((image == x) | (image == x.roll(1, 0))).flatten(1).all(1)
        assert 0 < int(pure.sum()) < b
    again = MixCut(mixup, cutmix, 0.5, k)(
        {"image": x, "label": y}, torch.Generator().manual_seed(3)
    )
    assert torch.equal(again["image"], image) and torch.equal(again["target"], target)


def resume_run(make_cfg, tmp_path: Path, monkeypatch, *overrides: str) -> None:
    """The run of `overrides` killed after its first (mid-epoch) checkpoint, then resumed, ends
    with the metrics and weights of the uninterrupted run."""
    args = (*overrides, "trainer.checkpoint_every_n_steps=3")
    whole = run(make_cfg(*args), tmp_path / "whole")
    save = checkpoint.save

    class Killed(BaseException):
        pass

    def save_then_die(path: Path, state: dict) -> None:
        save(path, state)
        assert state["step"] == 3  # mid-epoch: 4 steps an epoch
        raise Killed

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        run(make_cfg(*args), tmp_path / "split")
    monkeypatch.setattr(checkpoint, "save", save)
    resumed = run(make_cfg(*args, "resume=true"), tmp_path / "split")
    assert stable(resumed) == stable(whole)
    a = checkpoint.load(tmp_path / "whole" / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(tmp_path / "split" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "augment",
    [
        ("data.mixup=0.4", "data.cutmix=1.0", "loss.label_smoothing=0.1"),
        ("data.randaugment.num_ops=2", "data.random_erasing=0.5"),
    ],
)
def test_a_mid_epoch_resume_with_augmentation_ends_like_the_whole_run(
    augment: tuple[str, ...], make_cfg, tmp_path: Path, monkeypatch, one_thread
) -> None:
    resume_run(make_cfg, tmp_path, monkeypatch, *QUICK, "trainer.max_epochs=2", *augment)


def test_streamed_folders_take_the_same_keys_and_resume_exactly(
    tmp_path: Path, monkeypatch, one_thread
) -> None:
    folder = write_png_folder(tmp_path / "pngs", n=80)  # 4 batches of 20 an epoch

    def make(*overrides: str):
        return cfg_of(folder, tmp_path, "data.in_memory=false", "data.trivialaugment=true",
                      "data.cutmix=1.0", *overrides)  # fmt: skip

    data = build(make().data, "data")
    assert isinstance(data, StreamingClassificationData)
    data.setup(torch.device("cpu"), 0)
    batch = next(iter(data.train_loader()))
    assert batch["target"].shape == (20, 10) and batch["image"].dtype == torch.float32
    resume_run(make, tmp_path, monkeypatch)


def test_the_training_batches_carry_soft_targets_and_augmented_images(make_cfg) -> None:
    cfg = make_cfg("data=cifar10", "data.mixup=0.4", "data.trivialaugment=true")
    data = build(cfg.data, "data")
    data.setup(torch.device("cpu"), 0)
    batch = next(iter(data.train_loader()))
    assert batch["target"].shape == (len(batch["label"]), 10)
    assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.int64
    plain = build(make_cfg("data=cifar10").data, "data")
    plain.setup(torch.device("cpu"), 0)
    assert "target" not in next(iter(plain.train_loader()))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.mixup=-0.2"], "data.mixup must be a number >= 0, got -0.2"),
        (["data.cutmix=-1"], "data.cutmix must be a number >= 0, got -1"),
        (["data.mix_switch_prob=1.5"], "data.mix_switch_prob must be a number in [0, 1], got 1.5"),
        (["data.random_erasing=-0.1"], "data.random_erasing must be a number in [0, 1], got -0.1"),
        (["data.randaugment.num_ops=-1"], "data.randaugment.num_ops must be a whole number >= 0"),
        (
            ["data.randaugment.magnitude=31"],
            "data.randaugment.magnitude must be a whole number "
            "in 0..30 (torchvision's scale), got 31",
        ),  # fmt: skip
        (["data.randaugment.magnitude=-1"], "data.randaugment.magnitude must be"),
        (["+data.randaugment.level=3"], "data.randaugment has unknown key(s) ['level']"),
        (["data.trivialaugment=yes"], "data.trivialaugment must be true or false, got 'yes'"),
        (["data.trivialaugment=true", "data.randaugment.num_ops=2"], "two policies for the same"),
        # Raised at the first step, by the loss, when it meets the soft targets.
        (["data.cutmix=1", "loss=hinge"], "loss=hinge scores one correct class per image"),
    ],
)
def test_bad_augmentation_values_exit_2_through_the_cli(
    overrides: list[str], message: str, data_root: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from dlrun.cli import main

    args = [*overrides, "trainer.max_steps=1", "device=cpu", "trainer.progress=false",
            f"data.root={data_root}", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    monkeypatch.setattr("sys.argv", ["dlrun", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err, err


def test_randaugment_refuses_images_of_other_channel_counts() -> None:
    with pytest.raises(UserError, match="1- or 3-channel images; these have data.channels=2"):
        Augmentation(channels=2, trivialaugment=True)


def test_the_magnitude_tables_are_torchvisions() -> None:
    table, signed = magnitude_table(False, 32, 32)
    assert table.shape == (len(OPS), BINS)
    assert table[OPS.index("Rotate"), 9] == pytest.approx(9.0)  # 30 degrees over 30 bins
    assert table[OPS.index("Posterize"), 30] == 4 and table[OPS.index("Posterize"), 0] == 8
    assert signed.tolist() == [False] + [True] * 9 + [False] * 4
