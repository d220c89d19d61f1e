"""best.pt (and trainer.save_top_k's files) hold what evaluation reads, last.pt the resume state
(issue 30, item 8): the weights, the weight average, config, task state, step, metrics, but no
optimizer, schedule, scaler, RNG states or mid-epoch progress."""

import shutil
from pathlib import Path

import pytest

from dlrun.cli import run
from dlrun.engine import checkpoint
from dlrun.errors import UserError

RESUME_ONLY = ("optimizer", "scheduler", "scaler", "rng", "rng_ranks", "progress", "hooks")
# One epoch: its one evaluation improves the monitor, so best.pt and last.pt are the same step
# and last.pt is exactly what best.pt was before (a copy of it).
ONE_EPOCH = ("model=lenet", "data.batch_size=50", "trainer.max_epochs=1", "trainer.ema.decay=0.9")


def test_best_pt_is_slim_and_evaluates_as_the_full_checkpoint(make_cfg, tmp_path: Path) -> None:
    run(make_cfg(*ONE_EPOCH), tmp_path / "train")
    folder = tmp_path / "train" / "checkpoints"
    best, last = checkpoint.load(folder / "best.pt"), checkpoint.load(folder / "last.pt")
    assert best["step"] == last["step"]
    assert not set(RESUME_ONLY) & set(best) and set(RESUME_ONLY) <= set(last)
    assert {"model", "ema", "config", "task", "epoch", "step", "metrics", "monitor"} <= set(best)
    assert set(last) - set(best) <= {*RESUME_ONLY, "taken", "skipped", "last_eval_step",
                                     "max_steps", "num_threads"}  # fmt: skip
    assert (folder / "best.pt").stat().st_size < (folder / "last.pt").stat().st_size
    for weights in ("model", "ema"):  # the same test metrics as the full checkpoint (old best.pt)
        scored = []
        for name in ("best.pt", "last.pt"):
            args = ("mode=eval", f"ckpt={folder / name}", f"eval.weights={weights}")
            scored.append(run(make_cfg(*ONE_EPOCH, *args), tmp_path / f"eval_{weights}_{name}"))
        tests = [{k: v for k, v in s.items() if k.startswith("test/")} for s in scored]
        assert tests[0] and tests[0] == tests[1]
    # ckpt=best.pt with mode=train: a new run from its weights.
    tuned = run(make_cfg(*ONE_EPOCH, f"ckpt={folder / 'best.pt'}", "trainer.max_steps=1"),
                tmp_path / "tuned")  # fmt: skip
    assert tuned["step"] == 1
    # best.pt in last.pt's place: resume=true refuses it by name, not with a KeyError.
    shutil.copytree(tmp_path / "train", tmp_path / "copy")
    shutil.copyfile(folder / "best.pt", tmp_path / "copy" / "checkpoints" / "last.pt")
    with pytest.raises(UserError, match="holds weights for evaluation"):
        run(make_cfg(*ONE_EPOCH, "resume=true", "trainer.max_epochs=2"), tmp_path / "copy")


def test_top_k_files_are_slim_too(make_cfg, tmp_path: Path) -> None:
    args = ("model=linear", "data.batch_size=50", "trainer.max_epochs=1",
            "trainer.val_every_n_steps=1", "trainer.monitor=val/loss", "trainer.monitor_mode=min",
            "trainer.save_top_k=2")  # fmt: skip
    run(make_cfg(*args), tmp_path / "train")
    kept = sorted((tmp_path / "train" / "checkpoints" / "top").glob("*.pt"))
    assert len(kept) == 2
    for path in kept:
        state = checkpoint.load(path)
        assert "model" in state and not set(RESUME_ONLY) & set(state)
    scored = run(make_cfg(*args, "mode=eval", f"ckpt='{kept[0]}'"), tmp_path / "eval")
    assert "test/acc" in scored
