"""Time and memory of a head's log-likelihood (DLM, Gaussian, softmax), forward + backward.

For one batch of 32x32 RGB images with 256 levels, each implementation computes the mean
log-likelihood of the batch and its gradient with respect to the head's parameters
``(B, P, H, W)``. ``--head`` picks the head (default ``dlm``).

``--head dlm``: a 10-component discretized logistic mixture (``P = 100`` raw parameter
channels); the rows:

* ``port-style (baseline)``: written here from the formula in the way of the popular PyTorch
  port of openai/pixel-cnn's ``discretized_mix_logistic_loss``: NHWC layout, every
  ``B x H x W x C x K`` intermediate (centred values, both standardised edges, both sigmoids,
  log-CDFs, the middle-bin mass with its density fallback, ...) built by plain autograd ops,
  then a log-sum-exp over the ``K`` components;
* ``eager DLM head``: ``DiscretizedLogisticMixtureDistribution.log_prob`` on its eager
  reference path (``log_prob_backend = "eager"``): stable log-space bin masses of all
  ``(K, C)`` component-channel pairs at once, plain autograd;
* ``lean DLM head``: ``log_prob_backend = "lean"``, the default on CPU
  (``discretelik.heads.mixture.lean``): one autograd node that saves only the raw parameters,
  the levels and one ``(B, C, H, W)`` tensor, loops over the components in forward and twice in
  backward, recomputing each one's bin masses through the formula under autograd;
* ``triton DLM head`` (CUDA only): ``log_prob_backend = "triton"``, the default for float32 on
  CUDA (``discretelik.heads.mixture.triton``): the formula as two Triton kernels, one program
  per block of pixels, the component loop in registers. Skipped (with a note) on CPU, where
  Triton would only interpret it;
* the kernels' launch variants (CUDA only, skipped with the head's row on CPU), each
  ``triton_elementwise_log_prob`` called directly with a ``KernelConfig`` (no distribution
  object): ``triton op, no head`` (the head's configuration: the difference to the head's row
  is the head's Python), pixels per program and warps (``32 px, 1 warp`` to
  ``256 px, 8 warps``: the grid is ``B x H x W / px`` programs), the coupling ``tanh`` in
  float32 instead of float64, and the fused path (``triton fused``: one kernel computes the
  log-likelihood and the gradient of its sum, backward scales it by ``1 / B`` in place) with
  some of those settings.

On CUDA the DLM notes add a roofline per row: the minimum traffic of any implementation (the
parameters and levels read once, the gradient written once), the rate that is in the row's
time, and the time of a device-to-device ``copy_`` of the same bytes measured in the same
process (its share: how far the row is from memory speed); for the triton rows also their own
traffic by item (``traffic()``: each tensor counted once per kernel that touches it; the
two-kernel path reads the parameters twice, the fused path writes the gradient and then
scales it in place).

``--head gaussian``: a 10-component discretized Gaussian mixture with coupled channels, the same
``P = 100`` layout; the rows, the first the base of the ratios:

* ``eager Gaussian head``: ``DiscretizedGaussianDistribution.log_prob`` on its eager reference
  path (``log_prob_backend = "eager"``; the default on CUDA);
* ``lean Gaussian head``: ``log_prob_backend = "lean"`` (the default on CPU for ``K > 1``),
  ``discretelik.heads.mixture.lean``: one autograd node that saves only the raw parameters,
  the levels and one ``(B, C, H, W)`` tensor, loops over the components and recomputes each
  one's bin masses under autograd in backward.

``--head softmax``: a 256-way softmax per sub-pixel, ``P = 3 x 256 = 768`` logits in the head's
channel-major layout (``C`` blocks of 256); the rows:

* ``port-style (baseline)``: the loss as PixelCNN ports compute it, ``F.cross_entropy`` on the
  logits viewed as ``(B, 256, C, H, W)`` (here a transposed view of the channel-major layout,
  which costs the same as a plain ``view`` of level-major logits) with the integer image as
  target, summed per image and averaged over the batch: the negative of the heads' mean
  log-likelihood in nats, so the function returns its negative and the values agree;
* ``eager softmax head``: ``DiscreteSoftmaxDistribution.log_prob`` with
  ``log_prob_backend = "eager"``: the normaliser from ``exp(logits - peak)`` by plain autograd;
* ``lean softmax head``: the default path, ``discretelik.heads.softmax_lean``: one autograd
  node that saves only the logits, the levels and the per-sub-pixel normaliser, and whose
  backward writes ``one_hot - softmax`` straight into the gradient.

Every implementation runs in a fresh subprocess (so that nothing one leaves in the allocator
caches is credited to the next), on the same seeded parameters and levels, once as a warm-up
and then ``--repeats`` times; the table gives

* ``time``: the median wall time of forward + backward;
* ``peak extra``: tensor memory above what was in use just before the call (parameters and
  levels already allocated), at the highest point of forward + backward, the returned
  gradient included. On CUDA that is ``torch.cuda.max_memory_allocated`` minus
  ``torch.cuda.memory_allocated`` before the call (after ``reset_peak_memory_stats``). On CPU
  PyTorch keeps no allocation statistics, so the bytes of the live tensor storages created in
  the call are tracked op by op (``torch.distributed._tools.mem_tracker.MemTracker``, a
  ``TorchDispatchMode`` with weak references to storages): exact, independent of the
  allocator; ``n/a`` where that private tool is missing;
* ``peak RSS`` (CPU only): the same seen by the OS, allocator slack and fragmentation
  included: after the warm-up, ``gc.collect()`` and glibc's ``malloc_trim(0)`` hand freed
  memory back, writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's high-water mark
  ``VmHWM``, and the figure is ``VmHWM`` after the call minus ``VmRSS`` before it (an upper
  bound that varies from run to run, by tens of MB for the eager paths; ``n/a`` without
  ``clear_refs``);
* ``saved``: the bytes autograd keeps for backward, counted exactly through
  ``torch.autograd.graph.saved_tensors_hooks`` (each storage once, the parameters and levels
  themselves excluded): the part of the memory that scales with the graph, whatever the device
  or allocator;
* ``x BKCHW`` (DLM, Gaussian): ``peak extra`` in units of one float ``B x K x C x H x W``
  tensor; ``x logits`` (softmax, where there is no ``K``): in units of the float32 logits
  ``B x 768 x H x W``, i.e. of the returned gradient;
* ``time/base``, ``peak/base``: the ratios of time and peak to the table's first row, measured
  in the same run.

The head rows (and the softmax baseline) also report the largest difference of their mean
log-likelihood and gradient from the head's eager path (a sanity check, not a test; the tests
run every (head, backend) pair through one contract: ``tests/test_head_contract.py``, and
``tests/test_triton_dlm.py``).

    python examples/benchmarks/likelihood.py                       # CUDA if there, B = 64
    OMP_NUM_THREADS=1 python examples/benchmarks/likelihood.py --device cpu --batch 16
    OMP_NUM_THREADS=1 python examples/benchmarks/likelihood.py --head softmax --device cpu

``--markdown PATH`` also writes the header, table and notes as a Markdown fragment (see
``_report.py``); ``docs/performance.md`` includes those in ``docs/performance/``.

Measured figures, with their command and environment, are in ``docs/performance/likelihood-*.md``
(written by ``--markdown``), shown on ``docs/performance.md``.

For the DLM, the lean peak is the returned gradient (``B x 100 x H x W``, 3.3 BKCHW units) plus a working
set of about ``45 + 2 K / 3`` ``B x C x H x W`` tensors (measured for ``K`` = 1 to 20: the
``K`` part is the ``B x K x H x W`` mixture weights and their gradient); it pays with 1.1x to
1.4x the eager time on CPU (the bin masses are evaluated three times). The baseline's mean
log-likelihood differs from the heads' in the 5th digit: its density fallback for bins of mass
below ``1e-5``. The softmax baseline gives the heads' value (its gradient to rounding): same
formula, ``log_softmax`` inside ``cross_entropy``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from discretelik.heads.gaussian import DiscretizedGaussianDistribution
from discretelik.heads.logistic import DiscretizedLogisticMixtureDistribution
from discretelik.heads.mixture.layout import MixtureLayout
from discretelik.heads.mixture.triton import KernelConfig, triton_elementwise_log_prob
from discretelik.heads.softmax import DiscreteSoftmaxDistribution

from _report import Run, markdown_table, write_markdown  # this folder, sys.path[0]

K, C, SIZE, BINS = 10, 3, 32, 256
P = K * (1 + 2 * C + C * (C - 1) // 2)  # 100 raw parameter channels (openai's 10 K)
# The Triton kernels' launch variants (CUDA only), timed against the head's default
# (``KernelConfig()``: two kernels, 128 pixels and 8 warps per program, float64 coupling tanh).
TRITON_VARIANTS = {
    "triton op, no head": KernelConfig(),
    "triton 32 px, 1 warp": KernelConfig(block=32, num_warps=1),
    "triton 64 px, 2 warps": KernelConfig(block=64, num_warps=2),
    "triton 128 px, 4 warps": KernelConfig(block=128, num_warps=4),
    "triton 256 px, 8 warps": KernelConfig(block=256, num_warps=8),
    "triton float32 tanh": KernelConfig(float64_coupling_tanh=False),
    "triton fused": KernelConfig(fused=True),
    "triton fused, 64 px, 2 w": KernelConfig(block=64, num_warps=2, fused=True),
    "triton fused, f32 tanh": KernelConfig(float64_coupling_tanh=False, fused=True),
}
IMPLS = ["port-style (baseline)", "eager DLM head", "lean DLM head", "triton DLM head",
         *TRITON_VARIANTS]
BACKENDS = {"eager DLM head": "eager", "lean DLM head": "lean", "triton DLM head": "triton"}
GAUSSIAN_IMPLS = ["eager Gaussian head", "lean Gaussian head"]
SOFTMAX_IMPLS = ["port-style (baseline)", "eager softmax head", "lean softmax head"]


# -- the implementations: params (B, P, H, W) float, x (B, C, H, W) int64 -> mean log p -------
def port_style(params: Tensor, x: Tensor) -> Tensor:
    """The popular port's approach, from the PixelCNN++ formula; NHWC, all intermediates."""
    l = params.permute(0, 2, 3, 1)  # (B, H, W, 10 K)
    xs = (x.permute(0, 2, 3, 1).to(params.dtype) * 2 / (BINS - 1) - 1).unsqueeze(-1)
    xs = xs.expand(*xs.shape[:-1], K)  # (B, H, W, C, K)
    logits = l[..., :K]
    rest = l[..., K:].reshape(*l.shape[:-1], C, 3 * K)  # per channel: means, log-scales, coeffs
    means = rest[..., :K]
    log_scales = rest[..., K : 2 * K].clamp(min=-7.0)
    coeffs = torch.tanh(rest[..., 2 * K : 3 * K])
    m1 = means[..., 1, :] + coeffs[..., 0, :] * xs[..., 0, :]
    m2 = means[..., 2, :] + coeffs[..., 1, :] * xs[..., 0, :] + coeffs[..., 2, :] * xs[..., 1, :]
    means = torch.stack([means[..., 0, :], m1, m2], dim=-2)  # (B, H, W, C, K)
    centred = xs - means
    inv_s = torch.exp(-log_scales)
    plus_in = inv_s * (centred + 1.0 / (BINS - 1))
    min_in = inv_s * (centred - 1.0 / (BINS - 1))
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)  # level 0
    log_sf_min = -F.softplus(min_in)  # level 255
    mid_in = inv_s * centred
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    middle = torch.where(
        cdf_delta > 1e-5,
        torch.log(cdf_delta.clamp(min=1e-12)),
        log_pdf_mid - torch.log(torch.tensor((BINS - 1) / 2.0)),  # density * bin width
    )
    log_probs = torch.where(xs < -0.999, log_cdf_plus, torch.where(xs > 0.999, log_sf_min, middle))
    log_probs = log_probs.sum(dim=-2) + torch.log_softmax(logits, dim=-1)  # (B, H, W, K)
    return torch.logsumexp(log_probs, dim=-1).sum(dim=(1, 2)).mean()


