"""What TensorBoard shows a newcomer: loss and accuracy first, layers by name, sweeps by what
they vary."""

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from dlrun.cli import run
from dlrun.launch.sweep import job_folders
from tests.test_cli import dlrun
from tests.test_monitor import events


def test_a_run_opens_on_curves_and_names_its_layers(make_cfg, tmp_path: Path):
    run(make_cfg("model=lenet", "trainer.max_steps=4", "data.batch_size=50"), tmp_path)
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0}).Reload()
    tags = acc.Tags()
    # LeNet-5's stages by layer and shape, as the notes draw them
    inside = sorted(t for t in tags["images"] if t.startswith("inside/") and t != "inside/filters")
    assert inside == ["inside/conv1_6x28x28", "inside/conv2_16x10x10", "inside/pool1_6x14x14",
                      "inside/pool2_16x5x5"]  # fmt: skip
    # no one-point charts of constants: epoch sits among the times, the model's size is text
    assert "epoch" not in tags["scalars"] and "time/epoch" in tags["scalars"]
    assert not any(t.startswith("model/") for t in tags["scalars"])
    layouts = [v for _, v in events(tmp_path) if v.tag == "custom_scalars__config__"]
    layout = layout_pb2.Layout.FromString(layouts[0].tensor.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts == {
        "loss (train, val)": [r"^train/loss(_step)?$", r"^val/loss$"],
        "acc (train, val)": [r"^train/acc(_step)?$", r"^val/acc$"],
    }


def test_a_sweep_names_its_jobs_and_shows_the_keys_it_varies_first(data_root: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    done = dlrun(
        "-m", "model=mlp,lenet", "optim.lr=0.01,0.001", "trainer.max_steps=6", "device=cpu",
        "trainer.progress=false", f"hydra.sweep.dir={sweep}", data=data_root, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    names = [p.name for p in job_folders(sweep)]
    assert names == [
        "0_model=mlp,optim.lr=0.01,trainer.max_steps=6",
        "1_model=mlp,optim.lr=0.001,trainer.max_steps=6",
        "2_model=lenet,optim.lr=0.01,trainer.max_steps=6",
        "3_model=lenet,optim.lr=0.001,trainer.max_steps=6",
    ]  # device and trainer.progress say where it ran, not what it varies: left out
    found = [v for _, v in events(job_folders(sweep)[0]) if v.tag == "_hparams_/experiment"]
    infos = plugin_data_pb2.HParamsPluginData.FromString(
        found[0].metadata.plugin_data.content
    ).experiment.hparam_infos
    # TensorBoard sorts by (not differs, name) and shows the first few as columns
    shown = [i.name for i in sorted(infos, key=lambda i: (not i.differs, i.name))][:5]
    assert shown[:3] == ["model", "optim.lr", "trainer.max_steps"]


def test_a_short_run_says_how_to_get_a_validation_curve(make_cfg, tmp_path: Path, caplog):
    caplog.set_level("INFO")
    # 10 steps of 20 images: one epoch of the fixture's 200, one evaluation
    run(make_cfg("model=mlp", "trainer.max_steps=10", "data.batch_size=20"), tmp_path / "short")
    assert "add trainer.val_every_n_steps=1 for a validation curve of 10 points" in caplog.text
    steps = [
        e.step
        for e in EventAccumulator(str(tmp_path / "short")).Reload().Scalars("train/loss_step")
    ]
    assert steps == list(range(1, 11))  # 10 points, though log_every_n_steps is 50
    caplog.clear()
    cfg = make_cfg("model=mlp", "trainer.max_steps=10", "data.batch_size=20",
                   "trainer.val_every_n_steps=2")  # fmt: skip
    run(cfg, tmp_path / "curve")
    assert "val_every_n_steps" not in caplog.text
    acc = EventAccumulator(str(tmp_path / "curve")).Reload()
    assert [e.step for e in acc.Scalars("val/acc")] == [2, 4, 6, 8, 10]
