"""k-means anchors (1 - IoU distance): known answers on two clean clusters."""

import torch

from dlrun.models.anchors import kmeans_anchors, wh_iou


def test_wh_iou_known_answers() -> None:
    iou = wh_iou(
        torch.tensor([[10.0, 10.0], [20.0, 10.0]]), torch.tensor([[10.0, 10.0], [10.0, 20.0]])
    )
    assert torch.allclose(iou, torch.tensor([[1.0, 0.5], [0.5, 100 / 300]]))


def test_kmeans_finds_two_clusters_sorted_by_area() -> None:
    g = torch.Generator().manual_seed(0)
    small = torch.tensor([[8.0, 12.0]]) + torch.randn(50, 2, generator=g) * 0.3
    large = torch.tensor([[30.0, 20.0]]) + torch.randn(50, 2, generator=g) * 0.3
    anchors = kmeans_anchors(torch.cat([large, small]), 2, torch.Generator().manual_seed(1))
    assert torch.allclose(anchors, torch.tensor([[8.0, 12.0], [30.0, 20.0]]), atol=0.3)
