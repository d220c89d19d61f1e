"""Data modules declare what they offer beyond their loaders (dlrun.data.module.CAPABILITIES) and
trainers `require` it: one clear error naming the fix, never an AttributeError deep in a run.
Metric learning's pairs wrap a labelled module held in memory (dlrun.data.pairs.PairBatches)."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from dlrun.cli import build_trainer
from dlrun.config import migrations
from dlrun.data.in_memory import ClassificationData
from dlrun.data.module import offered, require
from dlrun.data.pairs import PairBatches
from dlrun.data.streamed import StreamingClassificationData
from dlrun.errors import UserError
from tests.fixtures import write_png_folder

SIAMESE = ("model=siamese", "model.backbone_args={activation: relu, pool: max}",
           "model.embedding_dim=8", "data.batch_size=20", "data.verify_pairs=40")  # fmt: skip


class OwnData:
    """A data module of one's own, as tests/test_extension.py writes one: no `offers`."""

    name = "own"


def test_require_gives_the_provider_or_one_line_that_names_the_fix() -> None:
    with pytest.raises(UserError) as err:
        require(OwnData(), "pairs", by="trainer=metric")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("trainer=metric needs pairs and P x K batches")
    assert "data=own does not offer" in message and "data.in_memory=true" in message
    provider = object()
    module = OwnData()
    module.offers = {"pairs": provider}  # type: ignore[attr-defined]
    assert require(module, "pairs", by="trainer=metric") is provider
    assert offered(module, "boxes") is None
    with pytest.raises(ValueError, match="unknown capability 'pears'"):
        offered(module, "pears")


def test_labelled_sets_offer_pairs_that_wrap_the_module(make_cfg) -> None:
    cfg = make_cfg("data=mnist", "data.holdout_classes=[8,9]", "data.classes_per_batch=4")
    data = instantiate(cfg.data)
    assert isinstance(data, ClassificationData)
    assert set(data.offers) == {"normalization", "tensors", "pairs"}
    pairs = require(data, "pairs", by="trainer=metric")
    assert isinstance(pairs, PairBatches) and pairs.labelled is data
    assert pairs.holdout_classes == [8, 9] and pairs.classes_per_batch == 4
    assert not torch.isin(data.train_y, torch.tensor([8, 9])).any()  # out before the splits


def test_metric_learning_on_streamed_folders_is_one_clear_error(make_cfg, tmp_path: Path) -> None:
    folder = write_png_folder(tmp_path / "pngs", n=40)
    keys = (*SIAMESE, "data=imagefolder", f"data.root={folder}",
            f"data.source.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    with pytest.raises(UserError) as err:
        build_trainer(make_cfg(*keys, "data.in_memory=false"), tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("trainer=metric needs pairs and P x K batches")
    assert "data=imagefolder does not offer" in message and "data.in_memory=true" in message
    streamed = instantiate(make_cfg(*keys, "data.in_memory=false").data)
    assert isinstance(streamed, StreamingClassificationData)
    assert offered(streamed, "pairs") is None and offered(streamed, "normalization") is streamed
    with pytest.raises(UserError, match=r"^Metric learning needs labelled images held in memory, "
                       r"which data=imagefolder does not offer; use data.in_memory=true"):  # fmt: skip
        PairBatches(streamed)
    # The same folder held in memory: the wrapper makes its pairs.
    held = instantiate(make_cfg(*keys, "data.in_memory=true").data)
    held.setup(torch.device("cpu"), 0)
    batch = next(iter(require(held, "pairs", by="trainer=metric").pair_loader()))
    assert set(batch) == {"image", "label", "image_b", "label_b"} and len(batch["label"]) == 20
    same = batch["label"] == batch["label_b"]
    assert torch.equal(same, torch.arange(20) % 2 == 0)  # half the pairs of one class


def test_runs_saved_with_the_old_data_targets_read_as_todays(make_cfg) -> None:
    today = make_cfg("data=mnist").data._target_
    assert make_cfg("data=cifar10").data._target_ == today
    for old in ("dlrun.data.ClassificationData", "dlrun.data.streamed.image_classification"):
        assert migrations.migrate({"data._target_": old}) == {"data._target_": today}
