"""What dlrun guarantees when runs die: kill -9, SIGTERM/SIGINT, NaN, out of memory, full disks, folders.

Each test drives a real `dlrun` subprocess (or `run()` with one fault patched in) and checks the
promise end to end: the resumed run's metrics equal an uninterrupted run's, the checkpoint on
disk is the last good one, the message names the step / batch size / keys at fault.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dlrun.cli import run
from dlrun.engine import checkpoint
from dlrun.errors import OutOfMemory, TrainingDiverged, UserError, WriteFailed
from dlrun.launch import rundir
from dlrun.tasks.classification.trainer import ClassificationTrainer
from tests.fixtures import write_idx

TIMING = ("time/", "images_per_s")
KILLER = Path(__file__).with_name("killer.py")
# Two small real tasks: a LeNet classifier and an MLP GAN, several checkpoints per epoch.
# data.val_split=0: every fake training image, as the pinned step counts assume (the default
# hold-out's resume is tests/test_holdout.py's).
TASKS = {
    "classifier": ("model=lenet", "model.activation=relu", "data.batch_size=20",
                   "trainer.max_epochs=3", "trainer.checkpoint_every_n_steps=7",
                   "data.val_split=0"),
    "gan": ("model=gan", "data.batch_size=20", "trainer.max_epochs=3",
            "trainer.checkpoint_every_n_steps=7", "metrics.fid.features=auto", "data.val_split=0"),
}  # fmt: skip
# Long enough (450 small steps, about 2 s of training) that a signal sent 0.2 s in lands mid-run.
SIGNALLED = ("model=lenet", "model.activation=relu", "data.batch_size=4", "trainer.max_epochs=3",
             "data.val_split=0")  # fmt: skip
QUICK = (
    "data.val_split=0",
    "model=lenet",
    "model.activation=relu",
    "data.batch_size=20",
    "trainer.log_every_n_steps=4",
)


def stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}


def env_for(data: Path, cwd: Path) -> dict[str, str]:
    # One thread: the same float summation order in every process, so "equal" means equal.
    return dict(os.environ, DLRUN_DATA=str(data), DLRUN_CACHE=str(cwd / "cache"),
                OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0", TQDM_DISABLE="1")  # fmt: skip


def start(
    *args: str, data: Path, cwd: Path, script: Path | None = None, **env: str
) -> subprocess.Popen:
    cmd = [sys.executable, str(script)] if script else [sys.executable, "-m", "dlrun"]
    return subprocess.Popen(
        [*cmd, *args], cwd=cwd, env=env_for(data, cwd) | env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    """The exit code and everything the process printed (logs go to stdout, errors to stderr)."""
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out + err


def dlrun(*args: str, data: Path, cwd: Path) -> tuple[int, str]:
    return finish(start(*args, data=data, cwd=cwd))


def metrics_of(folder: Path) -> dict:
    return stable(json.loads((folder / "metrics.json").read_text()))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_idx(tmp_path_factory.mktemp("faults_data"), n_train=600, n_test=100)


@pytest.fixture(scope="module")
def references(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The uninterrupted runs every interrupted one must end exactly like."""
    cwd = tmp_path_factory.mktemp("reference")
    out = {}
    for task, args in (TASKS | {"signalled": SIGNALLED}).items():
        proc = start(*args, f"hydra.run.dir={task}", data=data, cwd=cwd)
        opened = wait_for_events(cwd / task, 0, proc)
        last = cwd / task / "checkpoints" / "last.pt"
        while not last.exists() and proc.poll() is None:
            time.sleep(0.01)
        # From the TensorBoard file's opening to the first checkpoint: the header (config,
        # HParams, a classifier's traced graph) and the first steps; it varies by machine.
        first = time.time() - opened
        rc, err = finish(proc)
        assert rc == 0, err
        train_s = json.loads((cwd / task / "metrics.json").read_text())["time/train_s"]
        out[task] = {"metrics": metrics_of(cwd / task), "train_s": train_s, "first_s": first}
    return out


def wait_for_events(folder: Path, writers: int, proc: subprocess.Popen) -> float:
    """Wait until the run opens a new TensorBoard file (training follows); the time it did."""
    deadline = time.time() + 120
    while len(list(folder.glob("events.out.tfevents.*"))) == writers and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    return time.time()


