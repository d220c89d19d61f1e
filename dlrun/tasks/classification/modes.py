"""mode=predict and mode=export of an image classifier (ClassificationTrainer's mode_predict and
mode_export call these with what they need).

predict: `predict.input` (a folder of images, or a split) -> `<run>/predict/predictions.csv`, one
row per image: its file, the top class, that class's probability and the top five.
export: the checkpoint's network -> `<run>/export/model.onnx | model.pt | model.safetensors`,
checked against PyTorch on test images, with `<file>.json` beside it saying how to feed it.
"""

import copy
import csv
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

import dlrun
from dlrun.data.folder import IMAGE_SUFFIXES
from dlrun.data.transforms import per_channel
from dlrun.engine import run_modes
from dlrun.engine.checkpoint import unwrap
from dlrun.errors import UserError
from dlrun.models import instantiate_model, model_kwargs
from dlrun.tasks.classification import export

log = logging.getLogger(__name__)

TOP = 5  # classes listed per image in predictions.csv
PREDICT_CHUNK = 256  # images per forward pass: a folder of thousands must not need one batch
CHECK_IMAGES = 8  # test images each exported file is run on and compared with PyTorch
EXAMPLE_BATCH = 2  # the batch export traces with: not 1, which torch.export would fix as constant


def check_export(options: Mapping[str, Any]) -> None:
    """Before anything is written: refuse a bad export.format / export.opset, or a missing
    package the format needs."""
    fmt = export.check_format(options.get("format"))
    export.check_opset(options.get("opset"))
    for module in {"onnx": ("onnx", "onnxscript", "onnxruntime")}.get(fmt, ()):
        export.require(module, fmt)
    if fmt == "safetensors":
        export.require("safetensors.torch", fmt)


# ----- mode=predict ------------------------------------------------------------------------------
@torch.no_grad()
def predict(
    classify: Callable[[Tensor], Tensor],
    data: Any,
    device: torch.device,
    options: Mapping[str, Any],
    out: Path,
) -> dict[str, float]:
    """predict.input (a folder of images, or a split) through `classify` (normalised images ->
    logits, in eval mode) -> `out`/predictions.csv."""
    names, _raw, x = run_modes.predict_inputs(data, device, options)
    files = _file_names(str(options.get("input") or "test"), names)
    probs = []
    for chunk in x.split(PREDICT_CHUNK):
        probs.append(class_scores(classify(chunk), len(chunk)).float().softmax(1))
    p = torch.cat(probs).cpu()
    top_p, top_i = p.topk(min(TOP, p.shape[1]), dim=1)
    classes = class_names(data, p.shape[1])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictions.csv"
    with open(path, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["file", "class", "probability", "top5"])
        for name, ps, ix in zip(files, top_p.tolist(), top_i.tolist(), strict=True):
            top = ";".join(f"{classes[i]}:{q:.4f}" for i, q in zip(ix, ps, strict=True))
            rows.writerow([name, classes[ix[0]], f"{ps[0]:.4f}", top])
    log.info("predicted %d images into %s", len(files), path)
    return {"predict/items": float(len(files))}


def class_names(data: Any, k: int) -> list[str]:
    """The data's class names; an index stands in for any it does not name."""
    named = list(data.describe().get("classes") or [])
    return [str(named[i]) if i < len(named) else str(i) for i in range(k)]


def class_scores(out: Any, n: int) -> Tensor:
    """A model's output as one row of class scores per image, or a one-line error."""
    if not isinstance(out, Tensor) or out.dim() != 2 or len(out) != n:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise UserError(
            f"This model's output ({shape}) is not one row of class scores per image, so it "
            "cannot predict or be exported as a classifier; use a classifier checkpoint."
        )
    return out


