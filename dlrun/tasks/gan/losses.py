"""GAN losses as pure functions of the discriminator's raw outputs (logits), plus the WGAN-GP penalty.

Each `*_d` is minimised by the discriminator (critic), each `*_g` by the generator. They take raw
scores, not probabilities: the log-sigmoid terms are then computed stably (softplus), and LSGAN
and WGAN use the raw score by definition.

`bce_target` and `lsgan_target` are the per-prediction form (one output against an all-real or
all-fake target, averaged over every score: one per image, or one per patch of a PatchGAN). The
BCE and LSGAN pairs below are built from them (all but minimax_g), and CycleGAN uses them as its
authors' `GANLoss`: G = target(D(G(x)), real), D = (target(D(y), real) + target(D(G(x)), fake)) / 2.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def binary_cross_entropy(p: Tensor, target: Tensor) -> Tensor:
    """-mean(t log p + (1 - t) log(1 - p)) on probabilities: the notes' nn.BCELoss."""
    return F.binary_cross_entropy(p, target)


def bce_target(logits: Tensor, real: bool) -> Tensor:
    """BCE on logits against 1 (real) or 0 (fake): -mean log D, or -mean log(1 - D), D = sigmoid."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def lsgan_target(out: Tensor, real: bool) -> Tensor:
    """LSGAN's squared distance to the target b = 1 (real) or a = 0 (fake): mean (D - b)^2, unhalved."""
    target = torch.ones_like(out) if real else torch.zeros_like(out)
    return F.mse_loss(out, target)


def bce_d(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Goodfellow's discriminator loss: BCE(D(x), 1) + BCE(D(G(z)), 0), i.e. -log D(x) - log(1 - D(G(z)))."""
    return bce_target(real_logits, True) + bce_target(fake_logits, False)


def minimax_g(fake_logits: Tensor) -> Tensor:
    """The original (saturating) generator loss mean log(1 - D(G(z))), minimised.

    log(1 - sigmoid(l)) = log(1 / (1 + e^l)) = -softplus(l), stable for any l. It saturates: when
    D rejects the fakes (l << 0) its gradient sigmoid(l) vanishes, the reason for the alternative.
    """
    return -F.softplus(fake_logits).mean()


def nonsaturating_g(fake_logits: Tensor) -> Tensor:
    """The non-saturating generator loss -mean log D(G(z)) = BCE(D(G(z)), 1): strong early gradients."""
    return bce_target(fake_logits, True)


def lsgan_d(real_out: Tensor, fake_out: Tensor) -> Tensor:
    """LSGAN (Mao et al. 2017, a=0, b=c=1): 0.5 mean (D(x) - 1)^2 + 0.5 mean D(G(z))^2."""
    return 0.5 * lsgan_target(real_out, True) + 0.5 * lsgan_target(fake_out, False)


def lsgan_g(fake_out: Tensor) -> Tensor:
    """LSGAN generator: 0.5 mean (D(G(z)) - 1)^2, which still pulls fakes far on the right side."""
    return 0.5 * lsgan_target(fake_out, True)


def wgan_d(real_out: Tensor, fake_out: Tensor) -> Tensor:
    """WGAN critic: mean f(G(z)) - mean f(x), minus the Wasserstein-1 estimate (add the penalty)."""
    return fake_out.mean() - real_out.mean()


def wgan_g(fake_out: Tensor) -> Tensor:
    """WGAN generator: -mean f(G(z))."""
    return -fake_out.mean()


def gradient_penalty(
    critic: Callable[[Tensor], Tensor],
    real: Tensor,
    fake: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """WGAN-GP (Gulrajani et al. 2017): mean (||grad f(x_hat)||_2 - 1)^2 on random interpolates.

    Unweighted: the caller multiplies by lambda (10 in the paper). create_graph=True keeps the
    gradient differentiable, so the penalty trains the critic's parameters.
    """
    # (B, 1, 1, 1): one eps ~ U[0, 1] per sample, on the line between a real and a fake image.
    eps = torch.rand(
        (real.shape[0],) + (1,) * (real.ndim - 1),
        device=real.device,
        dtype=real.dtype,
        generator=generator,
    )
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    # The tiny constant keeps sqrt differentiable where a gradient is exactly zero.
    norm = (grad.flatten(1).pow(2).sum(1) + 1e-12).sqrt()  # (B,)
    return (norm - 1).pow(2).mean()


DLoss = Callable[[Tensor, Tensor], Tensor]
GLoss = Callable[[Tensor], Tensor]
TargetLoss = Callable[[Tensor, bool], Tensor]  # (D's outputs, real?) -> loss

# loss name -> (discriminator loss, generator loss); "wgan_gp" also needs gradient_penalty.
GAN_LOSSES: dict[str, tuple[DLoss, GLoss]] = {
    "bce": (bce_d, minimax_g),
    "nonsaturating": (bce_d, nonsaturating_g),
    "lsgan": (lsgan_d, lsgan_g),
    "wgan_gp": (wgan_d, wgan_g),
}
# loss name -> its per-prediction form, where its generator loss is one: "bce"'s minimax G (log of
# 1 - D, minimised) is not a target, and WGAN has none.
TARGET_LOSSES: dict[str, TargetLoss] = {"lsgan": lsgan_target, "nonsaturating": bce_target}


class GANObjective:
    """The `loss=` of a GAN: a named D/G loss pair, the gradient-penalty weight and critic steps."""

    def __init__(self, name: str, gp_weight: float = 0.0, critic_iters: int = 1) -> None:
        if name not in GAN_LOSSES:
            raise ValueError(f"unknown GAN loss '{name}'; choose one of: {', '.join(GAN_LOSSES)}")
        if critic_iters < 1 or gp_weight < 0:
            raise ValueError("loss.critic_iters must be >= 1 and loss.gp_weight >= 0")
        self.name = name
        self.d, self.g = GAN_LOSSES[name]
        # The per-prediction form (CycleGAN's adversarial terms); None where the loss has none.
        self.target: TargetLoss | None = TARGET_LOSSES.get(name)
        self.gp_weight, self.critic_iters = gp_weight, critic_iters
        # BCE-family discriminators output logits: D(x) as a probability is their sigmoid.
        self.probabilities = name in ("bce", "nonsaturating")
