"""The Triton kernels of the DLM log-likelihood against the eager path and float64 truth.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
``conftest.py`` before Triton is imported), which executes the same kernel source on CPU
tensors with numpy: the math, the masking, the indexing and the layout table are checked here;
the compiled GPU code and its speed only on a GPU (``test_cuda_*``, skipped elsewhere).

* Values and gradients at random parameters for 1/3/4 channels, 2 to 65536 bins, with and
  without coupling, both open edge bins: within the float32 eager path's own error of float64
  truth (measured: both ~3e-7 relative in values, ~1e-6 in gradients).
* Extreme raw parameters (up to ``1e4``): finite; values within a bound from the float32 error
  model (a few ulps of the value, or a few times the float32 eager path's own error, both
  against float64 truth), and the gradient within 5e-3 of the exact gradient of the
  float32-rounded parameters per image (as for the lean path).
* Odd shapes: pixel counts that are not a multiple of the block, several blocks, 1x1 images,
  one component, component and channel counts that are not powers of two.
* Normalisation: the kernels' probabilities of every joint value of a pixel sum to 1.
* Launch configurations (``KernelConfig``): the fused forward-with-gradient path and the
  float32 coupling tanh over both accuracy matrices (with non-default block sizes and warps,
  which change no bit in the interpreter: checked separately); the fused gradient equals the
  two-kernel one for ``sum``, ``mean`` and per-image weights without launching the backward
  kernel, and falls back to it for any other upstream gradient.
* Dispatch and errors of ``log_prob_backend``; what autograd keeps.
* Compilation: the interpreter runs the kernels as Python, so it does not catch what only the
  compiler rejects (it missed a plain-float global, which compiled Triton refuses). Without a
  GPU, ``test_kernels_compile_for_hopper`` compiles the kernels (the fused one and one
  non-default block size and tanh included) to sm_90 cubins with the installed Triton's
  NVIDIA backend (its own ``ptxas``, no GPU or driver needed).

``DISCRETELIK_REQUIRE_TRITON=1`` (set by ``.ci/run``) turns a missing Triton into a failure
instead of a skip, so that CI cannot pass without running these tests.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

if os.environ.get("DISCRETELIK_REQUIRE_TRITON"):
    import triton  # noqa: F401  (fail loudly in CI)
else:
    pytest.importorskip("triton")

from _head_cases import extreme_case  # noqa: E402

from discretelik.heads.mixture import logistic  # noqa: E402
from discretelik.heads.mixture import triton as _triton_dlm  # noqa: E402
from discretelik.heads.mixture.layout import MixtureLayout  # noqa: E402
from discretelik.heads.mixture.triton import KernelConfig  # noqa: E402
from discretelik.heads.logistic import (  # noqa: E402
    DiscretizedLogisticMixture,
    DiscretizedLogisticMixtureDistribution,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available(),
    reason="needs a CUDA GPU or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(params, x, backend, channels, mixtures, bins, coupling, weights=None, config=None):
    """``elementwise_log_prob`` on ``backend`` and the gradient of its weighted sum, or of its
    plain sum without ``weights`` (then the upstream gradient is ``sum``'s stride-0 expand,
    which the fused path scales instead of running the backward kernel). With a ``config``
    the Triton kernels are called directly with that ``KernelConfig`` (the head has none)."""
    params = params.detach().clone().to(DEVICE).requires_grad_(True)
    x = x.to(DEVICE)
    d = DiscretizedLogisticMixtureDistribution(
        params, channels=channels, mixtures=mixtures, bins=bins, coupling=coupling,
        log_prob_backend=backend,
    )  # fmt: skip
    if config is None:
        out = d.elementwise_log_prob(x)
    else:
        assert backend == "triton"
        out = _triton_dlm.triton_elementwise_log_prob(
            params, x, d.layout, bins, d.min_log_scale, config
        )
    loss = out.sum() if weights is None else (out * weights.to(out)).sum()
    (grad,) = torch.autograd.grad(loss, params)
    return out.detach().cpu(), grad.cpu()


# Launch configurations checked over the accuracy matrices besides the head's default (two
# kernels, 128 pixels per program, float64 coupling tanh): the fused path and the float32
# coupling tanh, the two settings that change the arithmetic. The block size and the warps do
# not (every pixel's arithmetic is its own; checked bit for bit in test_block_sizes_*), so
# they ride along here with non-default values. The fused path runs on the plain sum (its own
# gradient; a weighted sum takes the backward kernel, checked by the default and by
# test_fused_falls_back_for_any_other_upstream_gradient).
HEAD = None
FUSED = KernelConfig(block=64, num_warps=2, fused=True)
TANH32 = KernelConfig(block=256, num_warps=16, float64_coupling_tanh=False)


def matrix(channels: list[int], bins: list[int]) -> list:
    """``(channels, bins, coupling, config)`` cases; the float32 tanh only where there is a
    coupling (one channel has none)."""
    cases = []
    for config, name in ((HEAD, "head-default"), (FUSED, "fused"), (TANH32, "tanh32")):
        for c, b, coupling in itertools.product(channels, bins, (True, False)):
            if config is TANH32 and not (coupling and c > 1):
                continue
            cases.append(pytest.param(c, b, coupling, config, id=f"{name}-C{c}-{b}-{coupling}"))
    return cases


def case(seed, channels, mixtures, bins, coupling, shape=(2, 3, 5), scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    b, h, w = shape
    p = MixtureLayout(channels, mixtures, coupling).param_channels
    params = torch.randn(b, p, h, w, generator=gen) * scale
    x = torch.randint(0, bins, (b, channels, h, w), generator=gen)
    x[0, :, 0, 0] = 0  # both open edge bins
    x[-1, :, -1, -1] = bins - 1
    weights = torch.rand(x.shape, generator=gen) + 0.5  # a generic upstream gradient
    return params, x, weights


def errors(result, truth):
    """Value error relative to ``1 + |truth|`` and gradient error relative to its largest."""
    value = ((result[0].double() - truth[0]).abs() / (1 + truth[0].abs())).max().item()
    grad = ((result[1].double() - truth[1]).abs().max() / truth[1].abs().max()).item()
    return value, grad


@interpreted
@pytest.mark.parametrize(("channels", "bins", "coupling", "config"), matrix([1, 3, 4], [2, 32, 256, 65536]))
def test_as_accurate_as_the_float32_eager_path(
    channels: int, bins: int, coupling: bool, config: KernelConfig | None
) -> None:
    kw = dict(channels=channels, mixtures=3, bins=bins, coupling=coupling)
    params, x, weights = case(bins + channels, **kw)
    if config is not None and config.fused:
        weights = None  # the fused path's own gradient (of the plain sum)
    w64 = None if weights is None else weights.double()
    truth = run(params.double(), x, "eager", weights=w64, **kw)
    kernel = errors(run(params, x, "triton", weights=weights, config=config, **kw), truth)
    eager = errors(run(params, x, "eager", weights=weights, **kw), truth)
    # Within a few float32 ulps of truth, and never much worse than eager float32. The float32
    # coupling tanh (~2 ulps where torch.tanh has 0.5) shows in the gradients of narrow bins,
    # through the location times an inverse scale of up to e^7: measured 3.4x eager's error
    # (C=4, 65536 bins), hence its own factor; why the default is float64.
    factor = 4 if config is TANH32 else 2
    assert kernel[0] <= max(2 * eager[0], 5e-7), (kernel, eager)
    assert kernel[1] <= max(factor * eager[1], 1e-6), (kernel, eager)


@interpreted
@pytest.mark.parametrize(("channels", "bins", "coupling", "config"), matrix([1, 3], [2, 256, 65536]))
def test_extreme_parameters(
    channels: int, bins: int, coupling: bool, config: KernelConfig | None
) -> None:
    """Random and extreme (+-1e4) raw parameters at edge and near-edge bins."""
    k = 3
    params, x = extreme_case(channels, k, bins, coupling, n=8)
    kw = dict(channels=channels, mixtures=k, bins=bins, coupling=coupling)
    value, grad = run(params, x, "triton", config=config, **kw)
    eager_value, _ = run(params, x, "eager", **kw)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    true_value, truth = run(params.double(), x, "eager", **kw)
    # The float32 error model: a value formed from standardised edges of size |z| carries an
    # error of a few ulps of the largest term, which for a far-tail log mass is the value
    # itself; the GPU's approximate exp/log add a few ulps more. So the bound is 16 ulps of
    # 1 + |truth|, or 4x the float32 eager path's own error where that is larger (a fixed
    # rtol of 1e-6 failed on an H200 at -712 nats, off by 2.7e-6 relative: 32 ulps).
    eps = torch.finfo(torch.float32).eps
    eager_error = (eager_value.double() - true_value).abs()
    bound = torch.maximum(4 * eager_error, 16 * eps * (1 + true_value.abs()))
    excess = (value.double() - true_value).abs() - bound
    assert (excess <= 0).all(), excess.max()
    err = (grad.double() - truth).abs().flatten(1).amax(1)
    assert (err <= 5e-3 * truth.abs().flatten(1).amax(1) + 1e-6).all(), err.max()


@interpreted
@pytest.mark.parametrize(
    ("channels", "mixtures", "shape"),
    [
        (3, 1, (2, 3, 5)),  # one component
        (3, 7, (1, 9, 11)),  # K not a power of two; 99 pixels, one partial block
        (5, 2, (3, 1, 1)),  # C not a power of two (8 padded columns), 1x1 images
        (3, 2, (2, 10, 13)),  # 260 pixels: three blocks, the last partial
        (2, 16, (1, 2, 2)),  # K a power of two (no padding column)
    ],
)
def test_odd_shapes(channels: int, mixtures: int, shape) -> None:
    kw = dict(channels=channels, mixtures=mixtures, bins=256, coupling=True)
    params, x, weights = case(mixtures + channels, shape=shape, **kw)
    kernel = run(params, x, "triton", weights=weights, **kw)
    lean = run(params, x, "lean", weights=weights, **kw)
    assert kernel[0].shape == x.shape and kernel[1].shape == params.shape
    torch.testing.assert_close(kernel, lean, rtol=2e-5, atol=2e-5)


@interpreted
@pytest.mark.parametrize("coupling", [True, False])
def test_normalised_over_every_joint_value(coupling: bool) -> None:
    """``sum_x p(x) = 1`` over all ``bins^C`` joint values of each of two pixels."""
    channels, bins = 3, 5
    p = MixtureLayout(channels, 4, coupling).param_channels
    one = torch.randn(1, p, 1, 2, generator=torch.Generator().manual_seed(3)) * 2
    joint = torch.tensor(list(itertools.product(range(bins), repeat=channels)))  # (125, C)
    x = joint[:, :, None, None].expand(-1, -1, 1, 2).contiguous()
    params = one.expand(len(joint), -1, -1, -1)
    log_p, _ = run(params, x, "triton", channels=channels, mixtures=4, bins=bins,
                   coupling=coupling)  # fmt: skip
    total = log_p.sum(1).double().exp().sum(0)  # per pixel
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-5)


@interpreted
def test_head_log_prob_and_expanded_params() -> None:
    """Through the head, with ``expand``-ed (stride 0) parameters made contiguous."""
    head = DiscretizedLogisticMixture(channels=3, mixtures=4, bins=256)
    params = torch.randn(1, head.param_channels, 4, 4, device=DEVICE).expand(3, -1, -1, -1)
    params.requires_grad_(False)
    x = torch.randint(0, 256, (3, 3, 4, 4), device=DEVICE)
    results = {}
    for backend in ("triton", "eager"):
        head.log_prob_backend = backend
        results[backend] = head.distribution(params).log_prob(x)
    torch.testing.assert_close(results["triton"], results["eager"], rtol=1e-5, atol=1e-4)
    assert results["triton"].shape == (3,)


def kernel_log_prob(params, x, config, channels=3, mixtures=3, bins=256, coupling=True):
    """``elementwise_log_prob`` by the kernels launched with ``config``."""
    layout = MixtureLayout(channels, mixtures, coupling)
    return _triton_dlm.triton_elementwise_log_prob(params, x, layout, bins, -7.0, config)


@interpreted
@pytest.mark.parametrize("config", [HEAD, KernelConfig(fused=True)], ids=["two-kernel", "fused"])
def test_autograd_keeps_no_k_fold_tensors(config: KernelConfig | None) -> None:
    """Saved for backward: the parameters, the levels and one ``(B, C, H, W)`` maximum, and
    on the fused path the gradient of the sum (``params``' size: what backward returns); no
    ``K``-fold tensor is created on the way."""
    kw = dict(channels=3, mixtures=10, bins=256, coupling=True)
    params, x, _ = case(5, shape=(2, 8, 8), **kw)
    params = params.to(DEVICE).requires_grad_(True)
    x = x.to(DEVICE)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if config is None:
            d = DiscretizedLogisticMixtureDistribution(params, log_prob_backend="triton", **kw)
            loss = d.log_prob(x).mean()
        else:
            loss = kernel_log_prob(params, x, config, **kw).sum((-3, -2, -1)).mean()
    loss.backward()
    gradient = 0 if config is None else params.numel()
    assert sum(saved) <= params.numel() + 2 * x.numel() + gradient + 16, saved
    assert len(saved) == (3 if config is None else 4), saved


@interpreted
def test_block_sizes_and_warps_change_no_bit() -> None:
    """Every pixel's arithmetic is its own, so the block size (here 1 to 3 programs, partial
    ones included) and the warps give the default's results bit for bit in the interpreter
    (on a GPU the compiler may contract or reduce differently: a few ulps)."""
    kw = dict(channels=3, mixtures=3, bins=256, coupling=True)
    params, x, weights = case(21, shape=(2, 5, 7), **kw)  # 70 pixels
    exact = dict(rtol=0, atol=0) if DEVICE == "cpu" else dict(rtol=1e-5, atol=1e-5)
    for fused, w in ((False, weights), (True, None)):
        reference = run(params, x, "triton", weights=w, config=KernelConfig(fused=fused), **kw)
        for block, warps in ((32, 1), (64, 4), (256, 8)):
            config = KernelConfig(block=block, num_warps=warps, fused=fused)
            result = run(params, x, "triton", weights=w, config=config, **kw)
            torch.testing.assert_close(result, reference, **exact, msg=str(config))


class BackwardKernelCalls:
    """Counts launches of the backward kernel (monkeypatched into the module)."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        original = _triton_dlm._run_backward

        def counted(*args):
            self.count += 1
            return original(*args)

        monkeypatch.setattr(_triton_dlm, "_run_backward", counted)


