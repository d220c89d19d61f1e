"""Knowledge distillation (Hinton et al. 2015): a student classifier learns from a frozen teacher.

The teacher is any dlrun classifier checkpoint (`teacher.ckpt`; its own config builds it) and a
frozen role: eval mode, no optimizer, no gradients, not in the student's checkpoint, which stays an
ordinary classifier checkpoint (mode=eval, ckpt=, or the teacher of the next distillation).
"""

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from dlrun.data.module import offered
from dlrun.engine.loop import Sums
from dlrun.errors import UserError
from dlrun.scoring.classifiers import load_classifier_net
from dlrun.tasks.classification.trainer import ClassificationTrainer
from dlrun.tasks.distill.losses import distillation_loss

log = logging.getLogger(__name__)


class DistillTrainer(ClassificationTrainer):
    """Trains `model(image) -> logits` on alpha T^2 KL(teacher || student at T) + (1 - alpha) CE."""

    frozen_roles = frozenset({"teacher"})
    cpu_bf16 = False  # not measured against fp32 yet (docs/precision.md): auto keeps fp32 on CPUs

    def __init__(
        self,
        *,
        teacher: str | None,
        temperature: float = 4.0,
        alpha: float = 0.9,
        **kwargs: Any,
    ) -> None:
        check_settings(temperature, alpha)
        super().__init__(**kwargs)
        if self.loss.name != "cross_entropy" or self.loss.kwargs.get("label_smoothing"):
            raise UserError(
                "trainer=distill's hard term is plain cross-entropy (the teacher's soft targets "
                "already smooth the labels): use loss=cross_entropy with loss.label_smoothing=0, "
                f"not loss={self.loss.name}"
                + (
                    f" with label_smoothing={self.loss.kwargs['label_smoothing']}."
                    if self.loss.kwargs.get("label_smoothing")
                    else "."
                )
            )
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.teacher: nn.Module | None = None
        # mode=eval scores the student alone: a teacher is optional there (reported when given).
        if teacher:
            self.teacher = self._load_teacher(str(teacher))
        elif self.mode == "train":
            raise UserError(
                "trainer=distill needs a teacher: pass teacher.ckpt=PATH, the checkpoint of a "
                "dlrun classifier of this data set (e.g. <run>/checkpoints/last.pt)."
            )

    def _load_teacher(self, path: str) -> nn.Module:
        """The teacher on the device, frozen, after checking it classifies exactly these batches."""
        about = self.data.describe()
        shape, size = tuple(about["input_shape"]), about["input_shape"][-1]
        # A forked RNG: building the teacher's layers (before its weights load) must not shift
        # the student's random draws, so alpha=0 trains exactly as trainer=classification.
        with torch.random.fork_rng(devices=[]):
            net, cfg = load_classifier_net(
                path,
                self.device,
                key="teacher.ckpt",
                data_name=about["name"],
                image_size=size,
                num_classes=about["num_classes"],
            )
        data_cfg = cfg["data"]
        norm = offered(self.data, "normalization")  # a module of one's own may not say: no check
        ours = {} if norm is None else {"mean": norm.mean, "std": norm.std}
        for key, value in ours.items():
            theirs = data_cfg.get(key)
            if value is not None and not same_numbers(theirs, value):
                fix = " ".join(
                    f"data.{k}=[{','.join(str(v) for v in floats(data_cfg.get(k)))}]" for k in ours
                )
                raise UserError(
                    f"teacher.ckpt={path} was trained with data.{key}={floats(theirs)} but this "
                    f"run normalises with data.{key}={floats(value)}: the teacher must see the "
                    f"batches normalised as in its training; run with {fix}."
                )
        net.requires_grad_(False)
        net.to(self.device, memory_format=self.memory_format)
        try:  # a GAN or k-NN checkpoint has a config too, but does not score images
            with torch.no_grad():
                out = net(torch.zeros(2, *shape, device=self.device))
        except (RuntimeError, ValueError, TypeError):
            out = None
        if not isinstance(out, Tensor) or tuple(out.shape) != (2, about["num_classes"]):
            raise UserError(
                f"teacher.ckpt={path} (model {cfg['model'].get('_target_', '?')}) does not map "
                f"an image to {about['num_classes']} class scores: it is not a classifier "
                "checkpoint. Use one a classification (or distillation) run wrote."
            )
        return net

    # ----- what the base loop asks of a task ------------------------------------------------------
    def roles(self) -> dict[str, nn.Module]:
        roles = {"model": self.model}
        if self.teacher is not None:
            roles["teacher"] = self.teacher
        return roles

    def logged_metrics(self) -> list[str]:
        return [*super().logged_metrics(), "teacher/test_acc"]

    def step(self, batch: Mapping[str, Tensor]) -> Sums:
        x, y = self.layout(batch["image"]), batch["label"]
        # data.mixup / data.cutmix: the hard term learns the mixed (B, K) targets, as
        # trainer=classification does; y stays the dominant class (train/acc)
        target = batch.get("target", y)
        with self.autocast():
            out = self.net()(x)  # (B, K), or GoogLeNet's (logits, aux1, aux2) in training
            logits, *aux = out if isinstance(out, tuple) else (out,)
            if self.alpha == 0:  # the undistilled baseline: plain CE, no teacher forward to pay
                loss = self.loss(logits, target)
            else:
                with torch.no_grad():  # once per batch, outside the student's graph
                    teacher_logits = self.net("teacher")(x)
                loss = distillation_loss(
                    logits.float(), teacher_logits.float(), target, self.temperature, self.alpha
                )
        total = loss + self.loss.penalty(self.model) if self.loss.l1 or self.loss.l2 else loss
        if aux:  # GoogLeNet's auxiliary classifiers learn from the labels, as in classification
            total = total + self.aux_weight * sum(self.loss(a, target) for a in aux)
        self.optimize(total)
        b = len(y)
        return {"loss": (loss.detach() * b, b), "acc": ((logits.argmax(1) == y).sum(), b)}

    @torch.no_grad()
    def teacher_metrics(self) -> dict[str, float]:
        """The teacher's test accuracy and both parameter counts: what the student is measured by."""
        assert self.teacher is not None
        self.teacher.eval()
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        n = 0
        for batch in self.data.test_loader():
            with self.autocast():
                logits = self.net("teacher")(self.layout(batch["image"]))
            correct += (logits.argmax(1) == batch["label"]).sum()
            n += len(batch["label"])
        metrics = {
            "teacher/test_acc": correct.item() / n,
            "teacher/params": float(sum(p.numel() for p in self.teacher.parameters())),
            "student/params": float(self.params),
        }
        log.info(
            "teacher: test acc %.4f, %d parameters; student: %d trainable parameters",
            metrics["teacher/test_acc"],
            metrics["teacher/params"],
            self.params,
        )
        return metrics

    def log_start(self, writer: SummaryWriter) -> None:
        super().log_start(writer)
        # Once, at step 0 of a fresh run; a resumed run has them back in its saved metrics.
        self.logger.log(self.teacher_metrics(), self.state)

    def mode_eval(self, state: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, float]:
        if self.teacher is not None:
            self.metrics.update(self.teacher_metrics())
        return super().mode_eval(state, options)


def check_settings(temperature: float, alpha: float) -> None:
    """distill.temperature > 0 and distill.alpha in [0, 1], as one-line user errors."""
    if not isinstance(temperature, int | float) or not temperature > 0 or temperature == math.inf:
        raise UserError(
            f"distill.temperature must be a number > 0 (e.g. distill.temperature=4), got "
            f"{temperature!r}."
        )
    if not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        raise UserError(
            f"distill.alpha must be a number in [0, 1] (the soft term's weight, e.g. "
            f"distill.alpha=0.9), got {alpha!r}."
        )


def floats(value: float | Sequence[float] | None) -> list[float]:
    """A data.mean / data.std value (one number or one per channel) as a list."""
    if value is None:
        return []
    return [float(value)] if isinstance(value, int | float) else [float(v) for v in value]


def same_numbers(a: float | Sequence[float] | None, b: float | Sequence[float]) -> bool:
    """Two mean/std values equal up to float rounding (YAML and JSON round trips)."""
    x, y = floats(a), floats(b)
    return len(x) == len(y) and all(
        math.isclose(p, q, rel_tol=1e-6) for p, q in zip(x, y, strict=True)
    )
