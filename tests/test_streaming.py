"""data.in_memory=false: image folders read by DataLoader workers train like the in-memory path,
resume bit for bit (mid-epoch too), shard under torchrun, and `auto` picks the path by size."""

import json
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from dlrun.cli import CONFIG_DIR, build, run
from dlrun.data import ClassificationData
from dlrun.data.streamed import StreamingClassificationData
from dlrun.errors import UserError
from tests.conftest import train_on_all
from tests.fixtures import write_png_folder
from tests.test_faults import KILLER, finish, metrics_of, start
from tests.test_torchrun import assert_close, launch
from tests.test_torchrun import finish as finish_torchrun

# 160 training PNGs in batches of 20: 8 steps an epoch; SGD so that sums in another order stay close.
ARGS = ("data=imagefolder", "model=lenet", "model.activation=relu", "optim=sgd", "sched=none",
        "data.batch_size=20", "data.eval_batch_size=50", "trainer.max_epochs=2",
        "trainer.log_every_n_steps=2", "device=cpu", "trainer.progress=false")  # fmt: skip
PLAIN = ("data.crop_padding=0", "data.hflip=false")  # no augmentation: both paths draw the same


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_png_folder(tmp_path_factory.mktemp("stream") / "pngs", n=160)


def cfg_of(folder: Path, tmp_path: Path, *overrides: str) -> DictConfig:
    base = [*ARGS, f"data.root={folder}", f"data.source.cache_dir={tmp_path / 'cache'}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return train_on_all(compose("train", overrides=base + list(overrides)), overrides)


def test_streamed_folders_train_exactly_like_the_in_memory_path(folder: Path, tmp_path: Path):
    out = {}
    for mode in ("true", "false"):
        cfg = cfg_of(folder, tmp_path, *PLAIN, f"data.in_memory={mode}")
        metrics = run(cfg, tmp_path / mode)
        out[mode] = {
            k: v for k, v in metrics.items() if not k.startswith(("time/", "train/images"))
        }
    assert out["false"] == out["true"]  # same files, same order, same decode: bit for bit
    assert out["false"]["step"] == 16


def test_auto_streams_only_what_does_not_fit(folder: Path, tmp_path: Path):
    cfg = cfg_of(folder, tmp_path, "data.in_memory=auto")
    assert isinstance(build(cfg.data, "data"), ClassificationData)
    cfg = cfg_of(folder, tmp_path, "data.in_memory=auto", "data.memory_share=1e-9")
    data = build(cfg.data, "data")
    assert isinstance(data, StreamingClassificationData)
    assert data.describe()["sizes"] == {"train": 160, "val": 160, "test": 160}


def test_streamed_data_holds_out_the_same_validation_images(folder: Path, tmp_path: Path):
    found = {}
    for mode in ("true", "false"):
        cfg = cfg_of(folder, tmp_path, f"data.in_memory={mode}", "data.val_split=0.25")
        data = build(cfg.data, "data")
        data.setup(torch.device("cpu"), 0)
        found[mode] = data.example_batch(40, "val")
    assert found["true"]["image"].equal(found["false"]["image"])
    assert found["true"]["label"].equal(found["false"]["label"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.in_memory=maybe", "data.in_memory must be auto, true or false"),
        ("data.memory_share=0", "data.memory_share must be in (0, 1]"),
        ("data.holdout_classes=[1]", "needs its pairs in memory"),
    ],
)
def test_streaming_settings_that_cannot_work_are_clear_errors(
    folder: Path, tmp_path: Path, override: str, message: str
):
    cfg = cfg_of(folder, tmp_path, "data.in_memory=false", override)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(cfg.data, "data")


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.eval_batch_size=0", "data.eval_batch_size must be a positive integer, got 0"),
        ("data.num_workers=-1", "data.num_workers must be at least 0, got -1"),
        ("+data.seq_mode=column", "data.seq_mode must be row or pixel, got 'column'"),
        ("data.val_split=-1", "data.val_split must be >= 0"),
        ("data.bad_images=maybe", "data.bad_images='maybe' is not a policy; use one of: error"),
        ("data.mixup=-1", "data.mixup"),
    ],
)
def test_both_paths_check_the_keys_they_share_alike(
    folder: Path, tmp_path: Path, override: str, message: str
):
    for mode in ("true", "false"):  # one definition (dlrun.data.labelled): the same refusal
        cfg = cfg_of(folder, tmp_path, f"data.in_memory={mode}", override)
        with pytest.raises(UserError, match=re.escape(message)):
            build(cfg.data, "data")