# ----- mode=export -------------------------------------------------------------------------------
def export_network(
    model: nn.Module,
    data: Any,
    options: Mapping[str, Any],
    out: Path,
    *,
    model_spec: Mapping[str, Any],
    ckpt: str | None,
    state: Mapping[str, Any],
    tta: str,
) -> dict[str, float]:
    """export.format (onnx | torchscript | safetensors): `model` (the checkpoint's network, built
    from `model_spec`) -> `out`/model.* + its JSON."""
    fmt = export.check_format(options.get("format"))
    opset = export.check_opset(options.get("opset"))
    c, h, w = data.describe()["input_shape"]
    # A CPU copy in the default memory format: the file must not depend on where we trained.
    net = copy.deepcopy(unwrap(model)).float().cpu().eval()
    net = net.to(memory_format=torch.contiguous_format)
    test = data.example_batch(CHECK_IMAGES, "test")["image"].float().cpu()
    # Without the data set (the checkpoint describes it): seeded noise images check the file.
    what = "random images" if getattr(data, "synthetic", False) else "test images"
    test = test if len(test) >= EXAMPLE_BATCH else test.repeat(EXAMPLE_BATCH, 1, 1, 1)
    with torch.no_grad():
        ref = class_scores(net(test), len(test))
    out.mkdir(parents=True, exist_ok=True)
    path = out / export.FILES[fmt]
    written = export.write(fmt, net, test[:EXAMPLE_BATCH].contiguous(), path, opset=opset)

    def fresh() -> nn.Module:
        """An untrained model of the checkpoint's config (what safetensors weights load into)."""
        with torch.random.fork_rng(devices=[]):
            return instantiate_model(OmegaConf.create(model_kwargs(dict(model_spec))))

    # Run the file itself, on a batch of another size than the one it was traced with.
    try:
        got = export.run_exported(fmt, path, test, fresh=fresh)
    except UserError:
        raise
    except Exception as err:  # e.g. an opset newer than the installed onnxruntime runs
        raise UserError(
            f"The exported {path} was written but could not be run back to check it "
            f"({type(err).__name__}: {str(err).strip()[:300]}). For ONNX, a lower "
            "export.opset (18) is the usual fix."
        ) from err
    diff = (got.float() - ref).abs().max().item()
    agree = int((got.argmax(1) == ref.argmax(1)).sum())
    info = {
        "format": fmt,
        "file": path.name,
        **written,
        "input": {
            "name": "image",
            "shape": ["batch", c, h, w],
            "dtype": "float32",
            "layout": "NCHW",
            "channels": c,
            "color": "grayscale (PIL mode L)" if c == 1 else "RGB",
            "resize": f"bilinear to {h}x{w} (aspect ratio not kept), as dlrun decodes images",
            "normalize": "(pixel / 255 - mean) / std, per channel",
            "mean": per_channel(data.mean, c),
            "std": per_channel(data.std, c),
        },
        "output": {"name": "logits", "shape": ["batch", int(ref.shape[1])], "softmax": False},
        "classes": class_names(data, int(ref.shape[1])),
        "model": dict(model_spec) or None,
        "data": data.describe()["name"],
        "checkpoint": {"path": str(ckpt), "epoch": state.get("epoch"), "step": state.get("step")},
        "check": {"images": len(test), "of": what, "max_abs_logit_diff": diff, "same_top1": agree},
        "torch": torch.__version__,
        "dlrun": dlrun.__version__,
    }
    side = export.write_sidecar(path, info)
    log.info(
        "exported %s (%s, %.1f MB) and %s; on %d %s its logits differ from "
        "PyTorch's by at most %.2e (%d of %d top-1 classes the same)",
        path, fmt, path.stat().st_size / 1e6, side.name, len(test), what, diff, agree, len(test),
    )  # fmt: skip
    if tta != "none":
        log.warning("eval.tta=%s is not part of the exported network (one forward pass)", tta)
    if agree < len(test) or diff > 1e-3 * max(1.0, ref.abs().max().item()):
        log.warning("the exported %s disagrees with PyTorch beyond float rounding", fmt)
    return {"export/max_abs_logit_diff": diff, "export/same_top1": float(agree)}


def _file_names(spec: str, names: list[str]) -> list[str]:
    """The input files' names (with suffix) for a folder, listed as `folder_inputs` lists them;
    a split's item names as they are."""
    folder = Path(spec).expanduser()
    if spec in ("train", "val", "test") or not folder.is_dir():
        return names
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [p.name for p in files] if [p.stem for p in files] == names else names
