"""Siamese / triplet networks: pair and P x K sampling, fixed evaluation pairs, verification
metrics with known answers, the models, a few steps of each loss, and the embed / verify modes."""

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from dlrun.cli import build_trainer, run
from dlrun.data.pairs import ClassIndex, PairSampler, fixed_pairs
from dlrun.errors import UserError
from dlrun.models.siamese import Siamese, zoo_model
from dlrun.tasks.metric_learning import verification
from tests.conftest import stopped_at_step
from tests.test_monitor import scalars

TINY = ("model.backbone_args={activation: relu, pool: max}", "model.embedding_dim=8")
FAST = ("data.batch_size=20", "data.verify_pairs=40", "trainer.max_steps=3", "data.val_split=50")


@pytest.fixture(autouse=True)
def _threads(one_thread: None) -> None:
    """Tiny nets: one thread each (see conftest)."""


def labels_of(counts: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])[
        torch.randperm(sum(counts))
    ]


# ----- sampling ----------------------------------------------------------------------------------
def test_pairs_are_balanced_correct_and_every_item_is_an_anchor_once() -> None:
    labels = labels_of([7, 1, 12, 5, 9])  # one class with a single image
    sampler = PairSampler(labels, 8)
    g = torch.Generator().manual_seed(3)
    batches = sampler.epoch(g, torch.device("cpu"))
    anchors = torch.cat([b["a"] for b in batches])
    assert sorted(anchors.tolist()) == list(range(len(labels)))
    for batch in batches:
        same = labels[batch["a"]] == labels[batch["b"]]
        expect = torch.arange(len(same)) % 2 == 0  # even batches: exactly half of one class
        assert torch.equal(same, expect | ((labels[batch["a"]] == 1) & expect))
        lonely = labels[batch["a"]] == 1
        assert torch.all((batch["a"] != batch["b"])[same & ~lonely])  # distinct images


def test_partners_cover_their_class_and_the_other_classes_uniformly() -> None:
    labels = labels_of([50, 50, 50, 50])
    index = ClassIndex(labels)
    g = torch.Generator().manual_seed(0)
    anchors = torch.zeros(20000, dtype=torch.long)  # one anchor, many draws
    same = index.partners(anchors, torch.ones(20000, dtype=torch.bool), g)
    other = index.partners(anchors, torch.zeros(20000, dtype=torch.bool), g)
    assert torch.all(labels[same] == labels[0]) and not torch.any(same == 0)
    assert len(torch.unique(same)) == 49
    share = torch.bincount(labels[other], minlength=4).float() / 20000
    assert share[labels[0]] == 0 and torch.allclose(
        share[share > 0], torch.tensor(1 / 3), atol=0.02
    )


