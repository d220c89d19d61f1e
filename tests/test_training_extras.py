"""trainer.ema, eval.weights, trainer.save_top_k, trainer.profile, trainer.deterministic, resume=latest."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dlrun.cli import run
from dlrun.engine import checkpoint
from dlrun.engine.hooks.ema import WeightEMA
from dlrun.errors import UserError
from tests.test_optimize import Killed, stable

# 200 fixture images in batches of 50: 4 steps an epoch; LeNet-BN has BatchNorm buffers to average.
LENET_BN = ("model=lenet", "model.batchnorm=true", "data.batch_size=50", "trainer.max_epochs=2")
EMA = ("trainer.ema.decay=0.9",)
BN = "features.1.running_mean"  # a BatchNorm buffer of LeNet-BN


def test_the_average_follows_the_rule_buffers_included_and_swaps_back_exactly() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    start = {k: v.clone() for k, v in net.state_dict().items()}
    ema = WeightEMA(net, decay=0.9, warmup=False)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net.train()(torch.randn(8, 3))  # moves the running statistics and num_batches_tracked
    after = {k: v.clone() for k, v in net.state_dict().items()}
    ema.update()
    for k, v in ema.state_dict()["weights"].items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.9 * start[k] + 0.1 * after[k]), k
        else:
            assert torch.equal(v, after[k]), k  # num_batches_tracked is copied, not averaged
    with ema.swapped():
        assert torch.equal(net[1].running_mean, ema.shadow["1.running_mean"])
    assert all(torch.equal(net.state_dict()[k], after[k]) for k in after)


def test_warmup_starts_with_a_small_decay() -> None:
    ema = WeightEMA(nn.Linear(2, 2), decay=0.999)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.update()
    assert decays == [pytest.approx(0.1), pytest.approx(2 / 11), pytest.approx(0.25)]
    assert WeightEMA(nn.Linear(2, 2), decay=0.999, warmup=False).current_decay() == 0.999


def test_ema_is_evaluated_beside_the_weights_saved_and_used_by_eval_weights(
    make_cfg, tmp_path: Path
) -> None:
    metrics = run(make_cfg(*LENET_BN, *EMA), tmp_path / "run")
    assert {"val/acc_ema", "val/loss_ema", "val/acc", "val/loss"} <= set(metrics)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["val/acc_ema"] == metrics["val/acc_ema"]
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    # "ema" at the top level (eval.weights=ema, dlrun.load); the hook's own state under "hooks".
    assert set(state["ema"]) == set(state["model"]) and state["hooks"]["ema"]["updates"] == 8
    assert not torch.equal(state["ema"][BN], state["model"][BN])
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    raw = run(make_cfg(*LENET_BN, "mode=eval", f"ckpt={last}"), tmp_path / "eval_raw")
    avg = run(make_cfg(*LENET_BN, "mode=eval", f"ckpt={last}", "eval.weights=ema"), tmp_path / "e")
    # The test split is the validation split here: each evaluation repeats its val/* figure.
    assert raw["test/loss"] == pytest.approx(metrics["val/loss"], rel=1e-5)
    assert avg["test/loss"] == pytest.approx(metrics["val/loss_ema"], rel=1e-5)
    plain = run(make_cfg(*LENET_BN), tmp_path / "plain")
    with pytest.raises(UserError, match="holds no weight average"):
        ckpt = tmp_path / "plain" / "checkpoints" / "last.pt"
        run(make_cfg(*LENET_BN, "mode=eval", f"ckpt={ckpt}", "eval.weights=ema"), tmp_path / "x")
    # The same seed with and without the average: the raw weights train identically.
    assert plain["val/loss"] == metrics["val/loss"]


def test_resume_with_ema_ends_like_an_uninterrupted_run(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = (*LENET_BN, *EMA, "trainer.checkpoint_every_n_steps=1")
    whole = run(make_cfg(*args), tmp_path / "whole")
    save, saved = checkpoint.save, []

    def save_then_die(path: Path, state: dict) -> None:  # killed mid-epoch 2, after step 6
        save(path, state)
        saved.append(state["step"])
        if state["step"] == 6:
            raise Killed

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        run(make_cfg(*args), tmp_path / "split")
    monkeypatch.setattr(checkpoint, "save", save)
    resumed = run(make_cfg(*args, "resume=true"), tmp_path / "split")
    assert stable(resumed) == stable(whole)
    a = checkpoint.load(tmp_path / "whole" / "checkpoints" / "last.pt")["ema"]
    b = checkpoint.load(tmp_path / "split" / "checkpoints" / "last.pt")["ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("trainer.ema.decay=1.5", "trainer.ema.decay must be a number in (0, 1)"),
        ("trainer.save_top_k=0", "trainer.save_top_k must be an integer >= 1 or null"),
        ("trainer.profile=-2", "trainer.profile must be an integer >= 1 or null"),
        ("eval.weights=best", "eval.weights must be one of model|ema"),
        ("resume=maybe", "resume must be true or false or latest"),
    ],
)
def test_bad_values_are_one_paragraph_errors(make_cfg, tmp_path: Path, override: str, words: str):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        run(make_cfg(*LENET_BN, override), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_ema_on_a_task_without_one_network_and_top_k_without_a_monitor_are_refused(
    make_cfg, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match="trainer.monitor, which is null"):
        run(make_cfg(*LENET_BN, "trainer.save_top_k=2", "trainer.monitor=null"), tmp_path / "a")
    gan = ("model=gan", "data=mnist", "trainer.max_steps=2", "+trainer.ema.decay=0.99")
    with pytest.raises(UserError, match="does not have"):
        run(make_cfg(*gan), tmp_path / "b")


def test_save_top_k_keeps_the_k_best_by_the_monitor_and_resume_keeps_managing_them(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # val/loss, lower is better, at each of 8 steps: the kept files are the 3 lowest.
    args = ("model=linear", "data.batch_size=50", "trainer.max_epochs=2",
            "trainer.val_every_n_steps=1", "trainer.monitor=val/loss", "trainer.monitor_mode=min",
            "trainer.save_top_k=3", "trainer.log_every_n_steps=1")  # fmt: skip
    run(make_cfg(*args), tmp_path / "whole")
    folder = tmp_path / "whole" / "checkpoints" / "top"
    state = checkpoint.load(tmp_path / "whole" / "checkpoints" / "last.pt")
    kept = state["hooks"]["top_k"]["kept"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(e["file"] for e in kept)
    assert len(kept) == 3 and [e["score"] for e in kept] == sorted(e["score"] for e in kept)
    for entry in kept:  # each file is the checkpoint of the step it names, with its score
        saved = checkpoint.load(folder / entry["file"])
        assert saved["step"] == entry["step"]
        assert saved["metrics"]["val/loss"] == pytest.approx(entry["score"])
    best = checkpoint.load(tmp_path / "whole" / "checkpoints" / "best.pt")
    assert best["step"] == kept[0]["step"]
    save = checkpoint.save

    def save_then_die(path: Path, state: dict) -> None:
        save(path, state)
        if state["step"] == 5:
            raise Killed

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        run(make_cfg(*args), tmp_path / "split")
    monkeypatch.setattr(checkpoint, "save", save)
    run(make_cfg(*args, "resume=true"), tmp_path / "split")
    names = sorted(p.name for p in (tmp_path / "split" / "checkpoints" / "top").iterdir())
    assert names == sorted(p.name for p in folder.iterdir())


def test_profile_writes_a_trace_and_the_top_operators(make_cfg, tmp_path: Path) -> None:
    metrics = run(make_cfg(*LENET_BN, "trainer.profile=2"), tmp_path / "run")
    trace = json.loads((tmp_path / "run" / "profile" / "trace.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("conv" in n for n in names) and any("ProfilerStep#3" in n for n in names)
    table = (tmp_path / "run" / "profile" / "top_ops.txt").read_text()
    assert "Self CPU" in table and "aten::" in table
    assert metrics["step"] == 8  # the run itself goes on to its end


def test_deterministic_turns_on_deterministic_algorithms(make_cfg, tmp_path: Path) -> None:
    try:
        run(make_cfg(*LENET_BN, "trainer.max_epochs=1", "trainer.deterministic=true"), tmp_path)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def dlrun(*args: str, cwd: Path, data: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DLRUN_DATA=str(data), CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, "-m", "dlrun", "device=cpu", "trainer.progress=false", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def test_resume_latest_continues_the_newest_run_of_the_same_model_and_data(
    data_root: Path, tmp_path: Path, make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    quick = ("model=linear", "data.batch_size=100", "trainer.max_epochs=1", "sched=none")
    assert dlrun(*quick, cwd=tmp_path, data=data_root).returncode == 0
    (linear,) = (tmp_path / "outputs").glob("*/*_linear_mnist")
    # A newer run of another model (its folder copied, its recorded choice changed): passed over.
    other = linear.with_name(linear.name.replace("linear", "mlp"))
    shutil.copytree(linear, other)
    hydra_yaml = other / ".hydra" / "hydra.yaml"
    hydra_yaml.write_text(hydra_yaml.read_text().replace("model: linear", "model: mlp"))
    os.utime(other / "checkpoints" / "last.pt")
    done = dlrun(*quick, "trainer.max_epochs=2", "resume=latest", cwd=tmp_path, data=data_root)
    assert done.returncode == 0, done.stderr
    assert f"resume=latest: continuing {linear.resolve()}" in done.stdout + done.stderr
    assert json.loads((linear / "metrics.json").read_text())["epoch"] == 2
    assert len(list((tmp_path / "outputs").glob("*/*"))) == 2  # no new folder left behind
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="resume=latest found no run of model=lenet data=mnist"):
        run(make_cfg("resume=latest"), tmp_path / "new", {"model": "lenet", "data": "mnist"})


def test_a_run_saved_before_these_keys_resumes_while_they_stay_off(make_cfg, tmp_path: Path):
    args = ("model=linear", "data.batch_size=100", "sched=none", "trainer.max_epochs=1")
    run(make_cfg(*args), tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    state = checkpoint.load(last)
    for key in ("ema", "save_top_k", "profile", "deterministic"):  # as an older dlrun saved it
        del state["config"]["trainer"][key]
    for key in ("mixup", "cutmix", "mix_switch_prob", "randaugment", "trivialaugment"):
        del state["config"]["data"][key]
    del state["config"]["eval"]["weights"], state["config"]["export"]
    checkpoint.save(last, state)
    with pytest.raises(UserError, match="data.mixup"):
        run(make_cfg(*args, "trainer.max_epochs=2", "resume=true", "data.mixup=0.2"), tmp_path)
    assert run(make_cfg(*args, "trainer.max_epochs=2", "resume=true"), tmp_path)["epoch"] == 2