@interpreted
def test_fused_gradient_equals_the_two_kernel_gradient(monkeypatch) -> None:
    """``log_prob(x).sum()``, ``.mean()`` and a per-image weighted sum over a two-dimensional
    batch: the fused path scales its stored gradient of the sum (no backward kernel) and gets
    the two-kernel path's gradient: bit for bit for the sum (an upstream gradient of 1), to
    rounding where the per-image factor is not a power of two (the two-kernel path multiplies
    by it inside the kernel, the fused one at the end). Its values equal the forward
    kernel's to rounding (normalised against the final maximum rather than online)."""
    kw = dict(channels=3, mixtures=3, bins=256, coupling=True)
    layout = MixtureLayout(3, 3, True)
    gen = torch.Generator().manual_seed(4)
    params = (torch.randn(2, 3, layout.param_channels, 2, 3, generator=gen) * 3).to(DEVICE)
    x = torch.randint(0, 256, (2, 3, 3, 2, 3), generator=gen).to(DEVICE)
    per_image = (torch.rand(2, 3, generator=gen) + 0.5).to(DEVICE)
    losses = {
        "sum": lambda lp: lp.sum(),
        "mean": lambda lp: lp.mean(),
        "per-image weights": lambda lp: (lp * per_image).sum(),
    }
    calls = BackwardKernelCalls(monkeypatch)
    exact = DEVICE == "cpu"
    for name, loss in losses.items():
        results = {}
        for fused in (False, True):
            p = params.clone().requires_grad_(True)
            out = kernel_log_prob(p, x, KernelConfig(fused=fused), **kw)
            before = calls.count
            (grad,) = torch.autograd.grad(loss(out.sum((-3, -2, -1))), p)
            assert calls.count - before == (0 if fused else 1), (name, fused)
            results[fused] = out.detach(), grad
        # Elementwise relative errors are meaningless where the gradient cancels to ~0: the
        # tolerance is relative to the largest entry.
        scale = results[False][1].abs().max().item()
        tol = dict(rtol=0, atol=0) if name == "sum" and exact else dict(rtol=0, atol=1e-6 * scale)
        torch.testing.assert_close(results[True][1], results[False][1], **tol, msg=name)
        torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=1e-6)


