"""Hooks (dlrun/engine/hooks/): a user's own from the `callbacks` config group, stateful across a
resume; the example of docs/hooks.md as written; checkpoints written before hooks still resume."""

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dlrun.cli import run
from dlrun.engine import checkpoint
from dlrun.errors import UserError
from dlrun.tasks.classification.trainer import ClassificationTrainer
from tests.conftest import stopped_at_step

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread each (conftest)
DOCS = Path(__file__).parents[1] / "docs" / "hooks.md"
TIMING = ("time/", "images_per_s")
# The linear classifier, plain SGD: 200 fixture images, 50 a batch, 4 steps an epoch.
LINEAR = ("model=linear", "optim=sgd", "optim.momentum=0", "optim.weight_decay=0", "sched=none",
          "data.batch_size=50")  # fmt: skip

# A stateful hook: every method it may use counts, and its state holds a tensor of the weights.
TALLY = """
import json

import torch

from dlrun.engine.hooks import Hook


class Tally(Hook):
    def __init__(self, scale: float) -> None:
        self.scale, self.before, self.after, self.evals = scale, 0, 0, []
        self.weights = torch.zeros(())

    def before_step(self, trainer):
        self.before += 1

    def after_step(self, trainer):
        self.after += 1
        self.weights += sum(p.detach().abs().sum() for p in trainer.model.parameters())

    def after_evaluation(self, trainer, prefix, metrics):
        self.evals.append([trainer.step_count, metrics["val/loss"]])
        return {"val/tally": self.scale * self.after + len(self.evals)}

    def on_fit_end(self, trainer):
        (trainer.run_dir / "tally.json").write_text(json.dumps(self.state_dict() | {
            "weights": float(self.weights)}))

    def state_dict(self):
        return {"before": self.before, "after": self.after, "evals": self.evals,
                "weights": self.weights.clone()}

    def load_state_dict(self, state):
        self.before, self.after = state.get("before", 0), state.get("after", 0)
        self.evals = [list(e) for e in state.get("evals", [])]
        self.weights = state.get("weights", torch.zeros(())).clone()
"""


