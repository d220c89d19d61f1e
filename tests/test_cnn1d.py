"""model=cnn1d: Conv1d-BN-ReLU stages over an image read as a sequence of rows (or pixels)."""

from pathlib import Path

import pytest
import torch

from dlrun.cli import build, run
from dlrun.errors import UserError
from dlrun.models.cnn1d import CNN1d


def test_the_rows_are_the_steps_and_a_rows_pixels_the_channels() -> None:
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)  # B, C, H, W
    rows = CNN1d(in_channels=3, image_size=5).sequence(x)
    assert rows.shape == (2, 15, 4)  # (batch, C x W features, 4 steps)
    assert torch.equal(rows[1, :, 2], x[1, :, 2, :].flatten())  # step 2 = row 2, all channels
    pixels = CNN1d(in_channels=3, seq_mode="pixel").sequence(x)
    assert pixels.shape == (2, 3, 20) and torch.equal(pixels[0, :, 7], x[0, :, 1, 2])


@pytest.mark.parametrize(("pool", "expected"), [("avg", 13 / 3), ("max", 13.0)])
def test_a_fixed_kernel_gives_the_hand_computed_output(pool: str, expected: float) -> None:
    """Rows [1 2 3], [4 5 6], [7 8 9]; one filter: the previous row's first pixel, plus this
    row's last, minus the next row's middle (zero past either end). Steps: 0 + 3 - 5 = -2,
    1 + 6 - 8 = -1, 4 + 9 - 0 = 13; ReLU: 0, 0, 13; pooled: 13/3 (avg) or 13 (max)."""
    net = CNN1d(in_channels=1, image_size=3, num_classes=1, widths=[1], kernel_size=3, pool=pool)
    net.eval()
    with torch.no_grad():
        conv = net.features[0]
        conv.weight.zero_()
        conv.weight[0, 0, 0], conv.weight[0, 2, 1], conv.weight[0, 1, 2] = 1.0, 1.0, -1.0
        net.head.weight.fill_(1.0)
        net.head.bias.zero_()
        x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
        steps = net.features(net.sequence(x))  # BatchNorm at its start: x / sqrt(1 + eps)
        assert steps.flatten().tolist() == pytest.approx([0.0, 0.0, 13.0], abs=1e-4)
        assert net(x).item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.usefixtures("one_thread")
def test_it_trains_on_seq_mnist_and_reads_pixels_too(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("model=cnn1d", "data=seq_mnist", "model.widths=[4,4]", "data.batch_size=16",
                   "trainer.max_steps=3", "data.eval_subset=20")  # fmt: skip
    net = build(cfg.model, "model")
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert net.features[0].in_channels == 28  # a row's 28 pixels
    metrics = run(cfg, tmp_path)
    assert metrics["step"] == 3 and 0 <= metrics["val/acc"] <= 1
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert saved["features.0.weight"].shape == (4, 28, 5)  # 4 filters of 5 rows of 28 pixels
    cfg.data.seq_mode = "pixel"  # model.seq_mode follows it
    pixel = build(cfg.model, "model")
    assert pixel.features[0].in_channels == 1 and pixel(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kernel_size": 4}, "model.kernel_size must be odd"),
        ({"widths": []}, "model.widths must list one channel count"),
        ({"pool": "sum"}, "model.pool must be avg or max"),
        ({"seq_mode": "diagonal"}, "data.seq_mode must be row or pixel"),
    ],
)
def test_mistakes_are_one_line_user_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as err:
        CNN1d(**kwargs)
    assert "\n" not in str(err.value)
