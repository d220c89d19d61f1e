"""What a run sets for the whole process before any tensor work: its CPU threads
(trainer.num_threads) and deterministic kernels (trainer.deterministic). Both are trainer
arguments too (resume keeps the run's thread count); the CLI calls `configure` first."""

import os

import torch

from dlrun.launch import threads


def configure(num_threads: int | None, deterministic: bool, device: torch.device) -> None:
    """The run's one thread count (null: auto), then deterministic kernels or not."""
    threads.apply(num_threads)
    set_determinism(deterministic, device)


def set_determinism(on: bool, device: torch.device) -> None:
    """trainer.deterministic: deterministic kernels only (an op without one is an error) and no
    cudnn autotuning, whose choice of algorithm varies from run to run; off: cudnn benchmarks."""
    if on:  # cuBLAS needs a fixed workspace to be deterministic (before its first use)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = device.type == "cuda" and not on
