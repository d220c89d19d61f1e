"""CycleGAN: the authors' parameter counts, the image pool, the schedule, training, exact resume,
the domain classifier's scores, mode=translate, and the mistakes a user can make."""

import copy
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from dlrun.cli import Failed, build_trainer, run
from dlrun.engine.sched import linear_decay
from dlrun.errors import UserError
from dlrun.models.cyclegan import CycleGAN, NLayerDiscriminator, ResnetGenerator
from dlrun.tasks.cyclegan.image_pool import ImagePool
from dlrun.tasks.cyclegan.trainer import CycleGANTrainer, to_grey
from dlrun.tasks.gan.losses import GAN_LOSSES, bce_target, lsgan_target
from tests.conftest import stopped_at_step

TINY = (
    "model=cyclegan", "data=horse2zebra", "data.image_size=16", "data.load_size=20",
    "model.ngf=4", "model.ndf=4", "model.n_blocks=1", "model.n_layers=2", "trainer.pool_size=2",
    "trainer.log_every_n_steps=1", "trainer.sample_every_n_steps=3",
)  # fmt: skip
TIMING = ("time/", "images_per_s")


def write_domain(folder: Path, n: int, colour: tuple[int, int, int], grey: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(len(str(folder)) + n)
    for i in range(n):
        noise = torch.randint(0, 60, (24, 24, 3), generator=g)
        pixels = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8).numpy()
        image = Image.fromarray(pixels)
        if grey and i == 0:
            image = image.convert("L")  # as a few horse2zebra files are
        image.save(folder / f"n{i:04d}.jpg", quality=95)


@pytest.fixture(scope="module")
def h2z_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny horse2zebra in the authors' layout: reddish A (5 + 3), bluish B (7 + 4)."""
    root = tmp_path_factory.mktemp("h2z")
    base = root / "horse2zebra"
    write_domain(base / "trainA", 5, (180, 60, 40), grey=True)
    write_domain(base / "trainB", 7, (40, 60, 180))
    write_domain(base / "testA", 3, (180, 60, 40))
    write_domain(base / "testB", 4, (40, 60, 180), grey=True)
    return root


@pytest.fixture(autouse=True)
def offline(request: pytest.FixtureRequest) -> None:
    """No FID network (CI is offline), except where a test brings random TF-Inception weights."""
    if "tf_inception_weights" not in request.fixturenames:
        request.getfixturevalue("no_fid")


@pytest.fixture
def h2z_cfg(make_cfg: Callable, h2z_root: Path, tmp_path: Path) -> Callable:
    def make(*overrides: str):
        return make_cfg(f"data.root={h2z_root}", f"data.cache_dir={tmp_path / 'cache'}", *overrides)

    return make


def stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}


# ----- networks -------------------------------------------------------------------------------
def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_equal_the_authors_networks() -> None:
    assert count(ResnetGenerator(ngf=64, n_blocks=9)) == 11_378_179
    assert count(ResnetGenerator(ngf=64, n_blocks=6)) == 7_837_699
    assert count(NLayerDiscriminator(ndf=64, n_layers=3)) == 2_764_737
    # n_blocks=auto: 9 at 256 px, 6 below
    assert CycleGAN(image_size=256, ngf=8).n_blocks == 9
    assert CycleGAN(image_size=128, ngf=8).n_blocks == 6


def test_generator_keeps_the_shape_and_patchgan_judges_70px_patches() -> None:
    gan = CycleGAN(image_size=64, ngf=8, ndf=8)
    x = torch.randn(2, 3, 64, 64)
    out = gan.generators(x, x)
    assert {k: tuple(v.shape) for k, v in out.items()} == dict.fromkeys(
        ("fake_b", "rec_a", "fake_a", "rec_b", "idt_a", "idt_b"), (2, 3, 64, 64)
    )
    assert out["fake_b"].abs().max() <= 1  # tanh
    assert tuple(gan.discriminators.d_a(torch.randn(1, 3, 256, 256)).shape) == (1, 1, 30, 30)
    weights = [m.weight for m in gan.modules() if isinstance(m, torch.nn.Conv2d)]
    assert abs(torch.cat([w.flatten() for w in weights]).std().item() - 0.02) < 0.002


