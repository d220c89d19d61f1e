"""Macro precision, recall and F1 beside accuracy in a classifier's evaluation."""

import json
from pathlib import Path

import numpy as np
import pytest

from dlrun.cli import run
from dlrun.tasks.classification.trainer import macro_scores

# Rows true, columns predicted. Class 2 is never predicted (precision 0), class 3 predicted once
# but never true (recall 0), class 4 neither (left out of the means, as scikit-learn does).
CONFUSION = np.array([
    [2, 1, 0, 0, 0],
    [1, 3, 0, 1, 0],
    [1, 1, 0, 0, 0],
    [0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0],
])  # fmt: skip


def test_hand_computed_macro_scores_of_a_small_confusion_matrix() -> None:
    # TP 2, 3, 0, 0; true 3, 5, 2, 0; predicted 4, 5, 0, 1 -> over the four classes seen:
    # precision (2/4 + 3/5 + 0 + 0) / 4 = 11/40; recall (2/3 + 3/5 + 0 + 0) / 4 = 19/60;
    # F1 = 2TP / (true + predicted): (4/7 + 6/10 + 0 + 0) / 4 = 41/140.
    assert macro_scores(CONFUSION, "val") == pytest.approx(
        {"val/macro_precision": 11 / 40, "val/macro_recall": 19 / 60, "val/macro_f1": 41 / 140}
    )
    perfect = macro_scores(np.diag([3, 0, 5]), "test")  # class 1 absent: not a 0 in the mean
    assert perfect == {"test/macro_precision": 1.0, "test/macro_recall": 1.0, "test/macro_f1": 1.0}


@pytest.mark.usefixtures("one_thread")
def test_a_run_writes_them_for_val_and_test(make_cfg, tmp_path: Path) -> None:
    metrics = run(make_cfg("model=linear", "data.batch_size=50", "trainer.max_steps=2",
                           "data.val_split=0.1", "data.eval_subset=40"), tmp_path)  # fmt: skip
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for split in ("val", "test"):
        for name in ("macro_precision", "macro_recall", "macro_f1"):
            key = f"{split}/{name}"
            assert key in saved and saved[key] == metrics[key] and 0 <= saved[key] <= 1, key
