r"""The discretized logistic mixture log-likelihood as two Triton kernels (CUDA).

One autograd node, like the lean PyTorch path (``lean.py``): the same online mixture posterior
over components, with the logistic formula of ``formula.py`` and ``logistic.py`` translated
into Triton (its constants passed in from ``logistic.py``) and differentiated by hand. The
difference is where the loop over components runs: here inside one GPU program per block of
pixels, so the component log-masses never leave registers. What it allocates:

* forward: the result and the per-channel maximum ``top`` (``B x C x H x W`` float32 each);
  autograd saves the raw parameters, the levels and ``top``;
* backward: the gradient ``B x P x H x W`` (every channel written by the kernel) and nothing
  else.

``KernelConfig`` (an argument, never a global) selects the launch: pixels per program, warps,
the coupling ``tanh``'s precision, and the fused path, which computes the gradient of the
log-likelihood's sum in the forward kernel when a gradient will be needed (as Liger-Kernel's
cross entropy does) and, in backward, scales it in place by the incoming gradient when that
is one value per image (``log_prob(x).sum()`` or ``.mean()``, seen from its strides: no value
is compared, nothing waits for the device), else runs the backward kernel. Its forward
allocates the gradient (``B x P x H x W``) too, and autograd keeps it until backward returns
it. The head uses ``DEFAULT_CONFIG``: the two-kernel path until a GPU has timed the variants
(``examples/benchmarks/likelihood.py`` on CUDA); switching the head to another setting is a
change of ``KernelConfig``'s defaults, in one place.

Scope: float32 parameters ``(B, P, H, W)`` and levels ``(B, C, H, W)`` with no leading
``sample_shape``; ``triton_unsupported(params, value, bins)`` says why a call does not qualify, and the head
falls back to the PyTorch paths otherwise. Not twice differentiable.

The kernels also run in Triton's interpreter on CPU tensors when ``TRITON_INTERPRET=1`` is set
before Triton is first imported; the test suite checks them that way on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import logistic
from .layout import MixtureLayout

__all__ = [
    "DEFAULT_CONFIG",
    "KernelConfig",
    "triton_available",
    "triton_elementwise_log_prob",
    "triton_is_default",
    "triton_unsupported",
]

# Levels up to 2^24 are exact in float32 (bin edges are formed from them in the kernels).
_MAX_BINS = 2**24 + 1
# The oldest GPUs that the default picks the kernels on (Turing); Triton's support for older
# ones has been dropped or limited over its releases.
_MIN_CAPABILITY = (7, 5)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether Triton can be imported (it ships with CUDA builds of PyTorch on Linux) and
    ``torch.library.custom_op`` exists (torch 2.4 and later)."""
    return _TRITON_FOUND and _DLM_LOG_PROB_OP is not None


def triton_unsupported(params: Tensor, value: Tensor, bins: int) -> str | None:
    """Why the Triton kernels cannot compute this call, or ``None`` when they can.

    They take float32 ``params`` on a CUDA device (or on CPU under ``TRITON_INTERPRET=1``)
    with levels of the batch shape (no leading ``sample_shape``) and at most ``2^24 + 1`` bins
    (the kernels form bin edges from levels in float32, exact up to ``2^24``), and need an
    importable Triton with ``torch.library.custom_op`` (torch 2.4 and later).
    """
    if not (params.device.type == "cuda" or (params.device.type == "cpu" and _interpreting())):
        return f"the parameters are on {params.device}, not a CUDA device"
    if params.dtype != torch.float32:
        return f"the parameters are {params.dtype}, not float32"
    if value.dim() != params.dim():
        return f"the levels {tuple(value.shape)} have sample dimensions"
    if bins > _MAX_BINS:
        return f"bins={bins} exceeds {_MAX_BINS} (levels are exact in float32 up to 2**24)"
    if not _TRITON_FOUND:
        return "triton is not installed"
    if _DLM_LOG_PROB_OP is None:
        return f"its custom operators are unavailable ({_REGISTRATION_ERROR or 'torch < 2.4'})"
    return None


