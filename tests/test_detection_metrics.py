"""mAP: known answers on hand-made cases, and agreement with pycocotools' COCOeval."""

import contextlib
import io

import pytest
import torch

from dlrun.tasks.detection.metrics import mean_average_precision
from tests.conftest import need_extra


def det(boxes, scores, labels) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def gt(boxes, labels) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.long)}  # fmt: skip


def test_perfect_detections_score_1_and_none_score_0() -> None:
    t = [gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1])]
    assert mean_average_precision(
        [det([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [0, 1])], t, 2
    ) == {
        "map_50": 1.0,
        "map": 1.0,
    }
    assert mean_average_precision([det([], [], [])], t, 2)["map"] == 0.0


def test_iou_0_6_counts_at_three_of_ten_thresholds() -> None:
    # A 10x10 box against one shifted by 2.5 px: IoU 75 / 125 = 0.6 (>= 0.5, 0.55, 0.6 only).
    out = mean_average_precision(
        [det([[2.5, 0, 12.5, 10]], [1.0], [0])], [gt([[0, 0, 10, 10]], [0])], 1
    )
    assert out["map_50"] == 1.0 and out["map"] == pytest.approx(0.3)


def test_a_false_positive_ranked_first_halves_the_precision_at_full_recall() -> None:
    # Scores 0.9 (wrong place), 0.8 (right): precision 1/2 at recall 1, so AP = 0.5 everywhere
    # the curve is read (101 points, all at recall > 0 need the second detection).
    out = mean_average_precision(
        [det([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])],
        [gt([[0, 0, 10, 10]], [0])],
        1,
    )
    assert out["map_50"] == pytest.approx(0.5)


def hand_made() -> tuple[list[dict], list[dict]]:
    g = torch.Generator().manual_seed(0)
    preds, targets = [], []
    for _ in range(6):
        n = int(torch.randint(1, 5, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 80
        truth = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 20], 1)
        labels = torch.randint(0, 3, (n,), generator=g)
        jitter = (torch.rand(n, 4, generator=g) - 0.5) * 8
        extra = torch.rand(2, 4, generator=g) * 50
        extra[:, 2:] += extra[:, :2] + 5
        boxes = torch.cat([truth + jitter, extra])
        scores = torch.rand(n + 2, generator=g)
        plabels = torch.cat([labels, torch.randint(0, 3, (2,), generator=g)])
        preds.append({"boxes": boxes, "scores": scores, "labels": plabels})
        targets.append({"boxes": truth, "labels": labels})
    return preds, targets


def test_agrees_with_pycocotools_cocoeval() -> None:
    need_extra("pycocotools", "test")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    preds, targets = hand_made()
    xywh = lambda b: [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]  # noqa: E731
    images = [{"id": i + 1, "width": 128, "height": 128} for i in range(len(targets))]
    anns, k = [], 1
    for i, t in enumerate(targets):
        for box, label in zip(t["boxes"], t["labels"], strict=True):
            w = xywh(box)
            anns.append({"id": k, "image_id": i + 1, "category_id": int(label) + 1, "bbox": w,
                         "area": w[2] * w[3], "iscrowd": 0})  # fmt: skip
            k += 1
    dets = [
        {"image_id": i + 1, "category_id": int(label) + 1, "bbox": xywh(box), "score": float(s)}
        for i, p in enumerate(preds)
        for box, s, label in zip(p["boxes"], p["scores"], p["labels"], strict=True)
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": images, "annotations": anns,
                        "categories": [{"id": c + 1} for c in range(3)]}  # fmt: skip
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ours = mean_average_precision(preds, targets, 3)
    assert ours["map"] == pytest.approx(ev.stats[0], abs=1e-6)
    assert ours["map_50"] == pytest.approx(ev.stats[1], abs=1e-6)
    assert 0.05 < ours["map"] < 0.95  # a case that exercises partial matches