# ----- 1. kill -9 at any moment ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_kill_9_at_random_moments_then_resume_ends_like_an_uninterrupted_run(
    task: str, data: Path, references: dict, tmp_path: Path
) -> None:
    args, ref = TASKS[task], references[task]
    rng = random.Random(task)  # random, but the same moments on every CI run
    folder = tmp_path / "run"
    steps_at_kill = []  # the step of last.pt after each kill
    # The first kill lands during start-up; the others at a random moment of the run, timed from
    # the opening of its TensorBoard file.
    for attempt in range(5):
        resume = ("resume=true",) if (folder / ".hydra").is_dir() else ()
        writers = len(list(folder.glob("events.out.tfevents.*")))
        proc = start(*args, f"hydra.run.dir={folder}", *resume, data=data, cwd=tmp_path)
        if attempt:
            wait_for_events(folder, writers, proc)
            # Around the first checkpoint (before or after it), then up to half the training.
            time.sleep(
                rng.uniform(0.5, 1.0) * ref["first_s"] + rng.uniform(0, 0.5 * ref["train_s"])
            )
        else:
            time.sleep(rng.uniform(0.1, 1.0))
        proc.send_signal(signal.SIGKILL)
        rc, out = finish(proc)
        assert rc in (-signal.SIGKILL, 0), out
        last = folder / "checkpoints" / "last.pt"
        steps_at_kill.append(checkpoint.load(last)["step"] if last.is_file() else 0)
        if rc == 0:
            break
    print(f"{task}: last.pt step after each kill: {steps_at_kill}")
    assert len(steps_at_kill) >= 3 and any(0 < s < 90 for s in steps_at_kill), steps_at_kill
    if not (folder / "metrics.json").exists():
        resume = ("resume=true",) if (folder / ".hydra").is_dir() else ()
        rc, out = dlrun(*args, f"hydra.run.dir={folder}", *resume, data=data, cwd=tmp_path)
        assert rc == 0, out
    assert metrics_of(folder) == ref["metrics"]


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
# 30 steps per epoch, a checkpoint every 7: saves at steps 7, 14, 21, 28, 30 (epoch end), 35, ...
@pytest.mark.parametrize(("save", "previous"), [(2, 7), (5, 28)])
def test_kill_9_in_the_middle_of_a_checkpoint_write_leaves_the_previous_one_whole(
    task: str, save: int, previous: int, data: Path, references: dict, tmp_path: Path
) -> None:
    args = TASKS[task]
    proc = start(*args, "hydra.run.dir=run", data=data, cwd=tmp_path, script=KILLER,
                 DLRUN_KILL_AT_SAVE=str(save))  # fmt: skip
    rc, err = finish(proc)
    assert rc == -signal.SIGKILL, err
    ckpts = tmp_path / "run" / "checkpoints"
    torn = list(ckpts.glob(".last.pt.tmp*"))
    assert torn, "the kill did not land inside a checkpoint write"
    state = checkpoint.load(ckpts / "last.pt")  # the previous checkpoint, whole and loadable
    assert state["step"] == previous
    rc, err = dlrun(*args, "hydra.run.dir=run", "resume=true", data=data, cwd=tmp_path)
    assert rc == 0, err
    assert metrics_of(tmp_path / "run") == references[task]["metrics"]
    assert not list(ckpts.glob(".last.pt.tmp*")), "a torn temporary file was left behind"