def test_fixed_pairs_depend_on_their_own_seed_only() -> None:
    labels = labels_of([30, 30, 30])
    torch.manual_seed(1)
    a = fixed_pairs(labels, 100, seed=5)
    torch.manual_seed(2)  # the run's seed moves the global generator; the pairs stay
    b = fixed_pairs(labels, 100, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    i, j = a
    same = labels[i] == labels[j]
    assert torch.all(same[:50]) and not torch.any(same[50:]) and torch.all(i[:50] != j[:50])
    assert not torch.equal(fixed_pairs(labels, 100, seed=6)[0], i)


def test_holdout_classes_leave_training_and_validation_but_not_the_test_split(make_cfg) -> None:
    trainer = build_trainer(
        make_cfg("model=siamese", *TINY, *FAST, "data.holdout_classes=[8,9]"), "unused"
    )
    data = trainer.data
    assert not torch.isin(data.train_y, torch.tensor([8, 9])).any()
    assert not torch.isin(data.val_y, torch.tensor([8, 9])).any()
    assert torch.isin(data.test_y, torch.tensor([8, 9])).any()
    i, j = trainer.pairs.eval_pairs("test", [8, 9])
    assert torch.isin(data.test_y[i], torch.tensor([8, 9])).all()
    assert torch.isin(data.test_y[j], torch.tensor([8, 9])).all()


def test_pk_loader_draws_p_classes_of_k_images(make_cfg) -> None:
    cfg = make_cfg("model=siamese", "loss=triplet", *TINY, *FAST, "data.classes_per_batch=4")
    trainer = build_trainer(cfg, "unused")
    batch = next(iter(trainer.train_loader()))
    assert len(batch["label"]) == 20
    assert sorted(torch.bincount(batch["label"]).tolist())[-4:] == [5, 5, 5, 5]


# ----- metrics -----------------------------------------------------------------------------------
def test_threshold_accuracy_and_auc_known_answers() -> None:
    s = torch.tensor([0.9, 0.8, 0.7, 0.3, 0.2])
    y = torch.tensor([1, 1, 0, 1, 0]).bool()
    t, acc = verification.best_threshold(s, y)
    assert t == pytest.approx(0.75) and acc == pytest.approx(0.8)
    assert verification.accuracy_at(s, y, t) == pytest.approx(0.8)
    assert verification.roc_auc(s, y) == pytest.approx(5 / 6)
    assert verification.roc_auc(torch.tensor([1.0, 1.0]), torch.tensor([True, False])) == 0.5
    perfect = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert verification.best_threshold(perfect, torch.tensor([1, 1, 0, 0]).bool()) == (1.5, 1.0)
    fpr, tpr = verification.roc_curve(s, y)
    assert tpr.tolist()[-1] == 1.0 and fpr.tolist()[:3] == [0.0, 0.0, 0.0]
    image = verification.roc_image(fpr, tpr, "ROC")
    assert image.dtype == torch.uint8 and image.shape[0] == 3


def test_auc_matches_counting_every_pair() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 20, (300,), generator=g).float()  # many ties
    y = torch.rand(300, generator=g) < 0.4
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean()
    assert verification.roc_auc(s, y) == pytest.approx(float(brute))


def test_knn_accuracy_leaves_each_item_out() -> None:
    e = torch.tensor([[0.0], [0.1], [0.2], [5.0], [5.1], [9.0]])
    y = torch.tensor([0, 0, 0, 1, 1, 0])
    # k=1: the lone class-0 item at 9.0 is nearest to class 1: 5 of 6.
    assert verification.knn_accuracy(e, y, k=1) == pytest.approx(5 / 6)


# ----- models ------------------------------------------------------------------------------------
def test_shared_and_pseudo_siamese_and_the_head() -> None:
    kw = {"backbone": "mlp", "in_channels": 1, "image_size": 8, "embedding_dim": 4}
    shared, pseudo = Siamese(**kw), Siamese(**kw, shared=False, head=True)
    n = sum(p.numel() for p in shared.parameters())
    assert sum(p.numel() for p in pseudo.parameters()) == 2 * n + 5
    assert not any(k.startswith("branch_b") for k in shared.state_dict())
    a, b = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    ea, eb = shared.pair(a, b)
    assert torch.allclose(ea.norm(dim=1), torch.ones(3)) and torch.allclose(
        eb, shared(b), atol=1e-6
    )
    pa, pb = pseudo.pair(a, a)
    assert not torch.allclose(pa, pb)  # weights of their own
    assert pseudo.same_logit(pa, pb).shape == (3,)


def test_backbone_errors_name_the_choices() -> None:
    with pytest.raises(UserError, match="not a classifier of the zoo.*lenet"):
        zoo_model("cyclegan", in_channels=1, image_size=28, num_classes=4)
    with pytest.raises(UserError, match="backbone_args.widthz is not a key of model=lenet"):
        zoo_model("lenet", in_channels=1, image_size=28, num_classes=4, widthz=3)


