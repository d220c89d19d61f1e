"""Parameters and forward FLOPs of every model config at 32x32x3 (10 classes), as a Markdown table.

python benchmarks/zoo_table.py
"""

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from dlrun.cli import CONFIG_DIR
from dlrun.introspect import count_flops
from dlrun.models import instantiate_model


def main() -> None:
    names = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))
    print("| `model=` | parameters | forward MFLOPs / image |\n| --- | --- | --- |")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for name in names:
            cfg = compose("train", overrides=[f"model={name}", "data=cifar10"])
            model = instantiate_model(cfg.model)
            params = sum(p.numel() for p in model.parameters())
            flops = count_flops(model, (3, 32, 32), torch.device("cpu"))
            print(f"| `{name}` | {params:,} | {flops / 1e6:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
