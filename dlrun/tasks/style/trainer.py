"""Neural style transfer (Gatys et al. 2016): optimise an image's pixels, not a network's weights.

The model role is the generated image (`StyleImage`, one parameter); the VGG feature network is
a frozen role: eval mode, no gradients for its weights, not in the checkpoint. It is rebuilt from
the run's own config on resume (a dlrun VGG is 9-20 M parameters, the image 0.1 M: saving it in
every last.pt and best.pt would multiply their size for nothing), and a fingerprint of its weights
in the checkpoint makes resume refuse features that are not the run's. One loop step is one
optimizer step: L-BFGS (the paper's choice) re-evaluates the costs through a closure.
"""

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import save_image

from dlrun.engine import introspect
from dlrun.engine.checkpoint import unwrap
from dlrun.engine.loop import Sums, Trainer
from dlrun.errors import UserError
from dlrun.models.style import StyleImage
from dlrun.tasks.style.features import build_features
from dlrun.tasks.style.losses import StyleObjective

log = logging.getLogger(__name__)


class StyleTrainer(Trainer):
    """Roles "model" (the image, trained) and "features" (the VGG, frozen)."""

    takes_closures = True  # L-BFGS steps through `optimize_closure`

    data_kinds = ("style",)
    frozen_roles = frozenset({"features"})
    # The objective of this run's own image: best.pt is its lowest-cost image (Adam oscillates;
    # L-BFGS mostly descends, so best.pt is then near last.pt). Costs under other weights, layers
    # or features do not compare: a sweep over those should not be ranked by it.
    default_monitor = "val/loss"

    def __init__(
        self,
        *,
        loss: Any,
        features: str = "auto",
        features_ckpt: str | None = None,
        pool: str = "max",
        image_every_n_steps: int = 5,
        **kwargs: Any,
    ) -> None:
        if not isinstance(loss, StyleObjective):
            raise UserError(
                "Style transfer trains with loss=style (its weights are the style.* keys), not "
                f"loss={getattr(loss, 'name', type(loss).__name__)}."
            )
        if not isinstance(unwrap(kwargs["model"]), StyleImage):
            raise UserError(
                "trainer=style optimises an image: use model=style_transfer, not "
                f"{type(kwargs['model']).__name__}."
            )
        if kwargs.get("accumulate_grad_batches", 1) != 1:
            raise UserError("trainer.accumulate_grad_batches must be 1 for style transfer.")
        lbfgs = getattr(kwargs["optim"], "func", None) is torch.optim.LBFGS
        if lbfgs and kwargs.get("grad_clip") is not None:
            raise UserError(
                "trainer.grad_clip does not apply to L-BFGS (it steps through a closure); drop it, "
                "or use optim=adam."
            )
        super().__init__(**kwargs)
        self.objective, self.image = loss, unwrap(self.model)
        self.image_every = max(1, int(image_every_n_steps))
        self.features, about = build_features(
            features,
            features_ckpt,
            loss.layers,
            pool=pool,
            seed=self.seed,
            device=self.device,
        )
        self.features_hash = self.features.fingerprint()
        self.targets: dict[str, Tensor] | None = None  # computed once, from the first batch
        log.info("style transfer features: %s", about)

    # ----- what the base loop asks of a task ------------------------------------------------------
    def roles(self) -> dict[str, nn.Module]:
        return {"model": self.model, "features": self.features}

    def check_model(self) -> None:
        # The image takes the content image's shape (and pixels, or seeded noise) before the
        # optimizer is built over it.
        content = self.data.example_batch()["content"].cpu()
        self.image.start(content, torch.Generator().manual_seed(self.seed))

    def count_flops(self) -> int:
        """The feature network's forward FLOPs on the image: one cost evaluation."""
        return introspect.count_flops(
            self.features, tuple(self.image.pixels.shape[1:]), self.device
        )

    def logged_metrics(self) -> list[str]:
        tags = ["loss", "content_loss", "style_loss"]
        return [f"{split}/{t}" for split in ("val", "train") for t in tags]

    def extra_state(self) -> dict[str, Any]:
        return {"features": self.features_hash}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("features")
        if saved and saved != self.features_hash:
            raise UserError(
                "resume=true: the feature network is not the one this run started with (the file "
                "of style.features_ckpt, or torchvision's cached VGG-19 weights, changed). Resume "
                "with the same weights, or start a new run."
            )

    # ----- one step -------------------------------------------------------------------------------
    def _targets(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The content activations and style Gram matrices: the batch never changes, so once."""
        if self.targets is None:
            with torch.no_grad(), self.autocast():
                content = self.net("features")(batch["content"])
                style = self.net("features")(batch["style"])
            hw = {k: v.shape[-2] * v.shape[-1] for k, v in content.items()}
            self.targets = self.objective.targets(content, style, hw)
        return self.targets

    def _costs(self, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        image = self.net()()
        with self.autocast():
            features = self.net("features")(self.layout(image))
        return self.objective(features, targets, image)

    def step(self, batch: Mapping[str, Tensor]) -> Sums:
        targets = self._targets(batch)
        opt = self.optimizers["model"]
        first: dict[str, Tensor] = {}  # the costs at the image before this step
        evaluations = 0
        if isinstance(opt, torch.optim.LBFGS):

            def closure() -> Tensor:
                nonlocal evaluations
                evaluations += 1
                opt.zero_grad(set_to_none=True)
                costs = self._costs(targets)
                costs["loss"].backward()
                if not first:
                    first.update({k: v.detach() for k, v in costs.items()})
                return costs["loss"]

            self.optimize_closure(closure)
        else:
            costs = self._costs(targets)
            self.optimize(costs["loss"])
            first, evaluations = {k: v.detach() for k, v in costs.items()}, 1
        if (self.step_count + 1) % self.image_every == 0:
            self._log_image("style/image", self.step_count + 1)
        out = {k: (v, 1) for k, v in first.items()}
        out["evaluations"] = (torch.tensor(float(evaluations), device=self.device), 1)
        return out

    # ----- evaluation and images ------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loader: Any, prefix: str) -> dict[str, float]:
        """The costs of the current image: val/loss, val/content_loss, val/style_loss."""
        costs = self._costs(self._targets(next(iter(loader))))
        return {f"{prefix}/{k}": float(v) for k, v in costs.items()}

    def _log_image(self, tag: str, step: int, image: Tensor | None = None) -> None:
        if self.writer is not None:
            shown = self.image() if image is None else image
            self.writer.add_image(tag, shown.detach()[0].clamp(0, 1).cpu(), step)

    def log_start(self, writer: SummaryWriter) -> None:
        batch = self.data.example_batch()
        self._log_image("style/content", 0, batch["content"])
        self._log_image("style/style", 0, batch["style"])
        self._log_image("style/image", 0)

    def log_end(self, writer: SummaryWriter) -> None:
        """The final image to TensorBoard, and <run>/style/{result,content,style}.png."""
        if self.step_count % self.image_every:  # else the last step logged it
            self._log_image("style/image", self.step_count)
        out = self.run_dir / "style"
        out.mkdir(parents=True, exist_ok=True)
        batch = self.data.example_batch()
        for name, image in (
            ("result", self.image()),
            ("content", batch["content"]),
            ("style", batch["style"]),
        ):
            save_image(image.detach().clamp(0, 1).cpu(), out / f"{name}.png")
        log.info("style transfer: wrote %s", out / "result.png")