def test_an_undecodable_file_is_named_or_skipped(folder: Path, tmp_path: Path):
    broken = tmp_path / "broken"
    write_png_folder(broken, n=40)
    bad = next((broken / "train").rglob("*.png"))
    bad.write_bytes(b"not a png")
    cfg = cfg_of(broken, tmp_path, "data.in_memory=false", "trainer.max_epochs=1")
    with pytest.raises(UserError, match=f"Could not decode 1 image file.*{bad.name}"):
        run(cfg, tmp_path / "error")
    cfg = cfg_of(broken, tmp_path, "data.in_memory=false", "data.bad_images=skip",
                 "trainer.max_epochs=1")  # fmt: skip
    assert run(cfg, tmp_path / "skip")["step"] == 2


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_ends_like_an_uninterrupted_streamed_run(
    folder: Path, tmp_path: Path
):
    """With workers and augmentation: each image's crop and flip are seeded by (epoch seed,
    index), so the resumed epoch is bit for bit the interrupted one."""
    args = (*ARGS, f"data.root={folder}", "data.in_memory=false", "data.num_workers=2",
            "data.crop_padding=4", "trainer.checkpoint_every_n_steps=3")  # fmt: skip
    rc, out = finish(start(*args, "hydra.run.dir=ref", data=folder, cwd=tmp_path))
    assert rc == 0, out
    # The 3rd checkpoint write (step 9, in epoch 2) is torn by a kill -9: last.pt is step 6's.
    rc, out = finish(start(*args, "hydra.run.dir=run", data=folder, cwd=tmp_path,
                           script=KILLER, DLRUN_KILL_AT_SAVE="3"))  # fmt: skip
    assert rc == -9, out
    rc, out = finish(start(*args, "hydra.run.dir=run", "resume=true", data=folder, cwd=tmp_path))
    assert rc == 0, out
    assert "at step 6 (epoch 1, batch 6 of 8)" in out
    assert metrics_of(tmp_path / "run") == metrics_of(tmp_path / "ref")


@pytest.mark.slow
def test_two_processes_stream_their_shards_like_one_in_memory_process(folder: Path, tmp_path: Path):
    args = (*ARGS, *PLAIN, f"data.root={folder}", "trainer.max_epochs=1")
    one = launch(*args, "data.in_memory=true", "hydra.run.dir=one", data=folder, cwd=tmp_path,
                 procs=1)  # fmt: skip
    finish_torchrun(one)
    two = launch(*args, "data.in_memory=false", "data.num_workers=1", "hydra.run.dir=two",
                 data=folder, cwd=tmp_path, procs=2)  # fmt: skip
    finish_torchrun(two)
    assert_close(tmp_path / "one", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["step"] == 8


def test_a_png_the_workers_read_is_the_in_memory_decode(folder: Path, tmp_path: Path):
    """RGBA and odd sizes: both paths convert and resize alike."""
    odd = tmp_path / "odd"
    for split in ("train", "test"):
        (odd / split / "a").mkdir(parents=True)
        Image.new("RGBA", (40, 24), (200, 10, 30, 128)).save(odd / split / "a" / "x.png")
    batches = {}
    for mode in ("true", "false"):
        data = build(cfg_of(odd, tmp_path, f"data.in_memory={mode}").data, "data")
        data.setup(torch.device("cpu"), 0)
        batches[mode] = data.example_batch(1, "train")["image"]
    assert batches["true"].equal(batches["false"])
