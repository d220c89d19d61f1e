"""One package per task: everything only that task uses (trainer, modes, losses, metrics,
drawings). Task packages do not import each other, except that distillation builds on
classification and CycleGAN scores its discriminators with the GAN losses (tests/test_layout.py)."""
