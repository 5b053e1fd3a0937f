"""What the memory-lean implementations promise beyond the contract (``test_head_contract.py``).

The contract suite checks every (head, backend) pair for values, gradients, sample dimensions,
expanded parameters and extreme parameters. This module keeps what is particular to the
``"lean"`` paths:

* mixtures (every registered head whose distribution has a ``family``): any number of
  components per loop step gives the same values and gradients (``components_per_step``, and
  ``_STEP_ELEMENTS`` forcing one component per step on small inputs); ``gradcheck``;
  float32 at extreme raw parameters against the exact (float64) gradient of the same
  parameters; autograd saves only the parameters, the levels and one per-channel tensor, and no
  operation makes a ``K``-fold tensor (the eager path does both, which shows the checks can
  fail);
* softmax: bit-for-bit the eager values (sliced normalisers too), ``gradcheck`` of the node,
  extreme and infinite logits with validation off, a grouped projection, no double backward,
  ``torch.compile`` tracing the eager ops, and its memory (saves only the normaliser, peak about
  one gradient);
* the ``"auto"`` choice and the validation of ``log_prob_backend`` names.
"""

from __future__ import annotations

import math

import pytest
import torch
from _head_cases import LargestOutput, case, extreme_case
from torch.distributions import Distribution
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import discretelik.heads.softmax as softmax_module
from discretelik import build, create_head, get_head, list_heads
from discretelik.heads.mixture import lean as lean_module
from discretelik.heads.mixture.layout import MixtureLayout
from discretelik.heads.mixture.lean import lean_elementwise_log_prob
from discretelik.heads.softmax import DiscreteSoftmax, DiscreteSoftmaxDistribution
from discretelik.heads.softmax_lean import LeanSoftmaxLogProb

MIXTURES = [
    name
    for name in list_heads()
    if hasattr(get_head(name).distribution_class, "family")
    and "lean" in get_head(name).distribution_class.log_prob_backends
]
MIXTURE_NODE = "LeanMixtureLogProbBackward"
SOFTMAX_NODE = "LeanSoftmaxLogProbBackward"


# -- mixtures ---------------------------------------------------------------------------------
@pytest.fixture(params=["one component per step", "all components at once"])
def steps(request, monkeypatch) -> None:
    """Run a test with one component per loop step, and with the small-input default, which
    takes every component of these small cases at once."""
    if request.param == "one component per step":
        monkeypatch.setattr(lean_module, "_STEP_ELEMENTS", 1)


def mixture(name, params, channels, mixtures, bins, coupling, lean, **kw):
    dist_cls = get_head(name).distribution_class
    return dist_cls(
        params, channels=channels, mixtures=mixtures, bins=bins, coupling=coupling,
        log_prob_backend="lean" if lean else "eager", **kw,
    )  # fmt: skip


