"""Issue 30 (item 5, second half): a `+key=value` that adds a key no part of dlrun reads is refused
with one line (naming the key it resembles), before anything is built or written; the additions
dlrun does read (a config group, `callbacks.*`, `hydra.*`, a target's argument) stay allowed."""

from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from dlrun.config.checks import check_added_keys
from dlrun.errors import UserError
from tests.test_cli import dlrun

GROUPS = ["model", "data", "loss", "optim", "sched", "trainer", "callbacks", "experiment"]


def refusal(cfg: DictConfig, *added: str) -> str | None:
    try:
        check_added_keys(cfg, list(added), GROUPS)
    except UserError as err:
        return str(err)
    return None


@pytest.mark.parametrize(
    ("added", "says"),
    [
        ("+lr=0.1", "no part of dlrun reads lr (+lr=0.1); did you mean optim.lr=0.1?"),
        ("++lr=0.1", "no part of dlrun reads lr (++lr=0.1); did you mean optim.lr=0.1?"),
        (
            "+trainer.foo=1",
            "no part of dlrun reads trainer.foo (+trainer.foo=1: ClassificationTrainer takes no argument foo)",
        ),
        ("+trainer.max_epoch=3", "did you mean trainer.max_epochs=3?"),
        ("+eval.foo=1", "no part of dlrun reads eval.foo"),
        ("+optim.foo=1", "Adam takes no argument foo"),
        ("+sched.foo=1", "onecycle takes no argument foo"),
        ("+model.foo=1", "LeNet5 takes no argument foo"),
    ],
)
def test_an_added_key_nothing_reads_is_refused_with_what_it_resembles(
    make_cfg: Callable[..., DictConfig], added: str, says: str
) -> None:
    message = refusal(make_cfg(added), added)
    assert message is not None and says in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    "overrides",
    [
        ["+callbacks.x._target_=mypkg.Hook"],
        ["+experiment=mnist_fast"],  # a group (a searchpath's own group is added this way)
        ["++seed=3"],  # a declared key: an ordinary override
        ["++trainer.max_epochs=2"],
        ["+optim.amsgrad=true"],  # an argument torch.optim.Adam takes that adam.yaml does not set
        ["+loss.reduction=sum"],  # Objective passes **kwargs on to its loss function: not judged
        ["+hydra.job.env_set.X=1"],
        ["lr=0.1"],  # not an addition (Hydra refuses it itself, with its own suggestion)
    ],
)
def test_additions_dlrun_reads_stay_allowed(
    make_cfg: Callable[..., DictConfig], overrides: list[str]
) -> None:
    # train.yaml lists experiment (null): Hydra composes it as experiment=NAME, not +experiment
    composable = [
        o.replace("+experiment", "experiment")
        for o in overrides
        if not o.startswith(("+hydra.", "lr="))
    ]
    assert refusal(make_cfg(*composable), *overrides) is None


def test_an_added_key_the_config_lacks_is_not_judged(make_cfg: Callable[..., DictConfig]) -> None:
    """HydraConfig may hold another run's overrides (a test calling dlrun.cli.run in-process)."""
    assert refusal(make_cfg(), "+lr=0.1") is None


def test_the_command_refuses_plus_lr_with_one_line_and_exit_2(tmp_path: Path) -> None:
    res = dlrun("+lr=0.1", "trainer.max_epochs=1", data=tmp_path, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr == (
        "dlrun: error: no part of dlrun reads lr (+lr=0.1); did you mean optim.lr=0.1?\n"
    )
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.log"))
