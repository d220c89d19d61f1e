"""Checkpoints of the previous dlrun (format 1, tests/data/v1/README.md): eval, ckpt=, sample work;
resume=true refuses them in one paragraph."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dlrun.cli import run
from dlrun.errors import UserError
from dlrun.models.gan import gan

V1 = Path(__file__).parent / "data" / "v1"
# The model.* options of the run that wrote gan_last.pt (tests/data/v1/README.md).
TINY_GAN = ("model=gan", "model.g_hidden=[16,32]", "model.d_hidden=[16]", "model.latent_dim=8")


def saved(name: str) -> dict:
    return torch.load(V1 / name, weights_only=True)


def test_the_fixtures_are_format_1() -> None:
    """What the other tests rely on: old files, with no `format` key (dlrun 1 wrote none)."""
    for name in ("linear_best.pt", "linear_last.pt", "gan_last.pt"):
        assert saved(name).get("format", 1) == 1, name


def test_eval_of_an_old_checkpoint_scores_what_it_scored_when_written(
    make_cfg, tmp_path: Path
) -> None:
    old = saved("linear_best.pt")["metrics"]  # val was the test split of the same fake MNIST
    metrics = run(make_cfg("model=linear", "mode=eval", f"ckpt={V1 / 'linear_best.pt'}"), tmp_path)
    assert metrics["test/acc"] == old["val/acc"]
    assert metrics["test/loss"] == pytest.approx(old["val/loss"], rel=1e-5)
    assert metrics["step"] == saved("linear_best.pt")["step"]


def test_ckpt_of_an_old_checkpoint_starts_training_from_its_weights(
    make_cfg, tmp_path: Path
) -> None:
    still = ("model=linear", "trainer.max_steps=1", "optim.lr=0")
    run(make_cfg(*still, f"ckpt={V1 / 'linear_last.pt'}"), tmp_path / "from_old")
    run(make_cfg(*still), tmp_path / "fresh")  # the same run without ckpt=: its own init
    old = saved("linear_last.pt")["model"]
    after = torch.load(tmp_path / "from_old" / "checkpoints" / "last.pt", weights_only=True)
    fresh = torch.load(tmp_path / "fresh" / "checkpoints" / "last.pt", weights_only=True)
    assert after["model"].keys() == old.keys()
    for key in old:
        assert torch.equal(after["model"][key], old[key]), key
        assert not torch.equal(fresh["model"][key], old[key]), key  # lr=0 alone proves nothing
    assert after["step"] == 1 and after.get("format", 1) > 1  # a new run in the new format


def test_resume_from_an_old_checkpoint_is_refused_in_one_paragraph(
    make_cfg, tmp_path: Path
) -> None:
    last = tmp_path / "checkpoints" / "last.pt"
    last.parent.mkdir()
    shutil.copyfile(V1 / "linear_last.pt", last)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    # The old run's own settings (a changed config would be refused for that reason instead).
    cfg = make_cfg("model=linear", "trainer.max_epochs=2", "resume=true")
    with pytest.raises(UserError) as caught:
        run(cfg, tmp_path)
    message = str(caught.value)
    assert "written by an earlier dlrun" in message
    assert f"mode=eval ckpt={last}" in message and f"with ckpt={last}" in message
    assert "\n" not in message
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing written, the old checkpoint untouched


def test_sample_mode_of_an_old_gan_checkpoint_writes_its_generators_images(
    make_cfg, tmp_path: Path
) -> None:
    ckpt = V1 / "gan_last.pt"
    metrics = run(make_cfg(*TINY_GAN, "mode=sample", f"ckpt={ckpt}", "sample.n=4"), tmp_path)
    pngs = sorted(p.name for p in (tmp_path / "sample").glob("*.png"))
    assert pngs == ["0.png", "1.png", "2.png", "3.png", "grid.png"] and metrics["samples"] == 4
    # The images are the old generator's: z from seed 0, eval mode, (g(z) + 1) / 2, as PNG bytes.
    net = gan(g_hidden=[16, 32], d_hidden=[16], latent_dim=8)
    net.load_state_dict(saved("gan_last.pt")["model"])
    net.eval()
    z = net.sample_latent(4, "cpu", torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ((net.generator(z) + 1) / 2 * 255).clamp(0, 255)
    for i in range(4):
        png = torch.from_numpy(np.array(Image.open(tmp_path / "sample" / f"{i}.png")))
        got = png.float()[..., 0] if png.dim() == 3 else png.float()
        assert got.shape == (28, 28)
        torch.testing.assert_close(got, expected[i, 0], atol=1.0, rtol=0)
