import math

import pytest
import torch

from dlrun.tasks.gan.losses import (
    GAN_LOSSES,
    TARGET_LOSSES,
    GANObjective,
    bce_d,
    bce_target,
    binary_cross_entropy,
    gradient_penalty,
    lsgan_d,
    lsgan_g,
    lsgan_target,
    minimax_g,
    nonsaturating_g,
    wgan_d,
    wgan_g,
)

LOG2 = math.log(2)


def test_binary_cross_entropy_matches_the_notes_worked_example() -> None:
    # The notes' demo: sigmoid of this 3x3 input against these labels, rows 0.8447, 0.7260, 0.8293.
    logits = torch.tensor(
        [[1.9072, 1.1079, 1.4906], [-0.6584, -0.0512, 0.7608], [-0.0614, 0.6583, 0.1095]]
    )
    target = torch.tensor([[0.0, 1, 1], [1, 1, 1], [0, 0, 0]])
    assert round(binary_cross_entropy(torch.sigmoid(logits), target).item(), 4) == 0.8000
    # ... and the logits form the notes compare it with (nn.BCEWithLogitsLoss) agrees.
    with_logits = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert round(with_logits.item(), 4) == 0.8000


def test_bce_losses_at_logit_zero_are_log_two() -> None:
    # D(x) = sigmoid(0) = 1/2 everywhere: every BCE term is log 2.
    zeros = torch.zeros(5)
    assert bce_d(zeros, zeros).item() == pytest.approx(2 * LOG2)
    assert minimax_g(zeros).item() == pytest.approx(-LOG2)  # log(1 - 1/2)
    assert nonsaturating_g(zeros).item() == pytest.approx(LOG2)  # -log(1/2)


def test_bce_d_hand_computed() -> None:
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5])
    d_real = [1 / (1 + math.exp(-v)) for v in (2.0, -1.0)]  # D(x) = sigmoid(logit)
    d_fake = 1 / (1 + math.exp(-0.5))
    expected = -(math.log(d_real[0]) + math.log(d_real[1])) / 2 - math.log(1 - d_fake)
    assert bce_d(real, fake).item() == pytest.approx(expected, rel=1e-6)


def test_minimax_g_equals_the_naive_formula_and_is_stable() -> None:
    logits = torch.linspace(-6, 6, 25, dtype=torch.float64)
    naive = torch.log(1 - torch.sigmoid(logits)).mean()
    assert minimax_g(logits).item() == pytest.approx(naive.item(), rel=1e-10)
    # Where the naive form hits log(0) = -inf, the softplus form stays finite (-softplus(100)).
    assert minimax_g(torch.tensor([100.0])).item() == pytest.approx(-100.0)


def test_nonsaturating_g_is_minus_log_d() -> None:
    logits = torch.tensor([-3.0, 0.5, 2.0], dtype=torch.float64)
    expected = -torch.log(torch.sigmoid(logits)).mean()
    assert nonsaturating_g(logits).item() == pytest.approx(expected.item(), rel=1e-10)


def test_saturation_minimax_gradient_vanishes_where_nonsaturating_does_not() -> None:
    # D confidently rejects the fakes (logit -10): the reason the notes move to the other loss.
    l_mm = torch.tensor([-10.0], requires_grad=True)
    l_ns = torch.tensor([-10.0], requires_grad=True)
    minimax_g(l_mm).backward()
    nonsaturating_g(l_ns).backward()
    assert abs(l_mm.grad.item()) < 1e-4
    assert abs(l_ns.grad.item()) > 0.99


def test_lsgan_known_answers() -> None:
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.0])
    # 0.5 * mean(0, 4) + 0.5 * mean(0, 4) = 1 + 1
    assert lsgan_d(real, fake).item() == pytest.approx(2.0)
    # 0.5 * mean((0 - 1)^2, (2 - 1)^2) = 0.5
    assert lsgan_g(fake).item() == pytest.approx(0.5)
    assert lsgan_d(torch.ones(3), torch.zeros(3)).item() == 0.0  # the optimum a=0, b=1


def test_wgan_known_answers() -> None:
    real, fake = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.0])
    assert wgan_d(real, fake).item() == pytest.approx(-0.5 - 2.0)
    assert wgan_g(fake).item() == pytest.approx(0.5)


def _linear_critic(w: torch.Tensor) -> torch.nn.Module:
    class Critic(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(w)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B,)
            return x.flatten(1) @ self.w

    return Critic()


def test_gradient_penalty_of_a_one_lipschitz_linear_critic_is_zero() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2 * 4 * 4, generator=g)
    real, fake = torch.randn(6, 2, 4, 4, generator=g), torch.randn(6, 2, 4, 4, generator=g)
    critic = _linear_critic(w / w.norm())
    assert gradient_penalty(critic, real, fake, generator=g).item() < 1e-6
    # Gradient norm 3 everywhere: (3 - 1)^2 = 4, whatever the interpolation.
    critic = _linear_critic(3 * w / w.norm())
    gp = gradient_penalty(critic, real, fake, generator=g)
    assert gp.item() == pytest.approx(4.0, rel=1e-5)
    gp.backward()  # create_graph=True: the penalty reaches the critic's weights
    assert critic.w.grad is not None and critic.w.grad.norm() > 0


