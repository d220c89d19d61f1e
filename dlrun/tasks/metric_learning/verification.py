"""Verification metrics of pair scores (higher = more alike): threshold, accuracy, ROC, k-NN.

A score is -distance for an embedding compared by distance, or the head's logit of "same class";
`same` marks the pairs of one class. Everything is a few sorts and cumulative sums on the device.
"""

import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.transforms.v2.functional import pil_to_tensor


def best_threshold(scores: Tensor, same: Tensor) -> tuple[float, float]:
    """The threshold t ("same" iff score >= t) with the highest accuracy on these pairs, and that
    accuracy. t lies halfway between two neighbouring scores, so it generalises symmetrically."""
    order = scores.argsort(descending=True)
    s, y = scores[order].float(), same[order].float()
    n, positives = len(s), y.sum()
    tp = torch.cat([y.new_zeros(1), y.cumsum(0)])  # true positives when the top i are "same"
    i = torch.arange(n + 1, device=s.device)
    tn = (n - positives) - (i - tp)
    acc = (tp + tn) / n
    # A cut between equal scores cannot be made: only cuts where the score changes count.
    edge = torch.ones(n + 1, dtype=torch.bool, device=s.device)
    edge[1:n] = s[:-1] != s[1:]
    acc = torch.where(edge, acc, acc.new_full((), -1.0))
    best = int(acc.argmax())
    if best == 0:
        t = float(s[0]) + 1.0
    elif best == n:
        t = float(s[-1])
    else:
        t = float((s[best - 1] + s[best]) / 2)
    return t, float(acc[best])


def accuracy_at(scores: Tensor, same: Tensor, threshold: float) -> float:
    return float(((scores >= threshold) == same.bool()).float().mean())


def roc_auc(scores: Tensor, same: Tensor) -> float:
    """P(score of a same pair > score of a different pair), ties counting one half (Mann-Whitney)."""
    y = same.bool()
    p, n = int(y.sum()), int((~y).sum())
    if p == 0 or n == 0:
        return float("nan")
    values, inverse, counts = torch.unique(scores.float(), return_inverse=True, return_counts=True)
    # Mean rank (1-based) of each distinct value: tied scores share their ranks' average.
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]
    return float((ranks[y].sum() - p * (p + 1) / 2) / (p * n))


def roc_curve(scores: Tensor, same: Tensor) -> tuple[Tensor, Tensor]:
    """(false positive rate, true positive rate) as the threshold falls from above every score."""
    order = scores.argsort(descending=True)
    y = same[order].float()
    tpr = torch.cat([y.new_zeros(1), y.cumsum(0) / y.sum().clamp_min(1)])
    fpr = torch.cat([y.new_zeros(1), (1 - y).cumsum(0) / (1 - y).sum().clamp_min(1)])
    return fpr.cpu(), tpr.cpu()


def roc_image(fpr: Tensor, tpr: Tensor, title: str, size: int = 320) -> Tensor:
    """The ROC curve drawn as a uint8 (3, H, W) image for TensorBoard (PIL: no plotting library)."""
    margin = 36
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    span = size - 2 * margin

    def xy(x: float, y: float) -> tuple[float, float]:
        return margin + x * span, size - margin - y * span

    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    draw.line([xy(0, 0), xy(1, 1)], fill=(170, 170, 170))  # chance
    step = max(1, len(fpr) // 2000)  # a few thousand vertices are plenty for the eye
    points = [xy(float(f), float(t)) for f, t in zip(fpr[::step], tpr[::step], strict=True)]
    points.append(xy(float(fpr[-1]), float(tpr[-1])))
    draw.line(points, fill=(31, 119, 180), width=2)
    draw.text((margin, 8), title, fill="black")
    draw.text((size // 2 - 40, size - margin + 10), "false positive rate", fill="black")
    draw.text((4, margin - 14), "TPR", fill="black")
    return pil_to_tensor(img)


def knn_accuracy(embeddings: Tensor, labels: Tensor, k: int = 5, chunk: int = 2048) -> float:
    """Leave-one-out k-NN accuracy inside one split: each item's label by majority vote of its k
    nearest other items (ties to the nearest's class). Classes never trained on count as well."""
    n = len(embeddings)
    k = min(k, n - 1)
    if k < 1:
        return float("nan")
    classes = int(labels.max()) + 1
    correct = torch.zeros((), device=embeddings.device, dtype=torch.long)
    e = embeddings.float()
    for start in range(0, n, chunk):
        d = torch.cdist(e[start : start + chunk], e)
        rows = torch.arange(d.shape[0], device=d.device)
        d[rows, rows + start] = float("inf")  # not itself
        idx = d.topk(k, largest=False).indices  # nearest first
        votes = torch.zeros(d.shape[0], classes, device=d.device)
        # Weights 1 + a small bonus for nearer neighbours: a tie goes to the nearer class.
        weight = 1 + torch.linspace(1e-3, 0, k, device=d.device).expand(d.shape[0], k)
        votes.scatter_add_(1, labels[idx], weight)
        correct += (votes.argmax(1) == labels[start : start + chunk]).sum()
    return float(correct) / n