# ----- pool, schedule, losses -----------------------------------------------------------------
def test_image_pool_fills_then_swaps_half_the_time_and_replays() -> None:
    pool = ImagePool(3)
    images = [torch.full((1, 1, 2, 2), float(i)) for i in range(200)]
    gen = torch.Generator().manual_seed(0)
    for i in range(3):  # filling: each image comes back as it is
        assert torch.equal(pool.query(images[i], gen), images[i])
    assert pool.count == 3
    state = {"images": pool.images.clone(), "count": pool.count}
    rng = gen.get_state()
    out = [pool.query(images[i], gen)[0, 0, 0, 0].item() for i in range(3, 200)]
    old = sum(v != i for v, i in zip(out, range(3, 200), strict=True))
    assert 60 < old < 137  # about half are earlier images
    assert all(v < i for v, i in zip(out, range(3, 200), strict=True) if v != i)
    replay = ImagePool(3)
    replay.load_state_dict(state)
    gen.set_state(rng)
    assert [replay.query(images[i], gen)[0, 0, 0, 0].item() for i in range(3, 200)] == out
    assert torch.equal(ImagePool(0).query(images[5], gen), images[5])


def test_linear_decay_is_constant_for_half_the_run_then_falls_to_zero() -> None:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-4)
    sched = linear_decay(opt, total_steps=10, steps_per_epoch=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:6] == pytest.approx([2e-4] * 6)
    assert lrs[5:] == pytest.approx([2e-4, 1.6e-4, 1.2e-4, 0.8e-4, 0.4e-4])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_grey() -> None:
    rgb = torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1)
    assert to_grey(rgb).flatten().tolist() == pytest.approx([0.2989 - 0.114] * 3)


# ----- training --------------------------------------------------------------------------------
def test_a_few_steps_log_every_loss_and_the_translation_grid(h2z_cfg, tmp_path: Path) -> None:
    metrics = run(h2z_cfg(*TINY, "trainer.max_steps=4"), tmp_path)
    assert metrics["step"] == 4
    for side in "AB":
        for name in ("D", "G", "cycle", "idt"):
            value = metrics[f"train/{name}_{side}"]
            assert value == value and value > 0, (name, side)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert set(state["optimizer"]) == {"generators", "discriminators"}
    assert set(state["scheduler"]) == {"generators", "discriminators"}
    assert state["task"]["pool_a"]["count"] == 2 and state["task"]["pool_b"]["count"] == 2
    events = [e for f in tmp_path.glob("events.*") for e in EventFileLoader(str(f)).Load()]
    grids = [
        (e.step, v) for e in events for v in e.summary.value if v.tag == "samples/translations"
    ]
    assert [step for step, _ in grids] == [0, 3, 4]  # start, every 3 steps, end
    value = grids[0][1]
    png = (
        value.tensor.string_val[2] if value.HasField("tensor") else value.image.encoded_image_string
    )
    image = Image.open(io.BytesIO(png))
    assert image.size == (6 * 16 + 7 * 2, 3 * 16 + 4 * 2)  # 6 columns; 3 test A images: 3 rows
    tags = {v.tag for e in events for v in e.summary.value}
    assert {"train/D_A", "train/G_B", "train/cycle_A", "train/idt_B"} <= tags


def test_without_identity_loss_there_is_no_idt(h2z_cfg, tmp_path: Path) -> None:
    metrics = run(h2z_cfg(*TINY, "trainer.max_steps=2", "trainer.lambda_identity=0"), tmp_path)
    assert "train/idt_A" not in metrics and "train/cycle_A" in metrics


