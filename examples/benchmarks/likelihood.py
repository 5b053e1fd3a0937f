"""Time and memory of the discretized logistic mixture log-likelihood, forward + backward.

For one batch of 32x32 RGB images with 256 levels and a 10-component DLM (``P = 100`` raw
parameter channels), each implementation computes the mean log-likelihood of the batch and its
gradient with respect to the raw parameters ``(B, P, H, W)``:

* ``port-style (baseline)``: written here from the formula in the way of the popular PyTorch
  port of openai/pixel-cnn's ``discretized_mix_logistic_loss``: NHWC layout, every
  ``B x H x W x C x K`` intermediate (centred values, both standardised edges, both sigmoids,
  log-CDFs, the middle-bin mass with its density fallback, ...) built by plain autograd ops,
  then a log-sum-exp over the ``K`` components;
* ``eager DLM head``: ``DiscretizedLogisticMixtureDistribution.log_prob`` on its eager
  reference path (``log_prob_backend = "eager"``): stable log-space bin masses of all
  ``(K, C)`` component-channel pairs at once, plain autograd;
* ``lean DLM head``: the default path on CPU, ``discretelik.heads._fused_dlm``: one autograd
  node that saves only the raw parameters, the levels and one ``(B, C, H, W)`` tensor, and
  loops over the components in forward and (recomputing the bin masses) twice in backward;
* ``triton DLM head`` (CUDA only): the default path on CUDA, ``discretelik.heads._triton_dlm``:
  the lean path's math as two Triton kernels, one program per block of pixels, the component
  loop in registers. Skipped (with a note) on CPU, where Triton would only interpret it.

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
* ``x BKCHW``: ``peak extra`` in units of one float ``B x K x C x H x W`` tensor, and the ratios
  of time and peak to the baseline measured in the same run.

The two head paths also report the largest difference of their mean log-likelihood and
gradient from the eager path (a sanity check, not a test: ``tests/test_fused_dlm.py`` is).

    python examples/benchmarks/likelihood.py                       # CUDA if there, B = 64
    OMP_NUM_THREADS=1 python examples/benchmarks/likelihood.py --device cpu --batch 16

``--markdown PATH`` also writes the header, table and notes as a Markdown fragment (see
``_report.py``); ``docs/performance.md`` includes those in ``docs/performance/``.

Measured figures, with their command and environment, are in ``docs/performance/likelihood-*.md``
(written by ``--markdown``), shown on ``docs/performance.md``.

The lean peak is the returned gradient (``B x 100 x H x W``, 3.3 BKCHW units) plus a working
set of about ``45 + 2 K / 3`` ``B x C x H x W`` tensors (measured for ``K`` = 1 to 20: the
``K`` part is the ``B x K x H x W`` mixture weights and their gradient); it pays with 1.1x to
1.4x the eager time on CPU (the bin masses are evaluated three times). The baseline's mean
log-likelihood differs from the heads' in the 5th digit: its density fallback for bins of mass
below ``1e-5``.
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

from discretelik.heads.logistic import DiscretizedLogisticMixtureDistribution

from _report import Run, markdown_table, write_markdown  # this folder, sys.path[0]

K, C, SIZE, BINS = 10, 3, 32, 256
P = K * (1 + 2 * C + C * (C - 1) // 2)  # 100 raw parameter channels (openai's 10 K)
IMPLS = ["port-style (baseline)", "eager DLM head", "lean DLM head", "triton DLM head"]
BACKENDS = {"eager DLM head": "eager", "lean DLM head": "lean", "triton DLM head": "triton"}


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


def head(backend: str) -> Callable[[Tensor, Tensor], Tensor]:
    def run(params: Tensor, x: Tensor) -> Tensor:
        dist = DiscretizedLogisticMixtureDistribution(
            params, channels=C, mixtures=K, bins=BINS, validate_args=False
        )
        dist.log_prob_backend = backend
        return dist.log_prob(x).mean()

    return run


FUNCTIONS = {IMPLS[0]: port_style, **{name: head(b) for name, b in BACKENDS.items()}}


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
    params = torch.randn(args.batch, P, SIZE, SIZE, generator=gen).to(device)
    params.requires_grad_(True)
    x = torch.randint(0, BINS, (args.batch, C, SIZE, SIZE), generator=gen).to(device)
    fn = FUNCTIONS[args.worker]

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
        ref_value, ref_grad = step_with(head("eager"), params, x)
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
    return out


def step_with(fn, params: Tensor, x: Tensor) -> tuple[float, Tensor]:
    value = fn(params, x)
    (grad,) = torch.autograd.grad(value, params)
    return value.item(), grad


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, help="images B (default: 64 on CUDA, 16 on CPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per implementation")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    p.add_argument("--markdown", metavar="PATH", help="also write the results as Markdown here")
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
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
    sizes = f"B={args.batch}, K={K}, {SIZE}x{SIZE}x{C}, {BINS} levels"
    print(
        f"{sizes}; forward + backward of the "
        f"mean log-likelihood w.r.t. raw params ({P} channels); median of {args.repeats}\n"
    )
    bkchw = args.batch * K * C * SIZE * SIZE * 4  # one float32 B x K x C x H x W tensor
    base = [sys.executable, __file__, "--device", args.device, "--batch", str(args.batch)]
    base += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
    rows = {}
    notes = []
    for name in IMPLS:
        if name == "triton DLM head" and device.type != "cuda":
            note = f"{name}: skipped (needs CUDA; on CPU Triton only interprets the kernels)"
            print(note)
            notes.append(note)
            continue
        cmd = base + ["--worker", name] + (["--reference"] if "DLM" in name else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            print(f"{name}: failed\n{done.stderr}")
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            notes.append(f"{name}: failed: {last}")
            continue
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])

    def mb(n: float | None) -> str:
        return "n/a" if n is None else f"{n / 2**20:.1f}"

    columns = ["implementation", "time ms", "peak extra MB", "x BKCHW", "peak RSS MB",
               "saved MB", "time/base", "peak/base"]
    widths = [24, 8, 14, 8, 12, 9, 10, 10]
    header = " ".join(
        f"{c:{w}s}" if i == 0 else f"{c:>{w}s}" for i, (c, w) in enumerate(zip(columns, widths))
    )
    print(header)
    print("-" * len(header))
    ref = rows.get(IMPLS[0])
    table = []
    for name, r in rows.items():
        t_ratio = f"{r['time'] / ref['time']:.2f}" if ref else "n/a"
        p_ratio = f"{r['peak'] / ref['peak']:.2f}" if ref and r["peak"] and ref["peak"] else "n/a"
        units = "n/a" if r["peak"] is None else f"{r['peak'] / bkchw:.1f}"
        cells = [name, f"{1e3 * r['time']:.1f}", mb(r["peak"]), units, mb(r["rss"]),
                 mb(r["saved"]), t_ratio, p_ratio]
        table.append(cells)
        print(" ".join(
            f"{c:{w}s}" if i == 0 else f"{c:>{w}s}" for i, (c, w) in enumerate(zip(cells, widths))
        ))
    unit = f"one float32 B x K x C x H x W tensor = {mb(bkchw)} MB"
    print(f"\n{unit}")
    notes.append(unit)
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

    if args.markdown:
        write_markdown(
            args.markdown,
            run,
            title=f"DLM log-likelihood, forward + backward, on {device.type}",
            header=run.header(args.threads, sizes, f"median of {args.repeats}"),
            table=markdown_table(columns, table, "l" + "r" * (len(columns) - 1)),
            notes=notes,
        )
        print(f"\nwrote {args.markdown}")


if __name__ == "__main__":
    main()
