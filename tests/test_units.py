"""What units see (notes 002, 6.1; Zeiler & Fergus): receptive fields by hand, the top patches of
a unit whose answer is known, the mode's one-line refusals, and `dlrun mode=units` on a run."""

import json
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from PIL import Image
from torch import nn

from dlrun.errors import UserError
from dlrun.models.lenet import LeNet5
from dlrun.models.mlp import MLP
from dlrun.models.receptive_field import LayerField, receptive_fields
from dlrun.models.vgg import vgg11
from dlrun.tasks.classification.units import check_options, default_layers, grid, search, window


def table(model: nn.Module, shape: tuple[int, ...]) -> list[tuple[str, int, int, float]]:
    """(name, rf, jump, start) of each square layer: the rows and columns agree."""
    rows = []
    for f in receptive_fields(model, shape):
        assert f.rf[0] == f.rf[1] and f.jump[0] == f.jump[1] and f.start[0] == f.start[1], f
        rows.append((f.name, f.rf[0], f.jump[0], f.start[0]))
    return rows


def test_lenet5_receptive_fields_by_hand() -> None:
    # dlrun's LeNet-5 on MNIST (28 px): conv5 pad 2 (d2l's padding to the paper's 32 px), avg pool
    # 2/2, conv5 (no pad), avg pool 2/2. r_out = r + (k-1) j, j_out = j s, start += ((k-1)/2 - p) j,
    # from a pixel: r = 1, j = 1, start = 0 (pixel i's centre is at i).
    #   conv1 k5 p2: r = 1 + 4*1 = 5,  j = 1, start = 0 + (2 - 2)*1   = 0
    #   pool1 k2 s2: r = 5 + 1*1 = 6,  j = 2, start = 0 + (0.5 - 0)*1 = 0.5
    #   conv2 k5:    r = 6 + 4*2 = 14, j = 2, start = 0.5 + 2*2       = 4.5
    #   pool2 k2 s2: r = 14 + 1*2 = 16, j = 4, start = 4.5 + 0.5*2    = 5.5
    assert table(LeNet5(), (1, 28, 28)) == [
        ("features.0", 5, 1, 0.0),
        ("features.2", 6, 2, 0.5),
        ("features.3", 14, 2, 4.5),
        ("features.5", 16, 4, 5.5),
    ]


@pytest.fixture(scope="module")
def vgg() -> nn.Module:
    return vgg11(num_classes=10, image_size=32)  # 9M parameters: built once


def test_vgg11_receptive_fields_by_hand(vgg: nn.Module) -> None:
    # VGG-11 (A): 3x3 pad-1 convs (r += 2j, start unchanged) and 2x2/2 max pools (r += j, j *= 2,
    # start += j/2) in stages of 1, 1, 2, 2, 2 convs. Stage by stage (r, then j):
    #   conv 3 (j 1), pool 4 (j 2) | conv 8, pool 10 (j 4) | convs 18, 26, pool 30 (j 8) |
    #   convs 46, 62, pool 70 (j 16) | convs 102, 134, pool 150 (j 32).
    # Starts: 0 at the first conv; each pool adds its input's j/2 (0.5, 1, 2, 4, 8), convs none.
    # (Built for 32 px: its ceil-mode pools change the map sizes, not the fields.)
    got = table(vgg, (3, 32, 32))
    assert [r for _, r, _, _ in got] == [3, 4, 8, 10, 18, 26, 30, 46, 62, 70, 102, 134, 150]
    assert [j for _, _, j, _ in got] == [1, 2, 2, 4, 4, 4, 8, 8, 8, 16, 16, 16, 32]
    starts = [0.0, 0.5, 0.5, 1.5, 1.5, 1.5, 3.5, 3.5, 3.5, 7.5, 7.5, 7.5, 15.5]
    assert [s for _, _, _, s in got] == starts
    assert [n for n, *_ in got][:4] == [
        "features.0.0",
        "features.0.2",
        "features.1.0",
        "features.1.2",
    ]


