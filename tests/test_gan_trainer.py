"""The GAN trainer: every model x loss trains a few steps, resume is exact, sample mode, errors."""

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from dlrun.cli import run
from dlrun.errors import UserError

QUICK = ("data.batch_size=50", "trainer.log_every_n_steps=2", "metrics.n=100")
TIMING = ("time/", "images_per_s")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """A LeNet-5 checkpoint on the MNIST fixture: the offline FID feature network."""
    from hydra import compose, initialize_config_dir

    from dlrun.cli import CONFIG_DIR

    out = tmp_path_factory.mktemp("classifier")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"data.root={data_root}", "device=cpu", "trainer.progress=false",
                       "model=lenet", "model.activation=relu", "trainer.max_epochs=1"],
        )  # fmt: skip
    run(cfg, out)
    return out / "checkpoints" / "last.pt"


def gan_cfg(make_cfg, classifier: Path, *overrides: str):
    fid = ("metrics.fid.features=ckpt", f"metrics.fid.ckpt={classifier}")
    return make_cfg(*QUICK, *fid, *overrides)


@pytest.mark.parametrize("loss", ["nonsaturating", "bce", "lsgan", "wgan_gp"])
@pytest.mark.parametrize("model", ["gan", "dcgan"])
def test_every_gan_model_trains_with_every_loss(
    make_cfg, classifier: Path, tmp_path: Path, model: str, loss: str
) -> None:
    cfg = gan_cfg(make_cfg, classifier, f"model={model}", f"loss={loss}", "trainer.max_steps=5")
    metrics = run(cfg, tmp_path)
    assert metrics["step"] == 5
    for key in ("train/loss_d", "train/loss_g", "train/d_x", "train/d_g_z", "val/fid_classifier",
                "val/kid_classifier", "val/mode_coverage", "val/mode_evenness"):  # fmt: skip
        assert key in metrics and metrics[key] == metrics[key], key  # present, not NaN
    assert all(k in metrics for k in ("train/gp", "train/wasserstein")) == (loss == "wgan_gp")
    if loss in ("nonsaturating", "bce"):
        assert 0 <= metrics["train/d_x"] <= 1 and 0 <= metrics["train/d_g_z"] <= 1
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert set(state["optimizer"]) == {"generator", "discriminator"}


def test_wgan_gp_logs_penalty_and_distance_and_uses_a_batchnorm_free_critic(
    make_cfg, classifier: Path, tmp_path: Path
) -> None:
    cfg = gan_cfg(make_cfg, classifier, "model=dcgan", "loss=wgan_gp", "trainer.max_steps=10")
    metrics = run(cfg, tmp_path)
    assert metrics["train/gp"] >= 0 and "train/wasserstein" in metrics
    weights = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert not any("running_mean" in k for k in weights if k.startswith("discriminator."))


def test_gan_resume_ends_exactly_like_an_uninterrupted_run(
    make_cfg, classifier: Path, tmp_path: Path
) -> None:
    full = run(gan_cfg(make_cfg, classifier, "model=gan", "trainer.max_epochs=2"), tmp_path / "a")
    run(gan_cfg(make_cfg, classifier, "model=gan", "trainer.max_epochs=2", "trainer.max_steps=4"),
        tmp_path / "b")  # fmt: skip
    # The first run stopped after epoch 1 (4 steps of 50 on 200 images): continue it to the end.
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    ckpt["max_steps"] = 8  # as if the 8-step run had been killed after its first epoch
    torch.save(ckpt, tmp_path / "b" / "checkpoints" / "last.pt")
    resumed = run(
        gan_cfg(make_cfg, classifier, "model=gan", "trainer.max_epochs=2", "resume=true"),
        tmp_path / "b",
    )
    stable = lambda m: {k: v for k, v in m.items() if not any(t in k for t in TIMING)}  # noqa: E731
    assert stable(resumed) == pytest.approx(stable(full))


