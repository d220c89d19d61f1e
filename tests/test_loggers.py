"""The `logger` config group (dlrun/engine/loggers/, docs/loggers.md), each read back by its own
library: the csv module for metrics.csv, MLflow's MlflowClient, W&B's own record schema for its
offline run file; the scalars match TensorBoard's; resume=true continues the same run."""

import csv
import struct
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

from dlrun.cli import run
from dlrun.engine import checkpoint
from dlrun.engine.run_logger import TB_TAGS
from dlrun.errors import UserError
from dlrun.tasks.classification.trainer import ClassificationTrainer
from tests.conftest import need_extra, stopped_at_step
from tests.test_cli import dlrun
from tests.test_monitor import scalars

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread each (conftest)
# The linear classifier: 200 fixture images, 50 a batch, 4 steps an epoch, 2 epochs; a window
# every step, an evaluation every 2 steps.
TINY = ("model=linear", "optim=sgd", "sched=none", "data.batch_size=50", "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1", "trainer.val_every_n_steps=2")  # fmt: skip


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow database for the module's tests (a new one costs seconds of migrations); each
    test its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def mlflow(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return need_extra("mlflow", "mlflow")


def csv_rows(run_dir: Path) -> list[tuple[int, str, float]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [(int(r["step"]), r["tag"], float(r["value"])) for r in rows]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:  # noqa: ANN001
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_csv_and_mlflow_get_what_tensorboard_gets(
    make_cfg, mlflow: ModuleType, uri: str, tmp_path: Path
) -> None:
    out = run(make_cfg(*TINY, "logger=[tensorboard,csv,mlflow]", f"logger.mlflow.tracking_uri={uri}",
                       "logger.mlflow.experiment=tiny"), tmp_path / "run")  # fmt: skip
    run_dir = tmp_path / "run"
    # csv: one row per scalar TensorBoard got, at the same step (TensorBoard's names for a few)
    rows = csv_rows(run_dir)
    tb = {(step, tag) for tag, points in scalars(run_dir).items() if not tag[0].isdigit()
          for step, _ in points}  # fmt: skip  (1_loss/*, 2_acc/*: TensorBoard's headline copies)
    assert {(step, TB_TAGS.get(tag, tag)) for step, tag, _ in rows} == tb
    assert [s for s, t, _ in rows if t == "val/acc"] == [2, 4, 6, 8]
    assert [s for s, t, _ in rows if t == "train/loss_step"] == list(range(1, 9))

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (found,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert found.data.params["optim.lr"] == str(make_cfg(*TINY).optim.lr)
    assert found.data.params["model._target_"].endswith("Linear")
    assert found.data.tags["dlrun.run_dir"] == str(run_dir.absolute()) and found.data.tags["dlrun.commit"]
    val = history(client, found.info.run_id, "val/acc")
    assert val == [(s, v) for s, t, v in rows if t == "val/acc"]
    assert val[-1][1] == pytest.approx(out["val/acc"])
    # the final metrics: metrics.json's, the counts no step logged among them
    assert found.data.metrics["params"] == out["params"] and found.data.metrics["step"] == 8
    saved = checkpoint.load(run_dir / "checkpoints" / "last.pt")["hooks"]["loggers"]
    assert saved["mlflow"]["run_id"] == found.info.run_id


def test_resume_continues_the_mlflow_run_and_the_csv(
    make_cfg, mlflow: ModuleType, uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = (*TINY, "logger=[csv,mlflow]", f"logger.mlflow.tracking_uri={uri}",
            "logger.mlflow.experiment=resumed")  # fmt: skip
    # killed as step 7 starts: last.pt is step 6's (an evaluation's), steps 7's rows come again
    stopped_at_step(make_cfg(*args, "trainer.checkpoint_every_n_steps=3"), tmp_path / "run",
                    ClassificationTrainer, 7, monkeypatch)  # fmt: skip
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (first,) = client.search_runs([client.get_experiment_by_name("resumed").experiment_id])
    assert first.info.status == "KILLED"
    run(make_cfg(*args, "trainer.checkpoint_every_n_steps=3", "resume=true"), tmp_path / "run")

    runs = client.search_runs([first.info.experiment_id])
    assert [r.info.run_id for r in runs] == [first.info.run_id]  # the same run, continued
    assert runs[0].info.status == "FINISHED"
    assert [s for s, _ in history(client, first.info.run_id, "val/acc")] == [2, 4, 6, 8]
    steps = [s for s, _ in history(client, first.info.run_id, "train/loss_step")]
    assert sorted(set(steps)) == list(range(1, 9))
    rows = csv_rows(tmp_path / "run")
    assert [s for s, t, _ in rows if t == "train/loss_step"] == list(range(1, 9))  # each once
    assert Counter((s, t) for s, t, _ in rows).most_common(1)[0][1] <= 2  # train/lr: window + epoch


def test_a_sweep_is_one_mlflow_experiment_of_one_run_a_job(
    data_root: Path, mlflow: ModuleType, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"  # no MLFLOW_TRACKING_URI (the fixture): the sweep's own mlflow.db
    done = dlrun(
        "-m", "model=linear", "optim.lr=0.1,0.01", "trainer.max_steps=4", "data.batch_size=50",
        "logger=[tensorboard,mlflow]", f"hydra.sweep.dir={sweep}", "device=cpu",
        data=data_root, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{sweep / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweep")  # the sweep folder's name
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.params["optim.lr"] for r in runs) == ["0.01", "0.1"]
    assert {Path(r.data.tags["dlrun.run_dir"]).parent for r in runs} == {sweep}
    assert all(r.data.tags["dlrun.sweep"] == "sweep" for r in runs)


def wandb_records(path: Path) -> list:
    """The records of a W&B run file, parsed with wandb's own schema (wandb_internal_pb2.Record);
    the file is LevelDB's log format (32 KiB blocks of checksum, length, type + data) after a
    7-byte ':W&B' header, as wandb's datastore writes it."""
    from wandb.proto import wandb_internal_pb2

    data, pos, out, part = path.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header: padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        part, pos = part + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL, or LAST of FIRST, MIDDLE...
            out.append(wandb_internal_pb2.Record.FromString(part))
            part = b""
    return out


def test_wandb_writes_its_offline_run_and_resume_keeps_the_id(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_extra("wandb", "wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = (*TINY, "logger=[wandb]", "trainer.checkpoint_every_n_steps=3")
    stopped_at_step(make_cfg(*args), tmp_path / "run", ClassificationTrainer, 7, monkeypatch)
    run_id = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["hooks"]["loggers"]
    run_id = run_id["wandb"]["run_id"]
    run(make_cfg(*args, "resume=true"), tmp_path / "run")

    files = sorted((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2  # the first run and its resume
    for f, steps in zip(files, ([2, 4, 6], [8]), strict=True):
        records = wandb_records(f)
        (header,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert header.run_id == run_id and header.project == "dlrun"
        logged = [r.history for r in records if r.WhichOneof("record_type") == "history"]
        # one history row per step (what the step logged, merged); a key with '/' is nested_key
        keys = [{i.key or "/".join(i.nested_key) for i in h.item} for h in logged]
        val = [h.step.num for h, k in zip(logged, keys, strict=True) if "val/acc" in k]
        assert val == steps


def test_a_missing_library_names_its_extra(make_cfg, tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    with pytest.raises(UserError, match=r"pip install 'dlrun\[mlflow\]'"):
        run(make_cfg(*TINY, "logger=[tensorboard,mlflow]"), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written
