"""mode=predict and mode=export of an image classifier (a mixin of ClassificationTrainer).

predict: `predict.input` (a folder of images, or a split) -> `<run>/predict/predictions.csv`, one
row per image: its file, the top class, that class's probability and the top five.
export: the checkpoint's network -> `<run>/export/model.onnx | model.pt | model.safetensors`,
checked against PyTorch on test images, with `<file>.json` beside it saying how to feed it.
"""

import copy
import csv
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

import dlrun
from dlrun.data.folder import IMAGE_SUFFIXES
from dlrun.engine.checkpoint import unwrap
from dlrun.errors import UserError
from dlrun.models import instantiate_model, model_kwargs
from dlrun.tasks.classification import export

log = logging.getLogger(__name__)

TOP = 5  # classes listed per image in predictions.csv
PREDICT_CHUNK = 256  # images per forward pass: a folder of thousands must not need one batch
CHECK_IMAGES = 8  # test images each exported file is run on and compared with PyTorch
EXAMPLE_BATCH = 2  # the batch export traces with: not 1, which torch.export would fix as constant


class ClassifyModes:
    """`mode_predict` and `mode_export` for `model(image) -> logits` tasks."""

    # ----- provided by Trainer / RunModes -------------------------------------------------------
    model: nn.Module
    data: Any
    config: dict[str, Any]
    device: torch.device
    tta: str

    def check_mode(self, mode: str, ckpt: str | None) -> None:
        """Also refuse a bad export.format or a missing export package before anything is written."""
        super().check_mode(mode, ckpt)  # type: ignore[misc]
        if mode == "export":
            options = self._export_options()
            fmt = export.check_format(options.get("format"))
            export.check_opset(options.get("opset"))
            for module in {"onnx": ("onnx", "onnxscript", "onnxruntime")}.get(fmt, ()):
                export.require(module, fmt)
            if fmt == "safetensors":
                export.require("safetensors.torch", fmt)

    # ----- mode=predict --------------------------------------------------------------------------
    @torch.no_grad()
    def mode_predict(
        self, state: Mapping[str, Any], options: Mapping[str, Any]
    ) -> dict[str, float]:
        """predict.input (a folder of images, or a split) -> <run>/predict/predictions.csv."""
        names, _raw, x = self.predict_inputs(options)  # type: ignore[attr-defined]
        files = _file_names(str(options.get("input") or "test"), names)
        self.model.eval()
        probs = []
        for chunk in x.split(PREDICT_CHUNK):
            with self.autocast():  # type: ignore[attr-defined]
                logits = self.predict(self.layout(chunk))  # type: ignore[attr-defined]
            probs.append(self._logits(logits, len(chunk)).float().softmax(1))
        p = torch.cat(probs).cpu()
        top_p, top_i = p.topk(min(TOP, p.shape[1]), dim=1)
        classes = self._class_names(p.shape[1])
        out = self.output_dir("predict")  # type: ignore[attr-defined]
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

    def _class_names(self, k: int) -> list[str]:
        """The data's class names; an index stands in for any it does not name."""
        named = list(self.data.describe().get("classes") or [])
        return [str(named[i]) if i < len(named) else str(i) for i in range(k)]

    @staticmethod
    def _logits(out: Any, n: int) -> Tensor:
        if not isinstance(out, Tensor) or out.dim() != 2 or len(out) != n:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise UserError(
                f"This model's output ({shape}) is not one row of class scores per image, so it "
                "cannot predict or be exported as a classifier; use a classifier checkpoint."
            )
        return out

    # ----- mode=export ---------------------------------------------------------------------------
    def _export_options(self) -> dict[str, Any]:
        node = self.config.get("export")
        return dict(node) if isinstance(node, Mapping) else {}

    def mode_export(self, state: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, float]:
        """export.format (onnx | torchscript | safetensors) -> <run>/export/model.* + its JSON."""
        fmt = export.check_format(options.get("format"))
        opset = export.check_opset(options.get("opset"))
        c, h, w = self.data.describe()["input_shape"]
        # A CPU copy in the default memory format: the file must not depend on where we trained.
        net = copy.deepcopy(unwrap(self.model)).float().cpu().eval()
        net = net.to(memory_format=torch.contiguous_format)
        test = self.data.example_batch(CHECK_IMAGES, "test")["image"].float().cpu()
        test = test if len(test) >= EXAMPLE_BATCH else test.repeat(EXAMPLE_BATCH, 1, 1, 1)
        with torch.no_grad():
            ref = self._logits(net(test), len(test))
        out = self.output_dir("export")  # type: ignore[attr-defined]
        out.mkdir(parents=True, exist_ok=True)
        path = out / export.FILES[fmt]
        written = export.write(fmt, net, test[:EXAMPLE_BATCH].contiguous(), path, opset=opset)
        # Run the file itself, on a batch of another size than the one it was traced with.
        try:
            got = export.run_exported(fmt, path, test, fresh=self._fresh_model)
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
                "mean": _floats(self.data.mean, c),
                "std": _floats(self.data.std, c),
            },
            "output": {"name": "logits", "shape": ["batch", int(ref.shape[1])], "softmax": False},
            "classes": self._class_names(int(ref.shape[1])),
            "model": self.config.get("model"),
            "data": self.data.describe()["name"],
            "checkpoint": {
                "path": str(self.config.get("ckpt")),
                "epoch": state.get("epoch"),
                "step": state.get("step"),
            },
            "check": {"images": len(test), "max_abs_logit_diff": diff, "same_top1": agree},
            "torch": torch.__version__,
            "dlrun": dlrun.__version__,
        }
        side = export.write_sidecar(path, info)
        log.info(
            "exported %s (%s, %.1f MB) and %s; on %d test images its logits differ from "
            "PyTorch's by at most %.2e (%d of %d top-1 classes the same)",
            path, fmt, path.stat().st_size / 1e6, side.name, len(test), diff, agree, len(test),
        )  # fmt: skip
        if self.tta != "none":
            log.warning(
                "eval.tta=%s is not part of the exported network (one forward pass)", self.tta
            )
        if agree < len(test) or diff > 1e-3 * max(1.0, ref.abs().max().item()):
            log.warning("the exported %s disagrees with PyTorch beyond float rounding", fmt)
        return {"export/max_abs_logit_diff": diff, "export/same_top1": float(agree)}

    def _fresh_model(self) -> nn.Module:
        """An untrained model of the checkpoint's config (what safetensors weights load into)."""
        with torch.random.fork_rng(devices=[]):
            return instantiate_model(OmegaConf.create(model_kwargs(self.config["model"])))


def _floats(value: Any, channels: int) -> list[float]:
    values = [float(value)] if isinstance(value, int | float) else [float(v) for v in value]
    return values * channels if len(values) == 1 else values


def _file_names(spec: str, names: list[str]) -> list[str]:
    """The input files' names (with suffix) for a folder, listed as `folder_inputs` lists them;
    a split's item names as they are."""
    folder = Path(spec).expanduser()
    if spec in ("train", "val", "test") or not folder.is_dir():
        return names
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [p.name for p in files] if [p.stem for p in files] == names else names
