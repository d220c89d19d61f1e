"""The wheel works on its own: configs/ ships inside it as dlrun/configs/ (no top-level `configs`
in site-packages), with dlrun's Hydra plugins and py.typed, under dlrun.__version__; unpacked
outside the checkout, dlrun reads its configs from there. (.ci/run installs it into a fresh
virtual environment and trains from an empty folder.)"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import dlrun
from dlrun.config import compose

REPO = Path(__file__).resolve().parents[1]
BUILD_INPUTS = (
    "pyproject.toml",
    "setup.py",
    "MANIFEST.in",
    "README.md",
    "dlrun",
    "hydra_plugins",
    "configs",
)
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def files_under(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel` of a copy of the build inputs (the checkout gets no build/ folder)."""
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=SKIP)
        elif path.is_file():
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*cmd, str(src), "-w", str(out)], check=True, capture_output=True)
    (whl,) = out.glob("dlrun-*.whl")
    return whl


@pytest.fixture(scope="module")
def names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def test_wheel_ships_every_config_under_dlrun(names: set[str]) -> None:
    assert "dlrun/configs/train.yaml" in names
    shipped = {n.removeprefix("dlrun/configs/") for n in names if n.startswith("dlrun/configs/")}
    assert shipped == files_under(REPO / "configs")


def test_wheel_adds_no_top_level_name_but_dlrun_and_hydra_plugins(names: set[str]) -> None:
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"dlrun", "hydra_plugins"}


def test_wheel_has_py_typed_and_every_plugin_module(names: set[str]) -> None:
    assert "dlrun/py.typed" in names
    plugins = {
        f"hydra_plugins/{f}" for f in files_under(REPO / "hydra_plugins") if f.endswith(".py")
    }
    assert plugins and plugins <= names


def test_wheel_version_is_dlrun_version(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        (metadata,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        lines = zf.read(metadata).decode().splitlines()
    assert f"Version: {dlrun.__version__}" in lines
    assert wheel.name.startswith(f"dlrun-{dlrun.__version__}-")


def test_the_checkout_reads_the_top_level_configs() -> None:
    assert Path(compose.CONFIG_DIR) == REPO / "configs"


def test_an_unpacked_wheel_reads_its_own_configs(wheel: Path, tmp_path: Path) -> None:
    """The wheel's dlrun first on the path, run from an empty folder: CONFIG_DIR is the wheel's,
    and `dlrun --help` composes from it."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    (tmp_path / "cwd").mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = "import dlrun.config.compose as c, dlrun; print(c.CONFIG_DIR); print(dlrun.__file__)"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path / "cwd", env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [
        str(site / "dlrun" / "configs"),
        str(site / "dlrun" / "__init__.py"),
    ]
    run = subprocess.run(
        [sys.executable, "-m", "dlrun", "--help"],
        cwd=tmp_path / "cwd",
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "Usage: dlrun" in run.stdout and "lenet" in run.stdout


def test_an_unpacked_wheel_finds_the_siamese_backbone_zoo(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    code = "from dlrun.models.siamese import ZOO; print(ZOO)"
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()) == site / "dlrun" / "configs" / "model"
