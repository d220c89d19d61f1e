import sys
import time
import urllib.error
from pathlib import Path
from types import ModuleType

import pytest
import torch

from dlrun.errors import UserError
from dlrun.models.lenet import LeNet5
from dlrun.scoring.sample_quality import (
    ClassifierFeatures,
    InceptionFeatures,
    TFInceptionFeatures,
    fid_from_features,
    frechet_distance,
    kid_from_features,
    mode_coverage,
)


def _features(n: int = 500, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5  # correlated features: a full covariance
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix.double() + 0.3


def test_fid_of_a_set_with_itself_is_zero() -> None:
    f = _features()
    scale = torch.cov(f.T).trace().item()
    assert fid_from_features(f, f) < 1e-6 * scale


def test_fid_is_the_squared_mean_shift_for_equal_covariances() -> None:
    f = _features()
    shift = torch.tensor([1.0, -2.0] + [0.0] * 14, dtype=torch.float64)
    # Shifting every sample moves the mean only: FID = ||shift||^2 = 5 exactly.
    assert fid_from_features(f, f + shift) == pytest.approx(5.0, rel=1e-6)


def test_fid_grows_with_the_shift() -> None:
    f, other = _features(seed=0), _features(seed=1)  # two samples of one distribution
    fids = [fid_from_features(f, other + s) for s in (0.0, 1.0, 2.0)]
    assert fids[0] < fids[1] < fids[2]


def test_frechet_distance_of_diagonal_gaussians_known_answer() -> None:
    # 1-D per axis: (mu1 - mu2)^2 + (s1 - s2)^2 with s the standard deviations.
    mu1, mu2 = torch.zeros(2), torch.tensor([1.0, 0.0])
    s1, s2 = torch.diag(torch.tensor([1.0, 4.0])), torch.diag(torch.tensor([4.0, 9.0]))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(1.0 + (1 - 2) ** 2 + (2 - 3) ** 2)


def test_kid_is_near_zero_for_a_set_with_itself_and_grows_with_a_shift() -> None:
    f = _features(n=150)
    g = torch.Generator().manual_seed(0)
    kids = [kid_from_features(f, f + s, subsets=3, subset_size=100, generator=g) for s in (0, 1, 2)]
    assert abs(kids[0]) < 0.01 * kids[1]
    assert kids[0] < kids[1] < kids[2]


def _naive_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 with KID's kernel, written out as sums over pairs."""
    d, m = x.shape[1], x.shape[0]

    def k(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a @ b / d + 1) ** 3)

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    return xx + yy - 2 * xy


def test_kid_known_answer_with_the_subset_capped_at_the_smaller_set() -> None:
    x = _features(n=20, d=4)
    # 30 copies of one vector: every subset of y is the same, and with the subset capped at 20
    # every subset of x is all of x, so each subset's MMD^2 is the full-set value.
    y = torch.full((30, 4), 0.7, dtype=torch.float64)
    kid = kid_from_features(x, y, subsets=3, subset_size=1000)
    assert kid == pytest.approx(_naive_mmd2(x, y[:20]), rel=1e-10)


def test_classifier_features_of_lenet() -> None:
    model = LeNet5(in_channels=1, image_size=28, num_classes=10)
    extract = ClassifierFeatures(model, mean=[0.1307], std=[0.3081], batch_size=4)
    images = torch.rand(10, 1, 28, 28) * 2 - 1  # in [-1, 1], as a generator makes them
    feats = extract(images)
    assert feats.shape == (10, 84)
    logits = extract.logits(images)
    assert logits.shape == (10, 10)
    # The same logits as the classifier itself on the [0, 1]-mapped, normalised images.
    with torch.no_grad():
        expected = model(((images + 1) / 2 - 0.1307) / 0.3081)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_classifier_features_refuse_a_non_classifier() -> None:
    with pytest.raises(UserError, match="not a dlrun classifier"):
        ClassifierFeatures(torch.nn.Linear(2, 2), mean=[0.5], std=[0.5])


