"""The test-split warning is given once per sweep, not once per job (issue 30, item 8)."""

from pathlib import Path

from dlrun.launch.sweep import first_in_sweep, job_folders
from tests.test_cli import dlrun

WARNING = "val/acc is measured on the test split (data.val_split=0): best.pt"


def test_a_sweep_warns_once_that_it_selects_on_the_test_split(data_root: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    res = dlrun(
        "-m", "model=linear", "optim.lr=0.1,0.01", "trainer.max_steps=2", "data.val_split=0",
        "trainer.progress=false", f"hydra.sweep.dir={sweep}", "device=cpu",
        data=data_root, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    assert out.count(WARNING) == 1, out
    assert out.count("val/acc is measured on the test split (warned once for the sweep)") == 1
    logs = [(job / "dlrun.log").read_text() for job in job_folders(sweep)]
    assert len(logs) == 2 and WARNING in logs[0] and WARNING not in logs[1]
    assert [p.read_text().startswith(WARNING) for p in sweep.glob(".warned-*")] == [True]


def test_a_single_run_always_warns() -> None:
    assert first_in_sweep("a warning") and first_in_sweep("a warning")
