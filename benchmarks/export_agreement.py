"""Do the exported files predict what PyTorch predicts? Every test image, ONNX and TorchScript.

    DLRUN_DATA=../shared/datasets python benchmarks/export_agreement.py
    DLRUN_DATA=../shared/datasets python benchmarks/export_agreement.py --ckpt RUN/checkpoints/best.pt

Without --ckpt it first trains LeNet-5 on MNIST for one epoch (CPU, about ten seconds). It then
runs `dlrun mode=export` for onnx and torchscript (the real mode, in-process), runs each written
file on the whole test split (onnxruntime; torch.jit.load) in batches of --batch, and compares
them with the checkpoint's PyTorch model (dlrun.load): how many top-1 predictions differ, the
largest absolute logit difference, and each one's test accuracy. A --ckpt run's data and model
come from its run folder's .hydra/overrides.yaml, as it was started.
"""

import argparse
import time
from importlib.metadata import version
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import dlrun
from dlrun.cli import CONFIG_DIR, build_trainer, run
from dlrun.tasks.classification import export

TRAIN = ["model=lenet", "data=mnist", "trainer.max_epochs=1"]


def config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=["device=cpu", "trainer.progress=false", *overrides])


def run_overrides(ckpt: Path) -> list[str]:
    """The overrides the checkpoint's run was started with (model=, data=, model.* ...)."""
    saved = ckpt.resolve().parent.parent / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        raise SystemExit(f"{saved} is missing: pass a checkpoint inside its dlrun run folder")
    keep = ("ckpt=", "mode=", "resume=", "hydra.", "device=", "trainer.")
    return [o for o in yaml.safe_load(saved.read_text()) or [] if not o.startswith(keep)]


def batched(fn, x: torch.Tensor, batch: int) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return torch.cat([fn(chunk) for chunk in x.split(batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, help="a dlrun classifier checkpoint (default: train)")
    parser.add_argument("--batch", type=int, default=1000, help="images per call of each file")
    args = parser.parse_args()
    with TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.ckpt is None:
            start = time.perf_counter()
            metrics = run(config(TRAIN), work / "train")
            ckpt, overrides = work / "train" / "checkpoints" / "last.pt", TRAIN[:2]
            print(
                f"trained {' '.join(TRAIN)}: test acc {metrics['val/acc']:.4f} (val = the test split) "
                f"in {time.perf_counter() - start:.1f} s"
            )
        else:
            ckpt, overrides = args.ckpt, run_overrides(args.ckpt)
        data = build_trainer(config(overrides), work / "data").data
        n = data.describe()["sizes"]["test"]
        test = data.example_batch(n, "test")
        x, y = test["image"].cpu(), test["label"].cpu()
        model, _ = dlrun.load(ckpt)
        start = time.perf_counter()
        ref = batched(model, x, args.batch)
        ran = time.perf_counter() - start
        name = data.describe()["name"]
        print(f"checkpoint {args.ckpt or 'of that run'}; {n} test images of {name}")
        print(
            f"pytorch     torch {torch.__version__}, onnxruntime {version('onnxruntime')}, "
            f"onnxscript {version('onnxscript')}: test acc {(ref.argmax(1) == y).float().mean():.4f}; "
            f"{n / ran:.0f} images/s"
        )
        for fmt in ("onnx", "torchscript"):
            out = work / f"export_{fmt}"
            start = time.perf_counter()
            run(config([*overrides, "mode=export", f"ckpt={ckpt}", f"export.format={fmt}"]), out)
            took = time.perf_counter() - start
            path = out / "export" / export.FILES[fmt]
            exported = export.load_exported(fmt, path)
            start = time.perf_counter()
            got = batched(exported, x, args.batch)
            ran = time.perf_counter() - start
            print(
                f"{fmt:11s} {path.name}: {path.stat().st_size / 1e3:.0f} kB, exported in {took:.1f} s; "
                f"top-1 disagreements with PyTorch: {int((got.argmax(1) != ref.argmax(1)).sum())} "
                f"of {n}; max abs logit difference {(got - ref).abs().max().item():.3e}; "
                f"test acc {(got.argmax(1) == y).float().mean():.4f}; {n / ran:.0f} images/s"
            )


if __name__ == "__main__":
    main()
