"""Autoregressive backbones. Importing this package registers the built-in backbones."""

from . import gated_pixelcnn, pixelcnn, pixelcnn_pp, pixelrnn  # noqa: F401  (registration by import)
from .base import Backbone, Conditioning

__all__ = ["Backbone", "Conditioning"]
