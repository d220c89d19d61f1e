import importlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dlrun.cli import CONFIG_DIR
from dlrun.errors import UserError
from tests.fixtures import write_cifar_pickles, write_idx, write_png_folder

os.environ.setdefault("TQDM_DISABLE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N` (the README's command): N workers share the cores, so each keeps to one
    # thread, and so do the dlrun processes it starts (DLRUN_NUM_THREADS, read by trainer.num_threads
    # =null). Two workers of two threads on two cores would each wait for a descheduled peer.
    # Tests of the thread count itself set their own.
    torch.set_num_threads(1)
    os.environ["DLRUN_NUM_THREADS"] = "1"


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: with 2 threads on a busy 2-core box each op waits for a descheduled peer.

    DLRUN_NUM_THREADS too: each run sets its own count (trainer.num_threads=null: dlrun.launch.threads).
    """
    threads, share = torch.get_num_threads(), os.environ.get("DLRUN_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["DLRUN_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if share is None:
        os.environ.pop("DLRUN_NUM_THREADS", None)
    else:
        os.environ["DLRUN_NUM_THREADS"] = share


@pytest.fixture
def no_fid(monkeypatch: pytest.MonkeyPatch) -> None:
    """No FID network, as offline without either Inception's weights: a GAN run has no val/fid."""

    def offline(*_args: object, **_kwargs: object) -> None:
        raise UserError("no Inception weights here")

    monkeypatch.setattr("dlrun.scoring.sample_quality.InceptionFeatures", offline)
    monkeypatch.setattr("dlrun.scoring.sample_quality.TFInceptionFeatures", offline)


def need_extra(module: str, extra: str) -> ModuleType:
    """Import an optional extra's module: skip without it, but fail under CI (which installs it)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        why = f"{module} is not installed (pip install -e '.[{extra}]'): {err}"
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(f"CI installs every extra, yet {why}")
        pytest.skip(why)


@pytest.fixture(scope="session")
def torch_fidelity() -> ModuleType:
    """torch-fidelity's TF-Inception module (the fid extra): skipped without it, failed in CI."""
    return need_extra("torch_fidelity.feature_extractor_inceptionv3", "fid")


@pytest.fixture(scope="session")
def tf_inception_weights(
    torch_fidelity: ModuleType, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """torch-fidelity's TF-Inception network with random weights, saved as its real weights are.

    Conv weights scaled by sqrt(6) (ReLU + PyTorch's default init would shrink the activations
    about 6-fold a layer), so the features are O(1) rather than 1e-8.
    """
    tf = torch_fidelity
    # Built without loading (or downloading) any weights; the global RNG left as it was.
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng():
        mp.setattr(tf, "load_state_dict_from_url", lambda *_args, **_kwargs: {})
        mp.setattr(tf.FeatureExtractorInceptionV3, "load_state_dict", lambda *_a, **_k: None)
        torch.manual_seed(0)
        net = tf.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.mul_(6**0.5)
    path = tmp_path_factory.mktemp("tf_inception") / Path(tf.URL_INCEPTION_V3).name
    torch.save(net.state_dict(), path)
    return path


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
            return train_on_all(compose("train", overrides=base + list(overrides)), overrides)

    return make


def train_on_all(cfg: DictConfig, overrides: Sequence[str] = ()) -> DictConfig:
    """The fake data sets are tiny (100-200 training images) and most tests pin their sizes,
    steps and val == test scores: they train on every image (data.val_split=0), unless the test
    or its experiment chooses a split. tests/test_holdout.py runs the default, 0.1."""
    default = DATA_VAL_SPLIT_DEFAULT
    chosen = any("data.val_split" in o for o in overrides)
    if not chosen and cfg.get("data") is not None and cfg.data.get("val_split") == default:
        cfg.data.val_split = 0
    return cfg


DATA_VAL_SPLIT_DEFAULT = 0.1  # configs/data/{mnist,cifar10,...}.yaml


def stopped_at_step(
    cfg: DictConfig, folder: Path, trainer: type, at_step: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run `cfg` in `folder` and stop it as `trainer.step` is entered at step `at_step` (after
    the checkpoints written so far), as a crash there would; `resume=true` then continues it."""
    from dlrun.cli import run

    step = trainer.step

    def dies(self, batch):  # noqa: ANN001, ANN202
        if self.step_count == at_step:
            raise KeyError("stopped")
        return step(self, batch)

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "step", dies)
        with pytest.raises(KeyError, match="stopped"):
            run(cfg, folder)


@pytest.fixture(scope="session")
def opencv_contrib() -> ModuleType:
    """OpenCV with its contrib module (selective search: model=rcnn, fast_rcnn)."""
    cv2 = need_extra("cv2", "proposals")
    if not hasattr(cv2, "ximgproc"):
        need_extra("cv2.ximgproc", "proposals")
    return cv2
