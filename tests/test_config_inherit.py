"""Configs that inherit (the redesign's item 6): every task's trainer config extends one base,
configs/trainer/base/common.yaml, and EfficientNet-B1..B7 extend B0, each file stating only what
differs. configs/keys.md is the one description of a key (`dlrun --help` prints it): the shared
files describe no key in a comment, so no second text can drift from it."""

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from dlrun.config.compose import CONFIG_DIR, composed
from dlrun.config.helptext import describe, descriptions

TRAINERS = Path(CONFIG_DIR) / "trainer"
BASE = TRAINERS / "base" / "common.yaml"
MODELS = Path(CONFIG_DIR) / "model"
TASKS = sorted(p.stem for p in TRAINERS.glob("*.yaml"))


def flat(node: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_the_base_is_no_trainer_option() -> None:
    _, groups = composed([])
    assert groups["trainer"] == TASKS == [
        "classification", "cyclegan", "detection", "distill", "gan", "knn", "localization", "metric",
        "segmentation", "style",
    ]  # fmt: skip
    assert "base" not in groups


@pytest.mark.parametrize("task", TASKS)
def test_every_task_extends_the_base_and_keeps_its_keys(task: str) -> None:
    own = yaml.safe_load((TRAINERS / f"{task}.yaml").read_text(encoding="utf-8"))
    assert own["defaults"] == ["base/common@_here_", "_self_"]
    base = flat(yaml.safe_load(BASE.read_text(encoding="utf-8")))
    restated = [k for k, v in flat({k: v for k, v in own.items() if k != "defaults"}).items()
                if k in base and base[k] == v]  # fmt: skip
    assert not restated, f"{task}.yaml repeats the base's values: {restated}"
    cfg, _ = composed([f"trainer={task}"])
    trainer = flat(OmegaConf.to_container(cfg.trainer, resolve=False))  # type: ignore[arg-type]
    assert set(base) <= set(trainer), f"trainer={task} lacks {set(base) - set(trainer)}"


def test_efficientnets_extend_b0_with_only_what_differs() -> None:
    for phi in range(1, 8):
        own = yaml.safe_load((MODELS / f"efficientnet_b{phi}.yaml").read_text(encoding="utf-8"))
        assert own.pop("defaults") == ["efficientnet_b0", "_self_"]
        assert own == {"phi": phi} | ({"bn_momentum": 0.1} if phi >= 5 else {})
        cfg, _ = composed([f"model=efficientnet_b{phi}"])
        choices = cfg.hydra.runtime.choices
        assert cfg.model.phi == phi and choices.model == f"efficientnet_b{phi}"
        assert (choices.optim, choices.sched) == ("rmsprop_efficientnet", "cosine")


def test_keys_md_is_the_one_description_of_the_shared_keys() -> None:
    known = descriptions()
    lines = BASE.read_text(encoding="utf-8").splitlines()
    described = [line for line in lines if not line.startswith("#") and "#" in line]
    assert not described, f"describe these keys in configs/keys.md only: {described}"
    base = flat(yaml.safe_load(BASE.read_text(encoding="utf-8")))
    missing = [k for k in base if not describe(f"trainer.{k}", known)]
    assert not missing, f"add a line to configs/keys.md for trainer.{missing}"