# ----- the task ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "choice",
    [
        ("loss=contrastive",),
        ("loss=triplet",),
        ("loss=triplet", "loss.mining=batch_all"),
        ("loss=pair_bce", "model.head=true"),
        ("model=pseudo_siamese", "loss=pair_bce", "model.head=true"),
    ],
    ids=["contrastive", "batch_hard", "batch_all", "head_bce", "pseudo_bce"],
)
def test_each_loss_trains_and_scores_the_pairs(make_cfg, tmp_path: Path, choice: tuple) -> None:
    model = () if choice[0].startswith("model=") else ("model=siamese",)
    metrics = run(make_cfg(*model, *TINY, *FAST, *choice), tmp_path)
    # The test pairs are scored at the threshold fitted on the validation pairs; there it is
    # the best of all thresholds, at least as good as calling every (balanced) pair the same.
    assert metrics["test/threshold"] == metrics["val/threshold"]
    assert 0.5 <= metrics["val/verify_acc"] <= 1
    # every loss logs the same verification figures on both splits (their values: the learnable
    # case below checks them against a count by hand)
    logged = {k for k in metrics if k.startswith(("val/", "test/"))}
    names = ("verify_acc", "roc_auc", "knn_acc", "threshold")
    assert logged == {f"{p}/{n}" for p in ("val", "test") for n in names}
    assert metrics["step"] == 3 and torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_tensorboard_has_roc_images_and_the_projector(make_cfg, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(make_cfg("model=siamese", *TINY, *FAST, "trainer.projector_n=30"), tmp_path)
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0}).Reload()
    assert {"val/roc", "test/roc", "val/pairs"} <= set(events.Tags()["images"])
    config = (tmp_path / "projector_config.pbtxt").read_text()
    assert "sprite" in config and "metadata" in config
    folder = next(tmp_path.glob("*/test_embeddings"))
    assert len((folder / "metadata.tsv").read_text().splitlines()) == 30


def test_holdout_run_reports_unseen_class_verification(make_cfg, tmp_path: Path) -> None:
    keys = ("model=siamese", *TINY, *FAST, "data.holdout_classes=[8,9]", "trainer.max_steps=null",
            "trainer.max_epochs=2", "data.verify_pairs=200")  # fmt: skip
    metrics = run(make_cfg(*keys), tmp_path)
    assert "val/verify_acc_unseen" not in metrics  # the validation split holds no 8 or 9
    # The classes seen in training are verified well; pairs of two digits never seen, at the
    # same threshold, are still told apart better than by chance (the bars move with the class).
    assert metrics["test/verify_acc"] >= 0.9
    assert 0.5 < metrics["test/roc_auc_unseen"] <= 1 and 0 <= metrics["test/verify_acc_unseen"] <= 1


