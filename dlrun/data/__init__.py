"""Data sets decoded once into uint8 tensors, served from the device by `TensorLoader`."""

from dlrun.data.in_memory import ClassificationData, Splits
from dlrun.data.module import DataModule
from dlrun.data.samplers import (
    ClassBalancedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    ShardedSampler,
    UnpairedSampler,
)
from dlrun.data.tensor_loader import TensorLoader
from dlrun.data.transforms import Normalize, RandomCrop, RandomHFlip, Transform

__all__ = [
    "ClassBalancedSampler",
    "ClassificationData",
    "DataModule",
    "Normalize",
    "RandomCrop",
    "RandomHFlip",
    "RandomSampler",
    "Sampler",
    "SequentialSampler",
    "ShardedSampler",
    "Splits",
    "TensorLoader",
    "Transform",
    "UnpairedSampler",
]