class Shortcut(nn.Module):
    """A residual step whose 1x1 shortcut conv runs after the main path (as in a ResNet block)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, stride=2, padding=1)
        self.short = nn.Conv2d(1, 1, 1, stride=2)
        self.c = nn.Conv2d(1, 1, 3, padding=1)
        self.odd = nn.Conv2d(1, 1, (3, 5), stride=(1, 2), padding=(0, 2), dilation=(2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(self.b(self.a(x)) + self.short(x))
        return self.odd(y)


def test_a_shortcut_starts_from_its_own_input_and_tuples_and_dilation_count() -> None:
    got = {f.name: f for f in receptive_fields(Shortcut(), (1, 16, 16))}
    assert (got["b"].rf, got["b"].jump) == ((5, 5), (2, 2))  # 3, then 3 + 2*1
    # from the input (rf 1), not from b: a chain in call order would say 5 + 0 = 5, jump 4
    assert (got["short"].rf, got["short"].jump, got["short"].start) == ((1, 1), (2, 2), (0, 0))
    assert got["c"].rf == (9, 9)  # the sum sees b's 5: 5 + 2*2
    # rows: dilation 2 makes k 5: 9 + 4*2 = 17, start 0 + (2 - 0)*2 = 4; columns: k 5, pad 2,
    # stride 2: 9 + 4*2 = 17, jump 4, start 0 + (2 - 2)*2 = 0
    assert (got["odd"].rf, got["odd"].jump, got["odd"].start) == ((17, 17), (2, 4), (4.0, 0.0))


# ----- a unit whose best patches are known -------------------------------------------------------
PATTERN = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])  # an X


def known_net() -> nn.Sequential:
    """Unit 0 matches the X (|X|^2 = 5 where an image holds it); unit 1 is the centre pixel."""
    conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = PATTERN
        conv.weight[1, 0, 1, 1] = 1.0
    return nn.Sequential(conv)


def known_images() -> torch.Tensor:
    x = torch.zeros(6, 1, 12, 12)
    x[4, 0, 5:8, 2:5] = PATTERN  # the X whole, rows 5-7, columns 2-4: unit 0 peaks at (6, 3)
    x[1, 0, 8:11, 7:10] = 0.8 * PATTERN  # weaker (4), at (9, 8); the corner pixel gives unit 0 3
    x[2, 0, 0, 11] = 3.0  # the brightest pixel, in a corner: unit 1's field leaves the image
    x[0, 0, 6, 6] = 2.0
    return x


def test_a_unit_s_top_patches_are_the_images_and_places_that_hold_its_pattern() -> None:
    net, x = known_net(), known_images()
    fields = {f.name: f for f in receptive_fields(net, (1, 12, 12))}
    batches = [{"image": x[:3]}, {"image": x[3:]}]  # the best image comes in the second batch
    best, n = search(net, net, batches, fields, count=2, top=2)
    layer = best["0"]
    assert n == 6 and layer.units == 2
    assert layer.images.tolist() == [[4, 1], [2, 0]]
    assert torch.allclose(layer.values, torch.tensor([[5.0, 4.0], [3.0, 2.0]]))
    # unit 0: centred on (6, 3), the window is rows 5-7, columns 2-4: the X itself
    assert layer.where[0][0] == (6, 3, (5, 2, 3, 3)) and layer.where[0][1] == (9, 8, (8, 7, 3, 3))
    assert torch.equal(layer.patches[0][0][0], PATTERN)
    # unit 1: the corner pixel (0, 11); its window, rows -1..1 and columns 10..12, is padded
    assert layer.where[1][0] == (0, 11, (-1, 10, 3, 3))
    assert layer.patches[1][0][0].tolist() == [[0, 0, 0], [0, 3, 0], [0, 0, 0]]
    # a field wider than the image (VGG's pool3 rows: rf 30, jump 8, start 3.5; first row
    # 3.5 + 8 - 14.5 = -3) shows the 12 px image whole; 5 columns from 2 - 2 = 0 as they are
    assert window(LayerField("pool", (30, 5), (8, 1), (3.5, 2.0)), 1, 0, 12, 12) == (0, 0, 12, 5)
    # the grid: 2 units x 2 patches, 3 px upscaled to 48 (x16), 2 px gaps; un-normalised
    image = grid(layer, mean=[0.5], std=[0.25])
    assert image.shape == (3, 2 * 50 + 2, 2 * 50 + 2)
    assert image[0, 2, 2] == pytest.approx(0.75)  # the X's corner: 1 * 0.25 + 0.5
    assert image[0, 2 + 16, 2] == pytest.approx(0.5)  # a 0 of the X: the mean


def test_a_unit_is_its_conv_after_batchnorm_and_before_the_activation() -> None:
    bn = nn.BatchNorm2d(2).eval()  # running mean 0, variance 1
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([-1.0, 10.0]))
    net = nn.Sequential(known_net()[0], bn, nn.Sigmoid())
    x = known_images()
    x[3, 0, 2:5, 2:5] = -PATTERN  # unit 0's conv gives -5 here: +5 after the BatchNorm's -1
    fields = {f.name: f for f in receptive_fields(net, (1, 12, 12))}
    best, _ = search(net, net, [{"image": x}], {"0": fields["0"]}, count=2, top=2)
    scale = (1 + bn.eps) ** -0.5
    # the raw conv would rank images 4, 1 for unit 0; other images tie at 0 (blank places)
    assert best["0"].images.tolist() == [[3, 0], [2, 0]]
    # after the sigmoid, 30 and 20 would both be 1.0 in float32
    assert torch.allclose(best["0"].values, torch.tensor([[5.0, 0.0], [30.0, 20.0]]) * scale)


def test_the_default_layers_are_the_last_conv_at_each_resolution(vgg: nn.Module) -> None:
    assert default_layers(receptive_fields(vgg, (3, 32, 32)), vgg) == [
        "features.0.0", "features.1.0", "features.2.2", "features.3.2", "features.4.2",
    ]  # fmt: skip
    lenet = LeNet5(widths=(4, 8))
    assert default_layers(receptive_fields(lenet, (1, 28, 28)), lenet) == [
        "features.0",
        "features.3",
    ]


@pytest.mark.parametrize(
    ("model", "options", "says"),
    [
        (
            "lenet",
            {"layers": ["features.9"]},
            "no layer 'features.9'; its conv layers: features.0, features.3.",
        ),
        (
            "lenet",
            {"layers": ["features.1"]},
            "'features.1' is a Sigmoid, not a conv or pool layer",
        ),
        ("lenet", {"count": 0}, "units.count must be a whole number of at least 1, got 0."),
        ("lenet", {"top": "9"}, "units.top must be a whole number of at least 1, got '9'."),
        ("mlp", {}, "this model (MLP) has no Conv2d layer."),
    ],
)
def test_each_mistake_is_one_line(model: str, options: dict, says: str) -> None:
    net = LeNet5(widths=(4, 8)) if model == "lenet" else MLP()
    with pytest.raises(UserError) as err:
        check_options(net, {"count": 8, "top": 9, "layers": None, **options})
    assert says in str(err.value) and "\n" not in str(err.value)


# ----- dlrun mode=units on a trained run ----------------------------------------------------------
@pytest.fixture
def _env(one_thread: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    yield
    GlobalHydra.instance().clear()


def test_mode_units_writes_each_layer_s_grid_and_json(
    _env: None, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from hydra import compose, initialize_config_dir

    from dlrun.cli import CONFIG_DIR, run
    from tests.test_resume_config import dlrun as dlrun_cli

    run_dir = tmp_path / "run"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            f"data.root={data_root}", "device=cpu", "trainer.progress=false", "model.widths=[4,8]",
            "data.batch_size=16", "trainer.max_steps=2",
        ])  # fmt: skip
        run(cfg, run_dir, {"model": "lenet", "data": "mnist"})
    GlobalHydra.instance().clear()
    events = set(run_dir.glob("events.out.tfevents*"))
    ckpt = run_dir / "checkpoints" / "last.pt"
    command = ["mode=units", f"ckpt={ckpt}", f"data.root={data_root}", "device=cpu"]
    code, out, err = dlrun_cli(*command, capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0, err
    folder = run_dir / "units" / "001"
    info = json.loads((folder / "units.json").read_text())
    assert list(info["layers"]) == ["features.0", "features.3"] and info["images"] == 100
    conv1, conv2 = info["layers"]["features.0"], info["layers"]["features.3"]
    assert (conv1["receptive_field"], conv2["receptive_field"]) == ([5, 5], [14, 14])
    assert len(conv1["units"]) == 4 and len(conv2["units"]) == 8  # count 8, but conv1 has 4
    for unit in conv1["units"] + conv2["units"]:
        assert (
            len(set(unit["images"])) == 9
            and unit["activations"] == sorted(unit["activations"])[::-1]
        )
    # the recorded activation is what the unit computes on that image (before its sigmoid)
    net = LeNet5(widths=(4, 8)).eval()
    net.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    data = instantiate(cfg.data)
    data.setup(torch.device("cpu"), 0)
    test = data.example_batch(100, "test")["image"]
    unit = conv2["units"][3]
    i, (y, x) = unit["images"][0], unit["positions"][0]
    with torch.no_grad():
        maps = net.features[:4](test[i : i + 1])[0, 3]  # conv1, sigmoid, pool1, conv2
    assert maps.max().item() == pytest.approx(unit["activations"][0], abs=1e-5)
    assert maps[y, x].item() == pytest.approx(unit["activations"][0], abs=1e-5)
    # conv2's window: rows 4.5 + 2y - 6.5 = 2y - 2 onwards, 14 of them
    assert unit["windows"][0] == [2 * y - 2, 2 * x - 2, 14, 14]
    # 9 patches a row, 4 units: 5 px x10 = 50, 2 px gaps
    with Image.open(folder / "features.0.png") as png:
        assert png.size == (9 * 52 + 2, 4 * 52 + 2)
    assert (folder / "features.3.png").is_file()
    assert "features.3 (Conv2d): receptive field 14 px, jump 2" in out
    # Every conv and pool layer's receptive field, the pools' too (LeNet-5: 5, 6, 14, 16).
    for name, rf, jump in [("features.0", 5, 1), ("features.2", 6, 2), ("features.5", 16, 4)]:
        assert f"receptive field of {name}: {rf} px, jump {jump}" in out
    # TensorBoard: one more event file in the run itself, none in the results folder
    assert len(set(run_dir.glob("events.out.tfevents*")) - events) == 1
    assert not list((run_dir / "units").rglob("events.out.tfevents*"))
