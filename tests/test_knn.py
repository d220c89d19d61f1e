import torch

from dlrun.cli import run
from dlrun.models.knn import KNN


def test_knn_known_answer() -> None:
    knn = KNN(num_classes=3, k=3, p=1, chunk=2)  # chunk < N: the running top-k across chunks
    knn.memorize(torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]]), torch.tensor([0, 0, 1, 2, 2]))
    pred = knn(torch.tensor([[0.4], [10.2], [1.6]])).argmax(1)
    assert pred.tolist() == [0, 2, 0]  # 1.6: neighbours 2 (1), 1 (0), 0 (0) -> majority 0
    knn.k = 1
    assert knn(torch.tensor([[1.6]])).argmax(1).tolist() == [1]


def test_knn_l1_and_l2_agree_on_clear_cases() -> None:
    x, y = torch.randn(50, 1, 4, 4), torch.arange(50) % 5
    for p in (1, 2):
        knn = KNN(num_classes=5, k=1, p=p)
        knn.memorize(x, y)
        assert torch.equal(knn(x + 1e-3).argmax(1), y)


def test_model_knn_brings_its_trainer_and_reports_val_acc(make_cfg, tmp_path) -> None:
    cfg = make_cfg("model=knn")
    assert cfg.trainer._target_.endswith("KNNTrainer")
    metrics = run(cfg, tmp_path)
    assert metrics["step"] == 0 and metrics["params"] == 0 and metrics["val/acc"] > 0.5
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    again = run(
        make_cfg("model=knn", "mode=eval", f"ckpt={tmp_path / 'checkpoints' / 'last.pt'}"),
        tmp_path / "eval",
    )
    assert again["test/acc"] == metrics["val/acc"]
