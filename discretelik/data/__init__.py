"""Datasets: the bundled subsets and CIFAR-10 readers."""

from .bundled import BUNDLED_DATASETS, load_bundled
from .cifar10 import CIFAR10_CLASSES, UnsafePickleError, load_cifar10, read_cifar10_pickle

__all__ = [
    "BUNDLED_DATASETS",
    "CIFAR10_CLASSES",
    "UnsafePickleError",
    "load_bundled",
    "load_cifar10",
    "read_cifar10_pickle",
]
