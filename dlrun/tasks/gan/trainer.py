"""GANs: alternating discriminator (critic) and generator updates, samples, FID/KID in TensorBoard."""

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid, save_image

from dlrun.engine import checkpoint, introspect
from dlrun.engine.hooks.samples import SampleGrids
from dlrun.engine.loop import Sums, Trainer
from dlrun.errors import UserError
from dlrun.scoring import sample_quality as metrics_lib
from dlrun.scoring.classifiers import load_classifier
from dlrun.tasks.gan.losses import GANObjective, gradient_penalty

log = logging.getLogger(__name__)
FEATURES = ("auto", "inception", "inception_tv", "ckpt")
# The tag suffix of each feature network's FID / KID: val/fid (TF Inception, comparable with
# published figures), val/fid_tv (torchvision's Inception), val/fid_classifier (a dlrun classifier).
TAGS = {"inception": "", "inception_tv": "_tv", "ckpt": "_classifier"}


class GANTrainer(Trainer):
    """Trains the `generator` role against the `discriminator` role, one optimizer each."""

    modes = ("train", "eval", "sample")
    data_free_modes = {"sample": None}
    cpu_bf16 = True  # DCGAN on MNIST: bf16 FID as low, 0.60x the time (docs/precision.md)

    def __init__(
        self,
        *,
        loss: Any,
        sample_every_n_steps: int = 500,
        metrics: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(loss, GANObjective):
            raise UserError(
                f"A GAN trains with a GAN loss: loss=nonsaturating, bce, lsgan or wgan_gp, not "
                f"{getattr(loss, 'name', type(loss).__name__)}."
            )
        model = kwargs["model"]
        if not (hasattr(model, "generator") and hasattr(model, "discriminator")):
            raise UserError(
                f"The GAN trainer needs a GAN model (model=gan or model=dcgan), not "
                f"{type(model).__name__}."
            )
        if kwargs.get("accumulate_grad_batches", 1) != 1:
            raise UserError(
                "trainer.accumulate_grad_batches must be 1 for a GAN: its generator step "
                "back-propagates through the discriminator, whose accumulating gradients it "
                "would corrupt."
            )
        super().__init__(**kwargs)
        self.loss = loss
        self.hooks.append(SampleGrids(sample_every_n_steps))  # the fixed-noise grid every N steps
        cfg = dict(metrics or {})
        self.metric_n = int(cfg.get("n", 2000))
        fid = dict(cfg.get("fid") or {})
        self.feature_kind, self.feature_ckpt = fid.get("features", "auto"), fid.get("ckpt")
        self.feature_weights = fid.get("weights")  # the TF Inception's; None: torch-fidelity's
        if self.feature_kind not in FEATURES:
            raise UserError(
                f"metrics.fid.features must be one of {', '.join(FEATURES)}, "
                f"got '{self.feature_kind}'."
            )
        if self.feature_kind == "ckpt" and not self.feature_ckpt:
            raise UserError(
                "metrics.fid.features=ckpt needs metrics.fid.ckpt=PATH: a dlrun classifier "
                "checkpoint trained on the same data (e.g. from dlrun model=lenet data=mnist)."
            )
        self.gan = checkpoint.unwrap(self.model)
        self.d_steps = 0
        gen = torch.Generator(device=self.device).manual_seed(1234)
        self.fixed_noise = self.gan.sample_latent(64, self.device, gen)  # the same grid all run
        self.extractor: Any = None
        self.tag = TAGS.get(self.feature_kind, "")  # auto: settled by _ensure_features
        self.classifier: metrics_lib.ClassifierFeatures | None = None
        self.real_features: Tensor | None = None

    # ----- what the base loop asks of a task ------------------------------------------------------
    @property
    def default_monitor(self) -> str:  # type: ignore[override]
        return f"val/fid{TAGS.get(self.feature_kind, '')}"

    def roles(self) -> dict[str, nn.Module]:
        return {"generator": self.gan.generator, "discriminator": self.gan.discriminator}

    def role_steps(self, role: str) -> tuple[int, int]:
        """The generator steps once per `critic_iters` critic steps: its schedule spans those."""
        if role == "generator":
            k = self.loss.critic_iters
            return max(1, self.max_steps // k), max(1, self.steps_per_epoch // k)
        return self.max_steps, self.steps_per_epoch

    def logged_metrics(self) -> list[str]:
        tags = ["train/loss_d", "train/loss_g"]
        if self._ensure_features():
            tags += [f"val/fid{self.tag}", f"val/kid{self.tag}"]
        return tags

    def extra_state(self) -> dict[str, Any]:
        return {"d_steps": self.d_steps}  # WGAN-GP: where in its critic_iters cycle the run is

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.d_steps = int(state.get("d_steps", 0))

    def count_flops(self) -> int:  # the generator's, per sample
        return introspect.count_flops(self.model, (self.gan.latent_dim,), self.device)

    def train_loader(self) -> Any:
        """Real images scaled to [-1, 1], the generator's tanh range, whatever data.mean/std say."""
        c = self.data.describe()["input_shape"][0]
        # No random crops: a generator would learn the padding's black borders.
        return self.data.train_loader(mean=[0.5] * c, std=[0.5] * c, crop=False)

    def step(self, batch: Mapping[str, Tensor]) -> Sums:
        real = self.layout(batch["image"])
        b = len(real)
        d, g = self.net("discriminator"), self.net("generator")
        aug = self.data.generators()["aug"]
        z = self.gan.sample_latent(b, self.device, aug)
        with self.autocast():
            # Once per step: the generator's BatchNorm statistics move once. In the critic's
            # memory format like the real batch: a compiled critic fed two layouts fails on CUDA
            # (cuDNN's transposed convolutions may return NHWC).
            fake = self.layout(g(z))
            d_real, d_fake = d(real), d(fake.detach())
            d_loss = self.loss.d(d_real.float(), d_fake.float())
        out: dict[str, tuple[Tensor, int]] = {"loss_d": (d_loss.detach() * b, b)}
        if self.loss.gp_weight:
            # The plain critic: torch.compile has no double backward, which the penalty takes.
            gp = gradient_penalty(self.gan.discriminator, real, fake.float(), aug)
            d_loss = d_loss + self.loss.gp_weight * gp
            out["gp"] = (gp.detach() * b, b)
            out["wasserstein"] = ((d_real.mean() - d_fake.mean()).detach().float() * b, b)
        self.optimize(d_loss, "discriminator")
        self.d_steps += 1
        as_prob = torch.sigmoid if self.loss.probabilities else (lambda t: t)
        out["d_x"] = (as_prob(d_real.detach().float()).sum(), b)
        out["d_g_z"] = (as_prob(d_fake.detach().float()).sum(), b)
        # WGAN-GP: one generator step per `critic_iters` critic steps, each on a fresh real batch.
        if self.d_steps % self.loss.critic_iters == 0:
            with self.autocast():
                g_loss = self.loss.g(d(fake).float())  # the same fakes, through the updated D
            self.optimize(g_loss, "generator")
            out["loss_g"] = (g_loss.detach() * b, b)  # averaged over generator steps only
        return out

    @torch.no_grad()
    def evaluate(self, loader: Any, prefix: str) -> dict[str, float]:
        """FID / KID against real test images (when trainer.val_every_n_* says, and at the end)."""
        if not self._ensure_features():
            return {}
        fake = self.generate(self.metric_n, seed=4321)
        feats = self.extractor(fake)
        out = {
            f"{prefix}/fid{self.tag}": metrics_lib.fid_from_features(feats, self.real_features),
            f"{prefix}/kid{self.tag}": metrics_lib.kid_from_features(
                feats, self.real_features, generator=torch.Generator().manual_seed(0)
            ),
        }
        if self.classifier is not None:  # mode coverage: which classes the samples fall into
            labels = self.classifier.logits(fake).argmax(1)
            cover = metrics_lib.mode_coverage(labels, self.data.describe()["num_classes"])
            out[f"{prefix}/mode_coverage"] = float(cover["coverage"])
            out[f"{prefix}/mode_evenness"] = float(cover["evenness"])
        return out

    def log_start(self, writer: SummaryWriter) -> None:
        images = self.data.example_batch(64, "train", mean=[0.0], std=[1.0])["image"]
        writer.add_image("train/real_images", make_grid(images, nrow=8), 0)
        self.log_samples(writer, 0)

    def log_end(self, writer: SummaryWriter) -> None:
        self.log_samples(writer, self.step_count)

    # ----- samples and metrics ------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, n: int, seed: int = 0, batch: int = 500) -> Tensor:
        """n generated images in [-1, 1] (eval mode: BatchNorm's running statistics)."""
        g = self.gan.generator
        was_training = g.training
        g.eval()
        gen = torch.Generator(device=self.device).manual_seed(seed)
        z = self.gan.sample_latent(n, self.device, gen)
        with self.autocast():
            out = torch.cat([g(chunk).float() for chunk in z.split(batch)])
        g.train(was_training)
        return out

    @torch.no_grad()
    def log_samples(self, writer: SummaryWriter, step: int) -> None:
        """The generator's images of the fixed noise (eval mode), as one grid at `step`."""
        g = self.gan.generator
        was_training = g.training
        g.eval()
        with self.autocast():
            images = g(self.fixed_noise).float()
        g.train(was_training)
        grid = make_grid((images + 1) / 2, nrow=8).clamp(0, 1)
        writer.add_image("samples/fixed_noise", grid, step)

    def _ensure_features(self) -> bool:
        """Build the feature network once (and the real test images' features)."""
        if self.extractor is not None:
            return True
        if self.feature_kind == "none":  # auto found no feature network: do not retry each epoch
            return False
        if self.feature_ckpt:
            self.classifier, _ = load_classifier(
                self.feature_ckpt, self.device, key="metrics.fid.ckpt", data_name=self.data.name
            )
        if self.feature_kind == "ckpt":
            self.extractor = self.classifier
        elif self.feature_kind == "inception":
            self.extractor = self._tf_inception()
        elif self.feature_kind == "inception_tv":
            self.extractor = metrics_lib.InceptionFeatures(self.device)
        else:  # auto: the TF Inception where its weights can be had, else the classifier, else none
            try:
                self.extractor = self._tf_inception()
            except UserError as err:
                if self.feature_weights:  # weights named but unusable: a mistake, not a fallback
                    raise
                self.extractor = self.classifier
                if self.extractor is None:
                    log.warning("no FID/KID for this run: %s", err)
                    self.feature_kind = "none"
                    if self.monitor.name in ("val/fid", "val/fid_classifier"):
                        self.monitor.name = None  # nothing to select on: no best.pt, no HParams tag
                    return False
        self.tag = TAGS["ckpt"] if self.extractor is self.classifier else self.tag
        real = self.data.example_batch(self.metric_n, "val", mean=[0.5], std=[0.5])["image"]
        self.real_features = self.extractor(real)
        if self.extractor is self.classifier and self.monitor.name == "val/fid":
            self.monitor.name = "val/fid_classifier"
        return True

    def _tf_inception(self) -> metrics_lib.TFInceptionFeatures:
        return metrics_lib.TFInceptionFeatures(self.device, weights_path=self.feature_weights)

    def mode_sample(self, state: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, float]:
        """mode=sample: sample.n PNG files and grid.png in <run>/sample/."""
        out_dir = self.output_dir("sample")
        paths = self.sample(int(options.get("n", 64)), out_dir)
        log.info("wrote %d samples and grid.png to %s", len(paths), out_dir)
        return {"samples": float(len(paths))}

    def sample(self, n: int, out_dir: Path) -> list[Path]:
        """n PNG files and a grid (grid.png) in out_dir."""
        if n < 1:
            raise UserError(f"sample.n must be a positive integer, got {n}.")
        out_dir.mkdir(parents=True, exist_ok=True)
        images = (self.generate(n, seed=0) + 1) / 2
        width = len(str(n - 1))
        paths = []
        for i, image in enumerate(images):
            paths.append(out_dir / f"{i:0{width}d}.png")
            save_image(image, paths[-1])
        save_image(images[:256], out_dir / "grid.png", nrow=int(math.sqrt(min(n, 256))) or 1)
        return paths
