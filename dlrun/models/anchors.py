"""Anchor boxes of a detector (YOLO), fitted to a data set's boxes (YOLOv2's k-means, 1 - IoU as the distance)."""

import torch
from torch import Tensor


def wh_iou(wh: Tensor, anchors: Tensor) -> Tensor:
    """IoU of (N, 2) box sizes against (K, 2) anchor sizes, both centred at one point."""
    inter = torch.minimum(wh[:, None], anchors[None]).prod(-1)
    return inter / (wh.prod(-1)[:, None] + anchors.prod(-1)[None] - inter)


def kmeans_anchors(wh: Tensor, k: int, generator: torch.Generator, iters: int = 50) -> Tensor:
    """k anchor sizes (K, 2), sorted by area, that maximise the boxes' mean best IoU: Lloyd's
    iterations from k distinct random boxes, each anchor the median size of its cluster."""
    wh = wh.float()
    if len(wh) < k:
        raise ValueError(f"k-means of {k} anchors needs at least {k} boxes, got {len(wh)}")
    anchors = wh[torch.randperm(len(wh), generator=generator)[:k]].clone()
    for _ in range(iters):
        nearest = wh_iou(wh, anchors).argmax(1)
        moved = anchors.clone()
        for c in range(k):
            members = wh[nearest == c]
            if len(members):  # an empty cluster keeps its anchor
                moved[c] = members.median(0).values
        if torch.equal(moved, anchors):
            break
        anchors = moved
    return anchors[anchors.prod(1).argsort()]