@interpreted
def test_fused_falls_back_for_any_other_upstream_gradient(monkeypatch) -> None:
    """An upstream gradient that varies within an image (weighted elementwise), or a constant
    one stored densely (strides say nothing of values, and none are compared), goes through
    the backward kernel, with the fused forward's maximum: the two-kernel path's gradient bit
    for bit. Outside grad mode, or without ``requires_grad``, the fused config runs the plain
    forward kernel. A second backward through the graph (``retain_graph``) is refused rather
    than scaling the stored gradient twice."""
    kw = dict(channels=3, mixtures=3, bins=256, coupling=True)
    params, x, weights = case(8, **kw)
    calls = BackwardKernelCalls(monkeypatch)
    dense_ones = torch.ones_like(weights)
    for w in (weights, dense_ones):
        before = calls.count
        fused = run(params, x, "triton", weights=w, config=KernelConfig(fused=True), **kw)
        assert calls.count - before == 1
        two_kernel = run(params, x, "triton", weights=w, config=KernelConfig(), **kw)
        torch.testing.assert_close(fused[1], two_kernel[1], rtol=0, atol=0)

    p = params.to(DEVICE).requires_grad_(True)
    xd = x.to(DEVICE)
    with torch.no_grad():
        plain = kernel_log_prob(p, xd, KernelConfig(fused=True), **kw)
    assert plain.grad_fn is None
    out = kernel_log_prob(p.detach(), xd, KernelConfig(fused=True), **kw)
    assert out.grad_fn is None
    torch.testing.assert_close(out, plain, rtol=0, atol=0)

    loss = kernel_log_prob(p, xd, KernelConfig(fused=True), **kw).sum()
    assert "dlm_log_prob_with_grad" in type(loss.grad_fn.next_functions[0][0]).__name__
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_kernel_config_is_checked() -> None:
    for bad in (dict(block=48), dict(block=8), dict(block=2048), dict(num_warps=3),
                dict(num_warps=64), dict(block=128.0)):  # fmt: skip
        with pytest.raises(ValueError, match="KernelConfig.(block|num_warps) must be a power"):
            KernelConfig(**bad)
    with pytest.raises(TypeError, match="KernelConfig.fused must be a bool"):
        KernelConfig(fused=1)
    with pytest.raises(TypeError, match="config must be a KernelConfig, got dict"):
        kernel_log_prob(torch.randn(1, 30, 2, 2), torch.zeros(1, 3, 2, 2, dtype=torch.long), {})