# ----- one step and the domain score, computed independently ---------------------------------
def first_step(h2z_cfg, tmp_path: Path, *overrides: str):
    """A built trainer (no pool: each discriminator sees this step's fakes), its first batch, and
    a copy of the networks as they were before any step."""
    trainer = build_trainer(h2z_cfg(*TINY, "trainer.pool_size=0", *overrides), tmp_path)
    trainer.train_mode()
    batch = next(iter(trainer.train_loader().iterate(None)))
    return trainer, batch, copy.deepcopy(trainer.gan)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


@pytest.mark.parametrize("loss", ["lsgan", "nonsaturating"])
@pytest.mark.parametrize(
    ("overrides", "lam", "lam_idt"),
    [((), 10.0, 5.0), (("trainer.lambda_cycle=3", "trainer.lambda_identity=0.25"), 3.0, 0.75)],
)
def test_one_step_weighs_each_loss_as_the_paper(
    h2z_cfg, tmp_path: Path, overrides: tuple[str, ...], lam: float, lam_idt: float, loss: str
) -> None:
    """G_A: A -> B judged by D_A. Adversarial terms: the GAN task's losses (GAN_LOSSES), as the
    authors weigh them: G's unhalved (LSGAN: 2 lsgan_g = mean (D - 1)^2), each discriminator's
    halved (LSGAN: lsgan_d, Mao's 1/2; BCE: bce_d / 2). Cycle losses lambda x L1, identity losses
    lambda_identity x lambda x L1 (the default: 0.5 x 10): the logged losses and the gradients
    each optimizer stepped on, from these functions and formulas."""
    trainer, batch, net = first_step(h2z_cfg, tmp_path, f"loss={loss}", *overrides)
    assert trainer.adversarial is {"lsgan": lsgan_target, "nonsaturating": bce_target}[loss]
    a, b = batch["image_a"], batch["image_b"]
    g_a, g_b = net.generators.g_a, net.generators.g_b
    d_a, d_b = net.discriminators.d_a, net.discriminators.d_b
    d_loss, g_loss = GAN_LOSSES[loss]
    g_scale, d_scale = (2.0, 1.0) if loss == "lsgan" else (1.0, 0.5)

    def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).abs().mean()

    fake_b, fake_a = g_a(a), g_b(b)
    g_losses = {
        "G_A": g_scale * g_loss(d_a(fake_b)), "G_B": g_scale * g_loss(d_b(fake_a)),
        "cycle_A": lam * l1(g_b(fake_b), a), "cycle_B": lam * l1(g_a(fake_a), b),
        "idt_A": lam_idt * l1(g_a(b), b), "idt_B": lam_idt * l1(g_b(a), a),
    }  # fmt: skip
    d_losses = {
        "D_A": d_scale * d_loss(d_a(b), d_a(fake_b.detach())),
        "D_B": d_scale * d_loss(d_b(a), d_b(fake_a.detach())),
    }
    want_g = flat(torch.autograd.grad(sum(g_losses.values()), list(net.generators.parameters())))
    want_d = flat(
        torch.autograd.grad(sum(d_losses.values()), list(net.discriminators.parameters()))
    )
    out = trainer.step(batch)
    logged = {k: (total / n).item() for k, (total, n) in out.items()}
    assert logged == pytest.approx(
        {k: v.item() for k, v in (g_losses | d_losses).items()}, rel=1e-4
    )
    # Each role's gradients are still those of its own step (zeroed only before the next one).
    got_g = flat(p.grad for p in trainer.gan.generators.parameters())
    got_d = flat(p.grad for p in trainer.gan.discriminators.parameters())
    assert (got_g - want_g).norm() <= 1e-4 * want_g.norm()
    assert (got_d - want_d).norm() <= 1e-4 * want_d.norm()