def test_sample_mode_writes_n_pngs_and_a_grid(make_cfg, classifier: Path, tmp_path: Path) -> None:
    run(gan_cfg(make_cfg, classifier, "model=dcgan", "trainer.max_steps=2"), tmp_path / "train")
    ckpt = tmp_path / "train" / "checkpoints" / "last.pt"
    run(make_cfg("model=dcgan", "mode=sample", f"ckpt={ckpt}", "sample.n=10"), tmp_path / "s")
    pngs = sorted((tmp_path / "s" / "sample").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i}.png" for i in range(10)] + ["grid.png"]


def test_tensorboard_gets_losses_probabilities_and_throttled_sample_grids(
    make_cfg, classifier: Path, tmp_path: Path
) -> None:
    cfg = gan_cfg(make_cfg, classifier, "model=gan", "trainer.max_steps=8",
                  "trainer.max_epochs=2", "trainer.sample_every_n_steps=4")  # fmt: skip
    run(cfg, tmp_path)
    events = [
        v for f in tmp_path.glob("events.out.tfevents.*")
        for e in EventFileLoader(str(f)).Load() for v in e.summary.value
    ]  # fmt: skip
    tags = {v.tag for v in events}
    assert {"train/loss_d", "train/loss_g", "train/d_x", "train/d_g_z", "val/fid_classifier",
            "train/real_images"} <= tags  # fmt: skip
    grids = [v for v in events if v.tag == "samples/fixed_noise"]
    assert len(grids) == 4  # step 0, every 4 steps (4 and 8), and the end


def test_gan_with_a_classification_loss_is_a_user_error(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="A GAN trains with a GAN loss"):
        run(make_cfg("model=gan", "loss=cross_entropy"), tmp_path)


def test_classifier_with_a_gan_loss_is_a_user_error(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="loss=wgan_gp is not a classification loss"):
        run(make_cfg("model=lenet", "loss=wgan_gp"), tmp_path)


def test_sample_mode_of_a_classifier_is_a_user_error(
    make_cfg, classifier: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match="mode=.sample. is not a mode of this task.*train, eval"):
        run(make_cfg("model=lenet", "mode=sample", f"ckpt={classifier}"), tmp_path)


def test_fid_classifier_of_other_data_is_a_user_error(
    make_cfg, classifier: Path, tmp_path: Path
) -> None:
    cfg = gan_cfg(make_cfg, classifier, "model=dcgan", "data=cifar10", "trainer.max_steps=1")
    with pytest.raises(
        UserError, match="metrics.fid.ckpt=.* is a classifier of mnist, not of cifar10"
    ):
        run(cfg, tmp_path)