@interpreted
@pytest.mark.parametrize(
    ("config", "weighted", "operator"),
    [
        (HEAD, True, "dlm_log_prob"),
        (KernelConfig(fused=True), False, "dlm_log_prob_with_grad"),  # the stored gradient
        (KernelConfig(fused=True), True, "dlm_log_prob_with_grad"),  # the backward kernel
    ],
    ids=["two-kernel", "fused-sum", "fused-weighted"],
)
def test_traced_by_torch_compile_as_one_operator(
    config, weighted: bool, operator: str, monkeypatch
) -> None:
    """An explicit ``log_prob_backend="triton"``, and the fused path, survive ``torch.compile``
    (fullgraph: no graph break): the kernels are registered custom operators with a fake
    implementation and autograd. ``aot_eager`` traces forward and backward without
    generating code; the results are the uncompiled ones bit for bit, and the traced backward
    of the fused path's plain sum scales the stored gradient (the ``sum``'s expand is seen
    while tracing) instead of launching the backward kernel."""
    kw = dict(channels=3, mixtures=4, bins=256, coupling=True)
    params, x, weights = case(12, **kw)

    def loss(p: torch.Tensor) -> torch.Tensor:
        if config is None:
            d = DiscretizedLogisticMixtureDistribution(
                p, validate_args=False, log_prob_backend="triton", **kw
            )
            out = d.elementwise_log_prob(x.to(p.device))
        else:
            out = kernel_log_prob(p, x.to(p.device), config, **kw)
        return (out * weights.to(p.device)).sum() if weighted else out.sum()

    from torch._dynamo.backends.registry import lookup_backend

    targets: list[str] = []

    def backend(gm, example_inputs):  # records the traced graph, then runs it as aot_eager
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend=backend, fullgraph=True)
    results = []
    # Tracing a validate_args=False distribution sets torch.distributions' global default to
    # False (torch 2.13); restore it so that later tests still validate.
    default = torch.distributions.Distribution._validate_args
    calls = BackwardKernelCalls(monkeypatch)
    try:
        for fn in (compiled, loss):
            p = params.to(DEVICE).requires_grad_(True)
            value = fn(p)
            before = calls.count
            (grad,) = torch.autograd.grad(value, p)
            assert calls.count - before == (0 if operator.endswith("grad") and not weighted else 1)
            results.append((value.detach(), grad))
    finally:
        torch.distributions.Distribution.set_default_validate_args(default)
    assert f"discretelik.{operator}.default" in targets, targets  # not the eager graph
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_backend_errors() -> None:
    params = torch.randn(2, 20, 3, 3)
    x = torch.randint(0, 8, (2, 3, 3, 3))
    with pytest.raises(ValueError, match="log_prob_backend must be one of .*'fast'"):
        DiscretizedLogisticMixtureDistribution(params, mixtures=2, bins=8, log_prob_backend="fast")
    with pytest.raises(TypeError, match="log_prob_backend must be a str"):
        DiscretizedLogisticMixture(mixtures=2, bins=8, log_prob_backend=None)
    # float64, or levels with sample dimensions, are outside the kernels' scope: a clear error
    # when the Triton path is asked for explicitly.
    d64 = DiscretizedLogisticMixtureDistribution(
        params.double(), mixtures=2, bins=8, log_prob_backend="triton"
    )
    with pytest.raises(ValueError, match="'triton' cannot compute this call.*torch.float64"):
        d64.log_prob(x)
    d = DiscretizedLogisticMixtureDistribution(params, mixtures=2, bins=8, log_prob_backend="triton")
    with pytest.raises(ValueError, match="levels \\(4, 2, 3, 3, 3\\) have sample dimensions"):
        d.log_prob(x.expand(4, -1, -1, -1, -1))


