"""The evaluation protocol: nothing selects on the test split unless the user asks for it.

Every data set that can hold validation images out of training does so by default, every recipe
that selects (best.pt, early stopping, a sweep's objective) selects on held-out images, and a run
with the defaults reports the test split once, at the end, by its final weights.
"""

import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dlrun.cli import CONFIG_DIR, run
from tests.conftest import stopped_at_step
from tests.test_monitor import LINEAR, scalars, warnings_of

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = Path(CONFIG_DIR)
# Data sets that cannot hold out: style transfer's two images; CycleGAN's unpaired domains, whose
# recipe selects nothing (trainer.monitor: null). Each has its reason in its own config.
NO_HOLDOUT = {"style_images", "horse2zebra", "unpaired_folder"}


def composed(*overrides: str) -> DictConfig:
    """The config as a user gets it (no test-harness defaults)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def holds_out(cfg: DictConfig) -> bool:
    data = cfg.data
    if cfg.trainer._target_.endswith("MetricTrainer"):
        return True  # it holds 10% out itself without data.val_split (tests/test_metric.py)
    return bool(data.get("val_split") or data.get("val_scenes"))


@pytest.mark.parametrize("data", sorted(p.stem for p in (CONFIGS / "data").glob("*.yaml")))
def test_every_data_set_that_can_hold_out_does_by_default(data: str) -> None:
    cfg = composed(f"data={data}")
    if data in NO_HOLDOUT:
        assert "val_split" not in cfg.data and "val_scenes" not in cfg.data
    else:
        assert holds_out(cfg), f"data={data} selects on its test split by default"


@pytest.mark.parametrize(
    "recipe",
    [f"experiment={p.stem}" for p in sorted((CONFIGS / "experiment").glob("*.yaml"))]
    + [f"hparams_search={p.stem}" for p in sorted((CONFIGS / "hparams_search").glob("*.yaml"))]
    + ["model=cyclegan"],
)
def test_every_recipe_that_selects_selects_on_held_out_images(recipe: str) -> None:
    cfg = composed(recipe)
    if cfg.trainer.monitor is None:  # a fixed length: nothing selected, scored on the test split
        assert cfg.trainer.early_stopping.patience is None
        return
    assert holds_out(cfg), f"{recipe} selects on trainer.monitor={cfg.trainer.monitor} on test"


def test_a_run_with_the_defaults_selects_on_held_out_images_and_scores_test_at_the_end(
    make_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = (*LINEAR, "trainer.max_epochs=2", "data.val_split=0.1")  # the configs' default
    assert composed("data=mnist").data.val_split == 0.1
    with caplog.at_level(logging.INFO):
        metrics = run(make_cfg(*keys), tmp_path / "run")
    assert warnings_of(caplog) == []  # no selection on the test split, no warning
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "180 train, 20 val (held-out train split), 100 test images" in log
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    # test/* at the end is the final weights' score on the test split: what mode=eval of
    # last.pt gives, and not the validation score.
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    scored = run(make_cfg(*keys, "mode=eval", f"ckpt={ckpt}"), tmp_path / "eval")
    assert metrics["test/acc"] == scored["test/acc"] and metrics["test/loss"] == scored["test/loss"]
    assert "test split, final weights: test/loss=" in log
    # It is logged once, at the last step, beside the two validations.
    logged = scalars(tmp_path / "run")
    assert [step for step, _ in logged["test/acc"]] == [metrics["step"]]
    assert len(logged["val/acc"]) == 2


@pytest.mark.parametrize(
    ("overrides", "hint"),
    [
        (("data=mnist",), None),
        (("data=mnist", "data.val_split=0"), "data.val_split is 0"),
        (("model=siamese", "data.val_split=0"), None),  # it holds 10% out itself
        (("model=yolo", "data=mnist_det"), None),
        (("model=yolo", "data=mnist_det", "data.val_scenes=0"), "data.val_scenes is 0"),
        (("model=cyclegan", "data=horse2zebra"), "horse2zebra has no validation split"),
    ],
)
def test_a_search_warns_when_its_trials_score_the_test_split(
    overrides: tuple[str, ...], hint: str | None
) -> None:
    from hydra_plugins.dlrun_optuna_sweeper.dlrun_optuna_sweeper import test_split_hint

    said = test_split_hint(composed(*overrides))
    assert (said[0] if said else None) == hint


def test_a_default_run_stopped_mid_epoch_resumes_to_the_uninterrupted_run(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The held-out split is a fixed draw: a resumed run trains on the same images, and its
    end-of-run test/* equals the uninterrupted run's."""
    from dlrun.tasks.classification.trainer import ClassificationTrainer

    keys = (*LINEAR, "trainer.max_epochs=2", "data.val_split=0.1", "sched=cosine",
            "trainer.checkpoint_every_n_steps=2")  # fmt: skip
    whole = run(make_cfg(*keys), tmp_path / "whole")
    # stopped in epoch 2 (4 steps of 50 an epoch) at step 5, after step 4's checkpoint
    stopped_at_step(make_cfg(*keys), tmp_path / "cut", ClassificationTrainer, 5, monkeypatch)
    resumed = run(make_cfg(*keys, "resume=true"), tmp_path / "cut")
    timing = ("time/", "images_per_s")
    same = {k: v for k, v in whole.items() if not any(t in k for t in timing)}
    assert {k: resumed[k] for k in same} == same
    assert "test/acc" in same and "val/acc" in same


def test_a_set_too_small_to_hold_out_names_the_way_out() -> None:
    from dlrun.data.in_memory import held_out
    from dlrun.errors import UserError

    with pytest.raises(UserError, match=r"data.val_split=0.1 leaves no .* out of 5; .* data.val_split=0 to train on every image"):
        held_out(5, 0.1)  # the default on a five-image folder
    val, train = held_out(20, 0.1)
    assert len(val) == 2 and len(train) == 18 and set(val.tolist()).isdisjoint(train.tolist())