def value_and_grad(name, params, x, weights, lean, **kw):
    """``elementwise_log_prob`` and the gradient of its ``weights``-weighted sum."""
    params = params.detach().requires_grad_(True)
    elp = mixture(name, params, lean=lean, **kw).elementwise_log_prob(x)
    (grad,) = torch.autograd.grad((elp * weights).sum(), params)
    return elp.detach(), grad


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("bins", [2, 256, 65536])
def test_float64_matches_eager_in_steps(name: str, channels: int, bins: int, steps) -> None:
    for coupling in (True, False):
        kw = {"channels": channels, "mixtures": 3, "bins": bins, "coupling": coupling}
        params, x, weights = case(bins + channels, sample=(2,), **kw)
        lean = value_and_grad(name, params, x, weights, True, **kw)
        eager = value_and_grad(name, params, x, weights, False, **kw)
        torch.testing.assert_close(lean[0], eager[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lean[1], eager[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", MIXTURES)
def test_components_per_step(name: str) -> None:
    """Any step size gives the same values and gradients (up to rounding)."""
    kw = {"channels": 3, "mixtures": 5, "bins": 256, "coupling": True}
    layout = MixtureLayout(3, 5, True)
    family = get_head(name).distribution_class.family
    params, x, weights = case(8, sample=(2,), **kw)
    results = []
    for step in (1, 2, 5, 100):
        p = params.detach().requires_grad_(True)
        elp = lean_elementwise_log_prob(p, x, family, layout, 256, -7.0, components_per_step=step)
        (grad,) = torch.autograd.grad((elp * weights).sum(), p)
        results.append((elp.detach(), grad))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize(
    ("channels", "mixtures", "bins", "coupling", "sample"),
    [(3, 3, 256, True, ()), (1, 2, 2, True, (2,)), (4, 2, 32, True, ()), (3, 2, 16, False, (2, 1))],
)
def test_gradcheck(name, channels, mixtures, bins, coupling, sample, steps) -> None:
    layout = MixtureLayout(channels, mixtures, coupling)
    family = get_head(name).distribution_class.family
    params, x, _ = case(7, channels, mixtures, bins, coupling, batch=(1,), sample=sample, hw=(1, 2))
    # Keep raw log-scales off the clamp at -7, where the gradient jumps (one below, clamped).
    scale_channels = layout.split(torch.arange(float(layout.param_channels))[:, None, None])[2]
    values = torch.tensor([-9.0, -2.0, 0.5, -1.0], dtype=torch.float64)
    n_scales = scale_channels.numel()
    params[:, scale_channels.flatten().long()] = values.repeat(n_scales)[:n_scales, None, None]
    params.requires_grad_(True)

    def fn(p):
        return lean_elementwise_log_prob(p, x, family, layout, bins, -7.0)

    assert torch.autograd.gradcheck(fn, (params,))


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("bins", [2, 256, 65536])
def test_float32_extreme_parameters(name: str, channels: int, bins: int, steps) -> None:
    """Random and extreme (+-1e4) raw parameters at edge and near-edge bins: finite, the eager
    path's values, and gradients close to the exact (float64) gradient of the same parameters."""
    for coupling in (True, False):
        params, x = extreme_case(channels, 3, bins, coupling, n=12)
        weights = torch.ones(x.shape)
        kw = {"channels": channels, "mixtures": 3, "bins": bins, "coupling": coupling}
        value, grad = value_and_grad(name, params, x, weights, True, **kw)
        eager_value, eager_grad = value_and_grad(name, params, x, weights, False, **kw)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(value, eager_value, rtol=1e-6, atol=1e-5)
        true_value, truth = value_and_grad(name, params.double(), x, weights.double(), False, **kw)
        torch.testing.assert_close(value.double(), true_value, rtol=1e-5, atol=1e-4)
        bound = 5e-3 * truth.abs().flatten(1).amax(1) + 1e-6
        err = (grad.double() - truth).abs().flatten(1).amax(1)
        eager_err = (eager_grad.double() - truth).abs().flatten(1).amax(1)
        # Far in a Gaussian tail a log-mass reaches ~-6e13 (one float32 ulp ~4e6): where two
        # components' masses differ by less than that, float32 cannot tell their posterior
        # weights and neither path gets the gradient. The lean path must be within the bound,
        # or no worse than eager.
        assert (err <= torch.maximum(bound, 1.01 * eager_err)).all(), (err / bound).max()
        assert (err > bound).sum() <= 1


@pytest.mark.parametrize("name", MIXTURES)
def test_no_grad_and_single_component(name: str, steps) -> None:
    kw = {"channels": 3, "mixtures": 1, "bins": 256, "coupling": True}
    params, x, weights = case(4, **kw)
    lean = value_and_grad(name, params, x, weights, True, **kw)
    eager = value_and_grad(name, params, x, weights, False, **kw)
    torch.testing.assert_close(lean, eager, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        lp = mixture(name, params, lean=True, **kw).log_prob(x)
    torch.testing.assert_close(lp, eager[0].sum((-3, -2, -1)))


def mixture_memory(name: str, lean: bool):
    b, k, c, hw = 2, 10, 3, (8, 8)
    kw = {"channels": c, "mixtures": k, "bins": 256, "coupling": True}
    params, x, _ = case(5, batch=(b,), hw=hw, dtype=torch.float32, **kw)
    params.requires_grad_(True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with LargestOutput() as mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = mixture(name, params, lean=lean, **kw).log_prob(x).mean()
        loss.backward()
    return params, x, k, saved, mode.sizes


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("lean", [True, False])
def test_no_k_fold_temporaries(name: str, lean: bool, monkeypatch) -> None:
    # One component per step (the default for inputs of 2**16 elements and more).
    monkeypatch.setattr(lean_module, "_STEP_ELEMENTS", 1)
    params, x, k, saved, sizes = mixture_memory(name, lean)
    big = k * x.numel()  # one (B, K, C, H, W) tensor
    # Saved for backward: the parameters, the levels and one (B, C, H, W) running maximum
    # (plus scalars of the mean), instead of dozens of (B, K, C, H, W) tensors. The graph that
    # backward builds for one step at a time is not saved across the call.
    lean_saved = sum(saved) <= params.numel() + 2 * x.numel() + 16
    # No operation, forward or backward, returns a K-fold tensor; only the parameter gradient
    # (P = 10 K channels, needed anyway) is larger than a (B, K, H, W) or (B, C, H, W) one.
    per_pixel = max(x.numel(), k * x.numel() // x.shape[-3])
    lean_ops = all(n <= per_pixel or n == params.numel() for _, n in sizes)
    assert lean_saved == lean and lean_ops == lean, (sum(saved), max(n for _, n in sizes))
    if lean:
        assert max(n for _, n in sizes if n != params.numel()) < big


# -- softmax ----------------------------------------------------------------------------------
@pytest.fixture(params=["whole", "sliced"])
def slices(request, monkeypatch) -> None:
    """Run a test with the normaliser summed in one piece, and in slices of a few bins."""
    if request.param == "sliced":
        monkeypatch.setattr(softmax_module, "_CHUNK_ELEMENTS", 50)


def softmax(params, channels, bins, lean, **kw) -> DiscreteSoftmaxDistribution:
    backend = "lean" if lean else "eager"
    return DiscreteSoftmaxDistribution(params, channels, bins, log_prob_backend=backend, **kw)


def softmax_case(seed, channels, bins, batch=(2,), sample=(), hw=(2, 3), dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    params = torch.randn(*batch, channels * bins, *hw, generator=gen, dtype=dtype) * 3
    x = torch.randint(0, bins, (*sample, *batch, channels, *hw), generator=gen)
    flat = x.view(-1, *hw)
    flat[0, 0, 0], flat[-1, -1, -1] = 0, bins - 1  # both end levels
    weights = torch.rand(x.shape, generator=gen, dtype=dtype) + 0.5  # a generic upstream grad
    return params, x, weights


def softmax_both(params, x, weights, channels, bins, **kw):
    out = []
    for lean in (True, False):
        p = params.detach().requires_grad_(True)
        elp = softmax(p, channels, bins, lean, **kw).elementwise_log_prob(x)
        (grad,) = torch.autograd.grad((elp * weights).sum(), p)
        out.append((elp.detach(), grad))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("channels", "bins", "sample"), [(1, 2, ()), (3, 256, (3,)), (1, 1000, (2, 2))])
def test_softmax_values_bit_for_bit(dtype, channels: int, bins: int, sample, slices) -> None:
    """The same ops on the same numbers: the eager values exactly, gradients to rounding."""
    params, x, weights = softmax_case(bins + channels, channels, bins, sample=sample, dtype=dtype)
    lean, eager = softmax_both(params, x, weights, channels, bins)
    assert lean[0].dtype == lean[1].dtype == dtype
    assert torch.equal(lean[0], eager[0])
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(lean[1], eager[1], **tol)


@pytest.mark.parametrize(
    ("channels", "bins", "sample"), [(1, 2, ()), (3, 4, (2,)), (2, 7, (2, 1)), (1, 300, ())]
)
def test_softmax_gradcheck(channels: int, bins: int, sample) -> None:
    params, x, _ = softmax_case(11, channels, bins, batch=(1,), sample=sample, hw=(1, 2))
    n = math.prod(sample)
    index = x.reshape(n, *x.shape[len(sample) :]).movedim(0, -3)

    def fn(p):
        logits = p.reshape(1, channels, bins, 1, 2)
        return LeanSoftmaxLogProb.apply(logits, index, [(0, bins)])

    assert torch.autograd.gradcheck(fn, (params.requires_grad_(True),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_extreme_and_infinite_logits(dtype) -> None:
    """Logits of +-1e4, and (validation off) -inf levels, all -inf and +inf: the lean path
    reproduces the eager path's values and gradients, non-finite ones included."""
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
    with pytest.raises(ValueError, match="params must be finite"):
        softmax(params, 1, bins, True)
    lean, eager = softmax_both(params, x, weights, 1, bins, validate_args=False)
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


def test_softmax_channel_groups_and_bf16() -> None:
    """A grouped projection's feature gradient; bf16 parameters promoted to float32."""
    grads = []
    for backend in ("lean", "eager"):
        torch.manual_seed(0)
        head = DiscreteSoftmax(
            channels=3, bins=16, in_channels=12, feature_groups=3, log_prob_backend=backend
        )
        features = torch.randn(2, 12, 3, 3, generator=torch.Generator().manual_seed(1))
        features.requires_grad_(True)
        x = torch.randint(0, 16, (2, 3, 3, 3), generator=torch.Generator().manual_seed(2))
        lp = head(features).log_prob(x)
        grads.append(torch.autograd.grad(lp.sum(), [features, *head.parameters()]))
        params = head.params(features).detach().bfloat16()
        lp16 = head.distribution(params).log_prob(x)
        assert lp16.dtype == torch.float32
        grads[-1] = (*grads[-1], lp16)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_softmax_no_grad_and_no_double_backward() -> None:
    channels, bins = 3, 8
    params, x, _ = softmax_case(6, channels, bins, sample=(2,))
    with torch.no_grad():
        lp = softmax(params.requires_grad_(True), channels, bins, True).log_prob(x)
    assert lp.grad_fn is None and not lp.requires_grad
    assert torch.equal(lp, softmax(params, channels, bins, False).log_prob(x).detach())
    # Logits that need no gradient: no node either.
    assert softmax(params.detach(), channels, bins, True).log_prob(x).grad_fn is None
    (grad,) = torch.autograd.grad(
        softmax(params, channels, bins, True).log_prob(x).sum(), params, create_graph=True
    )
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(grad.sum(), params)


def test_softmax_torch_compile_uses_the_eager_path(monkeypatch) -> None:
    """``torch.compile`` (``aot_eager``: traced forward and backward, no code generation)
    traces the eager ops, never the lean node, and gives the lean path's values and gradients."""
    params, x, weights = softmax_case(12, 3, 16, dtype=torch.float32)

    def loss(p: torch.Tensor) -> torch.Tensor:
        d = DiscreteSoftmaxDistribution(p, 3, 16, validate_args=False, log_prob_backend="lean")
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


SOFTMAX_MEMORY = {"batch": 2, "channels": 3, "bins": 256, "hw": (8, 8)}


@pytest.mark.parametrize("lean", [True, False])
def test_softmax_saves_only_the_normaliser(lean: bool, monkeypatch) -> None:
    b, c, k, hw = SOFTMAX_MEMORY.values()
    # Four slices of 64 bins: the normaliser's temporaries are a quarter of the logits.
    monkeypatch.setattr(softmax_module, "_CHUNK_ELEMENTS", 64 * b * c * math.prod(hw))
    params, x, _ = softmax_case(5, c, k, batch=(b,), hw=hw, dtype=torch.float32)
    params.requires_grad_(True)
    own = {params.untyped_storage().data_ptr(), x.untyped_storage().data_ptr()}
    saved: list[int] = []  # elements saved for backward that are not the inputs' memory

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            saved.append(t.numel())
        return t

    with _Allocations() as mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            # validate_args=False: no full-size finiteness check of the parameters.
            loss = softmax(params, c, k, lean, validate_args=False).log_prob(x).mean()
        torch.autograd.grad(loss, params)
    # Saved for backward besides the logits and the levels: peak and log_z (and scalars of the
    # mean), where the eager path saves the exponentials of every logit.
    lean_saved = sum(saved) <= 2 * x.numel() + 16
    # The only allocation as large as the logits is the gradient; everything else is at most
    # one slice of the normaliser (forward) or per sub-pixel.
    full = [n for _, n in mode.sizes if n >= params.numel()]
    rest = max(n for _, n in mode.sizes if n < params.numel())
    lean_ops = len(full) == 1 and rest <= params.numel() // 4
    assert lean_saved == lean and lean_ops == lean, (sum(saved), full)


@pytest.mark.parametrize(
    ("lean", "validate"),
    [
        (True, False),
        (False, False),
        (True, None),  # validation on: the finiteness check allocates nothing of that size
    ],
)
def test_softmax_peak_memory_is_one_gradient(lean: bool, validate: bool | None) -> None:
    """Peak extra bytes of construction + forward + backward (MemTracker, as
    examples/benchmarks): about the gradient for the lean path, at least twice the logits for
    the eager path."""
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    b, c, k, hw = SOFTMAX_MEMORY.values()
    params, x, _ = softmax_case(5, c, k, batch=(b,), hw=hw, dtype=torch.float32)
    params.requires_grad_(True)

    def total(snapshot: dict) -> int:
        return sum(int(per_device["Total"]) for per_device in snapshot.values())

    tracker = mem_tracker.MemTracker()
    tracker.track_external(params, x)
    with tracker:
        before = total(tracker.get_tracker_snapshot("current"))
        dist = softmax(params, c, k, lean, validate_args=validate)
        (grad,) = torch.autograd.grad(dist.log_prob(x).mean(), params)
        del grad
    ratio = (total(tracker.get_tracker_snapshot("peak")) - before) / (params.numel() * 4)
    assert (ratio < 1.2) == lean and (ratio >= 2.0) == (not lean), ratio


# -- the "auto" choice and the names ----------------------------------------------------------
def first_node(dist, x) -> str:
    """The first autograd node of ``elementwise_log_prob`` that is not a view."""
    fn = dist.elementwise_log_prob(x).grad_fn
    while type(fn).__name__.startswith(("View", "Permute", "Unsafe", "Reshape")):
        fn = fn.next_functions[0][0]
    return type(fn).__name__


@pytest.mark.parametrize(
    ("name", "kw", "node"),
    [
        ("dlm", {"mixtures": 2}, MIXTURE_NODE),
        ("gaussian", {"mixtures": 2}, MIXTURE_NODE),
        ("gaussian", {"mixtures": 1}, None),  # one component: nothing K-fold to avoid
        ("softmax", {}, SOFTMAX_NODE),
    ],
)
def test_auto_on_cpu(name: str, kw: dict, node: str | None, monkeypatch) -> None:
    head = create_head(name, channels=3, bins=8, **kw)
    assert head.log_prob_backend == "auto"
    params = torch.randn(1, head.param_channels, 2, 2, requires_grad=True)
    x = torch.randint(0, 8, (1, 3, 2, 2))
    auto = first_node(head.distribution(params), x)
    assert (auto == node) if node else auto not in (MIXTURE_NODE, SOFTMAX_NODE), auto
    head.log_prob_backend = "eager"  # one instance, nothing global
    assert first_node(head.distribution(params), x) not in (MIXTURE_NODE, SOFTMAX_NODE)
    assert create_head(name, channels=3, bins=8, **kw).log_prob_backend == "auto"
    # While torch.compile traces, "lean" is answered by the (traceable) eager path.
    head.log_prob_backend = "lean"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert first_node(head.distribution(params), x) not in (MIXTURE_NODE, SOFTMAX_NODE)


@pytest.mark.parametrize("name", list_heads())
def test_backend_names_are_validated(name: str) -> None:
    head = create_head(name, channels=2, bins=4)
    params = torch.zeros(1, head.param_channels, 1, 1)
    dist_cls = type(head.distribution(params))
    for bad, error in (("fused", ValueError), ("", ValueError), (1, TypeError)):
        with pytest.raises(error, match="log_prob_backend"):
            create_head(name, channels=2, bins=4, log_prob_backend=bad)
        with pytest.raises(error, match="log_prob_backend"):
            head.log_prob_backend = bad
        with pytest.raises(error, match="log_prob_backend"):
            dist_cls(params, channels=2, bins=4, log_prob_backend=bad)
    assert head.log_prob_backend == "auto"  # a rejected assignment changes nothing


def test_build_passes_the_backend_to_the_head() -> None:
    model = build("pixelcnn", "dlm", preset="tiny", channels=1, bins=4,
                  head_kwargs={"log_prob_backend": "eager", "mixtures": 2})  # fmt: skip
    assert model.head.log_prob_backend == "eager"
