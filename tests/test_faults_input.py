"""Bad input and failing writes: each ends in one user error that names the cause and the fix.

Unit tests of dlrun.engine.checkpoint (atomic writes, safe loads, mismatch messages, config_diff) and
dlrun.config.checks (config types and ranges, image sizes a network cannot take). No training runs.
"""

import errno
import os
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict
from torch import nn

from dlrun.cli import CONFIG_DIR
from dlrun.config import checks
from dlrun.engine import checkpoint
from dlrun.errors import UserError, WriteFailed
from dlrun.models import model_kwargs
from dlrun.models.knn import KNN
from dlrun.models.lenet import LeNet5

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ----- atomic writes ------------------------------------------------------------------------------
@pytest.fixture
def old_ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "checkpoints" / "last.pt"
    checkpoint.save(path, {"step": 1, "w": torch.arange(4.0)})
    return path


def test_save_writes_a_loadable_checkpoint_and_no_temporary_file(old_ckpt: Path) -> None:
    checkpoint.save(old_ckpt, {"step": 2, "w": torch.ones(3)})
    assert checkpoint.load(old_ckpt)["step"] == 2
    assert leftovers(old_ckpt.parent, {"last.pt"}) == []


def test_disk_full_during_save_keeps_the_old_checkpoint(
    old_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = old_ckpt.read_bytes()

    def partial_then_full(obj, f) -> None:  # some bytes reach the temporary file, then ENOSPC
        f.write(b"PK\x03\x04 half a zip")
        enospc()

    monkeypatch.setattr(torch, "save", partial_then_full)
    with pytest.raises(WriteFailed) as info:
        checkpoint.save(old_ckpt, {"step": 2})
    msg = str(info.value)
    assert info.value.exit_code == 5
    assert str(old_ckpt) in msg and "No space left on device" in msg
    assert "previous checkpoint" in msg and "intact" in msg
    assert "Free disk space" in msg and "hydra.run.dir=" in msg
    assert old_ckpt.read_bytes() == before
    assert leftovers(old_ckpt.parent, {"last.pt"}) == []


def test_failed_rename_keeps_the_old_checkpoint(
    old_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = old_ckpt.read_bytes()

    def read_only_fs(*_args) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", read_only_fs)
    with pytest.raises(WriteFailed, match="Read-only file system.*intact.*Remount .* read-write"):
        checkpoint.save(old_ckpt, {"step": 2})
    assert old_ckpt.read_bytes() == before
    assert leftovers(old_ckpt.parent, {"last.pt"}) == []


def test_save_fsyncs_the_file_before_renaming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), replace(a, b))[1])
    checkpoint.save(tmp_path / "last.pt", {"step": 1})
    assert events[:2] == ["fsync", "replace"]
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 1


