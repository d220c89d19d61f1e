"""Sequence models (rnn, lstm, gru) on images read row by row or pixel by pixel."""

from pathlib import Path

import pytest
import torch

from dlrun.cli import run
from dlrun.errors import UserError
from dlrun.models.rnn import SequenceClassifier, lstm


def test_rows_and_pixels_become_the_steps_in_reading_order() -> None:
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)  # B, C, H, W
    rows = SequenceClassifier(in_channels=3, image_size=5, seq_mode="row").sequence(x)
    assert rows.shape == (2, 4, 15)  # 4 rows, each C x W
    assert torch.equal(rows[1, 2], x[1, :, 2, :].flatten())
    pixels = SequenceClassifier(in_channels=3, seq_mode="pixel").sequence(x)
    assert pixels.shape == (2, 20, 3)  # H x W steps of C
    assert torch.equal(pixels[0, 7], x[0, :, 1, 2])  # step 7 = row 1, column 2


@pytest.mark.parametrize("bidirectional", [False, True])
def test_the_head_reads_the_last_layers_final_state(bidirectional: bool) -> None:
    torch.manual_seed(0)
    net = lstm(hidden_size=8, num_layers=2, bidirectional=bidirectional)
    x = torch.randn(3, 1, 28, 28)
    out, _ = net.rnn(net.sequence(x))
    # forward direction: the output at the last step; backward: the output at the first step
    last = out[:, -1, :8] if not bidirectional else torch.cat([out[:, -1, :8], out[:, 0, 8:]], 1)
    assert torch.allclose(net(x), net.head(last), atol=1e-6)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("model", ["rnn", "lstm", "gru"])
def test_each_learns_seq_mnist_rows(make_cfg, tmp_path: Path, model: str) -> None:
    """The fixture's digits: a bright row whose place is the class. 100 steps of rows: the loss
    falls to well under half its start and the accuracy is far above chance (0.1)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = run(make_cfg(f"model={model}", "data=seq_mnist", "model.hidden_size=32",
                           "data.batch_size=50", "trainer.max_steps=100", "trainer.grad_clip=1.0",
                           "trainer.log_every_n_steps=1", "trainer.val_every_n_epochs=100"),
                  tmp_path)  # fmt: skip
    assert metrics["step"] == 100 and metrics["val/acc"] > 0.5, metrics
    assert metrics["train/grad_norm"] > 0  # the clipped gradient's norm, for the RNN story
    losses = [e.value for e in EventAccumulator(str(tmp_path)).Reload().Scalars("train/loss_step")]
    assert len(losses) == 100 and losses[0] > 2.0  # step 1: about ln 10 = 2.30
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0] and metrics["val/loss"] < 0.5 * losses[0]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("model", ["rnn", "lstm", "gru"])
def test_pixel_mode_feeds_784_steps_of_one_pixel_in_reading_order(
    make_cfg, data_root: Path, tmp_path: Path, model: str
) -> None:
    """What the recurrent layer itself reads in a run: each image as 784 one-value steps, row by
    row; the validation batch (the first 50 test images) exactly those pixels, normalised."""
    from dlrun.data import mnist

    inputs: list[torch.Tensor] = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, torch.nn.RNNBase):
            inputs.append(args[0].detach().clone())

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        pixel = run(make_cfg(f"model={model}", "data=seq_mnist", "data.seq_mode=pixel",
                             "model.hidden_size=8", "trainer.max_steps=1",
                             "data.eval_subset=50"), tmp_path)  # fmt: skip
    finally:
        hook.remove()
    assert pixel["step"] == 1 and inputs
    assert all(x.shape[1:] == (784, 1) for x in inputs), [tuple(x.shape) for x in inputs]
    assert {x.shape[0] for x in inputs} >= {50}  # the validation batch
    test_x = mnist.load(data_root, False, name="MNIST").test_x[:50].float()
    expect = ((test_x / 255 - 0.1307) / 0.3081).reshape(50, 784, 1)
    val = next(x for x in inputs if x.shape[0] == 50)
    assert torch.allclose(val, expect, atol=1e-5)


def test_a_wrong_seq_mode_is_a_user_error(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data.seq_mode must be row or pixel"):
        run(make_cfg("model=lstm", "data=seq_mnist", "data.seq_mode=column"), tmp_path)
    with pytest.raises(UserError, match="model.init must be one of default, orthogonal, identity"):
        run(make_cfg("model=rnn", "data=seq_mnist", "model.init=kaiming"), tmp_path / "init")


def test_grad_clip_inf_logs_the_norm_per_step_and_trains_as_without_clipping(
    make_cfg, tmp_path: Path
) -> None:
    """The vanishing / exploding story: train/grad_norm_step every step, the updates untouched."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    keys = ("model=rnn", "data=seq_mnist", "model.hidden_size=16", "trainer.max_steps=4",
            "trainer.log_every_n_steps=1")  # fmt: skip
    measured = run(make_cfg(*keys, "trainer.grad_clip=inf"), tmp_path / "inf")
    plain = run(make_cfg(*keys), tmp_path / "plain")
    assert measured["val/loss"] == plain["val/loss"] and "train/grad_norm" not in plain
    events = EventAccumulator(str(tmp_path / "inf")).Reload()
    norms = [e.value for e in events.Scalars("train/grad_norm_step")]
    assert len(norms) == 4 and all(n > 0 for n in norms)
    with pytest.raises(UserError, match="trainer.grad_clip must be a number > 0 or inf or null"):
        run(make_cfg(*keys, "trainer.grad_clip=-inf"), tmp_path / "bad")


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_recurrent_inits_set_each_gates_hidden_matrix(cell: str) -> None:
    """identity: every gate's hidden-to-hidden block is I (the IRNN); orthogonal: W W^T = I."""
    torch.manual_seed(0)
    for scheme in ("identity", "orthogonal"):
        net = SequenceClassifier(cell=cell, hidden_size=6, num_layers=2, init=scheme)
        for name, weight in net.rnn.named_parameters():
            if name.startswith("bias"):
                assert not weight.any(), name
            elif name.startswith("weight_ih") and scheme == "identity":
                assert weight.std() < 3e-3, name  # N(0, 0.001): the input barely moves the state
            elif name.startswith("weight_hh"):
                for block in weight.detach().split(6):
                    product = block if scheme == "identity" else block @ block.T
                    assert torch.allclose(product, torch.eye(6), atol=1e-5), (scheme, name)
    before = SequenceClassifier(cell=cell, hidden_size=6).rnn.weight_hh_l0
    assert not torch.allclose(before[:6], torch.eye(6))  # default: torch's uniform init
    with pytest.raises(UserError, match="model.init must be one of default, orthogonal, identity"):
        SequenceClassifier(cell=cell, init="kaiming")


def test_rnn_defaults_to_the_irnn_and_the_notes_tanh_rnn_is_one_override_away(make_cfg) -> None:
    c = make_cfg("model=rnn", "data=seq_mnist")
    irnn = ("relu", "identity", 2e-3, "dlrun.engine.sched.cosine")
    assert (c.model.nonlinearity, c.model.init, c.optim.lr, c.sched._target_) == irnn
    notes = make_cfg("model=rnn", "data=seq_mnist", "model.nonlinearity=tanh",
                     "model.init=default", "optim=adam", "sched=onecycle")  # fmt: skip
    tanh = ("tanh", 0.01, "dlrun.engine.sched.onecycle")
    assert (notes.model.nonlinearity, notes.optim.lr, notes.sched._target_) == tanh