def test_metrics_json_of_a_gan_run(
    make_cfg, classifier: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every value of metrics.json from what the run computed on: the discriminator's logits
    (recorded at the loss), the classifier's features and labels (recorded at the metrics),
    each put through its formula here. Nonsaturating loss; 2 steps of 50 of the 200 images."""
    from dlrun.scoring import sample_quality as metrics_lib
    from dlrun.tasks.gan import losses

    seen: dict[str, list] = {"d": [], "g": [], "fid": [], "kid": [], "labels": []}
    d_loss, g_loss = losses.GAN_LOSSES["nonsaturating"]

    def recorded(name: str, fn: Callable) -> Callable:
        def call(*args: object, **kwargs: object) -> object:
            seen[name].append([a.detach().clone() if torch.is_tensor(a) else a for a in args])
            return fn(*args, **kwargs)

        return call

    monkeypatch.setitem(
        losses.GAN_LOSSES, "nonsaturating", (recorded("d", d_loss), recorded("g", g_loss))
    )
    for name, fn in (("fid", "fid_from_features"), ("kid", "kid_from_features"),
                     ("labels", "mode_coverage")):  # fmt: skip
        monkeypatch.setattr(metrics_lib, fn, recorded(name, getattr(metrics_lib, fn)))
    cfg = gan_cfg(make_cfg, classifier, "model=gan", "trainer.max_steps=2")
    returned = run(cfg, tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == pytest.approx(returned)
    # Steps: 2 of the config's max_steps, each one D and one G update, in epoch 1 (4 steps long).
    assert saved["step"] == 2 and saved["epoch"] == 1
    assert len(seen["d"]) == len(seen["g"]) == 2
    assert saved["params"] == sum(p.numel() for p in instantiate(cfg.model).parameters())
    assert saved["train/lr"] == pytest.approx(cfg.optim.lr)  # sched=none
    # Losses: the window's mean of each step's -mean log D(x) - mean log(1 - D(G(z))), with
    # log sigmoid(t) = -softplus(-t); D(x) and D(G(z)) the mean probabilities.
    softplus = torch.nn.functional.softplus
    real, fake = (torch.stack([step[i] for step in seen["d"]]) for i in (0, 1))
    g_fake = torch.stack([step[0] for step in seen["g"]])
    assert real.shape == fake.shape == g_fake.shape == (2, 50)  # a logit per image, 50 a batch
    loss_d = (softplus(-real).mean(1) + softplus(fake).mean(1)).mean().item()
    assert saved["train/loss_d"] == pytest.approx(loss_d, rel=1e-5)
    assert saved["train/loss_g"] == pytest.approx(softplus(-g_fake).mean().item(), rel=1e-5)
    assert saved["train/d_x"] == pytest.approx(torch.sigmoid(real).mean().item(), rel=1e-5)
    assert saved["train/d_g_z"] == pytest.approx(torch.sigmoid(fake).mean().item(), rel=1e-5)
    # Two steps from the initialisation: a near-chance D (2 ln 2 and ln 2 at D = 1/2), and by
    # Jensen, -log of the mean probabilities bounds the mean of the logs from below.
    assert abs(saved["train/loss_d"] - 2 * math.log(2)) < 0.3
    assert abs(saved["train/loss_g"] - math.log(2)) < 0.3
    assert 0.3 < saved["train/d_g_z"] < saved["train/d_x"] < 0.7
    bound = -math.log(saved["train/d_x"]) - math.log(1 - saved["train/d_g_z"])
    assert bound <= saved["train/loss_d"] < bound + 0.05
    # FID, KID and mode coverage of the 100 samples (metrics.n) against the real images.
    ((fake_f, real_f),) = (step[:2] for step in seen["fid"])
    assert fake_f.shape[0] == 100 and fake_f.shape[1] == real_f.shape[1]
    x, y = fake_f.double().numpy(), real_f.double().numpy()
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    fid = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(cov_x + cov_y)
    # tr (S_x S_y)^1/2: the product's eigenvalues are those of a PSD matrix (real, >= 0).
    fid -= 2 * np.sqrt(np.linalg.eigvals(cov_x @ cov_y).real.clip(0)).sum()
    assert saved["val/fid_classifier"] == pytest.approx(fid, rel=1e-3)
    assert saved["val/fid_classifier"] > 0.1  # 2-step samples are not the real digits
    # KID: unbiased MMD^2 of the cubic kernel over 10 subsets of min(1000, |x|, |y|), drawn as
    # the run draws them (seed 0), each kernel mean leaving out k(x_i, x_i).
    m, draw, kid = min(1000, len(x), len(y)), torch.Generator().manual_seed(0), 0.0
    for _ in range(10):
        xs = x[torch.randperm(len(x), generator=draw)[:m].numpy()]
        ys = y[torch.randperm(len(y), generator=draw)[:m].numpy()]
        kxx, kyy, kxy = ((a @ b.T / x.shape[1] + 1) ** 3 for a, b in ((xs, xs), (ys, ys), (xs, ys)))
        kid += (kxx[~np.eye(m, dtype=bool)].mean() + kyy[~np.eye(m, dtype=bool)].mean()) / 10
        kid -= 2 * kxy.mean() / 10
    assert saved["val/kid_classifier"] == pytest.approx(kid, rel=1e-6, abs=1e-9)
    ((labels, classes),) = (step[:2] for step in seen["labels"])
    counts = np.bincount(labels.numpy(), minlength=classes) / len(labels)
    entropy = -sum(c * math.log(c) for c in counts if c > 0)
    assert saved["val/mode_coverage"] == pytest.approx((counts > 0).sum() / 10)
    assert saved["val/mode_evenness"] == pytest.approx(entropy / math.log(10), abs=1e-12)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("model=dcgan", "mode=sample"), "mode=sample needs ckpt=PATH"),
        (("model=gan", "metrics.fid.features=pixels"), "metrics.fid.features must be one of auto"),
        (
            ("model=gan", "metrics.fid.features=ckpt"),
            "metrics.fid.features=ckpt needs metrics.fid.ckpt",
        ),
        (("model=lenet", "trainer=gan", "loss=nonsaturating"), "needs a GAN model"),
    ],
)
def test_gan_config_mistakes_are_user_errors(
    make_cfg, tmp_path: Path, overrides: tuple[str, ...], message: str
) -> None:
    with pytest.raises(UserError, match=message):
        run(make_cfg(*overrides), tmp_path)


def test_sample_n_must_be_positive(make_cfg, classifier: Path, tmp_path: Path) -> None:
    run(gan_cfg(make_cfg, classifier, "model=gan", "trainer.max_steps=1"), tmp_path / "train")
    ckpt = tmp_path / "train" / "checkpoints" / "last.pt"
    with pytest.raises(UserError, match="sample.n must be an integer >= 1, got 0"):
        run(make_cfg("model=gan", "mode=sample", f"ckpt={ckpt}", "sample.n=0"), tmp_path / "s")


def test_auto_features_without_any_network_warn_once_and_skip(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tries = []

    def offline(*_args: object, **_kwargs: object) -> None:
        tries.append(1)
        raise UserError("no Inception weights here")

    def torchvision(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("auto never falls back to torchvision's Inception")

    monkeypatch.setattr("dlrun.scoring.sample_quality.TFInceptionFeatures", offline)
    monkeypatch.setattr("dlrun.scoring.sample_quality.InceptionFeatures", torchvision)
    cfg = make_cfg(*QUICK, "model=gan", "trainer.max_epochs=3")
    caplog.set_level(logging.INFO, logger="dlrun")
    metrics = run(cfg, tmp_path)
    assert len(tries) == 1 and not any("fid" in k for k in metrics)
    assert not (tmp_path / "checkpoints" / "best.pt").exists()  # nothing to select on
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done")]
    # No val/* to show: the run's last line has its final losses, not a bare "done".
    assert done and f"train/loss_d={metrics['train/loss_d']:.4f}" in done[-1], done
    assert "train/lr" not in done[-1]


# A tiny GAN, 2 steps, FID / KID on 4 images each side (KID needs 2): the feature network is slow.
TINY_FID = ("data.batch_size=50", "metrics.n=4", "model=gan", "model.g_hidden=[16,32]",
            "model.d_hidden=[16]", "model.latent_dim=8", "trainer.max_steps=2")  # fmt: skip


class PixelFeatures:
    """A stand-in for torchvision's Inception (its weights are not here): 4x4-pooled pixels."""

    def __init__(self, *_args: object, **_kwargs: object) -> None:
        pass

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1).float().cpu()