def softmax_port_style(logits: Tensor, x: Tensor) -> Tensor:
    """The PixelCNN ports' softmax loss: ``F.cross_entropy`` on ``(B, 256, C, H, W)`` logits.

    The head's layout is channel-major (``C`` blocks of 256), so the logits are viewed as
    ``(B, C, 256, H, W)`` and transposed (a view; a port whose last layer writes level-major
    logits uses ``view(B, 256, C, H, W)`` instead, at the same cost). The per-sub-pixel cross
    entropy in nats is summed per image and averaged over the batch, as the ports do; that is the
    negative of the head's mean log-likelihood, which is returned.
    """
    b, _, h, w = logits.shape
    scores = logits.view(b, C, BINS, h, w).transpose(1, 2)  # (B, 256, C, H, W)
    return -F.cross_entropy(scores, x, reduction="none").sum(dim=(1, 2, 3)).mean()


def head(backend: str, kind: str = "dlm") -> Callable[[Tensor, Tensor], Tensor]:
    def run(params: Tensor, x: Tensor) -> Tensor:
        if kind == "softmax":
            dist = DiscreteSoftmaxDistribution(
                params, C, BINS, validate_args=False, log_prob_backend=backend
            )
        else:
            cls = DiscretizedLogisticMixtureDistribution if kind == "dlm" \
                else DiscretizedGaussianDistribution
            dist = cls(params, channels=C, mixtures=K, bins=BINS, validate_args=False,
                       log_prob_backend=backend)
        return dist.log_prob(x).mean()

    return run


