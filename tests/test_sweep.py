"""Sweeps survive a bad trial: `dlrun -m` records a failed job in its folder and goes on."""

import csv
import json
from pathlib import Path

from tensorboard.plugins.hparams import plugin_data_pb2

from dlrun.launch.sweep import job_folders, job_number
from tests.test_cli import dlrun
from tests.test_monitor import events


def jobs(sweep: Path) -> dict[str, dict]:
    """Job number -> its failed.json record, or its metrics.json, for every job folder."""
    out = {}
    for job in job_folders(sweep):
        failed, metrics = job / "failed.json", job / "metrics.json"
        out[str(job_number(job.name))] = json.loads(
            (failed if failed.is_file() else metrics).read_text()
        )
    return out


def hparams_entries(sweep: Path) -> dict[str, dict]:
    """What `tensorboard --logdir <sweep>`'s HParams tab lists: per job folder, its hparams and
    the declared metrics that the job logged a value of."""
    out = {}
    for job in job_folders(sweep):
        found = {v.tag: v for _, v in events(job) if v.tag.startswith("_hparams_/")}
        if "_hparams_/session_start_info" not in found:
            continue

        def data(tag: str, found: dict = found) -> plugin_data_pb2.HParamsPluginData:
            return plugin_data_pb2.HParamsPluginData.FromString(
                found[tag].metadata.plugin_data.content
            )

        params = data("_hparams_/session_start_info").session_start_info.hparams
        declared = [m.name.tag for m in data("_hparams_/experiment").experiment.metric_infos]
        logged = {v.tag for _, v in events(job) if v.metadata.plugin_data.plugin_name == "scalars"}
        out[str(job_number(job.name))] = {
            "params": {
                k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                for k, v in params.items()
            },
            "metrics": [m for m in declared if m in logged],
        }
    return out


def assert_four_hparams_entries(sweep: Path) -> None:
    """model=mlp,lenet x optim.lr=0.1,0.01: four entries, each with its values and val/acc."""
    entries = hparams_entries(sweep)
    assert len(entries) == 4
    combos = {(e["params"]["model"], e["params"]["optim.lr"]) for e in entries.values()}
    assert combos == {("mlp", 0.1), ("mlp", 0.01), ("lenet", 0.1), ("lenet", 0.01)}
    assert all("val/acc" in e["metrics"] and "val/loss" in e["metrics"] for e in entries.values())


def test_a_sweep_gives_every_job_an_hparams_entry_with_its_metrics(data_root: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    done = dlrun(
        "-m", "model=mlp,lenet", "optim.lr=0.1,0.01", "trainer.max_steps=20",
        f"hydra.sweep.dir={sweep}", "device=cpu", data=data_root, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_four_hparams_entries(sweep)
    assert (sweep / "summary.csv").is_file() and (sweep / "summary.md").is_file()


def test_a_sweep_records_bad_values_and_finishes_every_job(data_root: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    done = dlrun(
        "-m", "model=lenet,mlp", "data.batch_size=64,0", "trainer.max_steps=20",
        f"hydra.sweep.dir={sweep}", "device=cpu",
        data=data_root, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = jobs(sweep)
    assert len(found) == 4
    failed = {k: v for k, v in found.items() if "exit_code" in v}
    assert sorted(failed) == ["1", "3"]  # data.batch_size=0, for each model
    for record in failed.values():
        assert record["exit_code"] == 2 and "data.batch_size must be" in record["error"]
        assert "data.batch_size=0" in record["overrides"]
    assert all(found[k]["step"] == 20 for k in ("0", "2"))
    assert (
        "2 of 4 job(s) failed" in done.stderr
        and "job 1 (model=lenet data.batch_size=0 " in done.stderr
    )
    # summary.csv / summary.md at the sweep's top: every job, its overrides, status and metrics
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["status"] for r in rows] == ["ok", "failed (exit 2)", "ok", "failed (exit 2)"]
    assert rows[0]["overrides"].startswith("model=lenet data.batch_size=64")
    assert float(rows[2]["val/acc"]) == found["2"]["val/acc"] and rows[1]["val/acc"] == ""
    md = (sweep / "summary.md").read_text()
    assert "| job | overrides | status | step |" in md and "failed (exit 2)" in md


def test_a_diverging_job_does_not_stop_the_sweep(data_root: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    done = dlrun(
        "-m", "model=linear", "optim=sgd", "optim.lr=1e38,0.01", "sched=none",
        "trainer.max_steps=6", "trainer.log_every_n_steps=1", f"hydra.sweep.dir={sweep}",
        "device=cpu", data=data_root, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = jobs(sweep)
    assert found["0"]["exit_code"] == 3 and "NaN or infinite" in found["0"]["error"]
    assert found["1"]["step"] == 6 and found["1"]["val/acc"] > 0.1
    assert "1 of 2 job(s) failed" in done.stderr and "exit 3" in done.stderr