def test_scope_limits_and_import_failure_fallback(monkeypatch) -> None:
    """Bins beyond float32-exact levels are out of scope (a clear error when asked for); the
    default never picks the kernels on CPU; a Triton that is found but fails to import makes
    the default warn once and use the PyTorch paths."""
    params = torch.randn(1, 20, 2, 2)
    x = torch.randint(0, 8, (1, 3, 2, 2))
    assert _triton_dlm.triton_unsupported(params, x, 2**24 + 1) is None
    assert "exceeds" in _triton_dlm.triton_unsupported(params, x, 2**24 + 2)
    d = DiscretizedLogisticMixtureDistribution(
        params, mixtures=2, bins=2**24 + 2, log_prob_backend="triton"
    )
    with pytest.raises(ValueError, match="bins=16777218 exceeds 16777217"):
        d.log_prob(x)
    assert not _triton_dlm.triton_is_default(params, x, 8)  # CPU, even when interpreting

    def broken():
        raise ImportError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(_triton_dlm, "_kernels", broken)
    _triton_dlm._kernels_importable.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be imported.*libcuda"):
            assert _triton_dlm._kernels_importable() is False
        assert _triton_dlm._kernels_importable() is False  # cached: warned once
    finally:
        _triton_dlm._kernels_importable.cache_clear()