def kernels(config: KernelConfig) -> Callable[[Tensor, Tensor], Tensor]:
    """The DLM kernels called directly (no distribution object, no validation) with
    ``config``: the mean over images of the per-image sum, as the head rows."""
    layout = MixtureLayout(C, K, True)

    def run(params: Tensor, x: Tensor) -> Tensor:
        out = triton_elementwise_log_prob(params, x, layout, BINS, -7.0, config)
        return out.sum(dim=(-3, -2, -1)).mean()

    return run


def traffic(name: str, batch: int) -> dict[str, int]:
    """Bytes a triton row moves through device memory in forward + backward (its kernels, the
    upstream gradient, the sums), each tensor counted once per kernel that reads or writes it
    (a pass that finds it in cache is not counted again), by item."""
    f32 = 4
    params = batch * P * SIZE * SIZE * f32
    per_channel = batch * C * SIZE * SIZE * f32  # out, top, the upstream gradient
    levels = batch * C * SIZE * SIZE * 8  # int64
    fused = name != "triton DLM head" and TRITON_VARIANTS[name].fused
    if fused:
        return {
            "params read": params,
            "levels read": levels,
            "out + top written": 2 * per_channel,
            "gradient written": params,
            "stored gradient scaled in place (read + write)": 2 * params,
            "out read by the sums": per_channel,
        }
    return {
        "params read (both kernels)": 2 * params,
        "levels read (both kernels)": 2 * levels,
        "out + top written, top read": 3 * per_channel,
        "upstream gradient made dense, read": 2 * per_channel,
        "gradient written": params,
        "out read by the sums": per_channel,
    }


