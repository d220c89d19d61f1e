"""The output modes' shared contract: inputs from a folder or a split, in the model's size."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dlrun.cli import build_trainer
from dlrun.engine.run_modes import mode_inputs
from dlrun.errors import UserError


def test_mode_inputs_reads_a_folder_resized_to_the_model_or_a_split(make_cfg, tmp_path: Path):
    trainer = build_trainer(make_cfg("model=lenet"), tmp_path / "run")
    folder = tmp_path / "in"
    folder.mkdir()
    for name, size in (("b", 40), ("a", 28), ("c", 7)):  # RGB files of other sizes
        Image.fromarray(np.full((size, size, 3), 200, np.uint8)).save(folder / f"{name}.png")
    (folder / "notes.txt").write_text("not an image")
    names, images = mode_inputs(trainer.data, {"input": str(folder)})
    assert names == ["a", "b", "c"] and images.shape == (3, 1, 28, 28)
    assert images.dtype == torch.uint8 and int(images[0, 0, 0, 0]) == 200  # grey of (200,)*3
    names, images = mode_inputs(trainer.data, {"input": "test"})
    assert len(names) == 100 and images.shape == (100, 1, 28, 28)
    assert torch.equal(images, trainer.data.test_x.cpu())  # the stored uint8 split, exactly
    with pytest.raises(UserError, match="neither a split .* nor a folder holding images"):
        mode_inputs(trainer.data, {"input": str(tmp_path / "missing")})
