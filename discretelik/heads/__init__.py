"""Likelihood heads. Importing this package registers the built-in heads."""

from . import gaussian, logistic, softmax  # noqa: F401  (registration by import)
from .base import DiscreteImageDistribution, Head

__all__ = ["DiscreteImageDistribution", "Head"]
