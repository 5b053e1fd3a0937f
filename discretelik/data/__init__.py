"""Datasets: the bundled subsets and CIFAR-10 readers."""

from .bundled import BUNDLED_DATASETS, load_bundled

__all__ = ["BUNDLED_DATASETS", "load_bundled"]
