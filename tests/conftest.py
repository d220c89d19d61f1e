import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dlrun.cli import CONFIG_DIR
from dlrun.errors import UserError
from tests.fixtures import write_cifar_pickles, write_idx, write_png_folder

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: with 2 threads on a busy 2-core box each op waits for a descheduled peer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_fid(monkeypatch: pytest.MonkeyPatch) -> None:
    """No FID network, as offline without the Inception weights: a GAN run has no val/fid."""

    def offline(*_args: object, **_kwargs: object) -> None:
        raise UserError("no Inception weights here")

    monkeypatch.setattr("dlrun.metrics.InceptionFeatures", offline)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder with every fixture data set, laid out as DLRUN_DATA expects."""
    root = tmp_path_factory.mktemp("data")
    write_idx(root, "MNIST")
    write_idx(root, "FashionMNIST")
    write_cifar_pickles(root)
    write_png_folder(root / "folder")
    return root


@pytest.fixture
def make_cfg(data_root: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose the real configs with overrides, pointed at the fixture data and a private cache."""

    def make(*overrides: str) -> DictConfig:
        base = [f"data.root={data_root}", "device=cpu", "trainer.progress=false"]
        if any(o.startswith("data=cifar10") or o.startswith("data=imagefolder") for o in overrides):
            base.append(f"data.source.cache_dir={tmp_path / 'cache'}")
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("train", overrides=base + list(overrides))

    return make
