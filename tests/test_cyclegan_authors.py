"""A generator saved by the CycleGAN authors' code runs in `dlrun mode=translate ckpt=<it>.pth`.

`Theirs` stands in for their ResnetGenerator, written from its layer list (models/networks.py of
junyanz/pytorch-CycleGAN-and-pix2pix, CycleGAN's defaults: instance norm without parameters,
no dropout, reflection padding), so that its state_dict has their key names and shapes. Its
random weights, saved as their code saves them (a plain state_dict), must give dlrun's generator
the same outputs: that proves the key mapping, not only that it loads.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from PIL import Image
from torch import Tensor, nn

from dlrun.errors import UserError
from dlrun.models.cyclegan import ResnetGenerator
from dlrun.models.cyclegan_authors import generator_settings, is_authors_generator, mapped_state
from dlrun.tasks.cyclegan.trainer import CycleGANTrainer
from tests.test_resume_config import dlrun as dlrun_cli  # `dlrun` in this process

NGF, BLOCKS = 4, 2


def pad_conv_norm(c_in: int, c_out: int, k: int, pad: int) -> list[nn.Module]:
    return [nn.ReflectionPad2d(pad), nn.Conv2d(c_in, c_out, k), nn.InstanceNorm2d(c_out)]


class TheirBlock(nn.Module):
    """Their ResnetBlock: `conv_block` = pad, conv, norm, ReLU, pad, conv, norm; x + that."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        first, second = pad_conv_norm(dim, dim, 3, 1), pad_conv_norm(dim, dim, 3, 1)
        self.conv_block = nn.Sequential(*first, nn.ReLU(), *second)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv_block(x)


class Theirs(nn.Module):
    """Their generator's `model`: c7s1-ngf, two stride-2 downs, blocks, two ups, c7s1-3, tanh."""

    def __init__(self, ngf: int = NGF, n_blocks: int = BLOCKS, channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [*pad_conv_norm(channels, ngf, 7, 3), nn.ReLU()]
        for c in (ngf, 2 * ngf):
            layers += [nn.Conv2d(c, 2 * c, 3, 2, 1), nn.InstanceNorm2d(2 * c), nn.ReLU()]
        layers += [TheirBlock(4 * ngf) for _ in range(n_blocks)]
        for c in (4 * ngf, 2 * ngf):
            up = nn.ConvTranspose2d(c, c // 2, 3, 2, 1, output_padding=1)
            layers += [up, nn.InstanceNorm2d(c // 2), nn.ReLU()]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def theirs(seed: int = 0) -> Theirs:
    """Random weights, biases too (N(0, 0.3)): a bias left at its init would go unnoticed."""
    torch.manual_seed(seed)
    net = Theirs().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net


@pytest.fixture
def env(one_thread: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # main() sets it to 1: restored afterwards
    monkeypatch.setenv("TQDM_DISABLE", "1")
    yield tmp_path
    GlobalHydra.instance().clear()


def test_their_key_layout_and_the_settings_read_off_it() -> None:
    state = theirs().state_dict()
    # Their key names (the first 7x7 conv, a block's two convs, the last conv at 17 + n).
    for key in ("model.1.weight", "model.10.conv_block.1.bias", "model.11.conv_block.5.weight",
                "model.12.weight", "model.15.weight", "model.19.bias"):  # fmt: skip
        assert key in state
    assert is_authors_generator(state)
    assert not is_authors_generator({"model": state, "step": 3})  # a dlrun checkpoint
    assert generator_settings(state) == {"in_channels": 3, "ngf": NGF, "n_blocks": BLOCKS}


def test_a_key_that_does_not_fit_is_named_in_one_line() -> None:
    ours = ResnetGenerator(3, 3, NGF, BLOCKS)
    state = theirs().state_dict()
    dropout = {k.replace("conv_block.5", "conv_block.6"): v for k, v in state.items()}
    with pytest.raises(UserError, match=r"model\.10\.conv_block\.6\.weight .*dropout"):
        mapped_state(dropout, ours, "g.pth")
    wide = dict(state) | {"model.4.bias": torch.zeros(9)}
    with pytest.raises(UserError, match=r"model\.4\.bias has shape \(9,\), .* \(8,\)"):
        mapped_state(wide, ours, "g.pth")
    short = {k: v for k, v in state.items() if k != "model.19.bias"}
    with pytest.raises(UserError, match=r"no model\.19\.bias, .*\(1 tensor"):
        mapped_state(short, ours, "g.pth")


def test_translate_takes_their_file_and_gives_their_outputs(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    net = theirs()
    state = net.state_dict()
    # A file from before PyTorch 0.4 (their pretrained downloads): the legacy format, with
    # instance norm running statistics that nothing reads.
    stale = {"model.2.running_mean": torch.zeros(NGF), "model.2.running_var": torch.ones(NGF)}
    ckpt = env / "latest_net_G.pth"
    torch.save(state | stale, ckpt, _use_new_zipfile_serialization=False)
    folder = env / "horses"
    folder.mkdir()
    gen = torch.Generator().manual_seed(1)
    for i in range(2):
        pixels = torch.randint(0, 256, (30, 40, 3), generator=gen, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"h{i}.png")
    seen: list[CycleGANTrainer] = []
    original = CycleGANTrainer.mode_translate

    def keep(self: CycleGANTrainer, *args: object) -> dict[str, float]:
        seen.append(self)
        return original(self, *args)

    monkeypatch.setattr(CycleGANTrainer, "mode_translate", keep)
    common = (f"ckpt={ckpt}", "device=cpu", "trainer.progress=false", "model.ndf=4")
    code, _, err = dlrun_cli("mode=translate", *common, f"translate.input={folder}",
                             "data.image_size=32", f"hydra.run.dir={env / 'out'}",
                             capsys=capsys, monkeypatch=monkeypatch)  # fmt: skip
    assert code == 0, err
    g_a = seen[0].gan.generators.g_a.eval()
    assert (g_a.model[1].out_channels, len(g_a.model)) == (NGF, 19 + BLOCKS)
    x = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(g_a(x), net(x), atol=1e-5, rtol=0)
        # The files: each input resized to 32 px (bicubic, as the mode does), translated by
        # their network, written as 8-bit PNGs (one level of rounding apart at most).
        names, images = seen[0]._translate_inputs({"input": str(folder)}, "a")
        expected = ((net(images) + 1) / 2 * 255).round()
    out = env / "out" / "translate"
    assert sorted(p.name for p in out.glob("*.png")) == ["grid.png", "h0.png", "h1.png"]
    written = torch.from_numpy(np.array(Image.open(out / "h1.png"))).permute(2, 0, 1)
    assert (written.float() - expected[names.index("h1")]).abs().max() <= 1
    # No input folder and no data set; the other direction of a one-way file: one line each.
    code, _, err = dlrun_cli("mode=translate", *common, capsys=capsys, monkeypatch=monkeypatch)
    assert code == 2 and "give translate.input=DIR" in err and err.count("\n") == 1
    code, _, err = dlrun_cli("mode=translate", *common, f"translate.input={folder}",
                             "translate.direction=BtoA", capsys=capsys, monkeypatch=monkeypatch)  # fmt: skip
    assert code == 2 and "translate.direction=AtoB" in err and err.count("\n") == 1