def test_gradient_penalty_is_reproducible_with_a_generator() -> None:
    critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1), torch.nn.Tanh())
    real, fake = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    a = gradient_penalty(critic, real, fake, torch.Generator().manual_seed(1))
    b = gradient_penalty(critic, real, fake, torch.Generator().manual_seed(1))
    assert a.item() == b.item()


def test_registry_pairs() -> None:
    assert GAN_LOSSES["bce"] == (bce_d, minimax_g)
    assert GAN_LOSSES["nonsaturating"] == (bce_d, nonsaturating_g)
    assert GAN_LOSSES["lsgan"] == (lsgan_d, lsgan_g)
    assert GAN_LOSSES["wgan_gp"] == (wgan_d, wgan_g)
    for d_fn, g_fn in GAN_LOSSES.values():
        assert d_fn(torch.zeros(2), torch.zeros(2)).ndim == 0
        assert g_fn(torch.zeros(2)).ndim == 0


# ----- the per-prediction form (CycleGAN's adversarial terms) ---------------------------------
def test_target_forms_known_answers() -> None:
    pred = torch.tensor([0.0, 2.0])
    assert lsgan_target(pred, True).item() == pytest.approx((1 + 1) / 2)  # mean (D - 1)^2
    assert lsgan_target(pred, False).item() == pytest.approx((0 + 4) / 2)  # mean D^2, unhalved
    d = torch.sigmoid(pred)
    assert bce_target(pred, True).item() == pytest.approx(-d.log().mean().item(), rel=1e-6)
    assert bce_target(pred, False).item() == pytest.approx(-(1 - d).log().mean().item(), rel=1e-6)


def test_objective_offers_the_target_form_where_its_loss_has_one() -> None:
    assert TARGET_LOSSES == {"lsgan": lsgan_target, "nonsaturating": bce_target}
    assert GANObjective("lsgan").target is lsgan_target
    assert GANObjective("nonsaturating").target is bce_target
    # minimax G minimises log(1 - D): no target; WGAN's critic has none either.
    assert GANObjective("bce").target is None
    assert GANObjective("wgan_gp", gp_weight=10, critic_iters=5).target is None


def _grads(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cyclegan_terms_are_the_gan_pairs_bit_for_bit(dtype: torch.dtype) -> None:
    """On PatchGAN-shaped outputs (B, 1, H, W), CycleGAN's terms G = t(D(G(x)), real) and
    D = (t(D(y), real) + t(D(G(x)), fake)) / 2 equal the GAN task's pair functions exactly, values
    and gradients: LSGAN G = 2 lsgan_g, D = lsgan_d (Mao's closed form, 1/2 on each term);
    non-saturating G = nonsaturating_g, D = bce_d / 2."""
    g = torch.Generator().manual_seed(0)
    real = (2 * torch.randn(4, 1, 6, 6, generator=g, dtype=dtype)).requires_grad_(True)
    fake = (2 * torch.randn(4, 1, 6, 6, generator=g, dtype=dtype)).requires_grad_(True)

    def cyclegan(t, r, f):  # noqa: ANN001, ANN202 (the trainer's step, on given outputs)
        return t(f, True), 0.5 * (t(r, True) + t(f, False))

    for name, g_scale, d_scale in (("lsgan", 2.0, 1.0), ("nonsaturating", 1.0, 0.5)):
        d_pair, g_pair = GAN_LOSSES[name]
        cg_g, cg_d = cyclegan(GANObjective(name).target, real, fake)
        want_g, want_d = g_scale * g_pair(fake), d_scale * d_pair(real, fake)
        assert torch.equal(cg_g, want_g) and torch.equal(cg_d, want_d), name
        for got, want in zip(_grads(cg_d, real, fake), _grads(want_d, real, fake), strict=True):
            assert torch.equal(got, want), name
        assert torch.equal(_grads(cg_g, fake)[0], _grads(want_g, fake)[0]), name
    # ... and the LSGAN pair is still Mao's closed form, to the bit (values and gradients).
    mao_d = 0.5 * (real - 1).pow(2).mean() + 0.5 * fake.pow(2).mean()
    assert torch.equal(lsgan_d(real, fake), mao_d)
    for got, want in zip(
        _grads(lsgan_d(real, fake), real, fake), _grads(mao_d, real, fake), strict=True
    ):
        assert torch.equal(got, want)
    assert torch.equal(lsgan_g(fake), 0.5 * (fake - 1).pow(2).mean())