def test_pair_resume_mid_epoch_ends_like_an_uninterrupted_run(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dlrun.tasks.metric_learning.trainer import MetricTrainer

    cfg = (
        "model=siamese", *TINY, "data.batch_size=20", "data.verify_pairs=40", "data.val_split=50",
        "trainer.max_epochs=1", "trainer.checkpoint_every_n_steps=3",
    )  # fmt: skip
    full = run(make_cfg(*cfg), tmp_path / "full")
    stopped_at_step(make_cfg(*cfg), tmp_path / "cut", MetricTrainer, 4, monkeypatch)
    resumed = run(make_cfg(*cfg, "resume=true"), tmp_path / "cut")
    assert resumed["val/verify_acc"] == full["val/verify_acc"]
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["task"]["threshold"] == b["task"]["threshold"]


@pytest.fixture
def trained(make_cfg, tmp_path: Path) -> Path:
    run(make_cfg("model=siamese", *TINY, *FAST), tmp_path / "train")
    return tmp_path / "train" / "checkpoints" / "last.pt"


def test_embed_mode_writes_embeddings_and_projector_tsvs(make_cfg, tmp_path, trained) -> None:
    keys = ("model=siamese", *TINY, *FAST, "mode=embed", f"ckpt={trained}")
    out = run(make_cfg(*keys), tmp_path / "embed")
    saved = torch.load(tmp_path / "embed" / "embed" / "embeddings.pt", weights_only=True)
    assert saved["embeddings"].shape == (100, 8) and out["embed/items"] == 100
    rows = (tmp_path / "embed" / "embed" / "tensors.tsv").read_text().splitlines()
    assert len(rows) == 100 and len(rows[0].split("\t")) == 8
    meta = (tmp_path / "embed" / "embed" / "metadata.tsv").read_text().splitlines()
    assert meta[0] == "name\tlabel" and len(meta) == 101
    folder = tmp_path / "pngs"
    folder.mkdir()
    for k in range(3):
        Image.new("L", (40, 40), 60 * k).save(folder / f"{k}.png")
    run(make_cfg(*keys, f"embed.input={folder}"), tmp_path / "embed_folder")
    saved = torch.load(tmp_path / "embed_folder" / "embed" / "embeddings.pt", weights_only=True)
    assert saved["names"] == ["0", "1", "2"] and saved["labels"] is None


def test_verify_mode_prints_the_distance_and_the_decision(
    make_cfg, tmp_path: Path, trained: Path, capsys
) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("L", (28, 28), 0).save(a)
    Image.new("L", (28, 28), 255).save(b)
    keys = ("model=siamese", *TINY, *FAST, "mode=verify", f"ckpt={trained}")
    out = run(make_cfg(*keys, f"verify.a={a}", f"verify.b={a}"), tmp_path / "v1")
    assert out["verify/same"] == 1.0 and out["verify/distance"] == pytest.approx(0, abs=1e-5)
    assert capsys.readouterr().out.startswith("same: distance 0.0000 <= threshold")
    out = run(make_cfg(*keys, f"verify.a={a}", f"verify.b={b}"), tmp_path / "v2")
    result = json.loads((tmp_path / "v2" / "verify" / "result.json").read_text())
    assert result["distance"] == pytest.approx(out["verify/distance"])
    assert result["distance"] > 0
    assert result["same"] == (result["distance"] <= result["threshold"])
    with pytest.raises(UserError, match="needs two images"):
        run(make_cfg(*keys, f"verify.a={a}"), tmp_path / "v3")
    with pytest.raises(UserError, match="no such file"):
        run(make_cfg(*keys, f"verify.a={a}", "verify.b=/nope.png"), tmp_path / "v4")


def test_eval_mode_scores_the_test_pairs_at_the_saved_threshold(
    make_cfg, tmp_path, trained
) -> None:
    saved = torch.load(trained, weights_only=True)
    out = run(make_cfg("model=siamese", *TINY, *FAST, "mode=eval", f"ckpt={trained}"), tmp_path)
    assert out["test/threshold"] == pytest.approx(-saved["task"]["threshold"])
    trained_metrics = json.loads((trained.parent.parent / "metrics.json").read_text())
    assert out["test/verify_acc"] == pytest.approx(trained_metrics["test/verify_acc"])
    assert out["test/roc_auc"] == pytest.approx(trained_metrics["test/roc_auc"])


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (("loss=cross_entropy",), "trains with loss=contrastive"),
        (("loss=pair_bce",), "needs model.head=true"),
        (("model.head=true",), "train no head"),
        (("model=pseudo_siamese", "loss=triplet"), "triplet batches have no sides"),
        (("data.holdout_classes=[10]",), "must name some, not all"),
        (("loss=triplet", "data.batch_size=12"), "K >= 2"),
        (("model.backbone=knn",), "not a classifier of the zoo"),
        (("trainer=classification",), "is an embedding network.*trainer=metric"),
    ],
)
def test_user_mistakes_are_one_clear_error(make_cfg, keys: tuple, message: str) -> None:
    model = () if keys[0].startswith("model=") else ("model=siamese",)
    with pytest.raises(UserError, match=message):
        trainer = build_trainer(make_cfg(*model, *TINY, *FAST, *keys), "unused")
        next(iter(trainer.train_loader()))


@pytest.mark.parametrize("data", ["fashion_mnist", "cifar10", "imagefolder"])
def test_pairs_and_triplets_come_from_any_labelled_image_set(
    make_cfg, tmp_path: Path, data_root: Path, data: str
) -> None:
    where = (f"data.root={data_root / 'folder'}",) if data == "imagefolder" else ()
    for loss in ("contrastive", "triplet"):
        metrics = run(
            make_cfg("model=siamese", f"data={data}", *where, f"loss={loss}", *TINY,
                     "data.batch_size=20", "data.verify_pairs=40", "trainer.max_steps=2",
                     "trainer.projector_n=10"),
            tmp_path / loss,
        )  # fmt: skip
        assert metrics["step"] == 2 and 0.5 <= metrics["val/verify_acc"] <= 1
        # data.val_split's default (0.1): the threshold's pairs are held-out training images
        assert metrics["test/threshold"] == metrics["val/threshold"]
        assert {"test/verify_acc", "test/roc_auc", "test/knn_acc"} <= set(metrics)


# ----- the protocol: the threshold is never fitted on test pairs --------------------------------
LEARNS = ("model=siamese", *TINY, "data.batch_size=20", "data.verify_pairs=200",
          "trainer.max_epochs=2", "data.val_split=0")  # fmt: skip


