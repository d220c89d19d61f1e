"""TensorBoard opens on the curves (issue 30, item 4): the first groups of the Time Series and
Scalars tabs hold the loss and the monitored metric, train and val; feature maps (inside/*) and
timing charts (time/*) come after them.

The order is TensorBoard's own: both tabs group tags by the part before the first '/', sort
groups by their tags (a natural sort in which '/' and digits come before other characters) and
open the first two groups (Time Series: over its scalars and images; Scalars: over its scalars).
"""

import itertools
import re
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dlrun.cli import run
from dlrun.engine.tb import Writer, headline_tags, log_layout


def tb_sort_key(tag: str) -> list[tuple[int, int | str]]:
    """TensorBoard's tag comparison (compareTagNames): digit runs compare as numbers, and '/'
    and digits sort before every other character; other characters by code point."""
    parts = re.findall(r"\d+|.", tag)
    return [(0, int(p)) if p.isdigit() else (0, -1) if p == "/" else (1, p) for p in parts]


def groups(tags: list[str]) -> list[tuple[str, list[str]]]:
    """Tag groups in the order the tabs show them, each with its cards in order."""
    ordered = sorted(tags, key=tb_sort_key)
    return [(g, list(ts)) for g, ts in itertools.groupby(ordered, key=lambda t: t.split("/")[0])]


def test_time_series_and_scalars_open_on_loss_and_the_monitor(make_cfg, tmp_path: Path) -> None:
    run(make_cfg("model=lenet", "trainer.max_steps=4", "data.batch_size=50"), tmp_path)
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars, images = acc.Tags()["scalars"], acc.Tags()["images"]
    for tab, tags in (("time series", scalars + images), ("scalars", scalars)):
        shown = groups(tags)
        opened = shown[:2]  # the two groups each tab opens
        assert opened == [("1_loss", ["1_loss/train", "1_loss/val"]),
                          ("2_acc", ["2_acc/train", "2_acc/val"])], tab  # fmt: skip
        names = [g for g, _ in shown]
        assert names.index("time") > 1 and names.index("train") > 1, tab
        if tab == "time series":
            assert names.index("inside") > 1  # feature maps and filters after the curves
    # the headline cards are the run's own curves: per-step training values, validation points
    for copy, tag in (("1_loss/train", "train/loss_step"), ("1_loss/val", "val/loss"),
                      ("2_acc/train", "train/acc_step"), ("2_acc/val", "val/acc")):  # fmt: skip
        assert [(e.step, e.value) for e in acc.Scalars(copy)] == [
            (e.step, e.value) for e in acc.Scalars(tag)
        ]


def test_the_headline_follows_the_monitor_and_survives_a_resume(tmp_path: Path) -> None:
    assert headline_tags("val/miou") == {
        "train/loss_step": "1_loss/train", "val/loss": "1_loss/val",
        "train/miou_step": "2_miou/train", "val/miou": "2_miou/val",
    }  # fmt: skip
    assert (
        headline_tags("train/loss")
        == headline_tags(None)
        == {"train/loss_step": "1_loss/train", "val/loss": "1_loss/val"}
    )
    fresh = Writer(str(tmp_path))
    assert fresh.headline == {}  # set by the header's layout
    log_layout(fresh, "val/miou")
    fresh.close()
    resumed = Writer(str(tmp_path), purge_step=10)  # a resume writes no header: it reads it back
    resumed.add_scalar("val/miou", 0.5, 12)
    resumed.close()
    assert resumed.headline == headline_tags("val/miou")
    acc = EventAccumulator(str(tmp_path)).Reload()
    assert [(e.step, e.value) for e in acc.Scalars("2_miou/val")] == [(12, 0.5)]