def test_save_into_a_read_only_folder_is_write_failed(old_ckpt: Path) -> None:
    folder = old_ckpt.parent
    before = old_ckpt.read_bytes()
    os.chmod(folder, 0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("chmod does not stop this user (root) from writing")
        with pytest.raises(WriteFailed, match="Permission denied.*intact.*Make .* writable"):
            checkpoint.save(old_ckpt, {"step": 2})
    finally:
        os.chmod(folder, 0o700)
    assert old_ckpt.read_bytes() == before
    assert leftovers(folder, {"last.pt"}) == []


def test_save_where_the_folder_is_a_file_is_write_failed(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").write_text("not a folder")  # a real OS error, even for root
    with pytest.raises(WriteFailed, match="Nothing was written"):
        checkpoint.save(tmp_path / "checkpoints" / "last.pt", {"step": 1})


def test_write_text_atomic_replaces_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    checkpoint.write_text_atomic(path, '{"a": 1}\n')
    checkpoint.write_text_atomic(path, '{"b": "\u00e9"}\n')
    assert path.read_text(encoding="utf-8") == '{"b": "\u00e9"}\n'
    assert leftovers(tmp_path, {"metrics.json"}) == []


def test_write_text_atomic_failure_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "metrics.json"
    checkpoint.write_text_atomic(path, "old\n")
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(WriteFailed, match="metrics.json: No space left on device.*intact"):
        checkpoint.write_text_atomic(path, "new\n")
    assert path.read_text() == "old\n"
    assert leftovers(tmp_path, {"metrics.json"}) == []


def test_write_text_atomic_into_a_read_only_folder_is_write_failed(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.json"
    checkpoint.write_text_atomic(path, "old\n")
    os.chmod(path.parent, 0o500)
    try:
        if os.access(path.parent, os.W_OK):
            pytest.skip("chmod does not stop this user (root) from writing")
        with pytest.raises(WriteFailed, match="Permission denied"):
            checkpoint.write_text_atomic(path, "new\n")
    finally:
        os.chmod(path.parent, 0o700)
    assert path.read_text() == "old\n"
    assert leftovers(path.parent, {"metrics.json"}) == []


def test_interrupted_save_leaves_no_temporary_file(
    old_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(obj, f) -> None:
        f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(old_ckpt, {"step": 2})
    assert leftovers(old_ckpt.parent, {"last.pt"}) == []


# ----- safe load ----------------------------------------------------------------------------------
def touch(path: str) -> None:
    """What a malicious checkpoint would run on load: here, create a marker file."""
    Path(path).touch()


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return touch, (str(self.marker),)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    bad = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": Payload(tmp_path / "marker")}, bad)
    with pytest.raises(UserError, match="could not be read as a dlrun checkpoint"):
        checkpoint.load(bad)
    assert not (tmp_path / "marker").exists()
    # The payload is real: an unsafe load would have run it.
    torch.load(bad, weights_only=False)
    assert (tmp_path / "marker").exists()


# ----- checkpoints that do not fit ----------------------------------------------------------------
def lenet_config(channels: int, classes: int, name: str) -> dict:
    model = {"_target_": "dlrun.models.lenet.LeNet5", "in_channels": channels, "image_size": 28}
    model |= {"num_classes": classes, "activation": "relu", "freeze": None}
    data = {"name": name, "channels": channels, "image_size": 28, "num_classes": classes}
    return {"model": model, "data": data | {"batch_size": 128}, "optim": {"lr": 0.01}}


def test_mismatch_names_the_keys_with_both_shapes_and_the_settings() -> None:
    saved = {
        "model": LeNet5(in_channels=1, num_classes=10).state_dict(),
        "config": lenet_config(1, 10, "mnist"),
    }
    model = LeNet5(in_channels=3, num_classes=100)
    now = lenet_config(3, 100, "cifar100") | {"optim": {"lr": 0.5}}  # optim does not matter
    now["model"]["freeze"] = "backbone"  # a training choice, not a shape
    with pytest.raises(UserError) as info:
        checkpoint.load_model_state(model, saved, "old.pt", config=now)
    msg = str(info.value)
    assert "Checkpoint old.pt does not fit this model" in msg
    assert "LeNet5 on data mnist" in msg
    assert "features.0.weight: checkpoint (6, 1, 5, 5) vs model (6, 3, 5, 5)" in msg
    assert "head.5.weight: checkpoint (10, 84) vs model (100, 84)" in msg
    assert "head.5.bias: checkpoint (10,) vs model (100,)" in msg
    assert "model.in_channels: 1 (checkpoint) vs 3 (this run)" in msg
    assert "model.num_classes: 10 (checkpoint) vs 100 (this run)" in msg
    assert "data.name: mnist (checkpoint) vs cifar100 (this run)" in msg
    assert "data.channels: 1 (checkpoint) vs 3 (this run)" in msg
    assert "optim" not in msg and "freeze" not in msg and "batch_size" not in msg
    assert "Use the same model= and data=" in msg


def test_mismatch_names_missing_and_unexpected_keys_and_counts_the_rest() -> None:
    saved = {"model": LeNet5(batchnorm=False).state_dict(), "config": lenet_config(1, 10, "mnist")}
    model = LeNet5(batchnorm=True)  # BN layers: new keys, no conv biases, shifted indices
    with pytest.raises(UserError) as info:
        checkpoint.load_model_state(model, saved, "plain.pt")  # no config: keys only
    msg = str(info.value)
    assert "Missing from the checkpoint (" in msg and "features.1.running_mean" in msg
    assert "In the checkpoint but not in this model (" in msg and "features.0.bias" in msg
    assert "... and" in msg and "more" in msg
    assert "(this run)" not in msg


def test_mismatch_of_small_models_lists_each_kind() -> None:
    theirs = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    ours = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(UserError) as info:
        checkpoint.load_model_state(ours, {"model": theirs.state_dict()}, "x.pt")
    msg = str(info.value)
    assert "Shapes differ (2): 0.weight: checkpoint (3, 4) vs model (5, 4); 0.bias" in msg
    assert "Missing from the checkpoint (2): 2.weight; 2.bias" in msg
    assert "In the checkpoint but not in this model (2): 1.weight; 1.bias" in msg
    assert "model ? on data ?" in msg  # no config in the checkpoint


def test_a_fitting_checkpoint_loads_and_a_checkpoint_without_weights_is_refused() -> None:
    src, dst = LeNet5(), LeNet5()
    checkpoint.load_model_state(dst, {"model": src.state_dict()}, "ok.pt", config={"model": {}})
    assert torch.equal(dst.head[-1].weight, src.head[-1].weight)
    with pytest.raises(UserError, match="holds no model weights"):
        checkpoint.load_model_state(dst, {"step": 3}, "weights_missing.pt")


# ----- config_diff --------------------------------------------------------------------------------
BASE = {
    "seed": 0,
    "optim": {"lr": 0.01, "betas": [0.9, 0.999]},
    "trainer": {"max_epochs": 10, "max_steps": None},
    "hydra": {"run": {"dir": "a"}},
}


@pytest.mark.parametrize(
    ("current", "allowed", "expected"),
    [
        (BASE, (), []),
        ({**BASE, "optim": {"lr": 0.02, "betas": [0.9, 0.999]}}, (), ["optim.lr"]),
        ({**BASE, "optim": {"lr": 0.01, "betas": [0.5, 0.999]}}, (), ["optim.betas"]),
        ({**BASE, "seed": 0.0}, (), []),  # 0 == 0.0
        ({**BASE, "seed": False}, (), ["seed"]),  # but false is not 0
        ({**BASE, "trainer": {"max_epochs": 20, "max_steps": None}}, ["trainer.max_epochs"], []),
        ({**BASE, "trainer": {"max_epochs": 20}}, ["trainer.max_epochs"], ["trainer.max_steps"]),
        ({**BASE, "hydra": {"run": {"dir": "b"}, "x": 1}}, ["hydra"], []),
        ({**BASE, "hydra": {"run": {"dir": "b"}}}, ["hydra.run.di"], ["hydra.run.dir"]),
        ({**BASE, "new": {"key": 1}}, (), ["new.key"]),
        ({**BASE, "optim": 3}, (), ["optim", "optim.betas", "optim.lr"]),
        (
            {**BASE, "seed": 1, "trainer": {"max_epochs": 10, "max_steps": 5}, "z": None},
            ("hydra",),
            ["seed", "trainer.max_steps", "z"],
        ),
    ],
)
def test_config_diff(current: dict, allowed, expected: list[str]) -> None:
    assert checkpoint.config_diff(BASE, current, allowed) == expected


def test_config_diff_is_symmetric_and_sorted() -> None:
    a = {"b": {"y": 1, "x": 2}, "a": 1}
    b = {"b": {"y": 2}, "a": 2, "c": {}}
    assert checkpoint.config_diff(a, b, []) == ["a", "b.x", "b.y", "c"]
    assert checkpoint.config_diff(b, a, []) == ["a", "b.x", "b.y", "c"]


# ----- check_config -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "key", "shown"),
    [
        ("optim.lr=-0.1", "optim.lr", "-0.1 (float)"),
        ("optim.lr=-1e-9", "optim.lr", "-1e-09 (float)"),
        ("optim.lr=nan", "optim.lr", "nan (float)"),
        ("optim.lr=inf", "optim.lr", "inf (float)"),
        ("optim.lr=fast", "optim.lr", "'fast' (str)"),
        ("data.batch_size=0", "data.batch_size", "0 (int)"),
        ("data.batch_size=2.5", "data.batch_size", "2.5 (float)"),
        ("data.batch_size=true", "data.batch_size", "true (bool)"),
        ("trainer.max_epochs=abc", "trainer.max_epochs", "'abc' (str)"),
        ("trainer.max_epochs=0", "trainer.max_epochs", "0 (int)"),
        ("trainer.max_steps=-1", "trainer.max_steps", "-1 (int)"),
        ("data.image_size=0", "data.image_size", "0 (int)"),
        ("data.num_workers=-1", "data.num_workers", "-1 (int)"),
        ("resume=yes", "resume", "'yes' (str)"),
        ("trainer.on_nonfinite=ignore", "trainer.on_nonfinite", "'ignore' (str)"),
        ("optim.weight_decay=-1", "optim.weight_decay", "-1 (int)"),
        ("trainer.compile=1", "trainer.compile", "1 (int)"),
        ("trainer.checkpoint_every_n_steps=0", "trainer.checkpoint_every_n_steps", "0 (int)"),
        ("data.val_split=-0.5", "data.val_split", "-0.5 (float)"),
        ("data.train_subset=0", "data.train_subset", "0 (int)"),
        ("seed=1.5", "seed", "1.5 (float)"),
        ("metrics.n=1", "metrics.n", "1 (int)"),
        ("sample.n=[1,2]", "sample.n", "[1, 2] (list)"),
    ],
)
def test_bad_value_is_named_with_its_key(make_cfg, override: str, key: str, shown: str) -> None:
    with pytest.raises(UserError) as info:
        checks.check_config(make_cfg(override))
    msg = str(info.value)
    assert f"{key} must be " in msg and f"got {shown}" in msg
    assert msg.count(" must be ") == 1  # only the bad key
    assert "on the command line, e.g. dlrun " in msg


def test_momentum_must_be_below_one(make_cfg) -> None:
    with pytest.raises(UserError, match=r"optim.momentum must be a number in \[0, 1\), got 1.0"):
        checks.check_config(make_cfg("optim=sgd", "optim.momentum=1.0"))


def test_every_bad_value_is_listed_in_one_message(make_cfg) -> None:
    cfg = make_cfg("optim.lr=-1", "data.batch_size=0", "trainer.max_epochs=abc", "resume=yes")
    with pytest.raises(UserError) as info:
        checks.check_config(cfg)
    msg = str(info.value)
    assert msg.startswith("This config has 4 bad values: ")
    assert "trainer.max_epochs must be an integer >= 1, got 'abc' (str)" in msg
    assert "data.batch_size must be an integer >= 1, got 0 (int)" in msg
    assert "optim.lr must be a number >= 0, got -1 (int)" in msg
    assert "resume must be true or false or latest, got 'yes' (str)" in msg
    assert "e.g. dlrun trainer.max_epochs=10 data.batch_size=128 optim.lr=0.01 resume=true" in msg


def test_the_default_config_passes(make_cfg) -> None:
    checks.check_config(make_cfg())


def test_edge_values_pass(make_cfg) -> None:
    checks.check_config(
        make_cfg(
            "optim.lr=0",  # a step that must not move the weights (tests/test_transfer.py)
            "data.num_workers=0",
            "data.val_split=0.1",
            "data.val_split=100",
            "trainer.max_steps=1",
            "trainer.checkpoint_every_n_steps=1",
            "trainer.on_nonfinite=skip",
            "data.train_subset=1",
            "metrics.n=2",
            "optim.weight_decay=0",
        )
    )
    checks.check_config(make_cfg("optim=sgd", "optim.momentum=0"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_passes(make_cfg, experiment: str) -> None:
    checks.check_config(make_cfg(f"experiment={experiment}"))


def test_every_model_option_passes(make_cfg) -> None:
    for model in MODELS:
        checks.check_config(make_cfg(f"model={model}"))


def test_missing_and_unresolvable_values_are_left_to_later_checks(make_cfg) -> None:
    cfg = make_cfg("data=imagefolder")  # data.root=??? is reported by the CLI, with its own hint
    with open_dict(cfg):
        cfg.data.batch_size = "???"
        cfg.trainer.max_epochs = "${no.such.key}"
    checks.check_config(cfg)


def test_a_required_key_that_is_absent_is_reported(make_cfg) -> None:
    cfg = make_cfg()
    with open_dict(cfg):
        del cfg.optim["lr"]
    with pytest.raises(UserError, match="optim.lr must be set to a number >= 0"):
        checks.check_config(cfg)


# ----- check_image_size ---------------------------------------------------------------------------
def build_model(make_cfg, *overrides: str) -> nn.Module:
    return instantiate(model_kwargs(make_cfg(*overrides).model))


def test_too_small_images_are_a_user_error_naming_the_size(make_cfg) -> None:
    model = build_model(make_cfg, "model=airbench", "data=cifar10", "data.image_size=8")
    with pytest.raises(UserError) as info:
        checks.check_image_size(model, (3, 8, 8), "airbench")
    msg = str(info.value)
    assert f"model=airbench ({type(model).__name__})" in msg
    assert "data.image_size=8" in msg and "8x8 px" in msg
    assert "Output size is too small" in msg
    assert "larger data.image_size" in msg and "another model=" in msg
    assert model.training  # restored


def test_a_model_built_for_another_size_is_a_user_error(make_cfg) -> None:
    model = build_model(make_cfg, "model.image_size=32")  # LeNet for 32 px, data at 28
    with pytest.raises(UserError, match="data.image_size=28.*mat1 and mat2 shapes"):
        checks.check_image_size(model, (1, 28, 28), "lenet")


def test_lenet_at_28_passes_and_keeps_modes_and_rng(make_cfg) -> None:
    model = build_model(make_cfg, "model.batchnorm=true")
    model.features[1].eval()  # e.g. a frozen BatchNorm: stays in eval mode
    rng = torch.get_rng_state()
    checks.check_image_size(model, (1, 28, 28), "lenet")
    assert model.training and not model.features[1].training
    assert all(m.training for m in model.modules() if m is not model.features[1])
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.features[1].num_batches_tracked.item() == 0  # eval mode: BN stats untouched


def test_a_model_without_parameters_is_not_checked() -> None:
    checks.check_image_size(KNN(num_classes=10), (1, 28, 28), "knn")  # needs its memory first