def test_without_custom_operators_the_error_says_why(monkeypatch) -> None:
    """Where registering the operators failed (an older torch), importing still works and an
    explicit request names the reason."""
    monkeypatch.setattr(_triton_dlm, "_DLM_LOG_PROB_OP", None)
    monkeypatch.setattr(_triton_dlm, "_REGISTRATION_ERROR", RuntimeError("no custom_op here"))
    params = torch.randn(1, 20, 2, 2)
    x = torch.randint(0, 8, (1, 3, 2, 2))
    assert _triton_dlm.triton_unsupported(params, x, 8) is not None
    d = DiscretizedLogisticMixtureDistribution(params, mixtures=2, bins=8, log_prob_backend="triton")
    with pytest.raises(ValueError, match="custom operators are unavailable \\(no custom_op here\\)"):
        d.log_prob(x)


def test_auto_on_cpu_is_lean_and_on_cuda_without_triton_warns(monkeypatch) -> None:
    params = torch.randn(1, 20, 2, 2, requires_grad=True)
    x = torch.randint(0, 8, (1, 3, 2, 2))
    lp = DiscretizedLogisticMixtureDistribution(params, mixtures=2, bins=8).log_prob(x)
    assert "LeanMixtureLogProb" in type(lp.grad_fn.next_functions[0][0]).__name__
    # A CUDA float32 call that misses the kernels for want of Triton warns once, naming the
    # reason, and falls back (simulated: only the parameters' device, dtype and rank are read).
    from types import SimpleNamespace

    fake = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32, dim=lambda: 4)
    monkeypatch.setattr(_triton_dlm, "triton_unsupported", lambda *a: "triton is not installed")
    _triton_dlm._warn_once.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="not used \\(triton is not installed\\)"):
            assert _triton_dlm.triton_is_default(fake, x, 8) is False
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _triton_dlm.triton_is_default(fake, x, 8) is False  # once only
    finally:
        _triton_dlm._warn_once.cache_clear()