def test_inception_tv_features_log_fid_tv(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("dlrun.scoring.sample_quality.InceptionFeatures", PixelFeatures)
    metrics = run(make_cfg(*TINY_FID, "metrics.fid.features=inception_tv"), tmp_path)
    assert {k for k in metrics if "fid" in k or "kid" in k} == {"val/fid_tv", "val/kid_tv"}
    assert metrics["val/fid_tv"] >= 0
    assert (tmp_path / "checkpoints" / "best.pt").exists()  # the monitor followed: val/fid_tv


@pytest.mark.parametrize("features", ["inception", "auto"])
def test_tf_inception_weights_file_logs_fid_and_kid(
    make_cfg, tmp_path: Path, tf_inception_weights: Path, one_thread: None, features: str
) -> None:
    """metrics.fid.weights=PATH (random weights here): val/fid, val/kid on the TF Inception."""
    cfg = make_cfg(*TINY_FID, f"metrics.fid.features={features}",
                   f"metrics.fid.weights={tf_inception_weights}")  # fmt: skip
    metrics = run(cfg, tmp_path)
    assert {k for k in metrics if "fid" in k or "kid" in k} == {"val/fid", "val/kid"}
    assert metrics["val/fid"] >= 0 and metrics["val/kid"] == metrics["val/kid"]  # not NaN
    assert (tmp_path / "checkpoints" / "best.pt").exists()  # the monitor: val/fid


def test_auto_with_unusable_tf_weights_is_an_error_not_a_fallback(
    make_cfg, classifier: Path, tmp_path: Path, torch_fidelity: object
) -> None:
    missing = tmp_path / "missing.pth"
    cfg = make_cfg(*TINY_FID, "metrics.fid.features=auto", f"metrics.fid.weights={missing}",
                   f"metrics.fid.ckpt={classifier}")  # fmt: skip
    with pytest.raises(UserError, match=f"metrics.fid.weights={missing} could not be loaded"):
        run(cfg, tmp_path / "run")


TINY = ("model=gan", "model.g_hidden=[16,32]", "model.d_hidden=[16]", "model.latent_dim=8")


def test_compile_wraps_both_gan_networks_and_changes_no_loss(
    make_cfg, tmp_path: Path, no_fid: None
) -> None:
    from dlrun.cli import build_trainer

    cfg = make_cfg(*QUICK, *TINY, "trainer.compile=true", "trainer.max_steps=4")
    trainer = build_trainer(cfg, tmp_path / "built")
    calls = {"generator": 0, "discriminator": 0}

    def counted(role: str, net: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def call(*args: torch.Tensor) -> torch.Tensor:
            calls[role] += 1
            return net(*args)

        return call

    for role in ("generator", "discriminator"):
        net = trainer.nets[role]
        assert getattr(net, "_orig_mod", None) is getattr(trainer.model, role), role
        assert trainer.net(role) is net
        trainer.nets[role] = counted(role, net)  # the steps must call these, not the plain ones
    compiled = trainer.fit()
    # Per step: g(z) once; D on the reals, the detached fakes, and the fakes for G's loss.
    assert calls == {"generator": 4, "discriminator": 3 * 4}
    plain = run(make_cfg(*QUICK, *TINY, "trainer.max_steps=4"), tmp_path / "plain")
    assert compiled["step"] == plain["step"] == 4
    for key in ("train/loss_d", "train/loss_g", "train/d_x", "train/d_g_z"):
        assert compiled[key] == pytest.approx(plain[key], rel=1e-4), key


@pytest.mark.parametrize("loss", ["nonsaturating", "wgan_gp"])
def test_the_generator_runs_once_per_training_step(
    make_cfg, tmp_path: Path, no_fid: None, loss: str
) -> None:
    """g(z) once per step, its fakes reused for both updates (the BatchNorm statistics move once).

    Sample grids and evaluation call it too, in eval mode without gradients: not counted.
    """
    from dlrun.cli import build_trainer

    steps = 6
    cfg = make_cfg(*QUICK, *TINY, f"loss={loss}", f"trainer.max_steps={steps}",
                   "trainer.sample_every_n_steps=2")  # fmt: skip
    trainer = build_trainer(cfg, tmp_path)
    calls = {"train": 0, "eval": 0}

    def count(module: torch.nn.Module, _inputs: object, _output: object) -> None:
        calls["train" if module.training and torch.is_grad_enabled() else "eval"] += 1

    trainer.model.generator.register_forward_hook(count)
    metrics = trainer.fit()
    assert metrics["step"] == steps
    assert calls["train"] == steps
    assert calls["eval"] >= steps // 2  # the hook did see the sample grids: it counts every call


def test_a_gan_without_fid_gets_no_validation_curve_hint(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The short-run hint is about val/* curves, which a GAN without a feature network never logs
    (a classifier's short run still gets it: tests/test_tensorboard.py)."""

    def offline(*_args: object, **_kwargs: object) -> None:
        raise UserError("no Inception weights here")

    monkeypatch.setattr("dlrun.scoring.sample_quality.TFInceptionFeatures", offline)
    caplog.set_level(logging.INFO, logger="dlrun")
    run(make_cfg(*TINY_FID), tmp_path)
    assert "no FID/KID for this run" in caplog.text and "validation curve" not in caplog.text