def test_without_val_split_the_threshold_is_fitted_on_held_out_training_images(
    make_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="dlrun.tasks.metric_learning.trainer"):
        trainer = build_trainer(make_cfg(*LEARNS), tmp_path / "built")
    said = [r.getMessage() for r in caplog.records if "verification threshold" in r.getMessage()]
    # 10% of the 200 fake training images is 20, less than 1,000: at most half, 100, are held out
    assert len(said) == 1 and "100 of the 200 training images" in said[0], said
    about = trainer.data.describe()
    assert not about["val_is_test"]
    assert about["sizes"] == {"train": 100, "val": 100, "test": 100}
    val, test = trainer.data.val_x.flatten(1), trainer.data.test_x.flatten(1)
    assert not (val[:, None] == test[None]).all(-1).any()  # no validation image is a test image
    metrics = run(make_cfg(*LEARNS), tmp_path / "run")
    assert metrics["test/threshold"] == metrics["val/threshold"]
    # A learnable case (each class a bar at its own row): the loss falls, the test pairs are
    # verified well at the validation threshold, and that accuracy is the one counted here.
    losses = [v for _, v in scalars(tmp_path / "run")["train/loss"]]
    assert len(losses) == 2 and losses[1] < 0.8 * losses[0], losses
    assert metrics["test/verify_acc"] >= 0.95 and metrics["test/roc_auc"] >= 0.99
    trainer = build_trainer(make_cfg(*LEARNS, "mode=eval", f"ckpt={tmp_path / 'run'}/checkpoints/last.pt"), tmp_path / "eval")
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    trainer.model.load_state_dict(state["model"])
    e, _ = trainer.embed(trainer.data.example_batch(100, "test")["image"])
    i, j = trainer.pairs.eval_pairs("test")
    same = trainer.data.test_y[i] == trainer.data.test_y[j]
    distance = (e[i] - e[j]).norm(dim=1)
    by_hand = ((distance <= -state["task"]["threshold"]) == same).float().mean().item()
    assert metrics["test/verify_acc"] == pytest.approx(by_hand, abs=1e-6)


def test_each_set_of_weights_has_its_own_threshold_fitted_on_validation_pairs(
    make_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = ("model=siamese", *TINY, *FAST, "trainer.ema.decay=0.5")
    run(make_cfg(*keys), tmp_path / "train")
    ckpt = tmp_path / "train" / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    saved = state["task"]["thresholds"]
    assert set(saved) == {"model", "ema"} and saved["model"] != saved["ema"]
    assert state["task"]["threshold"] == saved["model"]
    for weights in ("model", "ema"):
        out = run(make_cfg(*keys, "mode=eval", f"ckpt={ckpt}", f"eval.weights={weights}"),
                  tmp_path / f"eval_{weights}")  # fmt: skip
        assert out["test/threshold"] == pytest.approx(-saved[weights])
    # A checkpoint from before per-weights thresholds: the average's is fitted now, on the
    # validation pairs (the same value), not taken from the raw weights.
    state["task"] = {"threshold": saved["model"]}
    torch.save(state, tmp_path / "old.pt")
    out = run(make_cfg(*keys, "mode=eval", f"ckpt={tmp_path / 'old.pt'}", "eval.weights=ema"),
              tmp_path / "eval_old")  # fmt: skip
    assert out["test/threshold"] == pytest.approx(-saved["ema"])
    # ... and one written with data.val_split=0 before the hold-out fitted its threshold on test
    # pairs: it is fitted again on the validation pairs.
    state["task"] = {"threshold": 123.0}
    state["config"]["data"]["val_split"] = 0
    torch.save(state, tmp_path / "on_test.pt")
    with caplog.at_level(logging.WARNING, logger="dlrun.tasks.metric_learning.trainer"):
        out = run(make_cfg(*keys, "mode=eval", f"ckpt={tmp_path / 'on_test.pt'}"),
                  tmp_path / "eval_on_test")  # fmt: skip
    assert out["test/threshold"] == pytest.approx(-saved["model"])
    assert any("fitted on test pairs" in r.getMessage() for r in caplog.records)