def test_each_step_trains_only_its_own_networks(h2z_cfg, tmp_path: Path) -> None:
    """The generator step leaves the discriminators' gradients as they were (they judge, frozen),
    and the discriminator step the generators' (the fakes come detached)."""
    trainer, batch, _ = first_step(h2z_cfg, tmp_path)
    nets = {"generators": trainer.gan.generators, "discriminators": trainer.gan.discriminators}
    optimize, changed = trainer.optimize, []

    def grads(module: torch.nn.Module) -> list:
        return [None if p.grad is None else p.grad.clone() for p in module.parameters()]

    def same(x: list, y: list) -> bool:
        return all(
            (u is None and v is None) or (u is not None and v is not None and torch.equal(u, v))
            for u, v in zip(x, y, strict=True)
        )

    def watched(loss: torch.Tensor, role: str = "model") -> None:
        before = {r: grads(m) for r, m in nets.items()}
        optimize(loss, role)
        changed.append((role, [r for r, m in nets.items() if not same(before[r], grads(m))]))

    trainer.optimize = watched
    for _ in range(2):  # the second: the discriminators hold the first step's gradients
        trainer.step(batch)
    assert changed == [("generators", ["generators"]), ("discriminators", ["discriminators"])] * 2
    assert all(p.requires_grad for p in trainer.gan.discriminators.parameters())  # unfrozen after


class ColourJudge:
    """A stand-in domain classifier: label 0 (domain A) for reddish images, 1 (B) for bluish
    ones, as data=horse2zebra_domains labels trainA 0 and trainB 1; grey ties go to B."""

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        red, blue = images[:, 0].mean((1, 2)), images[:, 2].mean((1, 2))
        return torch.stack([red - blue, blue - red + 1e-3], 1).cpu()


def test_the_domain_score_judges_a_translation_a_to_b_as_b(
    h2z_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """G_A turns every reddish A test image blue (each now a B: AtoB 1); G_B turns only the last
    of the bluish B test images red (1 of 4 an A: BtoA 0.25). Test sets: 3 A, 4 B (one grey)."""
    trainer = build_trainer(h2z_cfg(*TINY), tmp_path)
    trainer.domain = ColourJudge()  # type: ignore[assignment]

    def translate(images: torch.Tensor, direction: str = "AtoB", batch: int = 50) -> torch.Tensor:
        out = images.clone()
        turned = slice(None) if direction == "AtoB" else slice(-1, None)
        out[turned] = images[turned].flip(1)  # RGB -> BGR: red <-> blue
        return out

    monkeypatch.setattr(trainer, "translate", translate)
    metrics = trainer.evaluate(None, "val")
    assert metrics["val/domain_transfer_AtoB"] == 1.0
    assert metrics["val/domain_transfer_BtoA"] == 0.25
    assert metrics["val/domain_transfer"] == 0.625
    assert metrics["val/domain_acc"] == 1.0  # the real test images: A as A, B (grey too) as B
    assert metrics["val/domain_acc_grey"] == pytest.approx(4 / 7)  # all grey: all taken for B


@pytest.mark.usefixtures("one_thread")
def test_resume_mid_epoch_ends_exactly_like_an_uninterrupted_run(
    h2z_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Epochs of 7 steps (7 zebras, 5 horses), pools of 2: a checkpoint at step 4, killed at 5."""
    cfg = (*TINY, "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=4")
    full = run(h2z_cfg(*cfg), tmp_path / "full")
    stopped_at_step(h2z_cfg(*cfg), tmp_path / "cut", CycleGANTrainer, 5, monkeypatch)
    saved = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == 4 and saved["progress"]["batch"] == 4
    resumed = run(h2z_cfg(*cfg, "resume=true"), tmp_path / "cut")
    assert stable(resumed) == stable(full)
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["task"]["pool_b"]["images"], b["task"]["pool_b"]["images"])


@pytest.fixture(scope="module")
def domain_ckpt(h2z_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small horse-vs-zebra classifier trained by dlrun at the translations' size."""
    from hydra import compose, initialize_config_dir

    from dlrun.cli import CONFIG_DIR

    out = tmp_path_factory.mktemp("domain")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            f"data.root={h2z_root}", f"data.source.cache_dir={out / 'cache'}", "device=cpu",
            "trainer.progress=false", "model=lenet", "data=horse2zebra_domains",
            "data.image_size=16", "data.batch_size=4", "trainer.max_epochs=2",
        ])  # fmt: skip
    run(cfg, out)
    return out / "checkpoints" / "last.pt"


