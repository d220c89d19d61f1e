"""The first ten minutes (issue 17): `dlrun` on a machine without the data and without a network.

The failed download names its real reason ("no network" when no host name resolves), a copy
command whose source is not its target, no tip to set what is already set, and leaves no folder
behind; the run folder is named only once it exists.
"""

import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dlrun.cli import run
from dlrun.data.download import failure_reason, new_folders_removed_on_failure
from dlrun.errors import UserError
from dlrun.launch import rundir

# Each data set that downloads, its overrides, and the hosts a failed download names.
CASES = {
    "mnist": (["data=mnist"], "ossci-datasets.s3.amazonaws.com or yann.lecun.com"),
    "fashion_mnist": (["data=fashion_mnist"], "fashion-mnist.s3-website"),
    "mnist_seg": (["model=unet", "data=mnist_seg"], "ossci-datasets.s3.amazonaws.com"),
    "cifar10": (["data=cifar10"], "www.cs.toronto.edu"),
    "horse2zebra": (["model=cyclegan", "data=horse2zebra"], "efrosgans.eecs.berkeley.edu"),
}
NO_DNS = (  # the same, in the subprocess
    "def f(*a, **k):\n"
    "    raise socket.gaierror(socket.EAI_AGAIN, 'Temporary failure in name resolution')\n"
)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: every host name fails to resolve, as on a machine without one."""

    def no_dns(*_args: object, **_kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)


def refused(make_cfg: Callable, tmp_path: Path, case: str, *overrides: str) -> str:
    """The message of a run of `case` refused for its data (and its run folder never made)."""
    cfg = make_cfg(*CASES[case][0], "device=cpu", *overrides)
    with pytest.raises(UserError) as err:
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    msg = str(err.value)
    assert "\n" not in msg and "was not found" in msg, msg
    return msg


def copy_command(msg: str) -> tuple[str, str]:
    """The source and target of the message's scp command."""
    found = re.search(r"scp (?:-r )?(\S+) (\S+)", msg)
    assert found, msg
    return found[1], found[2]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("case", CASES)
def test_offline_the_reason_is_no_network_and_no_folder_is_left(
    make_cfg: Callable, tmp_path: Path, offline: None, case: str
) -> None:
    root = tmp_path / "absent" / "data"
    msg = refused(make_cfg, tmp_path, case, f"data.root={root}", "data.download=true")
    assert f"The download failed: no network (cannot resolve {CASES[case][1]}" in msg, msg
    source, target = copy_command(msg)
    assert source.startswith("<that-machine>:") and source != target
    assert str(root) in msg  # where to put it: this run's data.root
    assert "set data.download=true" not in msg  # it is set, and it failed
    assert not (tmp_path / "absent").exists()  # neither data.root nor a folder above it


@pytest.mark.parametrize("case", ["mnist", "cifar10", "horse2zebra"])
def test_offline_a_failed_download_keeps_what_was_there_and_adds_nothing(
    make_cfg: Callable, tmp_path: Path, offline: None, case: str
) -> None:
    root = tmp_path / "data"
    (root / "mine").mkdir(parents=True)  # the user's, empty: kept as it is
    (root / "MNIST").mkdir()
    (root / "notes.txt").write_text("mine")
    before = tree(root)
    msg = refused(make_cfg, tmp_path, case, f"data.root={root}", "data.download=true")
    assert "no network" in msg
    assert tree(root) == before


@pytest.mark.parametrize("case", ["mnist", "cifar10", "horse2zebra"])
def test_without_download_the_tip_is_to_turn_it_on(
    make_cfg: Callable, tmp_path: Path, case: str
) -> None:
    root = tmp_path / "absent"
    msg = refused(make_cfg, tmp_path, case, f"data.root={root}", "data.download=false")
    assert "The download failed" not in msg
    assert "if this machine has a network, set data.download=true" in msg, msg
    if case != "horse2zebra":  # its folders can be put there by hand: no copy needed
        source, target = copy_command(msg)
        assert source.startswith("<that-machine>:") and source != target
    assert not root.exists()