def minimum_traffic(batch: int) -> int:
    """The least any implementation moves: the parameters and levels read once, the gradient
    written once."""
    return 2 * batch * P * SIZE * SIZE * 4 + batch * C * SIZE * SIZE * 8


def copy_time(n_bytes: int, device: torch.device, repeats: int) -> float:
    """Median seconds of a device-to-device copy that moves ``n_bytes`` in all (reads half,
    writes half), measured like the rows (synchronised wall time)."""
    src = torch.empty(n_bytes // 8, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(max(repeats, 5)):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Per ``--head``: the rows (the first is the base of the ratios), their functions, the raw
# parameter channels, the unit column's name and bytes per image, and the table's title.
HEADS = {
    "dlm": {
        "impls": IMPLS,
        "functions": {
            IMPLS[0]: port_style,
            **{n: head(b) for n, b in BACKENDS.items()},
            **{n: kernels(config) for n, config in TRITON_VARIANTS.items()},
        },
        "channels": P,
        "unit": ("x BKCHW", K * C * SIZE * SIZE * 4, "one float32 B x K x C x H x W tensor"),
        "title": "DLM log-likelihood",
    },
    "gaussian": {
        "impls": GAUSSIAN_IMPLS,
        "functions": {n: head(n.split()[0], "gaussian") for n in GAUSSIAN_IMPLS},
        "channels": P,
        "unit": ("x BKCHW", K * C * SIZE * SIZE * 4, "one float32 B x K x C x H x W tensor"),
        "title": "Discretized Gaussian mixture log-likelihood",
    },
    "softmax": {
        "impls": SOFTMAX_IMPLS,
        "functions": {
            SOFTMAX_IMPLS[0]: softmax_port_style,
            **{n: head(n.split()[0], "softmax") for n in SOFTMAX_IMPLS[1:]},
        },
        "channels": C * BINS,
        "unit": ("x logits", C * BINS * SIZE * SIZE * 4,
                 f"one float32 logits tensor B x {C * BINS} x H x W"),
        "title": "Softmax log-likelihood",
    },
}


# -- measurement (one implementation per process) ---------------------------------------------
def _proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Return freed heap to the OS and reset the kernel's peak RSS; False if unsupported."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _tracked_peak(step: Callable[[], object], inputs: tuple[Tensor, ...]) -> int | None:
    """Peak extra bytes of live tensor storages during ``step`` (CPU); None without MemTracker.

    The inputs are registered first: otherwise the first view of them (a ``narrow``, a
    ``permute``) would count their whole storage as new.
    """
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        return None

    def total(snapshot: dict) -> int:
        return sum(int(per_device["Total"]) for per_device in snapshot.values())

    tracker = MemTracker()
    tracker.track_external(*inputs)
    with tracker:
        before = total(tracker.get_tracker_snapshot("current"))
        result = step()
    del result
    return total(tracker.get_tracker_snapshot("peak")) - before


def worker(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    spec = HEADS[args.head]
    params = torch.randn(args.batch, spec["channels"], SIZE, SIZE, generator=gen).to(device)
    params.requires_grad_(True)
    x = torch.randint(0, BINS, (args.batch, C, SIZE, SIZE), generator=gen).to(device)
    fn = spec["functions"][args.worker]

    def step() -> tuple[Tensor, Tensor]:
        value = fn(params, x)
        (grad,) = torch.autograd.grad(value, params)
        return value.detach(), grad

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    value, grad = step()  # warm-up: lazy initialisation, thread pools, kernels
    out = {"value": value.item()}
    if args.reference:  # compare with the eager head on the same inputs
        ref_value, ref_grad = step_with(head("eager", args.head), params, x)
        out["diff_value"] = abs(value.item() - ref_value)
        out["diff_grad"] = (grad - ref_grad).abs().max().item() / ref_grad.abs().max().item()
        del ref_grad
    del grad

    # Saved-for-backward bytes, each storage once, inputs excluded.
    inputs = {params.untyped_storage().data_ptr(), x.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in inputs:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(params, x)
    out["saved"] = sum(seen.values())
    del loss, seen

    # Peak extra memory of one forward + backward.
    out["rss"] = None
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = step()
        sync()
        out["peak"] = torch.cuda.max_memory_allocated(device) - before
        del result
    else:
        out["peak"] = _tracked_peak(step, (params, x))
        if _reset_peak_rss():
            before = _proc_kb("VmRSS")
            result = step()
            out["rss"] = (_proc_kb("VmHWM") - before) * 1024
            del result

    times = []
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    out["time"] = statistics.median(times)
    if device.type == "cuda" and args.head == "dlm":  # the roofline, in this process
        if args.worker.startswith("triton"):
            out["traffic"] = traffic(args.worker, args.batch)
            out["copy"] = copy_time(sum(out["traffic"].values()), device, args.repeats)
        out["minimum"] = minimum_traffic(args.batch)
        out["copy_minimum"] = copy_time(out["minimum"], device, args.repeats)
    return out


def roofline(rows: dict[str, dict]) -> list[str]:
    """Notes: for each CUDA row the bytes it moves (triton rows: by item, ``traffic``; every
    row: the minimum any implementation moves), the achieved rate, and a device copy of the
    same bytes timed in the same process."""
    lines = []
    for name, r in rows.items():
        if "minimum" not in r:
            continue
        at_min = r["minimum"] / r["time"] / 1e9
        copy_rate = r["minimum"] / r["copy_minimum"] / 1e9
        line = (
            f"roofline, {name}: the minimum traffic ({r['minimum'] / 1e6:.1f} MB: parameters "
            f"and levels read once, gradient written once) in {1e3 * r['time']:.3f} ms is "
            f"{at_min:.0f} GB/s, {r['copy_minimum'] / r['time']:.1%} of a device copy of the "
            f"same bytes ({1e6 * r['copy_minimum']:.1f} us, {copy_rate:.0f} GB/s)"
        )
        if "traffic" in r:
            moved = sum(r["traffic"].values())
            items = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in r["traffic"].items())
            line += (
                f"; its own traffic {moved / 1e6:.1f} MB ({items}) is {moved / r['time'] / 1e9:.0f}"
                f" GB/s, {r['copy'] / r['time']:.1%} of a copy of as many bytes "
                f"({1e6 * r['copy']:.1f} us)"
            )
        lines.append(line)
    return lines


def step_with(fn, params: Tensor, x: Tensor) -> tuple[float, Tensor]:
    value = fn(params, x)
    (grad,) = torch.autograd.grad(value, params)
    return value.item(), grad


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head", choices=list(HEADS), default="dlm",
                   help="which head's log-likelihood to measure (default: dlm)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, help="images B (default: 64 on CUDA, 16 on CPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per implementation")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    p.add_argument("--markdown", metavar="PATH", help="also write the results as Markdown here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None and args.worker not in HEADS[args.head]["impls"]:
        p.error(f"--worker {args.worker!r} is not a row of --head {args.head}")
    if args.batch is None:
        args.batch = 64 if torch.device(args.device).type == "cuda" else 16
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    device = torch.device(args.device)
    run = Run(__file__, argv, device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or platform.machine()}, {args.threads} thread(s)"
    print(f"device: {device} ({where}); torch {torch.__version__}")
    spec = HEADS[args.head]
    if args.head == "softmax":
        sizes = f"B={args.batch}, {SIZE}x{SIZE}x{C}, {BINS} levels, {BINS}-way softmax"
        what = f"logits ({spec['channels']} channels)"
    else:
        sizes = f"B={args.batch}, K={K}, {SIZE}x{SIZE}x{C}, {BINS} levels"
        what = f"raw params ({spec['channels']} channels)"
    print(
        f"{sizes}; forward + backward of the "
        f"mean log-likelihood w.r.t. {what}; median of {args.repeats}\n"
    )
    unit_column, unit_bytes, unit_name = spec["unit"]
    unit_bytes *= args.batch  # the unit column's tensor, for this batch
    base = [sys.executable, __file__, "--head", args.head, "--device", args.device]
    base += ["--batch", str(args.batch), "--repeats", str(args.repeats)]
    base += ["--threads", str(args.threads)]
    rows = {}
    notes = []
    skipped = []
    for name in spec["impls"]:
        if name.startswith("triton") and device.type != "cuda":
            skipped.append(name)
            continue
        # Compared with the eager head: every head and kernel row, and the softmax baseline
        # (same values).
        reference = "head" in name or name.startswith("triton") or args.head == "softmax"
        cmd = base + ["--worker", name] + (["--reference"] if reference else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            print(f"{name}: failed\n{done.stderr}")
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            notes.append(f"{name}: failed: {last}")
            continue
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])

    def mb(n: float | None) -> str:
        return "n/a" if n is None else f"{n / 2**20:.1f}"

    columns = ["implementation", "time ms", "peak extra MB", unit_column, "peak RSS MB",
               "saved MB", "time/base", "peak/base"]
    widths = [24, 8, 14, max(8, len(unit_column) + 1), 12, 9, 10, 10]
    header = " ".join(
        f"{c:{w}s}" if i == 0 else f"{c:>{w}s}" for i, (c, w) in enumerate(zip(columns, widths))
    )
    print(header)
    print("-" * len(header))
    ref = rows.get(spec["impls"][0])
    table = []
    for name, r in rows.items():
        t_ratio = f"{r['time'] / ref['time']:.2f}" if ref else "n/a"
        p_ratio = f"{r['peak'] / ref['peak']:.2f}" if ref and r["peak"] and ref["peak"] else "n/a"
        units = "n/a" if r["peak"] is None else f"{r['peak'] / unit_bytes:.1f}"
        cells = [name, f"{1e3 * r['time']:.1f}", mb(r["peak"]), units, mb(r["rss"]),
                 mb(r["saved"]), t_ratio, p_ratio]
        table.append(cells)
        print(" ".join(
            f"{c:{w}s}" if i == 0 else f"{c:>{w}s}" for i, (c, w) in enumerate(zip(cells, widths))
        ))
    if skipped:
        note = f"{skipped[0]}: skipped (needs CUDA; on CPU Triton only interprets the kernels)"
        if len(skipped) > 1:
            note += f"; so are its launch variants ({'; '.join(skipped[1:])})"
        print(note)
        notes.append(note)
    unit = f"{unit_name} = {mb(unit_bytes)} MB"
    print(f"\n{unit}")
    notes.append(unit)
    if args.head == "gaussian":
        line = f"time/base, peak/base: against the {spec['impls'][0]}"
        print(line)
        notes.append(line)
    for name, r in rows.items():
        extra = ""
        if "diff_value" in r:
            extra = (
                f"; vs eager: |d value| {r['diff_value']:.2e}, "
                f"max|d grad| / max|grad| {r['diff_grad']:.2e}"
            )
        line = f"{name}: mean log-likelihood {r['value']:.4f}{extra}"
        print(line)
        notes.append(line)

    for line in roofline(rows):
        print(line)
        notes.append(line)

    if args.markdown:
        write_markdown(
            args.markdown,
            run,
            title=f"{spec['title']}, forward + backward, on {device.type}",
            header=run.header(args.threads, sizes, f"median of {args.repeats}"),
            table=markdown_table(columns, table, "l" + "r" * (len(columns) - 1)),
            notes=notes,
        )
        print(f"\nwrote {args.markdown}")


if __name__ == "__main__":
    main()