def triton_is_default(params: Tensor, value: Tensor, bins: int) -> bool:
    """Whether ``"auto"`` picks the Triton kernels for this call: float32 parameters on a CUDA
    GPU of compute capability 7.5 or newer, within the kernels' scope, with a Triton whose
    kernels import. A CUDA float32 call that misses only for want of Triton or of a new enough
    GPU warns once (the PyTorch paths are used)."""
    if params.device.type != "cuda" or params.dtype != torch.float32:
        return False
    reason = triton_unsupported(params, value, bins)
    if reason is None and torch.cuda.get_device_capability(params.device) < _MIN_CAPABILITY:
        reason = f"compute capability {torch.cuda.get_device_capability(params.device)} < 7.5"
    if reason is None:
        return _kernels_importable()
    if value.dim() == params.dim() and bins <= _MAX_BINS:
        _warn_once(reason)
    return False


@functools.lru_cache(maxsize=None)
def _warn_once(reason: str) -> None:
    warnings.warn(
        f"the DLM head's Triton kernels are not used ({reason}); log_prob uses the PyTorch "
        "paths",
        RuntimeWarning,
        stacklevel=4,
    )


@functools.lru_cache(maxsize=None)
def _kernels_importable() -> bool:
    try:
        _kernels()
    except Exception as error:  # noqa: BLE001  (any import-time failure of triton)
        warnings.warn(
            f"triton was found but the DLM kernels could not be imported ({error!r}); "
            "log_prob uses the PyTorch paths",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


@functools.lru_cache(maxsize=None)
def _kernels() -> Any:
    from . import triton_kernels  # imports triton

    return triton_kernels


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _offset_table(layout: MixtureLayout, device: torch.device) -> Tensor:
    """int32 ``(2 CP + CP * CP,)``: first parameter channel of every location, log-scale and
    coupling block (see the kernel module's docstring), ``-1`` for absent blocks.

    Cached per layout and device: building it on a GPU is a host-to-device copy, which
    would wait for the stream on every call.
    """
    cp = _next_power_of_2(layout.channels)
    loc, log_scale, coeff = layout._block_starts()
    table = [-1] * (2 * cp + cp * cp)
    for c in range(layout.channels):
        table[c] = loc[c]
        table[cp + c] = log_scale[c]
    if layout.coupling:
        pairs = [(c, j) for c in range(1, layout.channels) for j in range(c)]  # block order
        for block, (c, j) in enumerate(pairs):
            table[2 * cp + c * cp + j] = coeff[block]
    return torch.tensor(table, dtype=torch.int32, device=device)


@dataclass(frozen=True)
class KernelConfig:
    """How the DLM kernels are launched: one value per call, no global switch.

    The defaults are the head's (``log_prob_backend="triton"`` and ``"auto"`` on CUDA). They
    are not yet timed against the other settings on a GPU: ``examples/benchmarks/likelihood.py``
    times each variant on CUDA, and the default changes here, in one place, once a GPU has.

    Attributes:
        block: Pixels per program (a power of two, 16 to 1024). The default was chosen on
            register use (cuobjdump of the sm_90 build, RGB, ``K = 10``): with 8 warps each
            thread holds 2 entries of a ``(128, 4)`` tile and backward needs 128 registers
            (16 warps per SM can run), where 4 warps need 255 and spill more.
        num_warps: Warps per program (a power of two, 1 to 32); ignored by the interpreter.
        float64_coupling_tanh: Evaluate the coupling's ``tanh`` in float64 and round once (as
            accurate as ``torch.tanh``), else in float32 (about 2 ulps; float64 is slow on
            most GPUs). In float32 the gradients of narrow bins are less accurate (measured
            in the interpreter: 3.4x the eager path's error, ``C = 4``, 65536 bins).
        fused: When a gradient is needed (grad mode on and ``params.requires_grad``), one
            kernel computes the log-likelihood and the gradient of its sum, and autograd's
            backward scales that gradient by the incoming one in place when the latter is
            constant over ``(C, H, W)`` within each image (an expanded, stride-0 gradient,
            what ``log_prob(x).sum()`` or ``.mean()`` gives), else runs the backward kernel
            (any upstream gradient). Off: a forward kernel and a backward kernel.
    """

    block: int = 128
    num_warps: int = 8
    float64_coupling_tanh: bool = True
    fused: bool = False

    def __post_init__(self) -> None:
        for name, low, high in (("block", 16, 1024), ("num_warps", 1, 32)):
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high or value & (value - 1):
                raise ValueError(
                    f"KernelConfig.{name} must be a power of two in [{low}, {high}], got {value!r}"
                )
        for name in ("float64_coupling_tanh", "fused"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"KernelConfig.{name} must be a bool, got {getattr(self, name)!r}"
                )


DEFAULT_CONFIG = KernelConfig()


def triton_elementwise_log_prob(
    params: Tensor,
    value: Tensor,
    layout: MixtureLayout,
    bins: int,
    min_log_scale: float,
    config: KernelConfig = DEFAULT_CONFIG,
) -> Tensor:
    """``log p(x_c | x_<c)`` of every sub-pixel, by the Triton kernels.

    Same values (to float32 rounding) and gradients as the eager
    ``DiscretizedLogisticMixtureDistribution.elementwise_log_prob``, whatever ``config``.

    Args:
        params: float32 raw parameters ``batch_shape + (P, H, W)`` in ``layout`` (any strides;
            made contiguous).
        value: integer levels in ``[0, bins - 1]``, ``batch_shape + (C, H, W)`` (validated by
            the caller).
        layout: The parameter layout (channels, mixtures, coupling).
        bins: Levels per sub-pixel.
        min_log_scale: Lower clamp of the log-scales.
        config: Block size, warps, the coupling ``tanh``'s precision and the fused
            forward-with-gradient path (``KernelConfig``).

    Returns:
        float32 tensor of ``value``'s shape.

    Raises:
        ValueError: ``params``/``value`` outside the kernels' scope (see ``triton_unsupported``).
        TypeError: ``config`` is not a ``KernelConfig``.
    """
    if not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a KernelConfig, got {type(config).__name__}")
    reason = triton_unsupported(params, value, bins)
    if reason is not None:
        raise ValueError(f"triton_elementwise_log_prob cannot compute this call: {reason}")
    args = (
        params, value, layout.channels, layout.mixtures, layout.coupling, bins,
        float(min_log_scale), config.block, config.num_warps, config.float64_coupling_tanh,
    )  # fmt: skip
    if config.fused and torch.is_grad_enabled() and params.requires_grad:
        out, _top, _grad = _DLM_LOG_PROB_WITH_GRAD_OP(*args)
    else:
        out, _top = _DLM_LOG_PROB_OP(*args)
    return out


def _launch_args_constants(
    layout: MixtureLayout, block: int = DEFAULT_CONFIG.block,
    float64_coupling_tanh: bool = DEFAULT_CONFIG.float64_coupling_tanh,
) -> dict[str, Any]:  # fmt: skip
    """The kernels' compile-time constants for ``layout`` and a launch configuration."""
    return dict(
        C=layout.channels,
        CP=_next_power_of_2(layout.channels),
        K=layout.mixtures,
        KP=_next_power_of_2(layout.mixtures),
        COUPLING=layout.coupling and layout.channels > 1,
        BLOCK=block,
        # The formula's constants, from the one place they are written.
        WIDE_HALF_WIDTH=logistic.WIDE_HALF_WIDTH,
        FAR_TAIL=logistic.FAR_TAIL,
        TINY_LOG_HALF_WIDTH=logistic.TINY_LOG_HALF_WIDTH,
        Z_LIMIT=logistic.Z_LIMIT,
        WIDE_TANH=float64_coupling_tanh,
    )


def _on_device(t: Tensor) -> Any:
    """Make ``t``'s GPU the current one: Triton launches on the current CUDA device."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# The launch options after the layout, as every operator below takes them.
_OPTIONS_SCHEMA = (
    "int channels, int mixtures, bool coupling, int bins, float min_log_scale, int block, "
    "int num_warps, bool float64_coupling_tanh"
)


def _launch(
    kernel: str, params: Tensor, value: Tensor, buffers: tuple[Tensor, ...],
    channels: int, mixtures: int, coupling: bool, bins: int, min_log_scale: float,
    block: int, num_warps: int, float64_coupling_tanh: bool,
) -> None:  # fmt: skip
    """Run ``kernel`` (a name in the kernel module) over every pixel of contiguous ``params``
    ``batch + (P, H, W)``: its arguments are ``params, value, offset table, *buffers``, then
    the sizes, ``bins - 1``, the clamp and the compile-time constants."""
    n_pixels = params[..., 0, :, :].numel()
    if n_pixels == 0:
        return
    layout = MixtureLayout(channels, mixtures, coupling)
    constants = _launch_args_constants(layout, block, float64_coupling_tanh)
    if not _interpreting():
        constants["num_warps"] = num_warps
    with _on_device(params):
        getattr(_kernels(), kernel)[(-(-n_pixels // block),)](
            params, value, _offset_table(layout, params.device), *buffers,
            n_pixels, params.shape[-1] * params.shape[-2], params.shape[-3],
            float(bins - 1), float(min_log_scale), **constants,
        )  # fmt: skip


def _run_forward(params: Tensor, value: Tensor, *options: Any) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel: ``(out, top)``, float32 of ``value``'s shape."""
    out = torch.empty(value.shape, dtype=torch.float32, device=params.device)
    top = torch.empty_like(out)
    _launch("dlm_forward_kernel", params.contiguous(), value.contiguous(), (out, top), *options)
    return out, top


def _run_backward(
    params: Tensor, value: Tensor, top: Tensor, grad: Tensor, *options: Any
) -> Tensor:
    """Launch the backward kernel: the gradient, float32 of ``params``' shape (contiguous)."""
    out = torch.empty(params.shape, dtype=torch.float32, device=params.device)
    _launch(
        "dlm_backward_kernel", params.contiguous(), value.contiguous(),
        (top.contiguous(), grad.contiguous(), out), *options,
    )  # fmt: skip
    return out


def _run_forward_grad(
    params: Tensor, value: Tensor, *options: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the fused kernel: ``(out, top, grad)``, ``grad`` the gradient of ``out.sum()``
    (float32 of ``params``' shape, contiguous)."""
    out = torch.empty(value.shape, dtype=torch.float32, device=params.device)
    top = torch.empty_like(out)
    grad = torch.empty(params.shape, dtype=torch.float32, device=params.device)
    _launch(
        "dlm_forward_grad_kernel", params.contiguous(), value.contiguous(), (out, top, grad),
        *options,
    )  # fmt: skip
    return out, top, grad


def _constant_per_image(grad: Tensor) -> bool:
    """Whether ``grad`` (``batch + (C, H, W)``) is visibly one value per image: stride 0 in
    each of its last three dimensions that has more than one element, as the ``expand`` of
    ``sum``'s or ``mean``'s backward leaves it. Strides only: no value is compared, so nothing
    waits for the device; a constant gradient stored densely is not recognised (the backward
    kernel then computes the same gradient)."""
    return grad.dim() >= 3 and all(
        grad.stride(d) == 0 or grad.shape[d] == 1 for d in (-3, -2, -1)
    )


def _register_ops() -> Any:
    """The kernels as ``torch.library`` custom operators with autograd, so that
    ``torch.compile`` can trace a call (it sees one opaque operator and its fake, shape-only
    version) instead of breaking the graph: ``(log_prob, log_prob_with_grad)``, ``None``s
    before torch 2.4."""
    custom_op = getattr(torch.library, "custom_op", None)
    if custom_op is None:
        return None, None

    # Explicit schemas: inferring them from annotations depends on the torch version (these
    # annotations are strings here, ``from __future__ import annotations``).
    @custom_op(
        "discretelik::dlm_log_prob",
        mutates_args=(),
        schema=f"(Tensor params, Tensor value, {_OPTIONS_SCHEMA}) -> (Tensor, Tensor)",
    )
    def forward_op(params: Tensor, value: Tensor, *options: Any) -> tuple[Tensor, Tensor]:
        return _run_forward(params, value, *options)

    @forward_op.register_fake
    def _(params, value, *options):  # noqa: ANN001, ANN202
        out = value.new_empty(value.shape, dtype=torch.float32)
        return out, torch.empty_like(out)

    @custom_op(
        "discretelik::dlm_log_prob_backward",
        mutates_args=(),
        schema=f"(Tensor params, Tensor value, Tensor top, Tensor grad, {_OPTIONS_SCHEMA}) "
        "-> Tensor",
    )
    def backward_op(
        params: Tensor, value: Tensor, top: Tensor, grad: Tensor, *options: Any
    ) -> Tensor:
        return _run_backward(params, value, top, grad, *options)

    @backward_op.register_fake
    def _(params, value, top, grad, *options):  # noqa: ANN001, ANN202
        return params.new_empty(params.shape, dtype=torch.float32)

    @custom_op(
        "discretelik::dlm_log_prob_with_grad",
        mutates_args=(),
        schema=f"(Tensor params, Tensor value, {_OPTIONS_SCHEMA}) -> (Tensor, Tensor, Tensor)",
    )
    def with_grad_op(
        params: Tensor, value: Tensor, *options: Any
    ) -> tuple[Tensor, Tensor, Tensor]:
        return _run_forward_grad(params, value, *options)

    @with_grad_op.register_fake
    def _(params, value, *options):  # noqa: ANN001, ANN202
        out = value.new_empty(value.shape, dtype=torch.float32)
        return out, torch.empty_like(out), params.new_empty(params.shape, dtype=torch.float32)

    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        params, value, *options = inputs
        ctx.save_for_backward(params, value, output[1])  # top: the per-channel maximum
        ctx.options = options
        ctx.mark_non_differentiable(output[1])

    def backward(ctx: Any, grad: Tensor, _grad_top: Tensor) -> tuple[Tensor | None, ...]:
        params, value, top = ctx.saved_tensors
        d_params = backward_op(params, value, top, grad, *ctx.options)
        return (d_params,) + (None,) * (1 + len(ctx.options))

    forward_op.register_autograd(backward, setup_context=setup_context)

    def setup_context_with_grad(ctx: Any, inputs: tuple, output: tuple) -> None:
        params, value, *options = inputs
        # The gradient of out.sum() (params' size, which backward returns) and, for an
        # upstream gradient that is not one value per image, what the backward kernel reads.
        ctx.save_for_backward(params, value, output[1], output[2])
        ctx.options = options
        ctx.mark_non_differentiable(output[1], output[2])

    def backward_with_grad(
        ctx: Any, grad: Tensor, _grad_top: Tensor, _grad_grad: Tensor
    ) -> tuple[Tensor | None, ...]:
        params, value, top, d_sum = ctx.saved_tensors
        if _constant_per_image(grad):
            # d/d params of sum_b g_b sum_chw out = g_b * (gradient of the image's sum). In
            # place: the gradient needs no second B x P x H x W buffer. (A second backward
            # through the same graph, retain_graph=True, then fails autograd's version check
            # of the saved tensor instead of scaling twice.)
            per_image = grad[..., 0, 0, 0]
            d_params = d_sum.mul_(per_image.reshape(per_image.shape + (1, 1, 1)))
        else:
            d_params = backward_op(params, value, top, grad, *ctx.options)
        return (d_params,) + (None,) * (1 + len(ctx.options))

    with_grad_op.register_autograd(backward_with_grad, setup_context=setup_context_with_grad)
    return forward_op, with_grad_op


try:
    _DLM_LOG_PROB_OP, _DLM_LOG_PROB_WITH_GRAD_OP = _register_ops()
    _REGISTRATION_ERROR: Exception | None = None
except Exception as error:  # noqa: BLE001  (an API change must not break importing the package)
    _DLM_LOG_PROB_OP = _DLM_LOG_PROB_WITH_GRAD_OP = None
    _REGISTRATION_ERROR = error
