"""Sample-quality metrics for generators: FID, KID, mode coverage, and the features they compare."""

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlrun.errors import UserError


def _sqrtm_psd(a: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clamped at 0)."""
    vals, vecs = torch.linalg.eigh(a)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2): the Frechet distance of two Gaussians.

    S1 S2 is not symmetric, but tr (S1 S2)^1/2 = tr (S1^1/2 S2 S1^1/2)^1/2, whose argument is
    symmetric PSD: two eigh calls in float64 instead of a general matrix square root (scipy's).
    """
    mu1, mu2, s1, s2 = (t.detach().double().cpu() for t in (mu1, mu2, sigma1, sigma2))
    root1 = _sqrtm_psd(s1)
    middle = root1 @ s2 @ root1
    vals = torch.linalg.eigvalsh((middle + middle.T) / 2)  # symmetrise away rounding
    tr_covmean = vals.clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_covmean
    return max(float(value), 0.0)  # rounding can leave -1e-12 for identical sets


def _mean_cov(features: Tensor) -> tuple[Tensor, Tensor]:
    f = features.detach().double().cpu()
    return f.mean(0), torch.cov(f.T)  # unbiased (N - 1), as pytorch-fid's np.cov


def fid_from_features(f1: Tensor, f2: Tensor) -> float:
    """FID between two feature sets (N1, D) and (N2, D) (Heusel et al. 2017)."""
    return frechet_distance(*_mean_cov(f1), *_mean_cov(f2))