# ----- 2. SIGTERM / SIGINT ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "signum", "code"),
    [
        ("signalled", signal.SIGTERM, 143),
        ("signalled", signal.SIGINT, 130),
        ("gan", signal.SIGTERM, 143),
    ],
)
def test_a_stop_signal_checkpoints_mid_epoch_and_resume_continues_from_that_step(
    task: str, signum: int, code: int, data: Path, references: dict, tmp_path: Path
) -> None:
    args = SIGNALLED if task == "signalled" else TASKS[task]
    steps_per_epoch = 600 // (4 if task == "signalled" else 20)
    proc = start(*args, "hydra.run.dir=run", data=data, cwd=tmp_path)
    events = tmp_path / "run"
    deadline = time.time() + 120
    while not list(events.glob("events.out.tfevents.*")) and time.time() < deadline:
        time.sleep(0.02)  # training starts right after the TensorBoard file is opened
    time.sleep(0.2)
    sent = time.perf_counter()
    proc.send_signal(signum)
    rc, err = finish(proc)
    assert time.perf_counter() - sent < 15, "the stop was not prompt"
    assert rc == code, err
    assert "stopped after step" in err and "resume=true" in err and "Traceback" not in err
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    step, epoch = state["step"], state["epoch"]
    assert step < 3 * steps_per_epoch
    if step % steps_per_epoch:  # mid-epoch: the checkpoint knows where in the epoch it stopped
        assert state["progress"]["batch"] == step % steps_per_epoch
        where = f"epoch {epoch + 1}, batch {step % steps_per_epoch} of {steps_per_epoch}"
    else:
        where = f"end of epoch {epoch}"
    rc, err = dlrun(*args, "hydra.run.dir=run", "resume=true", data=data, cwd=tmp_path)
    assert rc == 0, err
    assert f"resumed from {tmp_path / 'run'}/checkpoints/last.pt at step {step} ({where})" in err
    assert metrics_of(tmp_path / "run") == references[task]["metrics"]


# ----- 3. NaN / inf loss --------------------------------------------------------------------------
def poison(monkeypatch: pytest.MonkeyPatch, bad_steps: set[int]) -> None:
    """NaN pixels in the batches of the given 1-based steps: the loss of those steps is NaN."""
    real = ClassificationTrainer.step

    def step(self: ClassificationTrainer, batch: dict) -> dict:
        x = batch["image"]
        if self.step_count + 1 in bad_steps:
            x = x * float("nan")
        return real(self, batch | {"image": x})

    monkeypatch.setattr(ClassificationTrainer, "step", step)


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison(monkeypatch, {13})
    cfg = make_cfg(*QUICK, "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=5")
    with pytest.raises(TrainingDiverged) as err:
        run(cfg, tmp_path)
    message = str(err.value)
    assert "NaN or infinite at step 13" in message and "optim.lr" in message
    assert "last good checkpoint" in message and "(step 10)" in message
    assert err.value.exit_code == 3
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 10 and all(v.isfinite().all() for v in state["model"].values())
    assert not (tmp_path / "metrics.json").exists()


