"""The configs composed without running anything: for `dlrun --help` and for the 'did you mean'
of a mistyped key. Light on purpose (Hydra and OmegaConf only, never torch): help must be fast."""

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig


def _config_dir() -> Path:
    """dlrun's configs: an installed wheel's dlrun/configs/ (setup.py copies them there), else the
    checkout's configs/ beside the package (an editable install; DESIGN section 2)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "configs"
    return (
        installed if (installed / f"{CONFIG_NAME}.yaml").is_file() else package.parent / "configs"
    )


CONFIG_NAME = "train"
CONFIG_DIR = str(_config_dir())


def composed(overrides: list[str]) -> tuple[DictConfig, dict[str, list[str]]]:
    """The config `dlrun <overrides>` would run (with its `hydra` node), and every app config
    group with its options (the hydra/* groups left out, as Hydra's own help does)."""
    GlobalHydra.instance().clear()  # after a failed @hydra.main Hydra is still initialised
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(CONFIG_NAME, overrides, return_hydra_config=True)
        loader = GlobalHydra.instance().config_loader()
        groups = {
            group: sorted(loader.get_group_options(group))
            for group in sorted(loader.list_groups(""))
            if group != "hydra"
        }
    return cfg, groups


def override_key(override: str) -> str:
    """The dotted key (or config group) of a command-line override: `+a.b=1`, `~a.b` -> `a.b`."""
    return override.lstrip("+~").split("=", 1)[0].split("@", 1)[0]


class CommandLine(NamedTuple):
    """A `dlrun` command line as Hydra's parser reads it, before Hydra runs."""

    parsed: argparse.Namespace  # Hydra's flags (-m, --help, ...)
    overrides: list[str]
    given: dict[str, str]  # each override's key -> its value as written


def command_line(args: Sequence[str]) -> CommandLine | None:
    """`args` read by Hydra's own parser; None where it refuses them (Hydra then reports it).
    What the rewrites before Hydra (resume, a mode's checkpoint and folder) start from."""
    try:
        parsed = get_args_parser().parse_args(list(args))
    except SystemExit:
        return None
    overrides = list(parsed.overrides or [])
    given = {override_key(o): o.partition("=")[2] for o in overrides}
    return CommandLine(parsed, overrides, given)