def kid_from_features(
    f1: Tensor,
    f2: Tensor,
    subsets: int = 10,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> float:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, over subsets.

    Unbiased, so it has no small-sample bias (unlike FID) and can be slightly negative.
    """
    x_all, y_all = f1.detach().double().cpu(), f2.detach().double().cpu()
    d = x_all.shape[1]
    m = min(subset_size, x_all.shape[0], y_all.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples in each set, got {m}")
    total = 0.0
    for _ in range(subsets):
        x = x_all[torch.randperm(x_all.shape[0], generator=generator)[:m]]
        y = y_all[torch.randperm(y_all.shape[0], generator=generator)[:m]]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        # Within-set means leave out the diagonal k(x_i, x_i): that is what makes it unbiased.
        within = (kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1))
        total += float(within - 2 * kxy.mean())
    return total / subsets


def mode_coverage(pred_labels: Tensor | Sequence[int], num_classes: int) -> dict[str, object]:
    """How many classes a generator's samples hit (a classifier's labels), and how evenly.

    coverage: share of classes predicted at least once; evenness: entropy of the class histogram
    over log K (1 = uniform, 0 = one class: mode collapse); histogram: counts per class.
    """
    labels = torch.as_tensor(pred_labels, dtype=torch.long).flatten().cpu()
    hist = torch.bincount(labels, minlength=num_classes)[:num_classes]
    p = hist.double() / max(int(hist.sum()), 1)
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return {
        "coverage": float((hist > 0).sum()) / num_classes,
        "evenness": entropy / math.log(num_classes) if num_classes > 1 else 1.0,
        "histogram": hist.tolist(),
    }


def _batched(fn: Callable[[Tensor], Tensor], images: Tensor, batch_size: int) -> Tensor:
    """fn over chunks of images, results concatenated as float32 on the CPU."""
    outs = [fn(chunk).float().cpu() for chunk in images.split(batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


class InceptionFeatures:
    """The 2048-d pool features of torchvision's ImageNet Inception-v3 (val/fid_tv).

    torchvision's weights are not the TF graph of the FID paper (TFInceptionFeatures): its FIDs
    rank models the same way but are not comparable with published numbers.
    """

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 64) -> None:
        from torchvision.models import Inception_V3_Weights, inception_v3

        weights = Inception_V3_Weights.IMAGENET1K_V1
        try:
            # Reads torch's hub cache, downloading there the first time.
            net = inception_v3(weights=weights, aux_logits=True, progress=False)
        except Exception as err:  # offline with an empty cache, or a torn / tampered file
            where = Path(torch.hub.get_dir()) / "checkpoints"
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise UserError(
                f"FID needs torchvision's Inception-v3 ImageNet weights, and they could not be "
                f"loaded ({type(err).__name__}: {reason}): they are not (intact) in torch's hub "
                f"cache and could not be downloaded. Download {weights.url} on a machine with a network and "
                f"place {Path(weights.url).name} in {where}/ (torch.hub.get_dir()/checkpoints/), "
                "or use metrics.fid.features=ckpt to compute FID on the features of a dlrun "
                "classifier checkpoint instead."
            ) from err
        net.fc = nn.Identity()  # the logits layer off: the output is the 2048-d average pool
        self.net = net.eval().to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.mean = torch.tensor([0.485, 0.456, 0.406], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225], device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def _features(self, images: Tensor) -> Tensor:  # (B, 1|3, H, W) in [-1, 1] -> (B, 2048)
        x = (images.to(self.device, torch.float32) + 1) / 2  # [0, 1], as ImageNet images
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        # ImageNet-normalised input: torchvision's model (transform_input=True) maps it back to
        # the [-1, 1] scaling its ported weights expect.
        return self.net((x - self.mean) / self.std)

    def __call__(self, images: Tensor) -> Tensor:  # (N, C, H, W) in [-1, 1] -> (N, 2048) CPU
        return _batched(self._features, images, self.batch_size)


TF_INCEPTION_EXTRA = "pip install 'dlrun[fid]'"  # torch-fidelity: the TF-Inception port


class TFInceptionFeatures:
    """The 2048-d pool features of the TF Inception graph of the FID paper (torch-fidelity's port).

    torch-fidelity's `inception-v3-compat` network (the graph pytorch-fid also ports) with its
    converted weights: FIDs / KIDs comparable with published figures, given the same images and
    sample counts. It takes uint8 images and resizes them to 299 px as TensorFlow 1.x did.
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        weights_path: str | None = None,
        batch_size: int = 64,
    ) -> None:
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import (
                URL_INCEPTION_V3,
                FeatureExtractorInceptionV3,
            )
        except ImportError as err:
            raise UserError(
                "FID on the TF Inception graph (metrics.fid.features=inception) needs "
                f"torch-fidelity, which is not installed ({err}): {TF_INCEPTION_EXTRA}, or use "
                "metrics.fid.features=inception_tv (torchvision's Inception, val/fid_tv) or "
                "metrics.fid.features=ckpt."
            ) from err
        path = str(Path(weights_path).expanduser()) if weights_path else None
        try:
            # weights_path None: torch.hub's cache, downloading there the first time.
            net = FeatureExtractorInceptionV3(
                "inception-v3-compat",
                ["2048"],
                feature_extractor_weights_path=path,
                verbose=False,
            )
        except Exception as err:  # offline with an empty cache, a torn file, the wrong file
            where = Path(torch.hub.get_dir()) / "checkpoints"
            name = Path(URL_INCEPTION_V3).name
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            what = (
                f"metrics.fid.weights={path} could not be loaded"
                if path
                else f"{name} could neither be loaded from torch's hub cache nor downloaded"
            )
            raise UserError(
                f"FID on the TF Inception graph needs torch-fidelity's Inception weights, and "
                f"{what} ({type(err).__name__}: {reason}). Download "
                f"{URL_INCEPTION_V3} on a machine with a network and place {name} in {where}/ "
                "(torch.hub.get_dir()/checkpoints/), or pass its path as metrics.fid.weights=PATH; "
                "or use metrics.fid.features=inception_tv (torchvision's Inception, val/fid_tv) "
                "or metrics.fid.features=ckpt (a dlrun classifier's features)."
            ) from err
        self.net = net.to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def _features(self, images: Tensor) -> Tensor:  # (B, 1|3, H, W) in [-1, 1] -> (B, 2048)
        x = images.to(self.device, torch.float32).clamp(-1, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB
        # The 8-bit pixels an image file of these samples would hold: what the network expects.
        pixels = ((x + 1) * 127.5).round().to(torch.uint8)
        return self.net(pixels)[0]

    def __call__(self, images: Tensor) -> Tensor:  # (N, C, H, W) in [-1, 1] -> (N, 2048) CPU
        return _batched(self._features, images, self.batch_size)


class ClassifierFeatures:
    """Penultimate features and logits of a trained dlrun classifier (FID / coverage offline).

    A dlrun classifier is `head(features(x))`; the features here are the input of the head's last
    layer (LeNet-5: the 84-d layer), the logits its output.
    """

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int = 256,
    ) -> None:
        head = getattr(model, "head", None)
        if not isinstance(getattr(model, "features", None), nn.Module) or head is None:
            raise UserError(
                f"{type(model).__name__} is not a dlrun classifier (it needs .features and .head), "
                "so its features cannot stand in for Inception's. Use a classifier checkpoint."
            )
        # head = Sequential(..., last) -> (body, last); a head that is one layer has no body.
        many = isinstance(head, nn.Sequential) and len(head) > 1
        self.body: nn.Module = head[:-1] if many else nn.Identity()
        self.last: nn.Module = head[-1] if many else head
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.batch_size = batch_size
        self.mean = torch.tensor(list(mean), device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), device=self.device).view(1, -1, 1, 1)

    def _penultimate(self, images: Tensor) -> Tensor:  # (B, C, H, W) in [-1, 1] -> head input
        x = (images.to(self.device, torch.float32) + 1) / 2  # the generator's [-1, 1] -> [0, 1]
        # The classifier was trained on normalised data, so normalise with the data's mean / std.
        return self.body(self.model.features((x - self.mean) / self.std))

    @torch.no_grad()
    def _features(self, images: Tensor) -> Tensor:  # (B, C, H, W) -> (B, D), LeNet-5: (B, 84)
        return self._penultimate(images).flatten(1)

    @torch.no_grad()
    def _logits(self, images: Tensor) -> Tensor:  # (B, C, H, W) -> (B, K)
        return self.last(self._penultimate(images))

    def __call__(self, images: Tensor) -> Tensor:  # (N, C, H, W) in [-1, 1] -> (N, D) CPU
        return _batched(self._features, images, self.batch_size)

    def logits(self, images: Tensor) -> Tensor:  # (N, C, H, W) in [-1, 1] -> (N, K) CPU
        return _batched(self._logits, images, self.batch_size)
