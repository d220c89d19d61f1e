"""What R-CNN and Fast R-CNN share: selective-search proposals (cached), their labels against the
true boxes, minibatch sampling, and the box-regression targets, checked by hand."""

import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

from dlrun.data import proposals
from dlrun.errors import UserError
from dlrun.models.regions import decode, encode, label_regions, sample


def test_box_regression_targets_by_hand() -> None:
    # Proposal centre (5, 5), 10 x 10; truth centre (7, 7), 10 x 12 (R-CNN appendix C):
    # t_x = (7 - 5) / 10 = 0.2, t_y = 0.2, t_w = log(10 / 10) = 0, t_h = log(12 / 10); then
    # Fast R-CNN's scale (10, 10, 5, 5).
    p, g = torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[2.0, 1.0, 12.0, 13.0]])
    t = encode(p, g)
    assert t[0].tolist() == pytest.approx([2.0, 2.0, 0.0, 5 * math.log(1.2)], abs=1e-6)
    assert encode(p, g, scale=(1.0, 1.0, 1.0, 1.0))[0, 3].item() == pytest.approx(math.log(1.2))
    assert decode(p, t)[0].tolist() == pytest.approx(g[0].tolist(), abs=1e-5)


def test_proposals_are_labelled_by_their_best_iou_in_their_own_image() -> None:
    props = torch.tensor(
        [
            [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 4.0], [30, 30, 40, 40], [-1, -1, -1, -1]],
            [[0.0, 0.0, 10.0, 10.0], [-1, -1, -1, -1], [-1, -1, -1, -1], [-1, -1, -1, -1]],
        ]
    )
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 8.0]], [[0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[3], [-1]])
    r = label_regions(props, boxes, labels, bg_iou=(0.1, 0.5))
    # IoU with the 10 x 8 box: 80 / 100 = 0.8 (class 3 -> label 4), 40 / 80 = 0.5 (>= fg: 4),
    # 0 (below bg 0.1: ignored); image 1 has no box: IoU 0, ignored too.
    assert r.image.tolist() == [0, 0, 0, 1]
    assert r.labels.tolist() == [4, 4, -1, -1]
    assert r.iou.tolist() == pytest.approx([0.8, 0.5, 0.0, 0.0])
    assert r.truth[0].tolist() == [0.0, 0.0, 10.0, 8.0] and r.truth[2].tolist() == [0.0] * 4
    r = label_regions(props, boxes, labels, add_truth=True)  # R-CNN: background from IoU 0
    assert r.labels.tolist() == [4, 4, 0, 0, 4] and r.boxes[-1].tolist() == [0, 0, 10, 8]


def test_sampling_keeps_the_foreground_share() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([1] * 10 + [0] * 30 + [-1] * 5)
    picked = sample(labels, 16, 0.25)
    assert len(picked) == 16 and (labels[picked] > 0).sum() == 4 and (labels[picked] >= 0).all()
    few = sample(torch.tensor([2, 0, 0]), 16)  # fewer than asked: all of them
    assert sorted(few.tolist()) == [0, 1, 2]


def test_selective_search_finds_a_lone_square_and_caches_it(
    opencv_contrib: ModuleType, tmp_path: Path
) -> None:
    images = torch.zeros(2, 1, 64, 64, dtype=torch.uint8)
    images[0, 0, 20:40, 10:30] = 255
    images[1, 0, 5:25, 30:60] = 200
    found = proposals.cached(images, tmp_path, upscale=2, max_boxes=50, strategy="fast")
    assert found.shape[0] == 2 and found.shape[2] == 4
    valid = proposals.valid(found)
    for i, truth in enumerate([[10.0, 20.0, 30.0, 40.0], [30.0, 5.0, 60.0, 25.0]]):
        best = (found[i][valid[i]] - torch.tensor(truth)).abs().amax(1).min()
        assert best <= 1.0, found[i][valid[i]]
    (cache,) = tmp_path.glob("proposals-*.pt")
    torch.save(torch.zeros(2, 1, 4), cache)  # the cache is read, not recomputed
    again = proposals.cached(images, tmp_path, upscale=2, max_boxes=50, strategy="fast")
    assert again.abs().sum() == 0
    with pytest.raises(UserError, match="strategy must be one of fast, quality, single"):
        proposals.selective_search(images, strategy="slow")
