"""A task's modes (`mode=train|eval|sample|...`): the CLI dispatches, the trainer offers them.

Contract for every mode but `train`: it needs `ckpt=PATH` (its weights are loaded into the
task's model before the run folder is written), reads its options from the config node of the
same name (`sample.n`, later `translate.input`, `predict.input`), and writes what it produces
under `<run>/<mode>/`. A task adds a mode by listing it in `modes` and defining `mode_<name>`.
"""

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from dlrun.data.folder import IMAGE_SUFFIXES
from dlrun.data.folder import decode as decode_image
from dlrun.data.transforms import Normalize
from dlrun.engine import checkpoint, dist
from dlrun.engine.tb import log_config, log_hparams, log_layout
from dlrun.errors import UserError

log = logging.getLogger(__name__)


def folder_inputs(
    spec: str,
    channels: int,
    size: int,
    resample: str = "bilinear",
    splits: str = "train, val, test",
) -> tuple[list[str], Tensor]:
    """The images of a folder (`<mode>.input=DIR`), decoded to `size` and `channels`, in file-name
    order: their names and uint8 (N, C, S, S). A folder without images is a UserError."""
    folder = Path(spec).expanduser()
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not folder.is_dir() or not files:
        raise UserError(
            f"input={spec} is neither a split ({splits}) nor a folder holding images "
            f"({', '.join(sorted(IMAGE_SUFFIXES))})."
        )
    images = torch.stack([decode_image(p, channels, size, resample) for p in files])
    return [p.stem for p in files], images


class RunModes:
    """The mode side of `Trainer`: dispatch, `eval`, the run folder's outputs, TensorBoard header."""

    modes: tuple[str, ...] = ("train", "eval")

    def check_mode(self, mode: str, ckpt: str | None) -> None:
        """Before any work: the mode exists for this task and has its checkpoint."""
        if mode not in self.modes:
            raise UserError(
                f"mode='{mode}' is not a mode of this task ({type(self).__name__}); use one of: "
                f"{', '.join(self.modes)}."
            )
        if mode != "train" and not ckpt:
            raise UserError(
                f"mode={mode} needs ckpt=PATH, the checkpoint to use "
                "(e.g. <run>/checkpoints/best.pt)."
            )

    def run_mode(
        self,
        mode: str,
        *,
        ckpt: str | None,
        resume: bool,
        options: Mapping[str, Any],
        commit: Callable[[], None],
    ) -> dict[str, float]:
        if mode == "train":
            self.prepare(resume=resume)
            commit()
            return self.fit(resume=resume)
        state = checkpoint.load(ckpt)
        checkpoint.load_model_state(self.model, state, ckpt, config=self.config)
        self._eval_weights(state, ckpt)
        commit()
        return getattr(self, f"mode_{mode}")(state, dict(options))

    def _eval_weights(self, state: Mapping[str, Any], ckpt: str | None) -> None:
        """eval.weights=ema: the checkpoint's weight average (trainer.ema) replaces its weights."""
        weights = self.config.get("eval", {}).get("weights", "model")
        if weights not in ("model", "ema"):
            raise UserError(f"eval.weights must be model or ema, got '{weights}'.")
        if weights == "model":
            return
        if not state.get("ema"):
            raise UserError(
                f"eval.weights=ema: {ckpt} holds no weight average (it was trained without "
                "trainer.ema.decay); use eval.weights=model."
            )
        checkpoint.load_model_state(
            self.model, {**state, "model": state["ema"]}, ckpt, config=self.config
        )
        self.scored_weights = "ema"  # a task's per-weights state (a threshold) follows
        log.info("evaluating the weight average (eval.weights=ema) of %s", ckpt)

    def output_dir(self, mode: str) -> Path:
        return self.run_dir / mode

    def mode_inputs(self, options: Mapping[str, Any]) -> tuple[list[str], Tensor]:
        """What an output mode reads (`<mode>.input`): a folder of images, decoded and resized to
        the model's input size and channels, or a split name (train | val | test) of the data.

        Returns the item names and uint8 images (N, C, H, W), in file-name or split order.
        """
        spec = str(options.get("input") or "test")
        c, h, w = self.data.describe()["input_shape"]
        if spec in ("train", "val", "test"):
            n = self.data.describe()["sizes"][spec]
            images = self.data.example_batch(n, spec, mean=[0.0], std=[1 / 255])["image"]
            return [f"{spec}_{i:06d}" for i in range(n)], images.round().to(torch.uint8)
        return folder_inputs(spec, c, max(h, w))

    def predict_inputs(self, options: Mapping[str, Any]) -> tuple[list[str], Tensor, Tensor]:
        """`mode_inputs` for predict modes: a split gives its first `predict.n` items. Returns
        names, the uint8 images (to draw on) and the images normalised as the model wants."""
        names, raw = self.mode_inputs(options)
        if str(options.get("input") or "test") in ("train", "val", "test"):
            n = int(options.get("n") or 64)
            names, raw = names[:n], raw[:n]
        x = Normalize(self.data.mean, self.data.std).normalize(raw.to(self.device))
        return names, raw, x

    def mode_eval(self, state: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, float]:
        """Score the checkpoint on the test split: test/* in metrics.json and the log."""
        self.epoch, self.step_count = state.get("epoch", 0), state.get("step", 0)
        self.train_time = state.get("train_time", 0.0)
        metrics = self.write_metrics(self.evaluate(self.data.test_loader(), "test"))
        if (
            dist.is_main()
        ):  # what the evaluation shows beyond scalars (a classifier's confusion matrix)
            with SummaryWriter(str(self.run_dir)) as writer:
                self.log_evaluation(writer, "test")
        shown = [
            f"{k}={v:.4f}"
            for k, v in metrics.items()
            if k.startswith("test/") and k.count("/") == 1
        ]
        log.info(", ".join(shown))
        return metrics

    def log_header(self, writer: SummaryWriter) -> None:
        """Once per fresh run: the resolved config, the HParams declaration, size scalars."""
        log_config(writer, OmegaConf.to_yaml(self.config))
        logged = self.logged_metrics()  # first: a task may settle its metric networks here
        declared = [self.monitor.name] if self.monitor.name else []
        declared += [m for m in logged if m not in declared]
        log_hparams(writer, self.hparams, declared)
        log_layout(writer, self.monitor.name)
        # Text, not scalars: two constant one-point charts would open TensorBoard's view.
        writer.add_text(
            "model",
            f"{self.params:,} trainable parameters, {self.flops:,} forward FLOPs per item",
            0,
        )
