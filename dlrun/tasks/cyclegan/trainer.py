"""CycleGAN: two generators against two discriminators, cycle and identity losses, image pools.

Each step is the authors' `optimize_parameters`: the generator pair's update (adversarial, cycle
and identity losses, the discriminators frozen), then the discriminator pair's (real images
against fakes drawn through each image history pool, halved). Evaluation translates the test
sets and scores the translations: FID/KID on TF-Inception features (when its weights can be
had) and a horse-vs-zebra style domain classifier (`metrics.domain.ckpt`), which works offline.
"""

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter
from torchvision.transforms.v2.functional import rgb_to_grayscale
from torchvision.utils import make_grid, save_image

from dlrun.data.module import kind_of
from dlrun.engine import checkpoint, introspect
from dlrun.engine.loop import Sums, Trainer
from dlrun.engine.run_modes import folder_inputs
from dlrun.errors import UserError
from dlrun.scoring import sample_quality as metrics_lib
from dlrun.scoring.classifiers import load_classifier
from dlrun.tasks.cyclegan import authors
from dlrun.tasks.cyclegan.image_pool import ImagePool

# CycleGAN is a GAN: its adversarial terms are the GAN task's losses, in their per-prediction form
# (the authors' GANLoss: lsgan is MSE to 1 / 0, nonsaturating their 'vanilla' BCE on logits).
from dlrun.tasks.gan.losses import GANObjective, TargetLoss

log = logging.getLogger(__name__)
DIRECTIONS = ("AtoB", "BtoA")
GRID_IMAGES = 4  # fixed test images per domain in the TensorBoard grid


def to_grey(images: Tensor) -> Tensor:
    """RGB -> its luminance in all three channels (torchvision's weights, those of PIL's "L")."""
    return rgb_to_grayscale(images, num_output_channels=3)


