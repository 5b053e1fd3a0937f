"""The cached one-pixel sampling step on static buffers, replayed from CUDA graphs.

With a sampling cache each pixel costs a few hundred small kernels, so on a GPU the step is
bound by launching them. ``StaticSteps`` writes the whole step -- the cache's ``advance``, the
head's parameters, the draw and the canvas update -- against buffers allocated before the
loop, with the position read from a device tensor, so that one CUDA graph per *plan* of the
cache (``SamplingCache.plan``: the handful of distinct pixel kinds, e.g. "first column of a row
divisible by 4") is captured once and replayed for every pixel of that kind:

* The position ``(i, j)`` is copied into a static ``(2,)`` int64 buffer before each replay;
  everything indexed by it is an ``index_select`` / ``index_copy_`` (no host synchronisation,
  no Python branch on a tensor value).
* Random draws come from the user's generator (or the default one), registered with each graph
  (``CUDAGraph.register_generator_state``). PyTorch's graph-safe Philox states make a replay
  draw exactly what the eager step would have drawn from the same generator state, and advance
  the generator by as much, so the graphed sampler consumes the generator exactly as the eager
  one does.
* The first pixel of each kind runs eagerly (it is also the warm-up), then its graph is
  captured (capture records, it does not run) and later pixels of that kind replay it.

On the CPU, or with ``cuda_graph="uncaptured"``, the same step runs eagerly; it makes the same
operations and draws as the eager cached sampler, so it draws the same images.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .backbones.sampling_cache import SamplingCache

if TYPE_CHECKING:
    from .model import AutoregressiveModel

__all__ = ["StaticSteps"]


class StaticSteps:
    """Draws pixels in raster order with the cached step, from CUDA graphs where possible.

    Args:
        model: The model (in evaluation mode).
        cache: Its backbone's fresh sampling cache for this draw.
        canvas: int64 ``(n, C, H, W)``, contiguous; drawn pixels are written into it.
        scaled: ``model.scale(canvas)``, contiguous; kept in step with ``canvas``.
        mask: bool ``(n, H, W)`` of known pixels (kept as they are in ``canvas``), or ``None``.
        generator: The generator of the draws, or ``None`` for the default one.
        params: float ``(n, P, H, W)`` that receives each drawn pixel's parameters, or ``None``.
        capture: Capture CUDA graphs (``canvas`` on a CUDA device); ``False`` runs the same
            step eagerly.
        strict: Raise when a capture fails instead of warning once and running eagerly.
    """

    def __init__(
        self,
        model: "AutoregressiveModel",
        cache: SamplingCache,
        canvas: Tensor,
        scaled: Tensor,
        mask: Tensor | None,
        generator: torch.Generator | None,
        params: Tensor | None,
        capture: bool,
        strict: bool = False,
    ) -> None:
        self.model, self.cache = model, cache
        self.canvas, self.scaled, self.params = canvas, scaled, params
        self.mask = None if mask is None else mask.contiguous()  # viewed flat per step
        self.generator = generator
        self.capture, self.strict = capture, strict
        n, c, h, w = canvas.shape
        self.width = w
        device = canvas.device
        rows = torch.arange(h, device=device).repeat_interleave(w)
        cols = torch.arange(w, device=device).repeat(h)
        self.table = torch.stack([rows, cols], dim=1)  # (H W, 2): raster index -> (i, j)
        self.pos = torch.zeros(2, dtype=torch.long, device=device)  # the static position
        self.graphs: dict[tuple[Hashable, bool], torch.cuda.CUDAGraph] = {}
        self._stream = torch.cuda.Stream(device) if capture else None

    def step(self, i: int, j: int, draw: bool) -> None:
        """Advance the cache at ``(i, j)`` and, if ``draw``, draw the pixel (else the pixel is
        known in every image and only the cache advances)."""
        plan = self.cache.plan(i, j)
        key = (plan, draw)
        self.pos.copy_(self.table[i * self.width + j])
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        self._body(plan, draw)  # the first pixel of its kind: eagerly, also the warm-up
        if self.capture:
            try:
                self.graphs[key] = self._capture(plan, draw)
            except Exception as err:  # noqa: BLE001  (any capture failure: fall back)
                if self.strict:
                    raise
                warnings.warn(
                    f"CUDA graph capture of the sampling step failed ({type(err).__name__}: "
                    f"{err}); sampling continues with the eager step",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self.capture = False

    def _capture(self, plan: Hashable, draw: bool) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:  # the default generator is registered by capture_begin
            graph.register_generator_state(self.generator)
        current = torch.cuda.current_stream(self.canvas.device)
        self._stream.wait_stream(current)
        # capture_begin/end directly: torch.cuda.graph would also collect garbage and empty
        # the allocator's cache for each of the graphs.
        with torch.cuda.stream(self._stream):
            graph.capture_begin()
            try:
                self._body(plan, draw)
            except BaseException:
                try:
                    graph.capture_end()
                except Exception:  # noqa: BLE001  (the capture is invalid anyway)
                    pass
                raise
            graph.capture_end()
        current.wait_stream(self._stream)
        return graph

    def _body(self, plan: Hashable, draw: bool) -> None:
        """The step, reading the position from ``self.pos`` and writing only static buffers."""
        i, j = self.pos[0:1], self.pos[1:2]
        feats = self.cache.advance(self.scaled, i, j, plan, features=draw)
        if not draw:
            return
        head = self.model.head
        params = head.params(feats[:, :, None, None])  # (n, P, 1, 1)
        # No validation: it would read the parameters back to the host.
        new = head.distribution(params, validate_args=False).sample(generator=self.generator)
        new = new[:, :, 0, 0]  # (n, C)
        n, c = new.shape
        flat = i * self.width + j  # (1,)
        canvas = self.canvas.view(n, c, -1)
        if self.mask is not None:
            keep = self.mask.view(n, -1).index_select(1, flat)  # (n, 1)
            new = torch.where(keep, canvas.index_select(2, flat)[:, :, 0], new)
        canvas.index_copy_(2, flat, new[:, :, None])
        scaled = self.model.scale(new)
        self.scaled.view(n, c, -1).index_copy_(2, flat, scaled[:, :, None])
        if self.params is not None:
            self.params.view(n, params.shape[1], -1).index_copy_(2, flat, params[:, :, 0])
