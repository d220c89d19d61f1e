"""Keys that moved: the old name on the command line ends in one line naming the new key."""

from pathlib import Path

import pytest

from tests.test_cli import dlrun


@pytest.mark.parametrize(
    ("arg", "new"),
    [
        ("model.freeze=backbone", "freeze=backbone"),
        ("metrics.every_n_epochs=2", "trainer.val_every_n_epochs=2"),
    ],
)
def test_a_renamed_key_is_one_line_naming_the_new_one(
    data_root: Path, tmp_path: Path, arg: str, new: str
) -> None:
    res = dlrun(arg, "trainer.max_epochs=1", data=data_root, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("dlrun: error: ") and new in lines[0]
    assert arg.split("=")[0] in lines[0]  # and the old name, so the user sees what moved
    assert "Traceback" not in res.stderr + res.stdout
    assert not (tmp_path / "outputs").exists()  # refused before a run folder was made


@pytest.mark.parametrize(
    ("arg", "new"),
    [
        ("loss._target_=dlrun.losses.Objective", "dlrun.tasks.classification.losses.Objective"),
        ("sched._target_=dlrun.sched.cosine", "dlrun.engine.sched.cosine"),
    ],
)
def test_a_moved_target_in_a_config_of_ones_own_is_one_line_naming_the_new_path(
    make_cfg, tmp_path: Path, arg: str, new: str
) -> None:
    """Saved runs read old `_target_`s through the migration table (tests/test_resume_config.py);
    a config written by hand before the task packages gets the new path in its error."""
    from dlrun.cli import build_trainer
    from dlrun.errors import UserError

    with pytest.raises(UserError) as err:
        build_trainer(make_cfg("model=lenet", arg), tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message and f"use _target_: {new}" in message, message
    assert arg.split("=")[1] in message  # the old path too, so the user sees what moved
