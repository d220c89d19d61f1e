"""Parameters and forward FLOPs of every model config at 32x32x3 (10 classes), as a Markdown table.

python benchmarks/zoo_table.py
"""

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from dlrun.cli import CONFIG_DIR
from dlrun.engine.introspect import count_flops
from dlrun.models import instantiate_model


def main() -> None:
    names = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))
    print("| `model=` | parameters | forward MFLOPs / image |\n| --- | --- | --- |")
    left_out: list[str] = []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for name in names:
            cfg = compose("train", overrides=[f"model={name}", "data=cifar10"])
            trainer = str(cfg.trainer._target_).rsplit(".", 1)[-1]
            if trainer != "ClassificationTrainer" or name in NOT_HERE:
                # GANs, CycleGAN, detectors, U-Net/FCN, Siamese, style transfer, k-NN: not an
                # image -> 10 class scores network, so this table's FLOPs do not apply
                left_out.append(f"`{name}` ({NOT_HERE.get(name, trainer)})")
                continue
            model = instantiate_model(cfg.model)
            params = sum(p.numel() for p in model.parameters())
            flops = count_flops(model, (3, 32, 32), torch.device("cpu"))
            print(f"| `{name}` | {params:,} | {flops / 1e6:,.1f} |", flush=True)
    print(f"\nLeft out (not an image -> 10 scores network at 32x32x3, or not built bare): {', '.join(left_out)}.")


# Classifier configs this table cannot build as they are: why.
NOT_HERE = {
    "timm": "needs model.name=<a timm network>",
    "torchvision": "needs model.name=<a torchvision classifier>",
    "knn": "no parameters: a nearest-neighbour classifier",
    "rnn": "reads rows or pixels as a sequence (data=seq_mnist)",
    "lstm": "reads rows or pixels as a sequence (data=seq_mnist)",
    "gru": "reads rows or pixels as a sequence (data=seq_mnist)",
}


if __name__ == "__main__":
    main()