def test_mode_coverage_known_answers() -> None:
    collapsed = mode_coverage([3] * 50, num_classes=10)
    assert collapsed["coverage"] == pytest.approx(0.1)
    assert collapsed["evenness"] == pytest.approx(0.0)
    assert collapsed["histogram"] == [0, 0, 0, 50, 0, 0, 0, 0, 0, 0]
    uniform = mode_coverage(torch.arange(10).repeat(7), num_classes=10)
    assert uniform["coverage"] == pytest.approx(1.0)
    assert uniform["evenness"] == pytest.approx(1.0)
    half = mode_coverage([0, 1] * 5, num_classes=4)  # 2 of 4 classes, evenly: log 2 / log 4
    assert half["coverage"] == 0.5 and half["evenness"] == pytest.approx(0.5)


def test_inception_offline_raises_a_user_error_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    # An empty hub cache and no network: torch.hub must try to download, and fail.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        InceptionFeatures("cpu")
    assert time.perf_counter() - start < 10
    msg = str(err.value)
    assert "\n" not in msg
    assert "inception_v3_google-0cc3c7bd.pth" in msg
    assert str(tmp_path / "hub" / "checkpoints") in msg
    assert "metrics.fid.features=ckpt" in msg


def _no_network(monkeypatch: pytest.MonkeyPatch, torch_home: Path) -> None:
    """An empty torch hub cache at torch_home, and no network: a download fails at once."""

    def no_network(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


def test_tf_inception_features_from_a_weights_file(
    tf_inception_weights: Path, one_thread: None
) -> None:
    """The real weights' loading path (metrics.fid.weights=PATH), with random weights."""
    extract = TFInceptionFeatures("cpu", weights_path=str(tf_inception_weights), batch_size=4)
    levels = torch.randint(0, 256, (4, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    grey = levels / 127.5 - 1  # exactly 8-bit levels, in [-1, 1]
    feats = extract(grey)
    assert feats.shape == (4, 2048) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert feats.isfinite().all() and feats.std() > 0
    assert not torch.equal(feats[0], feats[1])  # other images, other features
    # Batches of 4: the same again (deterministic); rounded to 8-bit pixels first, so a nudge
    # under half a level changes nothing; grey is RGB with three equal channels.
    again, nudged = extract(torch.cat([grey, grey + 0.003])).split(4)
    assert torch.equal(again, feats) and torch.equal(nudged, feats)
    assert torch.equal(extract(grey.expand(-1, 3, -1, -1)), feats)


def test_tf_inception_reads_torch_hubs_cache(
    tf_inception_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    """weights_path None: the file torch-fidelity would download, found in the cache offline."""
    _no_network(monkeypatch, tmp_path)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / tf_inception_weights.name).symlink_to(tf_inception_weights)
    feats = TFInceptionFeatures("cpu")(torch.zeros(2, 3, 8, 8))
    assert feats.shape == (2, 2048) and feats.isfinite().all()


def test_tf_inception_offline_raises_a_user_error_fast(
    torch_fidelity: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_network(monkeypatch, tmp_path)
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        TFInceptionFeatures("cpu")
    assert time.perf_counter() - start < 10
    msg = str(err.value)
    assert "\n" not in msg and "URLError: <urlopen error no network>" in msg
    assert torch_fidelity.URL_INCEPTION_V3 in msg  # where to get it, where to put it
    assert (
        f"place weights-inception-2015-12-05-6726825d.pth in {tmp_path / 'hub' / 'checkpoints'}/"
        in msg
    )
    assert "metrics.fid.weights=PATH" in msg and "metrics.fid.features=inception_tv" in msg


def test_tf_inception_with_a_bad_weights_file_names_it(
    torch_fidelity: ModuleType, tmp_path: Path
) -> None:
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a checkpoint")
    for path in (bad, tmp_path / "missing.pth"):
        with pytest.raises(UserError, match="needs torch-fidelity's Inception weights") as err:
            TFInceptionFeatures("cpu", weights_path=str(path))
        assert f"metrics.fid.weights={path} could not be loaded" in str(err.value)


def test_tf_inception_without_torch_fidelity_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(UserError, match=r"needs torch-fidelity.*pip install 'dlrun\[fid\]'"):
        TFInceptionFeatures("cpu")
