"""mode=export: ONNX, TorchScript and safetensors files that compute what the PyTorch model does."""

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

import dlrun
from dlrun.cli import CONFIG_DIR, build_trainer, run
from dlrun.errors import UserError
from dlrun.models import instantiate_model, model_kwargs
from tests.conftest import need_extra

# batchnorm: the exported graph must use the running statistics (eval mode), not the batch's.
TINY = ("model=lenet", "data=mnist", "model.activation=relu", "model.batchnorm=true")


@pytest.fixture(autouse=True)
def _threads(one_thread: None) -> None:
    """Tiny nets: one thread each (see conftest)."""


@pytest.fixture(scope="module")
def cfg_of(data_root: Path) -> Callable[..., DictConfig]:
    def make(*overrides: str) -> DictConfig:
        base = [f"data.root={data_root}", "device=cpu", "trainer.progress=false", *TINY]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("train", overrides=base + list(overrides))

    return make


@pytest.fixture(scope="module")
def ckpt(cfg_of: Callable[..., DictConfig], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("train")
    run(cfg_of("trainer.max_steps=5", "data.batch_size=16", "data.eval_subset=20"), run_dir)
    return run_dir / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def batch(cfg_of: Callable[..., DictConfig], tmp_path_factory: pytest.TempPathFactory):
    """Normalised test images: what the exported files are fed."""
    trainer = build_trainer(cfg_of(), tmp_path_factory.mktemp("unused"))
    return trainer.data.example_batch(16, "test")["image"]


def _export(cfg_of, ckpt: Path, out: Path, fmt: str) -> tuple[Path, dict]:
    metrics = run(cfg_of("mode=export", f"ckpt={ckpt}", f"export.format={fmt}"), out)
    name = {"onnx": "model.onnx", "torchscript": "model.pt", "safetensors": "model.safetensors"}
    path = out / "export" / name[fmt]
    info = json.loads(path.with_name(path.name + ".json").read_text())
    assert info["format"] == fmt and info["file"] == path.name
    assert info["input"]["shape"] == ["batch", 1, 28, 28] and info["input"]["channels"] == 1
    assert info["input"]["mean"] == [0.1307] and info["input"]["std"] == [0.3081]
    assert len(info["classes"]) == 10 and info["output"]["shape"] == ["batch", 10]
    assert info["check"]["same_top1"] == info["check"]["images"] == 8
    assert metrics["export/max_abs_logit_diff"] == info["check"]["max_abs_logit_diff"] < 1e-4
    return path, info


def _pytorch(ckpt: Path, x: torch.Tensor) -> torch.Tensor:
    model, _ = dlrun.load(ckpt)
    with torch.no_grad():
        return model(x)


def test_onnx_matches_pytorch_at_any_batch_size(cfg_of, ckpt: Path, batch, tmp_path: Path):
    ort = need_extra("onnxruntime", "export")
    need_extra("onnxscript", "export")  # torch.onnx's exporter needs it (and onnx)
    path, info = _export(cfg_of, ckpt, tmp_path / "run", "onnx")
    assert info["opset"] == 18 and not path.with_name("model.onnx.data").exists()  # one file
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # symbolic, not the traced 2
    for n in (16, 1, 5):
        (got,) = session.run(["logits"], {"image": batch[:n].numpy()})
        assert got.shape == (n, 10)
        torch.testing.assert_close(
            torch.from_numpy(got), _pytorch(ckpt, batch[:n]), atol=1e-5, rtol=1e-5
        )


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_is_traced_and_matches_pytorch(cfg_of, ckpt: Path, batch, tmp_path: Path):
    path, info = _export(cfg_of, ckpt, tmp_path / "run", "torchscript")
    assert "traced" in info["torchscript"]
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        for n in (16, 3):
            torch.testing.assert_close(
                loaded(batch[:n]), _pytorch(ckpt, batch[:n]), atol=1e-6, rtol=1e-6
            )


def test_safetensors_weights_load_into_a_fresh_model(cfg_of, ckpt: Path, batch, tmp_path: Path):
    st = need_extra("safetensors.torch", "export")
    path, info = _export(cfg_of, ckpt, tmp_path / "run", "safetensors")
    fresh = instantiate_model(OmegaConf.create(model_kwargs(info["model"]))).eval()  # from JSON
    with torch.no_grad():
        assert not torch.equal(fresh(batch), _pytorch(ckpt, batch))  # untrained differs ...
        st.load_model(fresh, str(path))
        assert torch.equal(fresh(batch), _pytorch(ckpt, batch))  # ... the weights agree


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (("export.format=bmp",), "export.format='bmp' is not an export format; use one of: onnx"),
        (("export.opset=12",), "export.opset=12 is not an ONNX opset version"),
        (("export.opset=latest",), "export.opset='latest' is not an ONNX opset version"),
    ],
)
def test_bad_export_settings_are_refused_before_the_run_folder(
    cfg_of, ckpt: Path, tmp_path: Path, keys: tuple, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        run(cfg_of("mode=export", f"ckpt={ckpt}", *keys), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_export_needs_a_checkpoint(cfg_of, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="mode=export needs ckpt=PATH"):
        run(cfg_of("mode=export"), tmp_path / "run")
    with pytest.raises(UserError, match="does not exist"):
        run(cfg_of("mode=export", f"ckpt={tmp_path / 'none.pt'}"), tmp_path / "run")


@pytest.mark.parametrize(
    ("fmt", "module"), [("onnx", "onnxscript"), ("safetensors", "safetensors")]
)
def test_a_missing_export_package_names_the_extra(
    cfg_of, ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, module: str
) -> None:
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(
        UserError, match=rf"needs the Python package {module}.*pip install -e '\.\[export\]'"
    ):
        run(cfg_of("mode=export", f"ckpt={ckpt}", f"export.format={fmt}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