class CycleGANTrainer(Trainer):
    """Roles "generators" (G_A: A -> B, G_B: B -> A) and "discriminators" (D_A, D_B)."""

    modes = ("train", "eval", "translate")
    data_kinds = ("unpaired",)
    cpu_bf16 = True  # horse2zebra 64 px: bf16 domain transfer as high, 0.59x the time (docs/precision.md)

    def __init__(
        self,
        *,
        loss: Any,
        lambda_cycle: float = 10.0,
        lambda_identity: float = 0.5,
        pool_size: int = 50,
        sample_every_n_steps: int = 500,
        metrics: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        name = getattr(loss, "name", type(loss).__name__)
        if not isinstance(loss, GANObjective) or loss.target is None:
            raise UserError(
                f"CycleGAN trains with loss=lsgan (the paper's) or loss=nonsaturating, not {name}."
            )
        model, data = kwargs["model"], kwargs["data"]
        if not (hasattr(model, "generators") and hasattr(model, "discriminators")):
            raise UserError(
                f"The CycleGAN trainer needs model=cyclegan, not {type(model).__name__}."
            )
        if kind_of(data) != "unpaired":
            raise UserError(
                f"CycleGAN trains on two unpaired image domains: data=horse2zebra, or "
                f"data=unpaired_folder data.root=DIR (trainA, trainB, testA, testB), not "
                f"data={getattr(data, 'name', type(data).__name__)}."
            )
        if kwargs.get("accumulate_grad_batches", 1) != 1:
            raise UserError(
                "trainer.accumulate_grad_batches must be 1 for CycleGAN: the generator step "
                "back-propagates through the discriminators."
            )
        if lambda_cycle < 0 or lambda_identity < 0 or pool_size < 0:
            raise UserError(
                "trainer.lambda_cycle, trainer.lambda_identity and trainer.pool_size must be >= 0."
            )
        super().__init__(**kwargs)
        self.adversarial: TargetLoss = loss.target  # (D's patch outputs, real?) -> loss
        self.lambda_cycle, self.lambda_identity = lambda_cycle, lambda_identity
        self.pools = {"a": ImagePool(pool_size), "b": ImagePool(pool_size)}
        self.sample_every = max(1, sample_every_n_steps)
        self.gan = checkpoint.unwrap(self.model)
        cfg = dict(metrics or {})
        fid, domain = dict(cfg.get("fid") or {}), dict(cfg.get("domain") or {})
        self.fid_features, self.fid_weights = fid.get("features", "auto"), fid.get("weights")
        if self.fid_features not in ("auto", "inception", "inception_tv", "none"):
            raise UserError(
                "metrics.fid.features for CycleGAN is auto, inception (TF Inception: val/fid), "
                f"inception_tv (torchvision's: val/fid_tv) or none, not {self.fid_features}."
            )
        self.domain_ckpt = domain.get("ckpt")
        self.inception: Any = None  # built on first use; False: unavailable (said once)
        self.real_features: dict[str, Tensor] = {}
        self.domain: metrics_lib.ClassifierFeatures | None = None
        if self.domain_ckpt:  # checked now: a wrong checkpoint fails before training starts
            self.domain, _ = load_classifier(
                self.domain_ckpt,
                self.device,
                key="metrics.domain.ckpt",
                image_size=data.image_size,
            )

    # ----- what the base loop asks of a task ------------------------------------------------------
    @property
    def default_monitor(self) -> str | None:  # type: ignore[override]
        if self.mode == "translate":
            return None  # nothing is evaluated: do not load the FID network
        if self._inception() is not None:
            return f"val/{self.fid_tag}"
        return "val/domain_transfer" if self.domain is not None else None

    def roles(self) -> dict[str, nn.Module]:
        return {"generators": self.gan.generators, "discriminators": self.gan.discriminators}

    def count_flops(self) -> int:  # one generator's, per image
        shape = tuple(self.data.describe()["input_shape"])
        return introspect.count_flops(self.gan.generators.g_a, shape, self.device)

    def logged_metrics(self) -> list[str]:
        tags = [f"train/{k}_{d}" for d in "AB" for k in ("D", "G", "cycle", "idt")]
        if self._inception() is not None:
            names = (self.fid_tag, self.fid_tag.replace("fid", "kid"))
            tags += [f"val/{m}{s}" for m in names for s in ("", "_AtoB", "_BtoA")]
        if self.domain is not None:
            tags += [f"val/domain_transfer{s}" for s in ("", "_AtoB", "_BtoA")]
            tags += ["val/domain_acc", "val/domain_acc_grey"]
        return tags

    def extra_state(self) -> dict[str, Any]:
        return {f"pool_{d}": pool.state_dict() for d, pool in self.pools.items()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for d, pool in self.pools.items():
            saved = dict(state.get(f"pool_{d}") or {})
            if saved.get("images") is not None:
                saved["images"] = saved["images"].to(self.device)
            pool.load_state_dict(saved)

    # ----- one step -------------------------------------------------------------------------------
    def _set_requires_grad(self, module: nn.Module, flag: bool) -> None:
        for p in module.parameters():
            p.requires_grad_(flag)

    def step(self, batch: Mapping[str, Tensor]) -> Sums:
        real_a, real_b = self.layout(batch["image_a"]), self.layout(batch["image_b"])
        b = len(real_a)
        gens, discs = self.net("generators"), self.net("discriminators")
        identity = self.lambda_identity > 0
        lam, lam_idt = self.lambda_cycle, self.lambda_cycle * self.lambda_identity
        # Generators: the discriminators judge but do not learn (no gradients for their weights).
        self._set_requires_grad(self.gan.discriminators, False)
        with self.autocast():
            out = gens(real_a, real_b, identity)
            pred_fake_b, pred_fake_a = discs(out["fake_b"], out["fake_a"])
            losses = {
                "G_A": self.adversarial(pred_fake_b.float(), True),
                "G_B": self.adversarial(pred_fake_a.float(), True),
                "cycle_A": F.l1_loss(out["rec_a"].float(), real_a) * lam,
                "cycle_B": F.l1_loss(out["rec_b"].float(), real_b) * lam,
            }
            if identity:
                losses["idt_A"] = F.l1_loss(out["idt_a"].float(), real_b) * lam_idt
                losses["idt_B"] = F.l1_loss(out["idt_b"].float(), real_a) * lam_idt
        self.optimize(sum(losses.values()), "generators")
        self._set_requires_grad(self.gan.discriminators, True)
        # Discriminators: real against pooled fakes. Real and fake go through each network as one
        # batch: instance norm is per image, so this equals two calls and runs faster.
        aug = self.data.generators()["aug"]
        # Detached: the generators' graph is spent (and pool_size=0 returns the fakes as given).
        fake_b = self.pools["b"].query(out["fake_b"].detach(), aug).to(real_b.dtype)
        fake_a = self.pools["a"].query(out["fake_a"].detach(), aug).to(real_a.dtype)
        fake_b, fake_a = self.layout(fake_b), self.layout(fake_a)
        with self.autocast():
            pred_b, pred_a = discs(torch.cat([real_b, fake_b]), torch.cat([real_a, fake_a]))
            pred_b, pred_a = pred_b.float(), pred_a.float()
            adv = self.adversarial
            losses["D_A"] = 0.5 * (adv(pred_b[:b], True) + adv(pred_b[b:], False))
            losses["D_B"] = 0.5 * (adv(pred_a[:b], True) + adv(pred_a[b:], False))
        self.optimize(losses["D_A"] + losses["D_B"], "discriminators")
        if (self.step_count + 1) % self.sample_every == 0:
            self._log_samples(self.step_count + 1)
        return {k: (v.detach() * b, b) for k, v in losses.items()}

    # ----- translations ---------------------------------------------------------------------------
    @torch.no_grad()
    def translate(self, images: Tensor, direction: str = "AtoB", batch: int = 50) -> Tensor:
        """Images in [-1, 1] through G_A (AtoB) or G_B (BtoA), in eval mode; float32."""
        g = self.gan.generators.g_a if direction == "AtoB" else self.gan.generators.g_b
        was_training = g.training
        g.eval()
        with self.autocast():
            out = [g(self.layout(chunk.to(self.device))).float() for chunk in images.split(batch)]
        g.train(was_training)
        return torch.cat(out)

    def _test_images(self, domain: str) -> Tensor:
        """A domain's test images in [-1, 1]."""
        return self.data.images("test", domain).float() / 127.5 - 1

    @torch.no_grad()
    def _log_samples(self, step: int) -> None:
        """Rows of: real A, fake B, reconstructed A, real B, fake A, reconstructed B."""
        if self.writer is None:
            return
        real_a, real_b = self._test_images("a"), self._test_images("b")
        n = min(GRID_IMAGES, len(real_a), len(real_b))
        real_a, real_b = real_a[:n], real_b[:n]
        fake_b, fake_a = self.translate(real_a, "AtoB"), self.translate(real_b, "BtoA")
        rec_a, rec_b = self.translate(fake_b, "BtoA"), self.translate(fake_a, "AtoB")
        columns = torch.stack([real_a, fake_b, rec_a, real_b, fake_a, rec_b], 1)  # (n, 6, C, H, W)
        grid = make_grid((columns.flatten(0, 1) + 1) / 2, nrow=6, padding=2).clamp(0, 1)
        self.writer.add_image("samples/translations", grid, step)

    def log_start(self, writer: SummaryWriter) -> None:
        self._log_samples(0)

    def log_end(self, writer: SummaryWriter) -> None:
        if self.step_count % self.sample_every:  # else the last step logged it already
            self._log_samples(self.step_count)

    # ----- evaluation -----------------------------------------------------------------------------
    def _inception(self) -> Any:
        """The FID feature network (TF Inception: val/fid; torchvision's: val/fid_tv), or None.

        features=auto without metrics.fid.weights: offline without the weights, one warning and
        no FID. Asked for explicitly (features=inception, or a weights file): an error instead.
        """
        if self.inception is None:
            self.inception = False
            explicit = self.fid_features != "auto" or self.fid_weights
            try:
                if self.fid_features == "inception_tv":
                    self.inception = metrics_lib.InceptionFeatures(self.device)
                elif self.fid_features in ("auto", "inception"):
                    self.inception = metrics_lib.TFInceptionFeatures(
                        self.device, weights_path=self.fid_weights
                    )
            except UserError as err:
                if explicit:
                    raise
                log.warning("no FID/KID for this run: %s", err)
        return self.inception or None

    @property
    def fid_tag(self) -> str:
        return "fid_tv" if self.fid_features == "inception_tv" else "fid"

    @torch.no_grad()
    def evaluate(self, loader: Any, prefix: str) -> dict[str, float]:
        """Translate both test sets; FID/KID against the target domain's real test images, and
        the domain classifier's verdicts (and its accuracy on real and greyscale test images)."""
        real = {d: self._test_images(d) for d in "ab"}
        fake = {"b": self.translate(real["a"], "AtoB"), "a": self.translate(real["b"], "BtoA")}
        out: dict[str, float] = {}
        inception = self._inception()
        if inception is not None:
            for target, direction in (("b", "AtoB"), ("a", "BtoA")):
                if target not in self.real_features:
                    self.real_features[target] = inception(real[target])
                feats, ref = inception(fake[target]), self.real_features[target]
                fid, kid = self.fid_tag, self.fid_tag.replace("fid", "kid")
                out[f"{prefix}/{fid}_{direction}"] = metrics_lib.fid_from_features(feats, ref)
                out[f"{prefix}/{kid}_{direction}"] = metrics_lib.kid_from_features(
                    feats, ref, generator=torch.Generator().manual_seed(0)
                )
            for m in (self.fid_tag, self.fid_tag.replace("fid", "kid")):
                out[f"{prefix}/{m}"] = (out[f"{prefix}/{m}_AtoB"] + out[f"{prefix}/{m}_BtoA"]) / 2
        if self.domain is not None:
            # Label 0 is domain A (trainA: horses), 1 domain B (zebras).
            to_b = (self.domain.logits(fake["b"]).argmax(1) == 1).float().mean().item()
            to_a = (self.domain.logits(fake["a"]).argmax(1) == 0).float().mean().item()
            out[f"{prefix}/domain_transfer_AtoB"] = to_b
            out[f"{prefix}/domain_transfer_BtoA"] = to_a
            out[f"{prefix}/domain_transfer"] = (to_b + to_a) / 2
            images = torch.cat([real["a"], real["b"]])
            labels = torch.cat([torch.zeros(len(real["a"])), torch.ones(len(real["b"]))]).long()
            for tag, x in (("domain_acc", images), ("domain_acc_grey", to_grey(images))):
                pred = self.domain.logits(x).argmax(1)
                out[f"{prefix}/{tag}"] = (pred == labels).float().mean().item()
        return out

    # ----- mode=translate -------------------------------------------------------------------------
    def run_mode(self, mode: str, *, ckpt: str | None, resume: bool, options: Mapping[str, Any],
                 commit: Callable[[], None], weights: str = "model") -> dict[str, float]:  # fmt: skip
        """As every task's, but mode=translate also takes a generator file of the CycleGAN
        authors' code (tasks/cyclegan/authors.py) into G_A."""
        if mode == "translate" and ckpt:
            state = authors.load_generator(self.gan.generators.g_a, str(ckpt), options)
            if state is not None:
                self.checkpoint_path, self.scored_weights = ckpt, "model"
                commit()
                return self.mode_translate(state, dict(options))
        return super().run_mode(mode, ckpt=ckpt, resume=resume, options=options, commit=commit,
                                weights=weights)  # fmt: skip

    def mode_translate(
        self, state: Mapping[str, Any], options: Mapping[str, Any]
    ) -> dict[str, float]:
        """translate.input (a folder, or a split: test | train) through G_A (AtoB) or G_B (BtoA):
        one PNG per image and grid.png (input beside output, the first 32 pairs) in <run>/translate/."""
        direction = str(options.get("direction") or "AtoB")
        if direction not in DIRECTIONS:
            raise UserError(f"translate.direction must be AtoB or BtoA, got '{direction}'.")
        names, images = self._translate_inputs(options, "a" if direction == "AtoB" else "b")
        out_dir = self.output_dir("translate")
        out_dir.mkdir(parents=True, exist_ok=True)
        fake = (self.translate(images, direction) + 1) / 2
        for name, image in zip(names, fake, strict=True):
            save_image(image, out_dir / f"{name}.png")
        pairs = torch.stack([(images.cpu() + 1) / 2, fake.cpu()], 1).flatten(0, 1)[:64]
        save_image(pairs.clamp(0, 1), out_dir / "grid.png", nrow=8, padding=2)
        log.info("translated %d images (%s) into %s", len(names), direction, out_dir)
        return {"translated": float(len(names))}

    def _translate_inputs(
        self, options: Mapping[str, Any], domain: str
    ) -> tuple[list[str], Tensor]:
        spec = str(options.get("input") or "test")
        channels, size, _ = self.data.describe()["input_shape"]  # a stand-in's too (authors.py)
        if spec in ("train", "test"):
            x = self.data.images(spec, domain)
            if x.shape[-1] != size:  # training images are stored at load size: resize down
                x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True)
            folder = f"{spec}{domain.upper()}"
            return [f"{folder}_{i:04d}" for i in range(len(x))], x.float() / 127.5 - 1
        names, images = folder_inputs(spec, channels, size, "bicubic", splits="test, train")
        return names, images.float() / 127.5 - 1
