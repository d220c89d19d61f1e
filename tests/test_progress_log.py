"""Issue 30, item 6: with no progress bar showing (a log file, a cluster job; stdout is not a
terminal under pytest), a run says it is alive every trainer.log_every_s seconds: while training
(step, epoch, loss, img/s, ETA), evaluating (and what a long CPU evaluation will take) and
preparing data. The loss shown is a host value the window already had: no sync of its own."""

import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from dlrun.cli import build_trainer, run
from dlrun.engine import progress
from dlrun.engine.run_logger import RunLogger

QUICK = ("trainer.max_epochs=2", "data.batch_size=50", "trainer.log_every_n_steps=2",
         "data.eval_batch_size=20", "model=lenet", "model.activation=relu")  # fmt: skip
TRAIN_LINE = re.compile(
    r"step (\d+)/(\d+) \(epoch (\d+)/2\): loss=(\d+\.\d{4}), (\d+) img/s, ETA (\d+s|\d+m\d\ds|\?)$"
)


@pytest.fixture(autouse=True)
def _threads(one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny nets: one thread each; the data's heartbeat settings put back after each test."""
    monkeypatch.setitem(progress.SETTINGS, "every_s", progress.SETTINGS["every_s"])
    monkeypatch.setitem(progress.SETTINGS, "bar", progress.SETTINGS["bar"])


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_a_run_without_a_bar_logs_step_epoch_loss_rate_and_eta(
    make_cfg: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every batch is due (log_every_s tiny); the loss each line shows is the last window's."""
    windows: list[float] = []
    window = RunLogger.window

    def record(self: RunLogger, means: Any, *args: Any) -> None:
        windows.append(means["loss"])
        logging.getLogger("dlrun").info("window %r", means["loss"])
        window(self, means, *args)

    monkeypatch.setattr(RunLogger, "window", record)
    caplog.set_level(logging.INFO)
    run(make_cfg(*QUICK, "trainer.log_every_s=1e-9"), tmp_path)  # progress=false, as make_cfg
    said = lines(caplog)
    train = [(i, m) for i, m in enumerate(said) if TRAIN_LINE.match(m)]
    assert len(train) >= 4, said  # 200 images of 50: 8 steps, most of them after a window
    steps = [int(TRAIN_LINE.match(m)[1]) for _, m in train]
    assert steps == sorted(steps) and all(int(TRAIN_LINE.match(m)[2]) == 8 for _, m in train)
    assert {TRAIN_LINE.match(m)[3] for _, m in train} == {"1", "2"}
    peeked = 0
    for i, m in train:  # the loss shown: the window logged last before the line, to 4 places
        earlier = [float(w.split()[1]) for w in said[:i] if w.startswith("window ")]
        if earlier:
            assert float(TRAIN_LINE.match(m)[4]) == pytest.approx(earlier[-1], abs=1e-4)
        else:  # before the first window: the running loss, read off the device for the line
            peeked += 1
            assert 0 < float(TRAIN_LINE.match(m)[4]) < 10
    assert peeked >= 1 and int(TRAIN_LINE.match(train[0][1])[1]) == 1  # step 1 shows a loss
    assert int(TRAIN_LINE.match(train[-1][1])[5]) > 0
    # The evaluation after each epoch (100 fixture images, 5 batches of 20): its lines and, on
    # the CPU, what it will take (longer than log_every_s), with the key that evaluates fewer.
    assert any(
        re.fullmatch(r"evaluating val: 5/5 batches, [\d.]+ batches/s, ETA 0s", m) for m in said
    )
    estimate = [m for m in said if m.startswith("evaluating 100 val images: about ")]
    assert len(estimate) == 2 and "on cpu (data.eval_subset=" in estimate[0], said


def test_no_lines_when_off_or_when_a_bar_shows(
    make_cfg: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    run(make_cfg(*QUICK, "trainer.max_epochs=1", "trainer.log_every_s=0"), tmp_path / "off")
    run(make_cfg(*QUICK, "trainer.max_epochs=1", "trainer.log_every_s=1e-9",
                 "trainer.progress=true"), tmp_path / "bar")  # fmt: skip
    said = lines(caplog)
    assert not [m for m in said if m.startswith(("step ", "evaluating "))], said


class NoSync(torch.Tensor):
    """A batch tensor that fails on any use but its length and shape (no value read, no op)."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", None) not in ("__len__", "__get__"):
            raise AssertionError(f"the heartbeat used a batch tensor: {func}")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_the_training_line_reads_no_tensor(caplog: pytest.LogCaptureFixture) -> None:
    """The line's numbers are host ints and floats: the batch's length, the clock, the window's
    means; a tensor in the batch is never read (on CUDA that would be a per-step sync)."""
    caplog.set_level(logging.INFO)
    state, length = progress.LoopState(), progress.RunLength(max_steps=10)
    length.plan(3)
    beat = progress.TrainBeat(1e-9, state, length)
    beat.means = {"loss": 0.5, "acc": 0.25}
    batches = [{"image": torch.zeros(4, 1, 2, 2).as_subclass(NoSync)} for _ in range(3)]
    for _ in beat.wrap(batches, "epoch 1/1"):
        state.step += 1
    said = lines(caplog)
    assert len(said) == 3  # one per batch, each due
    assert re.fullmatch(r"step 3/10 \(epoch 1/1\): loss=0\.5000, \d+ img/s, ETA \S+", said[-1])


def test_a_long_cpu_evaluation_says_what_it_will_take(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10,000 test images in 100 batches of 1.3 s (a patched clock): after the first batches,
    one line with the whole (about 2m10s) and an eval_subset that fits the 30 s; then a progress
    line every 30 s."""
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    caplog.set_level(logging.INFO)

    class Loader:
        batch_size = 100
        sampler = type("Sampler", (), {"n": 10_000})()

        def __len__(self) -> int:
            return 100

        def __iter__(self) -> Any:
            for _ in range(100):
                yield {"image": torch.zeros(1)}

    paused: list[float] = []
    batches = progress.EvalBatches(Loader(), "test", 30, False, "data.eval_subset", paused.append)
    assert len(batches) == 100 and batches.batch_size == 100  # the loader's, for the task
    for _ in batches:
        now[0] += 1.3  # the batch's work, as the task does it
    said = lines(caplog)
    assert said[0] == (
        "evaluating 10000 test images: about 2m10s on cpu "
        "(data.eval_subset=2000 evaluates fewer, about 26s)"
    )
    assert said[1].startswith("evaluating test: 24/100 batches, 0.77 batches/s, ETA 1m39s")
    assert len(said) == 1 + 4 and paused == [pytest.approx(130.0)]


def test_a_short_evaluation_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    loader = [{"image": torch.zeros(1)} for _ in range(5)]
    assert len(list(progress.EvalBatches(loader, "val", 30, False, "data.eval_subset"))) == 5
    assert not lines(caplog)


def test_scene_data_preparation_beats(
    make_cfg: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """data=mnist_det composes its scenes through one Heartbeat, set from trainer.log_every_s by
    the command; 2048-scene chunks: 600 train scenes in 1 chunk, 2 test scenes, 4 val scenes."""
    caplog.set_level(logging.INFO)
    cfg = make_cfg("model=yolo", "data=mnist_det", "model.width=4", "data.train_scenes=600",
                   "data.test_scenes=2", "data.val_scenes=4", "data.val_objects=50",
                   "trainer.log_every_s=1e-9")  # fmt: skip
    build_trainer(cfg, tmp_path)
    said = [m for m in lines(caplog) if m.startswith("composing mnist_det scenes: ")]
    assert [m.split(",")[0] for m in said] == [
        "composing mnist_det scenes: 2/606 scenes",
        "composing mnist_det scenes: 6/606 scenes",
        "composing mnist_det scenes: 606/606 scenes",
    ]
    assert said[-1].endswith("ETA 0s")


def test_heartbeat_ticks_on_the_clock(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line every every_s of time.monotonic(), whatever the number of ticks between."""
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    caplog.set_level(logging.INFO)
    beat = progress.Heartbeat("decoding x", 1000, 100, unit="images", bar=False)
    for _ in range(1000):
        now[0] += 0.25
        beat.tick()
    assert lines(caplog) == [
        "decoding x: 400/1000 images, 4.0 images/s, ETA 2m30s",
        "decoding x: 800/1000 images, 4.0 images/s, ETA 50s",
    ]


def test_the_training_rate_leaves_evaluations_out(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 images a second of training, a 20 s evaluation between (EvalBatches' `pause`): the lines
    still say 8 img/s, and the ETA is the steps left at the training's pace."""
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    caplog.set_level(logging.INFO)
    state, length = progress.LoopState(), progress.RunLength(max_steps=100)
    length.plan(50)
    beat = progress.TrainBeat(30, state, length)
    for i, _ in enumerate(beat.wrap([{"image": torch.zeros(8)}] * 50, "epoch 1/1")):
        now[0] += 1.0
        state.step += 1
        if i == 10:
            now[0] += 20.0
            beat.pause(20.0)
    assert lines(caplog) == [  # every 30 s of the wall clock: at 31 s (11 steps) and 61 s
        "step 11/100 (epoch 1/1): 8 img/s, ETA 1m29s",
        "step 41/100 (epoch 1/1): 8 img/s, ETA 59s",
    ]