def test_domain_classifier_scores_translations_and_selects_nothing_by_default(
    h2z_cfg, domain_ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The authors' protocol: a fixed length, no best.pt (horse2zebra has no validation split);
    a monitor set anyway selects on the test images, and the warning says what to do instead."""
    metrics = run(
        h2z_cfg(*TINY, "trainer.max_steps=3", f"metrics.domain.ckpt={domain_ckpt}"), tmp_path
    )
    for key in ("domain_transfer_AtoB", "domain_transfer_BtoA", "domain_transfer",
                "domain_acc", "domain_acc_grey"):  # fmt: skip
        assert 0 <= metrics[f"val/{key}"] <= 1, key
    assert metrics["val/domain_transfer"] == pytest.approx(
        (metrics["val/domain_transfer_AtoB"] + metrics["val/domain_transfer_BtoA"]) / 2
    )
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "checkpoints" / "best.pt").exists()  # trainer.monitor: null
    assert "test split" not in caplog.text
    hparams = json.loads((tmp_path / "metrics.json").read_text())
    assert "val/domain_acc_grey" in hparams
    caplog.clear()
    selected = tmp_path / "selected"
    run(h2z_cfg(*TINY, "trainer.max_steps=3", f"metrics.domain.ckpt={domain_ckpt}",
                "trainer.monitor=val/domain_transfer"), selected)  # fmt: skip
    assert (selected / "checkpoints" / "best.pt").is_file()
    warnings = [r.getMessage() for r in caplog.records if "test split" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once, though it evaluated at the end only here
    assert warnings[0].startswith(
        "val/domain_transfer is measured on the test split (horse2zebra has no validation split)"
    )
    assert "Set trainer.monitor=null to train for a fixed length" in warnings[0]
    assert "val_split" not in warnings[0]  # no advice to set what an unpaired set lacks


def test_the_recipe_sets_no_monitor_and_a_search_needs_one(h2z_cfg) -> None:
    """trainer.monitor=null: a sweep over CycleGAN names its objective, or is refused at once."""
    from hydra_plugins.dlrun_optuna_sweeper.dlrun_optuna_sweeper import (
        DlrunOptunaSweeper,
        monitor_direction,
    )

    cfg = h2z_cfg("model=cyclegan", "data=horse2zebra")
    assert cfg.trainer.monitor is None and cfg.trainer.monitor_mode == "auto"
    sweeper = object.__new__(DlrunOptunaSweeper)  # its settings only: no Optuna study
    sweeper.settings = {"direction": "minimize"}
    with pytest.raises(Failed, match="trainer.monitor is null, so the trials return nothing"):
        sweeper.check(cfg)
    fid = h2z_cfg("model=cyclegan", "data=horse2zebra", "trainer.monitor=val/fid")
    assert monitor_direction(fid) == ("val/fid", "minimize")
    sweeper.check(fid)  # accepted
    domain = h2z_cfg("model=cyclegan", "data=horse2zebra", "trainer.monitor=val/domain_transfer")
    assert monitor_direction(domain) == ("val/domain_transfer", "maximize")


def test_fid_and_kid_of_both_directions_on_a_tf_inception_weights_file(
    h2z_cfg, tf_inception_weights: Path, tmp_path: Path, one_thread: None
) -> None:
    """metrics.fid.weights=PATH (random weights here, loaded as the real ones are)."""
    cfg = h2z_cfg(*TINY, "trainer.max_steps=2", f"metrics.fid.weights={tf_inception_weights}",
                  "trainer.monitor=val/fid")  # fmt: skip
    metrics = run(cfg, tmp_path)
    for m in ("fid", "kid"):
        parts = metrics[f"val/{m}_AtoB"], metrics[f"val/{m}_BtoA"]
        assert all(v == v for v in parts)  # not NaN
        assert metrics[f"val/{m}"] == pytest.approx(sum(parts) / 2)
    assert metrics["val/fid_AtoB"] >= 0
    assert (tmp_path / "checkpoints" / "best.pt").is_file()  # trainer.monitor=val/fid, min
    with pytest.raises(UserError, match="metrics.fid.weights"):  # named, so not optional
        run(h2z_cfg(*TINY, f"metrics.fid.weights={tmp_path / 'missing.pth'}"), tmp_path / "b")


def test_domain_classifier_of_another_size_is_a_user_error(
    h2z_cfg, domain_ckpt: Path, tmp_path: Path
) -> None:
    cfg = h2z_cfg(*TINY, "data.image_size=12", "data.load_size=14",
                  f"metrics.domain.ckpt={domain_ckpt}")  # fmt: skip
    with pytest.raises(UserError, match="data.image_size=12"):
        run(cfg, tmp_path)


def test_translate_mode_writes_one_file_per_image_and_a_grid(
    h2z_cfg, h2z_root: Path, tmp_path: Path
) -> None:
    run(h2z_cfg(*TINY, "trainer.max_steps=2"), tmp_path / "train")
    ckpt = tmp_path / "train" / "checkpoints" / "last.pt"
    metrics = run(h2z_cfg(*TINY, "mode=translate", f"ckpt={ckpt}"), tmp_path / "t1")
    files = sorted(p.name for p in (tmp_path / "t1" / "translate").glob("*.png"))
    assert metrics["translated"] == 3 and len(files) == 4 and "grid.png" in files
    folder = h2z_root / "horse2zebra" / "testB"
    run(h2z_cfg(*TINY, "mode=translate", f"ckpt={ckpt}", f"translate.input={folder}",
                "translate.direction=BtoA"), tmp_path / "t2")  # fmt: skip
    out = tmp_path / "t2" / "translate"
    assert sorted(p.stem for p in out.glob("n*.png")) == sorted(p.stem for p in folder.glob("*"))
    assert Image.open(out / "n0000.png").size == (16, 16)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"neither a split \(test, train\) nor a folder"):
        run(h2z_cfg(*TINY, "mode=translate", f"ckpt={ckpt}", f"translate.input={empty}"),
            tmp_path / "t4")  # fmt: skip
    with pytest.raises(UserError, match="AtoB or BtoA"):
        run(h2z_cfg(*TINY, "mode=translate", f"ckpt={ckpt}", "translate.direction=up"),
            tmp_path / "t3")  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("loss=wgan_gp",), "loss=lsgan"),
        (("trainer.accumulate_grad_batches=2",), "accumulate_grad_batches must be 1"),
        (("data.load_size=8",), "data.load_size=8"),
        (("model.n_layers=3",), "too small for a PatchGAN"),
        (("metrics.fid.features=ckpt",), "metrics.fid.features for CycleGAN"),
    ],
)
def test_mistakes_are_user_errors(h2z_cfg, tmp_path: Path, overrides, message: str) -> None:
    with pytest.raises(UserError, match=message):
        run(h2z_cfg(*TINY, *overrides), tmp_path)


def test_cyclegan_on_a_classification_set_is_a_user_error(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data=horse2zebra, or data=unpaired_folder"):
        run(make_cfg("model=cyclegan", "model.ngf=4", "model.ndf=4", "data=mnist"), tmp_path)


def test_classifier_trainer_refuses_unpaired_data(h2z_cfg, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="train it with model=cyclegan"):
        run(h2z_cfg("model=lenet", "data=horse2zebra", "data.image_size=16",
                    "data.load_size=20"), tmp_path)  # fmt: skip
