"""The contract every backbone follows.

A backbone maps an image, as float ``(B, C, H, W)`` scaled to ``[-1, 1]``, plus optional
conditioning, to features ``(B, out_channels, H, W)``. It knows nothing about the head.

Causality contract (checked for every registered backbone by ``discretelik.testing``):

* ``channel_groups == 1``: the features at pixel ``(i, j)`` depend only on pixels strictly
  before ``(i, j)`` in raster order (whole previous pixels). Every head may sit on top.
* ``channel_groups == C`` (only backbones with ``supports_channel_groups``, and only when the
  head also supports it, e.g. ``"pixelcnn"`` + ``"softmax"``): the features are ``C``
  contiguous blocks; block ``c`` at pixel ``(i, j)`` may also depend on channels ``< c`` of
  pixel ``(i, j)`` itself (the R -> G -> B sub-pixel order of PixelRNN/PixelCNN).
"""

from __future__ import annotations

from typing import ClassVar, Mapping, Union

import torch
from torch import Tensor, nn

from .._checks import check_float_dtype, check_ndim, check_tensor, value_checks_enabled

__all__ = ["Backbone", "Conditioning"]

Conditioning = Union[Tensor, Mapping[str, Tensor], None]
"""Conditioning accepted by backbones: class labels int64 ``(B,)``, a spatial map float
``(B, cond_channels, h, w)``, a mapping ``{"label": ..., "map": ...}`` for both, or ``None``."""


class Backbone(nn.Module):
    """Base class of autoregressive backbones.

    Subclasses set ``in_channels`` (image channels), ``out_channels`` (features ``F``) and
    ``channel_groups`` and implement ``forward(x, cond=None)``.

    Attributes:
        supports_channel_groups: Whether the backbone can produce ``C`` ordered feature groups
            (R -> G -> B sub-pixel masks).
        in_channels: Image channels ``C``.
        out_channels: Feature channels ``F``.
        channel_groups: ``1`` or ``C``, see the module docstring.
        size_multiple: ``H`` and ``W`` must be multiples of this (4 for the PixelCNN++ U-Net).
    """

    supports_channel_groups: ClassVar[bool] = False
    in_channels: int
    out_channels: int
    channel_groups: int = 1
    num_classes: int | None = None
    cond_channels: int | None = None
    size_multiple: int = 1

    def check_input(self, x: Tensor) -> None:
        """Validate the image argument ``x``: float ``(B, in_channels, H, W)``."""
        check_tensor(x, "x")
        check_float_dtype(x, "x")
        check_ndim(x, 4, "x", "(B, C, H, W)")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have {self.in_channels} channels (the backbone's in_channels), "
                f"got shape {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        m = self.size_multiple
        if h % m or w % m:
            raise ValueError(
                f"x height and width must be multiples of {m} for {type(self).__name__}, "
                f"got {h}x{w}"
            )

    def split_cond(self, cond: Conditioning, batch: int) -> tuple[Tensor | None, Tensor | None]:
        """Validate ``cond`` against how the backbone was built; return ``(label, map)``.

        Raises:
            ValueError: Conditioning is missing although the backbone was built conditional, is
                given although it was not, or has the wrong shape or range.
            TypeError: Wrong dtype or container.
        """
        label: Tensor | None = None
        cmap: Tensor | None = None
        if cond is None:
            pass
        elif isinstance(cond, Tensor):
            if cond.is_floating_point():
                cmap = cond
            else:
                label = cond
        elif isinstance(cond, Mapping):
            unknown = set(cond) - {"label", "map"}
            if unknown:
                raise ValueError(f"cond keys must be 'label' and/or 'map', got {sorted(unknown)}")
            label, cmap = cond.get("label"), cond.get("map")
        else:
            raise TypeError(
                "cond must be None, a label tensor (B,), a map tensor (B, Cc, h, w) or a dict "
                f"with 'label'/'map', got {type(cond).__name__}"
            )
        name = type(self).__name__
        if self.num_classes is None and label is not None:
            raise ValueError(f"cond has class labels but {name} was built with num_classes=None")
        if self.num_classes is not None:
            if label is None:
                raise ValueError(
                    f"cond must give class labels (B,) int64: {name} was built with "
                    f"num_classes={self.num_classes}"
                )
            if label.is_floating_point() or label.dtype == torch.bool:
                raise TypeError(f"cond label must be an integer tensor, got dtype {label.dtype}")
            if tuple(label.shape) != (batch,):
                raise ValueError(
                    f"cond label must have shape ({batch},), got {tuple(label.shape)}"
                )
            # Reading the labels synchronises a GPU; the global validation switch skips it.
            if (
                value_checks_enabled()
                and label.numel()
                and (int(label.min()) < 0 or int(label.max()) >= self.num_classes)
            ):
                raise ValueError(
                    f"cond label must lie in [0, {self.num_classes - 1}], got "
                    f"[{int(label.min())}, {int(label.max())}]"
                )
            # Embedding lookups take int64/int32 indices only; uint8 / int16 labels pass above.
            label = label.long()
        if self.cond_channels is None and cmap is not None:
            raise ValueError(f"cond has a spatial map but {name} was built with cond_channels=None")
        if self.cond_channels is not None:
            if cmap is None:
                raise ValueError(
                    f"cond must give a spatial map (B, {self.cond_channels}, h, w): {name} was "
                    f"built with cond_channels={self.cond_channels}"
                )
            if not cmap.is_floating_point():
                raise TypeError(f"cond map must be a float tensor, got dtype {cmap.dtype}")
            if (
                cmap.dim() != 4
                or cmap.shape[0] != batch
                or cmap.shape[1] != self.cond_channels
                or min(cmap.shape[2:]) < 1  # an empty map has nothing to upsample
            ):
                raise ValueError(
                    f"cond map must have shape ({batch}, {self.cond_channels}, h, w) with "
                    f"h, w >= 1, got {tuple(cmap.shape)}"
                )
        return label, cmap

    def forward(self, x: Tensor, cond: Conditioning = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError
