"""A trained classifier as a file other programs run: ONNX, TorchScript or safetensors weights.

Each writer takes the network on the CPU in eval mode and an example batch (B >= 2, normalised as
the model wants); `run_exported` reads a written file back and runs it, which is how mode=export
checks each file against PyTorch before saying it is done.

ONNX goes through torch.export (`torch.onnx.export(..., dynamo=True)`, torch's default since 2.9):
the TorchScript-based exporter (dynamo=False) still works in torch 2.14 but warns that it will be
removed. The dynamo exporter needs onnxscript; the batch dimension is a symbolic `batch` in the
graph, so one file takes any batch size. TorchScript is traced (`torch.jit.trace`), not scripted:
tracing runs the ordinary forward once and records it, so every network of the zoo traces, where
scripting would reject Python constructs in several of them (and an eval-mode classifier has no
data-dependent control flow for tracing to freeze).
"""

import contextlib
import importlib
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from dlrun.errors import UserError

FILES = {"onnx": "model.onnx", "torchscript": "model.pt", "safetensors": "model.safetensors"}
INSTALL = "pip install -e '.[export]'"
# Above this many bytes of weights an ONNX file must keep them in a side file (protobuf's 2 GiB
# limit); below it the one model.onnx holds everything.
ONNX_INLINE_LIMIT = 1_800_000_000
MIN_OPSET = 18  # what torch.onnx's dynamo exporter emits; lower ones would need down-conversion


def check_format(fmt: Any) -> str:
    if fmt not in FILES:
        raise UserError(
            f"export.format={fmt!r} is not an export format; use one of: {', '.join(FILES)} "
            "(e.g. dlrun mode=export ckpt=PATH export.format=onnx)."
        )
    return str(fmt)


def check_opset(opset: Any) -> int:
    """export.opset: an int from 18, the opset torch.onnx's exporter writes (it converts up)."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise UserError(
            f"export.opset={opset!r} is not an ONNX opset version dlrun can write; use an integer "
            f"of at least {MIN_OPSET}, e.g. export.opset={MIN_OPSET}."
        )
    return opset


def require(module: str, fmt: str) -> ModuleType:
    """An optional package of the export extra, or a UserError naming the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(
            f"export.format={fmt} needs the Python package {module.split('.')[0]}, which is not "
            f"installed here ({err}). Install the export extra: {INSTALL}."
        ) from err


def write(fmt: str, net: nn.Module, example: Tensor, path: Path, *, opset: int) -> dict[str, Any]:
    """Write `net` (CPU, eval) as `fmt` at `path`; returns what the sidecar JSON records of it."""
    if fmt == "onnx":
        return write_onnx(net, example, path, opset)
    if fmt == "torchscript":
        return write_torchscript(net, example, path)
    return write_safetensors(net, path)


def write_onnx(net: nn.Module, example: Tensor, path: Path, opset: int) -> dict[str, Any]:
    for module in ("onnx", "onnxscript"):
        require(module, "onnx")
    onnx = importlib.import_module("onnx")
    inline = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    inline = inline < ONNX_INLINE_LIMIT
    batch = torch.export.Dim("batch")
    # The exporter prints its progress to stdout, warns about its own internals and logs each
    # optimisation pass at INFO (into dlrun.log); our log says what happened, once.
    with (
        contextlib.redirect_stdout(io.StringIO()),
        warnings.catch_warnings(),
        _quiet("onnx_ir", "onnxscript", "torch.onnx", "torch.export"),
        torch.no_grad(),
    ):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                net,
                (example,),
                str(path),
                input_names=["image"],
                output_names=["logits"],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=({0: batch},),
                external_data=not inline,
            )
        except Exception as err:
            raise _unexportable("onnx", net, err) from err
    onnx.checker.check_model(str(path))  # a path: it finds external weights too
    return {
        "opset": opset,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
    }


def write_torchscript(net: nn.Module, example: Tensor, path: Path) -> dict[str, Any]:
    # torch 2.14 marks torch.jit deprecated (FutureWarning) yet runs it; TorchScript is still
    # what C++ (libtorch) and older serving stacks load.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            traced = torch.jit.trace(net, example, check_trace=False)
        except Exception as err:
            raise _unexportable("torchscript", net, err) from err
        torch.jit.save(traced, str(path))
    return {"torchscript": "traced (torch.jit.trace on an example batch)"}


def write_safetensors(net: nn.Module, path: Path) -> dict[str, Any]:
    st = require("safetensors.torch", "safetensors")
    # save_model, not save_file: it drops the aliases of shared (tied) tensors safely.
    st.save_model(net, str(path), metadata={"format": "pt"})
    return {"weights": "the model's state_dict; build the model from `model` and load_model()"}


def load_exported(
    fmt: str, path: Path, fresh: Callable[[], nn.Module] | None = None
) -> Callable[[Tensor], Tensor]:
    """The written file as a function of a CPU batch -> logits: an onnxruntime session, the
    torch.jit.load-ed module, or the safetensors weights loaded into `fresh()` (a newly built,
    untrained model of the same config)."""
    if fmt == "onnx":
        ort = require("onnxruntime", "onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(["logits"], {"image": x.numpy()})[0])
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(path), map_location="cpu")
    else:
        if fresh is None:
            raise ValueError("safetensors weights need a model to load into (fresh)")
        st = require("safetensors.torch", "safetensors")
        net = fresh()
        st.load_model(net, str(path))
    net.eval()

    def call(x: Tensor) -> Tensor:
        with torch.no_grad():
            return net(x)

    return call


def run_exported(
    fmt: str, path: Path, x: Tensor, fresh: Callable[[], nn.Module] | None = None
) -> Tensor:
    """The logits of the written file on the CPU batch `x` (see `load_exported`)."""
    return load_exported(fmt, path, fresh)(x)


def write_sidecar(path: Path, info: Mapping[str, Any]) -> Path:
    """`<file>.json` beside the exported file: what a program needs to feed it and read it."""
    side = path.with_name(path.name + ".json")
    side.write_text(json.dumps(info, indent=1) + "\n")
    return side


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """These libraries' loggers at WARNING for the duration (their INFO is per-pass chatter)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _unexportable(fmt: str, net: nn.Module, err: Exception) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    others = ", ".join(f for f in FILES if f != fmt)
    return UserError(
        f"export.format={fmt} could not export {type(net).__name__} ({type(err).__name__}: "
        f"{first}). Export it as one of {others} instead."
    )