@pytest.mark.parametrize("case", ["mnist", "cifar10", "horse2zebra"])
def test_a_refused_connection_is_named_with_its_url(
    make_cfg: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    with socket.socket() as s:  # a local port nobody listens on: every connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *_a, **_k: here)
    root = tmp_path / "absent"
    msg = refused(make_cfg, tmp_path, case, f"data.root={root}", "data.download=true")
    why = msg.split("The download failed: ", 1)[1].split(". To fix it", 1)[0]
    assert re.fullmatch(r"\[Errno \d+\] Connection refused \(https?://\S+\)", why), msg
    assert not root.exists()


def test_the_reason_is_never_empty() -> None:
    url = "https://example.org/data.tgz"
    assert failure_reason([(url, RuntimeError(""))]) == f"RuntimeError ({url})"
    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except OSError as err:
            raise RuntimeError("Error downloading data.tgz:\n") from err
    except RuntimeError as err:
        wrapped = err
    assert failure_reason([(url, wrapped)]) == f"[Errno 104] Connection reset by peer ({url})"
    no_dns = OSError("<urlopen error>")
    no_dns.__cause__ = socket.gaierror(-2, "Name or service not known")
    other = ("http://mirror.example.net/d.tgz", no_dns)
    assert failure_reason([(url, no_dns), other]) == (
        "no network (cannot resolve example.org or mirror.example.net)"
    )


def test_a_new_folder_holding_a_file_is_kept(tmp_path: Path) -> None:
    with pytest.raises(OSError), new_folders_removed_on_failure(tmp_path / "a" / "b" / "c"):
        (tmp_path / "a" / "b" / "c").mkdir(parents=True)
        (tmp_path / "a" / "b" / "part.gz").write_bytes(b"partial")  # never deleted
        raise OSError("the connection dropped")
    assert tree(tmp_path) == ["a", "a/b", "a/b/part.gz"]


def test_the_run_folder_is_named_once_it_is_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="dlrun"):
        rundir.commit(run_dir, OmegaConf.create({}), None)
    assert run_dir.is_dir()
    assert caplog.messages == [
        f"run folder: {run_dir.resolve()}",
        f"TensorBoard: tensorboard --logdir {run_dir.resolve()}",
    ]


def test_the_first_command_offline_names_no_folder_and_writes_none(tmp_path: Path) -> None:
    """README's first command, `dlrun`, in an empty folder, without data and without a network."""
    script = (
        f"import runpy, socket, sys\n{NO_DNS}socket.getaddrinfo = f\n"
        "sys.argv = ['dlrun']\nrunpy.run_module('dlrun', run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DLRUN_DATA"}  # data.root: ./data
    env |= {"DLRUN_CACHE": str(tmp_path / "cache"), "HYDRA_FULL_ERROR": "0"}
    res = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "Data set MNIST was not found (looked in data/MNIST/raw)" in out
    assert "The download failed: no network (cannot resolve" in out
    assert "run folder:" not in out and "TensorBoard:" not in out and "Traceback" not in out
    assert tree(tmp_path) == [], out  # no outputs/, no data/MNIST/raw


def test_the_plugin_scan_needs_no_optional_extra() -> None:
    """Hydra imports every hydra_plugins module whose name has no leading `_` on every run: ours
    must import none of the `[sweep]` extra's packages (nor torch), or a plain install prints
    "Error importing ..." warnings at each run."""
    import pkgutil

    import hydra_plugins

    ours = [
        name
        for _, name, _ in pkgutil.walk_packages(hydra_plugins.__path__, "hydra_plugins.")
        if name.split(".")[1].startswith("dlrun_") and not name.rsplit(".", 1)[-1].startswith("_")
    ]
    assert len(ours) >= 3  # the three packages, at least
    extras = ["optuna", "submitit", "hydra_plugins.hydra_submitit_launcher",
              "hydra_plugins.hydra_optuna_sweeper", "hydra_plugins.hydra_joblib_launcher", "torch"]  # fmt: skip
    code = (
        "import importlib, sys\n"
        f"for m in {ours!r}: importlib.import_module(m)\n"
        f"print([m for m in {extras!r} if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", (ours, done.stdout)