def test_kernel_constants_come_from_the_formula() -> None:
    """The kernels get the branch and saturation constants from ``logistic.py``: no literal
    copy of them in the kernel source."""
    import inspect

    from discretelik.heads.mixture import triton_kernels

    constants = _triton_dlm._launch_args_constants(MixtureLayout(3, 2, True))
    for name in ("WIDE_HALF_WIDTH", "FAR_TAIL", "TINY_LOG_HALF_WIDTH", "Z_LIMIT"):
        assert constants[name] == getattr(logistic, name), name
    source = inspect.getsource(triton_kernels)
    for literal in ("< 40.0", "< -20.0", "> 1.0)", "2.0**100", "2 ** 100"):
        assert literal not in source, literal


def test_offset_table_matches_the_layout() -> None:
    """Every parameter channel is named exactly once by the table (so backward writes all)."""
    for channels, mixtures, coupling in [(1, 3, True), (3, 10, True), (3, 2, False), (5, 2, True)]:
        layout = MixtureLayout(channels, mixtures, coupling)
        table = _triton_dlm._offset_table(layout, torch.device("cpu")).tolist()
        starts = [t for t in table if t >= 0]
        covered = sorted(s + k for s in starts for k in range(mixtures))
        assert covered == list(range(mixtures, layout.param_channels)), (channels, coupling)
        loc, log_scale, _ = layout._block_starts()
        cp = _triton_dlm._next_power_of_2(channels)
        assert table[:channels] == loc and table[cp : cp + channels] == log_scale


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from discretelik.heads.mixture import triton as _triton_dlm, triton_kernels as kernels

    channels, mixtures, coupling, jobs = json.loads(sys.argv[1])
    layout = _triton_dlm.MixtureLayout(channels, mixtures, coupling)
    scalars = {"N": "i32", "HW": "i32", "P": "i32", "n_levels": "fp32", "min_log_scale": "fp32"}
    pointers = {
        "dlm_forward_kernel": ["params", "value", "tab", "out", "top"],
        "dlm_backward_kernel": ["params", "value", "tab", "top", "grad_out", "grad"],
        "dlm_forward_grad_kernel": ["params", "value", "tab", "out", "top", "grad"],
    }
    types = {"value": "*i64", "tab": "*i32"}
    for name, options in jobs:
        config = _triton_dlm.KernelConfig(**options)
        const = _triton_dlm._launch_args_constants(
            layout, config.block, config.float64_coupling_tanh
        )
        fn = getattr(kernels, name)
        signature = {n + "_ptr": types.get(n, "*fp32") for n in pointers[name]}
        signature.update(scalars)
        signature.update({n: "constexpr" for n in const})
        src = ASTSource(fn, signature, constexprs={(fn.arg_names.index(n),): v
                                                   for n, v in const.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": config.num_warps})
        assert compiled.asm["cubin"], name
        print(name, options, "ok", len(compiled.asm["cubin"]))
    """
)

_DEFAULT_KERNELS = [["dlm_forward_kernel", {}], ["dlm_backward_kernel", {}]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the CUDA test compiles them")
@pytest.mark.parametrize(
    ("channels", "mixtures", "coupling", "jobs"),
    [
        # The default kernels, the fused one, and one kernel at non-default settings (the
        # block and the tanh are compile-time constants; not every combination, for time).
        (3, 10, True, _DEFAULT_KERNELS + [
            ["dlm_forward_grad_kernel", {"fused": True}],
            ["dlm_forward_kernel",
             {"block": 32, "num_warps": 1, "float64_coupling_tanh": False}],
        ]),
        (1, 5, False, _DEFAULT_KERNELS),
    ],
    ids=["rgb-coupled", "grey"],
)  # fmt: skip
def test_kernels_compile_for_hopper(channels: int, mixtures: int, coupling: bool, jobs) -> None:
    """The kernels compile to sm_90 cubins (a separate process: this one interprets)."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, json.dumps([channels, mixtures, coupling, jobs])],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(" ok ") == len(jobs), done.stdout


@cuda
def test_cuda_kernels_are_accurate() -> None:
    """On a GPU: the compiled kernels stay close to float64 truth.

    Compiled Triton takes ``exp`` and float32 division from fast approximate PTX instructions
    (``ex2.approx`` after a multiplication by ``log2 e``, ``div.full``; seen in the sm_90 PTX),
    a few ulps where ``torch`` is within one, so the bound is looser than in the interpreted
    test. The kernels are ``"auto"``'s choice for float32 on a CUDA GPU.
    """
    kw = dict(channels=3, mixtures=10, bins=256, coupling=True)
    params, x, weights = case(11, shape=(8, 32, 32), **kw)
    d = DiscretizedLogisticMixtureDistribution(params.cuda().requires_grad_(True), **kw)
    default = type(d.elementwise_log_prob(x.cuda()).grad_fn).__name__
    assert "dlm_log_prob" in default, default
    truth = run(params.double(), x, "eager", weights=weights.double(), **kw)
    kernel = errors(run(params, x, "triton", weights=weights, **kw), truth)
    eager = errors(run(params, x, "eager", weights=weights, **kw), truth)
    assert kernel[0] <= max(4 * eager[0], 2e-6), (kernel, eager)
    assert kernel[1] <= max(4 * eager[1], 1e-5), (kernel, eager)
