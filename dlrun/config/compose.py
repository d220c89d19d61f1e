"""The configs composed without running anything: for `dlrun --help` and for the 'did you mean'
of a mistyped key. Light on purpose (Hydra and OmegaConf only, never torch): help must be fast."""

from pathlib import Path

from hydra import compose, initialize_config_dir
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