def test_on_nonfinite_skip_leaves_out_the_bad_updates_and_counts_them(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    poison(monkeypatch, {3, 7})
    cfg = make_cfg(*QUICK, "trainer.max_epochs=2", "trainer.on_nonfinite=skip")
    metrics = run(cfg, tmp_path)
    assert metrics["train/skipped_steps"] == 2 and metrics["step"] == 20
    assert all(v == v for v in metrics.values())  # no NaN in any logged value
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert all(v.isfinite().all() for v in state["model"].values())
    assert "non-finite loss at step 3" in caplog.text and "step 7" in caplog.text


def test_on_nonfinite_skip_leaves_the_weights_exactly_as_they_were(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step after the first is poisoned: the weights must still be those of step 1."""
    one = run(make_cfg(*QUICK, "trainer.max_steps=1", "sched=none"), tmp_path / "one")
    poison(monkeypatch, set(range(2, 6)))
    cfg = make_cfg(*QUICK, "trainer.max_steps=5", "sched=none", "trainer.on_nonfinite=skip")
    run(cfg, tmp_path / "skip")
    a = checkpoint.load(tmp_path / "one" / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(tmp_path / "skip" / "checkpoints" / "last.pt")["model"]
    assert one["step"] == 1 and all(torch.equal(a[k], b[k]) for k in a)


def test_a_gan_whose_discriminator_loss_turns_nan_stops_naming_the_network(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dlrun.tasks.gan.trainer import GANTrainer

    real = GANTrainer.step

    def step(self: GANTrainer, batch: dict) -> dict:
        x = batch["image"]
        return real(self, batch | {"image": x * float("nan") if self.step_count == 5 else x})

    monkeypatch.setattr(GANTrainer, "step", step)
    cfg = make_cfg("model=gan", "data.batch_size=50", "trainer.max_steps=8",
                   "trainer.log_every_n_steps=4", "metrics.fid.features=auto")  # fmt: skip
    with pytest.raises(
        TrainingDiverged,
        match=r"loss \(generator, discriminator\) became NaN or infinite at step 6",
    ):
        run(cfg, tmp_path)


# ----- 4. out of memory ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("phase", "key"), [("train", "data.batch_size=20"), ("eval", "data.eval_batch_size=1000")]
)
def test_out_of_memory_names_the_batch_size_and_keeps_the_checkpoint(
    phase: str, key: str, make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    where = "step" if phase == "train" else "evaluate"
    real = getattr(ClassificationTrainer, where)

    def oom(self: ClassificationTrainer, *args: object) -> object:
        if self.step_count >= 7 and (phase == "train" or self.epoch >= 2):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args)

    monkeypatch.setattr(ClassificationTrainer, where, oom)
    cfg = make_cfg(*QUICK, "trainer.max_epochs=3", "trainer.checkpoint_every_n_steps=5")
    with pytest.raises(OutOfMemory) as err:
        run(cfg, tmp_path)
    assert key in str(err.value) and "Lower it" in str(err.value) and err.value.exit_code == 4
    step = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["step"]
    assert f"(step {step}) is intact" in str(err.value)


# ----- 5. full disk, unwritable folder ---------------------------------------------------------------
def test_a_full_disk_fails_the_checkpoint_write_cleanly_and_keeps_the_previous_one(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, calls = torch.save, []

    def full_disk(obj: object, f: object, *args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            if hasattr(f, "write"):
                f.write(b"partial")
            raise OSError(28, "No space left on device")
        real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    cfg = make_cfg(*QUICK, "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=5")
    with pytest.raises(WriteFailed) as err:
        run(cfg, tmp_path)
    assert "No space left on device" in str(err.value) and err.value.exit_code == 5
    ckpts = tmp_path / "checkpoints"
    assert checkpoint.load(ckpts / "last.pt")["step"] == 5
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt"]


# A plain folder name, and one through the default `unique_dir` naming (its error comes wrapped).
@pytest.mark.parametrize("run_dir", ["a_file/run", "${unique_dir:a_file/run}"])
def test_an_output_folder_that_cannot_be_created_is_a_clear_error(
    run_dir: str, data: Path, tmp_path: Path
) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    rc, err = dlrun(*QUICK, f"hydra.run.dir={run_dir}", data=data, cwd=tmp_path)
    assert rc == 5 and "Traceback" not in err, err
    message = "dlrun: error: cannot create the run folder"
    assert message in err and "a_file/run (a file stands where a folder must be)" in err, err


# ----- 8. runs never overwrite each other ------------------------------------------------------------
def test_two_runs_started_together_with_the_same_name_get_distinct_folders(
    data: Path, tmp_path: Path
) -> None:
    same = "hydra.run.dir=${unique_dir:outputs/same}"  # as two runs in one second would name it
    procs = [start(*QUICK, "trainer.max_steps=2", same, data=data, cwd=tmp_path) for _ in range(3)]
    assert all(rc == 0 for rc, _ in map(finish, procs))
    folders = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert folders == ["same", "same_1", "same_2"]
    assert all((tmp_path / "outputs" / f / "metrics.json").is_file() for f in folders)


def test_unique_dir_claims_a_new_folder_once_per_process(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    first = rundir.unique_dir(str(tmp_path / "x"))
    assert (
        first == str((tmp_path / "x_1").resolve())
        and rundir.unique_dir(str(tmp_path / "x")) == first
    )


@pytest.fixture
def finished(make_cfg, tmp_path: Path) -> Path:
    run(make_cfg(*QUICK, "trainer.max_epochs=1", "sched=none"), tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        (("optim.lr=0.5",), ["optim.lr: 0.01 (run) vs 0.5 (now)"]),
        (("model.activation=tanh", "seed=3"), ["model.activation", "seed"]),
        (("data.batch_size=10",), ["data.batch_size"]),
        (("sched=onecycle",), ["sched._target_"]),
    ],
)
def test_resume_with_a_changed_config_refuses_and_names_the_keys(
    changes: tuple[str, ...], named: list[str], make_cfg, finished: Path
) -> None:
    before = snapshot(finished)
    cfg = make_cfg(*QUICK, "trainer.max_epochs=1", "sched=none", "resume=true", *changes)
    with pytest.raises(UserError) as err:
        run(cfg, finished)
    assert all(n in str(err.value) for n in named), str(err.value)
    assert snapshot(finished) == before


def test_resume_may_extend_the_run_and_change_logging(make_cfg, finished: Path) -> None:
    cfg = make_cfg(*QUICK, "trainer.max_epochs=2", "sched=none", "resume=true",
                   "trainer.log_every_n_steps=3", "trainer.checkpoint_every_n_steps=4")  # fmt: skip
    assert run(cfg, finished)["epoch"] == 2


def test_resume_refuses_a_new_length_when_the_schedule_depends_on_it(
    make_cfg, tmp_path: Path
) -> None:
    run(make_cfg(*QUICK, "trainer.max_epochs=1"), tmp_path)
    with pytest.raises(UserError, match="sched=onecycle"):
        run(make_cfg(*QUICK, "trainer.max_epochs=2", "resume=true"), tmp_path)


def test_a_new_run_never_writes_into_a_folder_that_holds_one(make_cfg, finished: Path) -> None:
    before = snapshot(finished)
    with pytest.raises(UserError, match="already holds a run"):
        run(make_cfg(*QUICK, "trainer.max_epochs=1", "sched=none"), finished)
    assert snapshot(finished) == before


# ----- 7. bad input never touches an existing run folder -------------------------------------------
@pytest.fixture(scope="module")
def existing(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run in its folder: every refused command below must leave it byte for byte."""
    cwd = tmp_path_factory.mktemp("existing")
    rc, out = dlrun(
        *QUICK, "trainer.max_steps=3", "sched=none", "hydra.run.dir=run", data=data, cwd=cwd
    )
    assert rc == 0, out
    return cwd


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["model=resnet999"],
            2,
            "Could not find 'model/resnet999'. Did you mean model=resnet18, model=resnet34 or "
            "model=resnet50? Available options in 'model': airbench, alexnet,",
        ),
        (["optim.lr=-0.1"], 2, "optim.lr must be a number >= 0, got -0.1"),
        (["data.batch_size=0", "trainer.max_epochs=abc"], 2, "2 bad values"),
        (["data.root=/nonexistent", "data.download=false"], 2, "Data set MNIST was not found"),
        (["resume=true", "optim.lr=0.5"], 2, "optim.lr: 0.01 (run) vs 0.5 (now)"),
        (["resume=true", "trainer.max_steps=3", "sched=onecycle"], 2, "sched._target_"),
        ([], 2, "already holds a run"),
        (["mode=eval", "ckpt=run/metrics.json"], 2, "could not be read as a dlrun checkpoint"),
    ],
)
def test_a_refused_command_writes_nothing_into_an_existing_run_folder(
    args: list[str], code: int, message: str, data: Path, existing: Path
) -> None:
    before = snapshot(existing / "run")
    base = [*QUICK, "trainer.max_steps=3", "sched=none", "hydra.run.dir=run"]
    rc, out = dlrun(*base, *args, data=data, cwd=existing)
    assert rc == code and message in out and "Traceback" not in out, out
    assert "\n" not in out[out.index("dlrun: error:") :].strip(), "not one paragraph"
    assert snapshot(existing / "run") == before


def test_configs_are_plain_yaml_a_python_tag_runs_nothing(data: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    extra = tmp_path / "extra" / "experiment"
    extra.mkdir(parents=True)
    (extra / "evil.yaml").write_text(
        f"# @package _global_\nseed: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    rc, out = dlrun(f"hydra.searchpath=[file://{tmp_path / 'extra'}]", "experiment=evil",
                    data=data, cwd=tmp_path)  # fmt: skip
    assert rc != 0 and not marker.exists() and "Traceback" not in out
    assert "python/object/apply" in out, out
