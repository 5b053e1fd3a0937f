"""The memory-lean log-likelihood of the softmax head against its eager reference path.

* Values: the same ops on the same numbers, so equal to the eager path bit for bit (float64,
  float32, extreme and infinite logits); gradients to rounding (float64 ~1e-12), and
  ``torch.autograd.gradcheck`` passes on small shapes.
* Bins 2, 3, 256 and 1000, one or three channels, sample dimensions (the gradient sums over the
  draws), expanded (stride 0) logits, a channel-grouped projection, bf16 promotion, no_grad,
  sliced normalisers.
* Memory: autograd saves nothing but the logits, the levels and the per-sub-pixel normaliser,
  the only allocation of the logits' size is the gradient, and the peak extra memory of
  forward + backward is about one gradient; the eager path fails all three.
* ``log_prob_backend``: the default, validation, ``expand``, ``torch.compile``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Distribution
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import discretelik.heads.softmax as softmax_module
from discretelik.heads._lean_softmax import LeanSoftmaxLogProb
from discretelik.heads.softmax import DiscreteSoftmax, DiscreteSoftmaxDistribution

LEAN_NODE = "LeanSoftmaxLogProbBackward"


@pytest.fixture(params=["whole", "sliced"])
def slices(request, monkeypatch) -> None:
    """Run a test with the normaliser summed in one piece, and in slices of a few bins."""
    if request.param == "sliced":
        monkeypatch.setattr(softmax_module, "_CHUNK_ELEMENTS", 50)


def dist(params, channels, bins, lean, **kw) -> DiscreteSoftmaxDistribution:
    d = DiscreteSoftmaxDistribution(params, channels, bins, **kw)
    d.log_prob_backend = "lean" if lean else "eager"
    return d


def value_and_grad(params, x, weights, lean, channels, bins):
    """``elementwise_log_prob`` and the gradient of its ``weights``-weighted sum."""
    params = params.detach().requires_grad_(True)
    elp = dist(params, channels, bins, lean).elementwise_log_prob(x)
    (grad,) = torch.autograd.grad((elp * weights).sum(), params)
    return elp.detach(), grad


def case(seed, channels, bins, batch=(2,), sample=(), hw=(2, 3), dtype=torch.float64, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    params = torch.randn(*batch, channels * bins, *hw, generator=gen, dtype=dtype) * scale
    x = torch.randint(0, bins, (*sample, *batch, channels, *hw), generator=gen)
    flat = x.view(-1, *hw)
    flat[0, 0, 0], flat[-1, -1, -1] = 0, bins - 1  # both end levels
    weights = torch.rand(x.shape, generator=gen, dtype=dtype) + 0.5  # a generic upstream grad
    return params, x, weights


def both(params, x, weights, channels, bins):
    lean = value_and_grad(params, x, weights, True, channels, bins)
    eager = value_and_grad(params, x, weights, False, channels, bins)
    return lean, eager


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("bins", [2, 3, 256, 1000])
@pytest.mark.parametrize("sample", [(), (3,), (2, 2)])
def test_float64_matches_eager(channels: int, bins: int, sample, slices) -> None:
    params, x, weights = case(bins + channels, channels, bins, sample=sample)
    lean, eager = both(params, x, weights, channels, bins)
    assert lean[0].shape == x.shape and lean[1].shape == params.shape
    assert torch.equal(lean[0], eager[0])  # the same ops on the same numbers
    torch.testing.assert_close(lean[1], eager[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("bins", [2, 256, 1000])
def test_float32_matches_eager(channels: int, bins: int, slices) -> None:
    params, x, weights = case(7 * bins, channels, bins, sample=(2,), dtype=torch.float32)
    lean, eager = both(params, x, weights, channels, bins)
    assert lean[0].dtype == lean[1].dtype == torch.float32
    assert torch.equal(lean[0], eager[0])
    torch.testing.assert_close(lean[1], eager[1], rtol=1e-5, atol=1e-6)


def test_gradient_sums_over_draws() -> None:
    """With sample dimensions the gradient is that of the sum of the per-draw losses."""
    channels, bins = 2, 5
    params, x, weights = case(3, channels, bins, sample=(4,))
    _, grad = value_and_grad(params, x, weights, True, channels, bins)
    per_draw = sum(value_and_grad(params, x[i], weights[i], True, channels, bins)[1] for i in range(4))
    torch.testing.assert_close(grad, per_draw, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("channels", "bins", "sample"), [(1, 2, ()), (3, 4, (2,)), (2, 7, (2, 1)), (1, 300, ())]
)
def test_gradcheck(channels: int, bins: int, sample) -> None:
    params, x, _ = case(11, channels, bins, batch=(1,), sample=sample, hw=(1, 2))
    n = math.prod(sample)
    index = x.reshape(n, *x.shape[len(sample):]).movedim(0, -3)

    def fn(p):
        logits = p.reshape(1, channels, bins, 1, 2)
        return LeanSoftmaxLogProb.apply(logits, index, [(0, bins)])

    assert torch.autograd.gradcheck(fn, (params.requires_grad_(True),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_and_infinite_logits(dtype) -> None:
    """Logits of +-1e4, -inf levels (probability 0), all -inf and +inf (NaN, as eager): the
    lean path reproduces the eager path's values and gradients, non-finite ones included."""
    bins = 6
    rows = torch.tensor(
        [
            [1e4, 1e4, -1e4, 0.0, 1e4 - 1.0, -1e4],  # huge and tiny logits
            [-1e4, -1e4, -1e4, -1e4, -1e4, -1e4],
            [0.0, -math.inf, 3.0, -math.inf, -2.0, 1.0],  # levels of probability zero
            [-math.inf] * 6,  # no finite logit: NaN
            [0.0, math.inf, 1.0, 2.0, -math.inf, 3.0],  # +inf: NaN / -inf
            [1e4, -1e4, -1e4, -1e4, -1e4, -1e4],  # one certain level
        ],
        dtype=dtype,
    )  # (6, bins)
    params = rows[:, :, None, None].repeat(1, 1, 1, bins)  # (6 images, bins, 1, bins)
    x = torch.arange(bins).reshape(1, 1, 1, bins).expand(6, 1, 1, bins)  # every level
    weights = torch.ones(x.shape, dtype=dtype)
    lean, eager = both(params, x, weights, 1, bins)
    torch.testing.assert_close(lean[0], eager[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(lean[1], eager[1], equal_nan=True)
    assert torch.isfinite(lean[0][[0, 1, 5]]).all() and torch.isfinite(lean[1][[0, 1, 2, 5]]).all()
    assert lean[0][2, 0, 0, 1] == -math.inf  # a level of probability zero
    assert lean[0][3].isnan().all()
    # The exact answer at +-1e4 (float64 reference, in float64 differences of the logits).
    ref = torch.log_softmax(rows[[0, 1, 5]].double(), dim=-1)
    torch.testing.assert_close(lean[0][[0, 1, 5], 0, 0].double(), ref, rtol=1e-6, atol=1e-6)
    # One-hot minus softmax, summed over the pixels (each draws every level once).
    got = lean[1][[0, 1, 5], :, 0, :].sum(-1).double()  # (3, bins)
    torch.testing.assert_close(got, 1 - bins * ref.exp(), rtol=0, atol=1e-5)


def test_expanded_logits_and_sample_shape(slices) -> None:
    """``expand``-ed (stride 0) parameters with sample dimensions."""
    channels, bins = 3, 256
    params, x, weights = case(5, channels, bins, batch=(1, 2), sample=(3,))
    params = params.expand(2, 2, *params.shape[2:])  # batch (2, 2), stride 0 in dim 0
    x = torch.cat([x, x.flip(1)], dim=1)  # (3, 2, 2, C, H, W)
    weights = torch.cat([weights, weights], dim=1)
    lean, eager = both(params, x, weights, channels, bins)
    assert lean[0].shape == x.shape and lean[1].shape == params.shape
    assert torch.equal(lean[0], eager[0])
    torch.testing.assert_close(lean[1], eager[1], rtol=1e-12, atol=1e-14)
    small = dist(params[0, :1].detach(), channels, bins, True)
    big = small.expand((4, 1))
    assert big.log_prob_backend == "lean" and "log_prob_backend" in vars(big)
    value = x[0, :1, 0].expand(4, 1, *x.shape[3:])
    torch.testing.assert_close(big.log_prob(value), small.log_prob(value[:1]).expand(4, 1))


def test_channel_groups_and_bf16() -> None:
    """A grouped projection's feature gradient; bf16 parameters promoted to float32."""
    torch.manual_seed(0)
    head = DiscreteSoftmax(channels=3, bins=16, in_channels=12, feature_groups=3)
    features = torch.randn(2, 12, 3, 3, requires_grad=True)
    x = torch.randint(0, 16, (2, 3, 3, 3))
    grads = []
    for lean in (True, False):
        d = head(features)
        d.log_prob_backend = "lean" if lean else "eager"
        grads.append(torch.autograd.grad(d.log_prob(x).sum(), [features, *head.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    params = head.params(features).detach().bfloat16()
    lean_lp = head.distribution(params).log_prob(x)
    eager_dist = head.distribution(params)
    eager_dist.log_prob_backend = "eager"
    assert lean_lp.dtype == torch.float32
    assert torch.equal(lean_lp, eager_dist.log_prob(x))


def test_no_grad_and_no_double_backward() -> None:
    channels, bins = 3, 8
    params, x, _ = case(6, channels, bins, sample=(2,))
    with torch.no_grad():
        lp = dist(params.requires_grad_(True), channels, bins, True).log_prob(x)
    assert lp.grad_fn is None and not lp.requires_grad
    assert torch.equal(lp, dist(params, channels, bins, False).log_prob(x).detach())
    # Logits that need no gradient: no node either.
    assert dist(params.detach(), channels, bins, True).log_prob(x).grad_fn is None
    (grad,) = torch.autograd.grad(
        dist(params, channels, bins, True).log_prob(x).sum(), params, create_graph=True
    )
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(grad.sum(), params)


# -- backend choice ---------------------------------------------------------------------------
def test_default_backend_and_choices(monkeypatch) -> None:
    params = torch.randn(2, 3 * 8, 2, 2, requires_grad=True)
    x = torch.randint(0, 8, (2, 3, 2, 2))

    def node(d: DiscreteSoftmaxDistribution) -> str:  # the first node that is not a view
        fn = d.elementwise_log_prob(x).grad_fn
        while type(fn).__name__.startswith(("View", "Permute", "Unsafe", "Reshape")):
            fn = fn.next_functions[0][0]
        return type(fn).__name__

    assert DiscreteSoftmaxDistribution.log_prob_backends == (None, "eager", "lean")
    assert DiscreteSoftmaxDistribution(params, 3, 8).log_prob_backend is None
    assert node(DiscreteSoftmaxDistribution(params, 3, 8)) == LEAN_NODE  # the default
    eager = dist(params, 3, 8, False)
    assert node(eager) != LEAN_NODE
    # On the class: every instance (and restored afterwards by monkeypatch).
    monkeypatch.setattr(DiscreteSoftmaxDistribution, "log_prob_backend", "eager")
    assert node(DiscreteSoftmaxDistribution(params, 3, 8)) != LEAN_NODE
    monkeypatch.undo()
    # Under torch.compile the eager path is traced, even when "lean" is asked for.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert node(DiscreteSoftmaxDistribution(params, 3, 8)) != LEAN_NODE
    assert node(dist(params, 3, 8, True)) != LEAN_NODE
    monkeypatch.undo()
    for bad in ("triton", "fused", 1):
        bad_dist = DiscreteSoftmaxDistribution(params, 3, 8)
        bad_dist.log_prob_backend = bad
        with pytest.raises(ValueError, match="log_prob_backend must be one of .*'lean'"):
            bad_dist.log_prob(x)


def test_torch_compile_uses_the_eager_path(monkeypatch) -> None:
    """``torch.compile`` (``aot_eager``: traced forward and backward, no code generation)
    traces the eager ops, never the lean node, and gives the lean path's values and gradients."""
    params, x, weights = case(12, 3, 16, dtype=torch.float32)

    def loss(p: torch.Tensor) -> torch.Tensor:
        d = DiscreteSoftmaxDistribution(p, 3, 16, validate_args=False)
        return (d.elementwise_log_prob(x) * weights).sum()

    def run(fn) -> tuple[torch.Tensor, torch.Tensor]:
        p = params.clone().requires_grad_(True)
        value = fn(p)
        return value.detach(), torch.autograd.grad(value, p)[0]

    def refuse(*args):
        raise AssertionError("the lean path was traced")

    monkeypatch.setattr(softmax_module, "lean_softmax_log_prob", refuse)
    # Tracing ``validate_args=False`` sets torch.distributions' global default to False (seen
    # with torch 2.13, also for a plain ``Normal``): restore it for the tests that follow.
    default = Distribution._validate_args
    torch._dynamo.reset()
    try:
        compiled = run(torch.compile(loss, backend="aot_eager", fullgraph=True))
    finally:
        torch._dynamo.reset()
        Distribution.set_default_validate_args(default)
    monkeypatch.undo()
    torch.testing.assert_close(compiled, run(loss), rtol=1e-5, atol=1e-5)


# -- memory -----------------------------------------------------------------------------------
class _Allocations(TorchDispatchMode):
    """Records the element count of every tensor an aten operation returns in new memory (not
    a view of, nor written into, one of its arguments)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append((str(func), t.numel()))
        return out


MEMORY_CASE = dict(batch=2, channels=3, bins=256, hw=(8, 8))


def memory_case(lean: bool, monkeypatch):
    b, c, k, hw = MEMORY_CASE.values()
    # Four slices of 64 bins: the normaliser's temporaries are a quarter of the logits.
    monkeypatch.setattr(softmax_module, "_CHUNK_ELEMENTS", 64 * b * c * math.prod(hw))
    params, x, _ = case(5, c, k, batch=(b,), hw=hw, dtype=torch.float32)
    params.requires_grad_(True)
    own = {params.untyped_storage().data_ptr(), x.untyped_storage().data_ptr()}
    saved: list[int] = []  # elements saved for backward that are not the inputs' memory

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            saved.append(t.numel())
        return t

    with _Allocations() as mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            # validate_args=False: no full-size NaN check of the parameters.
            loss = dist(params, c, k, lean, validate_args=False).log_prob(x).mean()
        (grad,) = torch.autograd.grad(loss, params)
    return params, x, saved, mode.sizes


@pytest.mark.parametrize("lean", [True, False])
def test_saves_only_the_normaliser(lean: bool, monkeypatch) -> None:
    params, x, saved, sizes = memory_case(lean, monkeypatch)
    per_subpixel = x.numel()  # one (B, C, 1, H, W) tensor
    # Saved for backward besides the logits and the levels: peak and log_z (and scalars of the
    # mean), where the eager path saves the exponentials of every logit.
    lean_saved = sum(saved) <= 2 * per_subpixel + 16
    # The only allocation as large as the logits is the gradient; everything else is at most
    # one slice of the normaliser (forward) or per sub-pixel.
    full = [n for _, n in sizes if n >= params.numel()]
    lean_ops = len(full) == 1 and max(n for _, n in sizes if n < params.numel()) <= params.numel() // 4
    assert lean_saved == lean and lean_ops == lean, (sum(saved), full)


@pytest.mark.parametrize("lean", [True, False])
def test_peak_memory_is_one_gradient(lean: bool, monkeypatch) -> None:
    """Peak extra bytes of forward + backward (MemTracker, as examples/benchmarks): about the
    gradient for the lean path, at least twice the logits for the eager path."""
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    b, c, k, hw = MEMORY_CASE.values()
    params, x, _ = case(5, c, k, batch=(b,), hw=hw, dtype=torch.float32)
    params.requires_grad_(True)

    def total(snapshot: dict) -> int:
        return sum(int(per_device["Total"]) for per_device in snapshot.values())

    tracker = mem_tracker.MemTracker()
    tracker.track_external(params, x)
    with tracker:
        before = total(tracker.get_tracker_snapshot("current"))
        (grad,) = torch.autograd.grad(dist(params, c, k, lean).log_prob(x).mean(), params)
        del grad
    ratio = (total(tracker.get_tracker_snapshot("peak")) - before) / (params.numel() * 4)
    assert (ratio < 1.2) == lean and (ratio >= 2.0) == (not lean), ratio