@pytest.fixture
def user_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder of the user's own: its modules importable (as PYTHONPATH=. would make them), and
    forgotten afterwards (each test writes its own)."""
    folder = tmp_path / "user"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:
        if getattr(sys.modules[name], "__file__", "") and str(folder) in sys.modules[name].__file__:
            del sys.modules[name]


def stable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}


def same(a: Any, b: Any) -> bool:
    """Equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_a_stateful_callback_resumes_bit_for_bit(
    make_cfg, user_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (user_folder / "tally_hooks.py").write_text(TALLY)
    (user_folder / "configs" / "callbacks").mkdir(parents=True)
    (user_folder / "configs" / "callbacks" / "tally.yaml").write_text(
        "tally:\n  _target_: tally_hooks.Tally\n  scale: 1000.0\n"
    )
    args = (*LINEAR, "trainer.max_epochs=2", "trainer.val_every_n_steps=3",
            "trainer.checkpoint_every_n_steps=1", "callbacks=tally",
            f"hydra.searchpath=[file://{user_folder / 'configs'}]")  # fmt: skip
    whole = run(make_cfg(*args), tmp_path / "whole")
    # Evaluated at steps 3, 4 (epoch end), 6 and 8; stopped in epoch 2 after step 6's checkpoint.
    stopped_at_step(make_cfg(*args), tmp_path / "split", ClassificationTrainer, 6, monkeypatch)
    saved = checkpoint.load(tmp_path / "split" / "checkpoints" / "last.pt")
    assert saved["step"] == 6 and saved["hooks"]["tally"]["after"] == 6
    resumed = run(make_cfg(*args, "resume=true"), tmp_path / "split")

    assert stable(resumed) == stable(whole) and whole["val/tally"] == 8 * 1000.0 + 4
    a = checkpoint.load(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "split" / "checkpoints" / "last.pt")
    assert same(a["model"], b["model"]) and same(a["hooks"], b["hooks"])
    tally = json.loads((tmp_path / "whole" / "tally.json").read_text())
    assert tally == json.loads((tmp_path / "split" / "tally.json").read_text())  # on_fit_end
    assert tally["before"] == tally["after"] == 8
    assert [step for step, _ in tally["evals"]] == [3, 4, 6, 8]
    on_disk = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert stable(on_disk) == stable(json.loads((tmp_path / "whole" / "metrics.json").read_text()))


def blocks(markdown: str) -> dict[str, str]:
    """The fenced python and yaml blocks of a markdown text, by the file their first line names."""
    found = re.findall(r"```(?:python|yaml)\n# (\S+)\n(.*?)```", markdown, flags=re.DOTALL)
    return {name: body for name, body in found}


def test_the_example_of_docs_hooks_md_runs_as_written(
    make_cfg, user_folder: Path, tmp_path: Path
) -> None:
    files = blocks(DOCS.read_text(encoding="utf-8"))
    assert set(files) == {"my_hooks.py", "my_configs/callbacks/best.yaml"}
    for name, body in files.items():
        (user_folder / name).parent.mkdir(parents=True, exist_ok=True)
        (user_folder / name).write_text(body)
    shown = re.search(r"dlrun (hydra\.searchpath=\S+) (callbacks=\S+)\n", DOCS.read_text())
    assert shown and shown.groups() == ("hydra.searchpath=[file://$PWD/my_configs]", "callbacks=best")
    searchpath = shown.group(1).replace("$PWD", str(user_folder))
    args = (*LINEAR, "trainer.max_epochs=2", "trainer.val_every_n_steps=2", searchpath,
            shown.group(2))  # fmt: skip
    metrics = run(make_cfg(*args), tmp_path / "run")
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert metrics["val/acc_best"] == state["hooks"]["best_acc"]["best"] >= metrics["val/acc"]
    # Without a file: the key given on the command line.
    plus = run(make_cfg(*args[:-1], "+callbacks.best_acc._target_=my_hooks.BestSoFar"),
               tmp_path / "plus")  # fmt: skip
    assert stable(plus) == stable(metrics)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("+callbacks.top_k._target_=my_hooks.BestSoFar", "'top_k' is a built-in hook's name"),
        ("+callbacks.odd._target_=collections.OrderedDict", "not a dlrun hook: subclass"),
        ("+callbacks.odd._target_=no_such_module.Hook", "The callbacks.odd config could not"),
    ],
)
def test_a_callback_that_is_no_hook_is_a_user_error(
    make_cfg, tmp_path: Path, override: str, words: str
) -> None:
    with pytest.raises(UserError, match=re.escape(words)):
        run(make_cfg(*LINEAR, "trainer.max_steps=1", override), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def as_before_hooks(path: Path) -> None:
    """Rewrite a checkpoint in the layout of the code before hooks: no "hooks"; the average's
    count and the top k at the top level; the patience count in the monitor's state."""
    state = checkpoint.load(path)
    hooks = state.pop("hooks")
    state["ema_updates"] = hooks["ema"]["updates"]
    state["top_k"] = {k: hooks["top_k"][k] for k in ("kept", "last_step")}
    state["monitor"]["bad_evals"] = hooks["early_stopping"]["bad_evals"]
    checkpoint.save(path, state)


def test_a_checkpoint_written_before_hooks_resumes_them(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # val/loss falls as the run trains, so monitored with mode=max it stops improving after the
    # first evaluation: patience 4 stops the run at step 10 of 12, counting across the resume.
    args = (*LINEAR, "trainer.max_epochs=3", "trainer.val_every_n_steps=2",
            "trainer.checkpoint_every_n_steps=1", "trainer.monitor=val/loss",
            "trainer.monitor_mode=max", "trainer.early_stopping.patience=4",
            "trainer.ema.decay=0.9", "trainer.save_top_k=2")  # fmt: skip
    whole = run(make_cfg(*args), tmp_path / "whole")
    assert whole["step"] == 10
    stopped_at_step(make_cfg(*args), tmp_path / "split", ClassificationTrainer, 7, monkeypatch)
    last = tmp_path / "split" / "checkpoints" / "last.pt"
    assert checkpoint.load(last)["hooks"]["early_stopping"]["bad_evals"] == 2
    as_before_hooks(last)
    resumed = run(make_cfg(*args, "resume=true"), tmp_path / "split")
    assert stable(resumed) == stable(whole)
    a = checkpoint.load(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = checkpoint.load(last)
    assert same(a["ema"], b["ema"]) and same(a["hooks"], b["hooks"]) and "top_k" not in b
    top = [sorted(p.name for p in (tmp_path / run_ / "checkpoints" / "top").iterdir())
           for run_ in ("whole", "split")]  # fmt: skip
    assert top[0] == top[1] and len(top[0]) == 2


def test_no_hook_is_built_for_a_setting_that_is_off(make_cfg, tmp_path: Path) -> None:
    from dlrun.cli import build_trainer

    trainer = build_trainer(make_cfg(*LINEAR, "trainer.max_steps=1"), tmp_path)
    assert trainer.hooks == []  # the loop's per-step hook calls are skipped (`hooked`)


@pytest.mark.slow
def test_a_stateful_callback_of_a_killed_dlrun_process_resumes_bit_for_bit(
    data_root: Path, tmp_path: Path
) -> None:
    """The same hook through the real command: the process kills itself (SIGKILL) in the middle
    of its fourth checkpoint write (tests/killer.py), `dlrun resume=true` continues it, and the
    weights, the metrics and the hook's own state end as the uninterrupted process's did."""
    user = tmp_path / "user"
    (user / "configs" / "callbacks").mkdir(parents=True)
    (user / "tally_hooks.py").write_text(TALLY)
    (user / "configs" / "callbacks" / "tally.yaml").write_text(
        "tally:\n  _target_: tally_hooks.Tally\n  scale: 1000.0\n"
    )
    args = (*LINEAR, "trainer.max_epochs=2", "trainer.val_every_n_steps=3",
            "trainer.checkpoint_every_n_steps=1", "callbacks=tally", "trainer.num_threads=1",
            f"hydra.searchpath=[file://{user / 'configs'}]")  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(user), DLRUN_DATA=str(data_root), HYDRA_FULL_ERROR="0")

    def command(*argv: str, kill_at_save: int = 0) -> subprocess.CompletedProcess:
        head = [str(Path(__file__).with_name("killer.py"))] if kill_at_save else ["-m", "dlrun"]
        return subprocess.run(
            [sys.executable, *head, *argv], cwd=tmp_path, capture_output=True, text=True,
            env=env | {"DLRUN_KILL_AT_SAVE": str(kill_at_save)}, timeout=300,
        )  # fmt: skip

    done = command(*args, "data.val_split=0", f"hydra.run.dir={tmp_path / 'whole'}")
    assert done.returncode == 0, done.stderr
    killed = command(*args, "data.val_split=0", f"hydra.run.dir={tmp_path / 'split'}", kill_at_save=4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # killed in the middle of a write
    saved = checkpoint.load(tmp_path / "split" / "checkpoints" / "last.pt")
    assert saved["step"] == 3 and saved["hooks"]["tally"]["after"] == 3  # the last whole write
    resumed = command("resume=true", f"hydra.run.dir={tmp_path / 'split'}")
    assert resumed.returncode == 0, resumed.stderr
    a = checkpoint.load(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "split" / "checkpoints" / "last.pt")
    assert same(a["model"], b["model"]) and same(a["hooks"], b["hooks"])
    whole, split = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("whole", "split"))
    assert stable(whole) == stable(split) and whole["val/tally"] == 8 * 1000.0 + 4
    tally = [(tmp_path / r / "tally.json").read_text() for r in ("whole", "split")]
    assert tally[0] == tally[1]  # what on_fit_end wrote from the hook's state
