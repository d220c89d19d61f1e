"""Data sets decoded once into uint8 tensors, served from the device by `TensorLoader`."""

from dlrun.data.base import ClassificationData, Splits
from dlrun.data.tensor_loader import TensorLoader

__all__ = ["ClassificationData", "Splits", "TensorLoader"]
