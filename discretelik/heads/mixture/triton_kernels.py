r"""Triton kernels of the discretized logistic mixture log-likelihood (forward and backward).

Imported only through ``triton.py`` beside it, which checks that Triton is there. The math is
a translation of ``formula.py`` with the ``logistic.py`` family (read them first), whose
constants arrive as compile-time arguments (``WIDE_HALF_WIDTH``, ``FAR_TAIL``,
``TINY_LOG_HALF_WIDTH``, ``Z_LIMIT``), and of the lean path's online posterior (``lean.py``),
done per pixel inside one program instead of per component across the whole batch:

* a program owns ``BLOCK`` pixels (flattened ``B x H x W``) and holds every per-channel
  quantity as a ``(BLOCK, CP)`` tile, ``CP`` the channel count rounded up to a power of two
  (columns ``>= C`` are masked out and kept finite);
* the ``K`` components are a loop inside the program, so the component log-masses ``L_kc``
  live only in registers: nothing of size ``B x K x C x H x W`` is ever written to memory.
  It is a run-time loop: unrolled (``tl.static_range``) the backward kernel took 90 s to
  compile for ``K = 10``, rolled 2.4 s;
* ``dlm_forward_kernel`` writes the per-channel conditional log-likelihood and the running
  maximum ``top`` of ``v_kc = log pi_k + sum_{j<c} L_kj`` (``B x C x H x W`` each), one pass;
  ``dlm_backward_kernel`` reads ``top``, recomputes both normalisers in a first pass and
  writes the gradient of every raw parameter in a second, exactly the two passes of the lean
  PyTorch path;
* ``dlm_forward_grad_kernel`` (the fused path) does all three passes in one program: ``top``,
  then the normalisers against it (the log-likelihood from them), then the gradient of the
  log-likelihood's sum (an upstream gradient of 1 at every sub-pixel). The passes are shared
  functions (``_running_top``, ``_normalisers``, ``_write_gradients``), so the two paths
  cannot drift apart.

Launch settings that change the code are compile-time arguments: ``BLOCK`` (pixels per
program) and ``WIDE_TANH`` (the coupling's ``tanh`` in float64 or float32); ``triton.py``
passes them from its ``KernelConfig``.

Only core ``tl`` operations are used (no ``libdevice``), so that the same source compiles with
the Triton that ships with older PyTorch releases and runs in Triton's CPU interpreter
(``TRITON_INTERPRET=1``), which is how the test suite checks it on machines without a GPU.
``log1p``, ``expm1`` and ``tanh`` are therefore written out below in forms accurate to a few
float32 ulps (absolute, for ``tanh``).

Channel-offset table ``tab`` (int32, built by ``triton._offset_table``):
``tab[c]`` and ``tab[CP + c]`` are the first parameter channels of the location and
log-scale blocks of image channel ``c``; ``tab[2 CP + c CP + j]`` that of the coupling block
``alpha_{c j}`` (``j < c``), and ``-1`` where there is none. Component ``k`` of a block sits
``k`` channels after its start.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Globals read inside @triton.jit functions must be constexpr objects.
_LOG2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _log1p(y):
    """``log(1 + y)`` for ``y > -1`` (Goldberg's trick: the rounding of ``1 + y`` cancels)."""
    u = 1.0 + y
    d = u - 1.0
    return tl.where(d == 0.0, y, tl.log(u) * (y / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _expm1(x):
    """``exp(x) - 1`` for ``x <= 0``, to about one ulp.

    Near zero (``x > -0.5``) a Taylor polynomial to ``x^9 / 9!`` (truncation below
    ``1e-9`` relative); below, ``exp(x) - 1`` itself: the subtraction rounds once, and the
    relative error of ``exp`` is scaled by ``exp(x) / (1 - exp(x)) < 1.6`` there.
    """
    small = tl.maximum(x, -0.5)  # keeps the unused polynomial finite
    big = tl.minimum(x, -0.5)
    p = 1.0 / 362880.0
    p = p * small + 1.0 / 40320.0
    p = p * small + 1.0 / 5040.0
    p = p * small + 1.0 / 720.0
    p = p * small + 1.0 / 120.0
    p = p * small + 1.0 / 24.0
    p = p * small + 1.0 / 6.0
    p = p * small + 0.5
    p = p * small + 1.0
    return tl.where(x > -0.5, p * small, tl.exp(big) - 1.0)


@triton.jit
def _tanh(x):
    """``tanh(x) = sign(x) t / (t + 2)``, ``t = -expm1(-2|x|)``: no overflow, ~2 ulps."""
    t = -_expm1(-2.0 * tl.abs(x))
    r = t / (2.0 - t)
    return tl.where(x < 0.0, -r, r)


@triton.jit
def _coupling_tanh(alpha, WIDE_TANH: tl.constexpr):
    """``tanh`` of a raw coupling coefficient: evaluated in float64 and rounded once when
    ``WIDE_TANH``, else ``_tanh`` in float32.

    The coupled location ``mu`` enters the standardised edges multiplied by the inverse scale
    (up to ``e^7``), so its rounding shows in the gradients of narrow bins: ``_tanh``'s ~2
    float32 ulps made them ~3x less accurate than the eager path's (``torch.tanh``, 0.5 ulp).
    There are only ``C (C - 1) / 2`` of these per component and pixel, but float64 runs at a
    fraction of float32's rate on most GPUs, so the float32 form is kept as a variant to time.
    """
    if WIDE_TANH:
        t = _tanh(alpha.to(tl.float64)).to(tl.float32)
    else:
        t = _tanh(alpha)
    return t


@triton.jit
def _log_sigmoid(x):
    """``log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|))``."""
    return tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    """``sigmoid(x)`` without overflow of ``exp``."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _log_cosh(y):
    """``log(cosh(y)) = |y| + log1p(exp(-2|y|)) - log 2``."""
    a = tl.abs(y)
    return a + _log1p(tl.exp(-2.0 * a)) - _LOG2


@triton.jit
def _column(tile, col, j):
    """Column ``j`` of a ``(BLOCK, CP)`` tile as a ``(BLOCK,)`` vector."""
    return tl.sum(tl.where(col[None, :] == j, tile, 0.0), axis=1)


@triton.jit
def _exclusive_cumsum(tile, col, C: tl.constexpr):
    """``sum_{j<c} tile[:, j]`` for every column ``c``, summed in order ``j = 0, 1, ...``
    (as ``cumsum``), ``0`` in column 0."""
    out = tl.zeros_like(tile)
    running = tl.zeros_like(_column(tile, col, 0))
    for j in tl.static_range(C - 1):
        running = running + _column(tile, col, j)
        out = tl.where(col[None, :] == j + 1, running[:, None], out)
    return out


@triton.jit
def _strict_suffix_sum(tile, col, C: tl.constexpr):
    """``sum_{c' > c} tile[:, c']`` for every column ``c``, summed from the last column down
    (as ``flip(cumsum(flip))``), ``0`` in column ``C - 1``."""
    out = tl.zeros_like(tile)
    running = tl.zeros_like(_column(tile, col, 0))
    for jj in tl.static_range(C - 1):
        j = C - 1 - jj
        running = running + _column(tile, col, j)
        out = tl.where(col[None, :] == j - 1, running[:, None], out)
    return out


@triton.jit
def _pixels(pid, N, HW, BLOCK: tl.constexpr):
    """The program's pixel indices ``(BLOCK,)`` (int64), their mask, batch and spatial index."""
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    pmask = offs < N
    b = offs // HW
    return pmask, b, offs - b * HW


@triton.jit
def _log_weights(params_ptr, pbase, pmask, HW, K: tl.constexpr, KP: tl.constexpr):
    """``log_softmax`` of the ``K`` logits as a ``(BLOCK, KP)`` tile (padding columns
    ``-inf``), and the component index ``(KP,)``."""
    kcol = tl.arange(0, KP)
    kmask = kcol < K
    logits = tl.load(
        params_ptr + pbase[:, None] + kcol[None, :].to(tl.int64) * HW,
        mask=pmask[:, None] & kmask[None, :],
        other=0.0,
    )
    logits = tl.where(kmask[None, :], logits, float("-inf"))
    peak = tl.max(logits, axis=1)
    shifted = logits - peak[:, None]
    return shifted - tl.log(tl.sum(tl.exp(shifted), axis=1))[:, None], kcol


@triton.jit
def _component(
    params_ptr, tab_ptr, pbase, HW, m2, col, k,
    centre, upper_edge, lower_edge, first, last, loc_off, scale_off,
    n_levels, min_log_scale,
    C: tl.constexpr, CP: tl.constexpr, COUPLING: tl.constexpr,
    WIDE_HALF_WIDTH: tl.constexpr, FAR_TAIL: tl.constexpr, TINY_LOG_HALF_WIDTH: tl.constexpr,
    Z_LIMIT: tl.constexpr, WIDE_TANH: tl.constexpr,
):  # fmt: skip
    """Log bin masses ``L_kc`` of component ``k`` at every channel, ``(BLOCK, CP)``, and
    everything the derivatives need (see ``_component_grads``).

    Branches and constants are those of the formula (``formula.log_bin_mass`` with
    ``logistic.Logistic``): edges saturated at ``Z_LIMIT``; open edge bins by log-sigmoids;
    middle bins folded to the right half, then the wide form ``log sigma(a) + log(1 - rho)``
    where ``h > WIDE_HALF_WIDTH`` and ``b < FAR_TAIL``, else the ``sinh`` form with the
    half-width ``h`` taken from the log-scale.
    """
    raw_ls = tl.load(params_ptr + pbase[:, None] + (scale_off + k)[None, :].to(tl.int64) * HW,
                     mask=m2, other=0.0)  # fmt: skip
    ls = tl.maximum(raw_ls, min_log_scale)
    mu = tl.load(params_ptr + pbase[:, None] + (loc_off + k)[None, :].to(tl.int64) * HW,
                 mask=m2, other=0.0)  # fmt: skip
    if COUPLING:
        # mu_c = loc_c + sum_{j<c} tanh(alpha_cj) x_j, the sum formed first (as coupled_loc).
        coupled = tl.zeros_like(mu)
        for j in tl.static_range(C - 1):
            off = tl.load(tab_ptr + 2 * CP + col * CP + j, mask=col < C, other=-1)
            alpha = tl.load(
                params_ptr + pbase[:, None] + (off + k)[None, :].to(tl.int64) * HW,
                mask=m2 & (off >= 0)[None, :],
                other=0.0,
            )
            coupled = coupled + _coupling_tanh(alpha, WIDE_TANH) * _column(centre, col, j)[:, None]
        mu = mu + coupled
    inv_scale = tl.exp(-ls)
    upper = (upper_edge - mu) * inv_scale  # standardised bin edges
    lower = (lower_edge - mu) * inv_scale
    h = inv_scale / n_levels  # standardised half-width
    log_h = -tl.log(n_levels) - ls
    # A bin wholly beyond +-Z_LIMIT moves in to the limit, keeping its width.
    right = lower > Z_LIMIT
    left = upper < -Z_LIMIT
    upper = tl.where(right, Z_LIMIT + 2.0 * h, tl.where(left, -Z_LIMIT, upper))
    lower = tl.where(left, -Z_LIMIT - 2.0 * h, tl.where(right, Z_LIMIT, lower))
    flip = upper + lower < 0.0
    a = tl.where(flip, -lower, upper)
    b = tl.where(flip, -upper, lower)
    wide = (h > WIDE_HALF_WIDTH) & (b < FAR_TAIL)
    aw = tl.where(wide, a, 2.0)  # harmless inputs where unused
    bw = tl.where(wide, b, -2.0)
    log_a = _log_sigmoid(aw)
    log_ratio = _log_sigmoid(bw) - log_a  # log rho, rho = sigma(b) / sigma(a) < 1
    one_minus_rho = -_expm1(log_ratio)
    log_wide = log_a + tl.log(one_minus_rho)
    tiny = log_h < TINY_LOG_HALF_WIDTH
    safe_h = tl.where(tiny, 1.0, h)
    neg_expm1 = -_expm1(-2.0 * safe_h)  # 1 - exp(-2h)
    log_sinh = tl.where(tiny, log_h, safe_h + tl.log(neg_expm1) - _LOG2)
    log_narrow = log_sinh - _LOG2 - _log_cosh(a / 2.0) - _log_cosh(b / 2.0)
    middle = tl.where(wide, log_wide, log_narrow)
    log_mass = tl.where(first, _log_sigmoid(upper), tl.where(last, _log_sigmoid(-lower), middle))
    return (log_mass, raw_ls, inv_scale, upper, lower, flip, a, b, wide, aw, bw, log_ratio,
            one_minus_rho, tiny, safe_h, neg_expm1, h, right, left)  # fmt: skip


@triton.jit
def _log_mass(
    params_ptr, tab_ptr, pbase, HW, m2, col, k,
    centre, upper_edge, lower_edge, first, last, loc_off, scale_off,
    n_levels, min_log_scale,
    C: tl.constexpr, CP: tl.constexpr, COUPLING: tl.constexpr,
    WIDE_HALF_WIDTH: tl.constexpr, FAR_TAIL: tl.constexpr, TINY_LOG_HALF_WIDTH: tl.constexpr,
    Z_LIMIT: tl.constexpr, WIDE_TANH: tl.constexpr,
):  # fmt: skip
    """``L_kc`` alone (unpacked here rather than indexed: older Triton cannot index tuples)."""
    (log_mass, _raw_ls, _inv_scale, _upper, _lower, _flip, _a, _b, _wide, _aw, _bw,
     _log_ratio, _one_minus_rho, _tiny, _safe_h, _neg_expm1, _h, _right, _left) = _component(
        params_ptr, tab_ptr, pbase, HW, m2, col, k,
        centre, upper_edge, lower_edge, first, last, loc_off, scale_off,
        n_levels, min_log_scale, C, CP, COUPLING,
        WIDE_HALF_WIDTH, FAR_TAIL, TINY_LOG_HALF_WIDTH, Z_LIMIT, WIDE_TANH,
    )  # fmt: skip
    return log_mass


@triton.jit
def _component_grads(
    first, last, inv_scale, upper, lower, flip, a, b, wide, aw, bw, log_ratio,
    one_minus_rho, tiny, safe_h, neg_expm1, h, right, left,
):  # fmt: skip
    """``dL/dmu`` and ``dL/dls`` (``ls`` the clamped log-scale), branch by branch.

    With standardised edges ``u = (e_+ - mu) / s`` and ``l = (e_- - mu) / s``
    (``du/dmu = -1/s``, ``du/d log s = -u``, alike for ``l``):

    * level 0, ``log sigma(u)``: ``d/du = sigma(-u)``;
    * level ``bins - 1``, ``log sigma(-l)``: ``d/dl = -sigma(l)``;
    * middle bins, folded to ``a = u, b = l`` (or ``a = -l, b = -u`` when ``u + l < 0``):
      the wide form ``log sigma(a) + log(1 - rho)``, ``rho = sigma(b) / sigma(a)``, has
      ``d/da = sigma(-a) / (1 - rho)``, ``d/db = -rho sigma(-b) / (1 - rho)``; the narrow form
      ``log sinh(h) - log 2 - log cosh(a/2) - log cosh(b/2)`` has ``d/da = -tanh(a/2) / 2``,
      ``d/db = -tanh(b/2) / 2`` and, through ``h = exp(-log s) / n``,
      ``d/d log s = -h coth(h)`` (``-1`` where ``h`` is tiny and ``log sinh h = log h``);
    * a saturated bin (``right``: ``[Z, Z + 2h]``, ``left``: ``[-Z - 2h, -Z]``) depends on the
      log-scale only through its width: ``d u/d log s = -2h`` (right), ``d l/d log s = 2h``
      (left), and not on ``mu``.
    """
    d_a = tl.where(wide, _sigmoid(-aw) / one_minus_rho, -0.5 * _tanh(a / 2.0))
    d_b = tl.where(
        wide, -tl.exp(log_ratio) * _sigmoid(-bw) / one_minus_rho, -0.5 * _tanh(b / 2.0)
    )
    # Narrow branch through h = exp(-ls) / n: d log sinh(h) / d ls = -h coth(h), or -1 if tiny.
    h_coth = safe_h * (1.0 + tl.exp(-2.0 * safe_h)) / neg_expm1
    d_ls_h = tl.where(wide, 0.0, tl.where(tiny, -1.0, -h_coth))
    sign = tl.where(flip, -1.0, 1.0)
    d_upper = tl.where(first, _sigmoid(-upper), tl.where(last, 0.0, tl.where(flip, d_b, d_a) * sign))
    d_lower = tl.where(first, 0.0, tl.where(last, -_sigmoid(lower), tl.where(flip, d_a, d_b) * sign))
    d_ls_h = tl.where(first | last, 0.0, d_ls_h)
    d_mu = tl.where(right | left, 0.0, -(d_upper + d_lower) * inv_scale)
    d_edges = tl.where(
        right, -2.0 * h * d_upper, tl.where(left, 2.0 * h * d_lower, -upper * d_upper - lower * d_lower)
    )
    return d_mu, d_ls_h + d_edges


@triton.jit
def _geometry(value_ptr, tab_ptr, b, s, pmask, HW, n_levels, C: tl.constexpr, CP: tl.constexpr):
    """Channel index, masks, value pointers and the bin geometry of the program's pixels."""
    col = tl.arange(0, CP)
    cmask = col < C
    m2 = pmask[:, None] & cmask[None, :]
    vptr = (b * C * HW + s)[:, None] + col[None, :].to(tl.int64) * HW  # value[b, c, s]
    level = tl.load(value_ptr + vptr, mask=m2, other=0).to(tl.float32)
    # Bin centres and edges, each rounded once from an exact integer numerator (as eager;
    # the numerators are below 2^24, so exact in float32). ``n_levels`` = bins - 1, a float.
    centre = (2.0 * level - n_levels) / n_levels
    upper_edge = (2.0 * level - (n_levels - 1.0)) / n_levels
    lower_edge = (2.0 * level - (n_levels + 1.0)) / n_levels
    first = level == 0.0
    last = level == n_levels
    loc_off = tl.load(tab_ptr + col, mask=cmask, other=0)
    scale_off = tl.load(tab_ptr + CP + col, mask=cmask, other=0)
    return col, m2, vptr, centre, upper_edge, lower_edge, first, last, loc_off, scale_off




# The arguments every pass over the components shares, in this order (Triton functions take
# no structures): the pointers and pixel geometry, then the compile-time constants.
@triton.jit
def _running_top(
    params_ptr, tab_ptr, pbase, HW, m2, col, log_w, kcol,
    centre, upper_edge, lower_edge, first, last, loc_off, scale_off,
    n_levels, min_log_scale,
    C: tl.constexpr, CP: tl.constexpr, K: tl.constexpr, COUPLING: tl.constexpr,
    BLOCK: tl.constexpr,
    WIDE_HALF_WIDTH: tl.constexpr, FAR_TAIL: tl.constexpr, TINY_LOG_HALF_WIDTH: tl.constexpr,
    Z_LIMIT: tl.constexpr, WIDE_TANH: tl.constexpr,
):  # fmt: skip
    """``top = max_k v_kc``, ``(BLOCK, CP)``: the same maximum as the forward kernel's (the
    same ``v``, the same ``maximum``), without its sums."""
    top = tl.full([BLOCK, CP], float("-inf"), tl.float32)
    for k in range(K):
        log_mass = _log_mass(
            params_ptr, tab_ptr, pbase, HW, m2, col, k,
            centre, upper_edge, lower_edge, first, last, loc_off, scale_off,
            n_levels, min_log_scale, C, CP, COUPLING,
            WIDE_HALF_WIDTH, FAR_TAIL, TINY_LOG_HALF_WIDTH, Z_LIMIT, WIDE_TANH,
        )  # fmt: skip
        top = tl.maximum(top, _column(log_w, kcol, k)[:, None] + _exclusive_cumsum(log_mass, col, C))
    return top


@triton.jit
def _normalisers(
    params_ptr, tab_ptr, pbase, HW, m2, col, log_w, kcol,
    centre, upper_edge, lower_edge, first, last, loc_off, scale_off,
    n_levels, min_log_scale, top,
    C: tl.constexpr, CP: tl.constexpr, K: tl.constexpr, COUPLING: tl.constexpr,
    BLOCK: tl.constexpr,
    WIDE_HALF_WIDTH: tl.constexpr, FAR_TAIL: tl.constexpr, TINY_LOG_HALF_WIDTH: tl.constexpr,
    Z_LIMIT: tl.constexpr, WIDE_TANH: tl.constexpr,
):  # fmt: skip
    """Both normalisers against the final ``top``: ``log s_v = logsumexp_k(v_kc - top)`` and
    ``(peak, log s_y)`` with ``peak + log s_y = logsumexp_k(v_kc - top + L_kc)``, from the very
    values ``_write_gradients`` recomputes (the first pass of the lean backward; the forward's
    sums, formed against the running maximum, are not enough: see ``lean.py``)."""
    s_v = tl.zeros([BLOCK, CP], tl.float32)
    peak = tl.full([BLOCK, CP], float("-inf"), tl.float32)
    s_y = tl.zeros([BLOCK, CP], tl.float32)
    for k in range(K):
        log_mass = _log_mass(
            params_ptr, tab_ptr, pbase, HW, m2, col, k,
            centre, upper_edge, lower_edge, first, last, loc_off, scale_off,
            n_levels, min_log_scale, C, CP, COUPLING,
            WIDE_HALF_WIDTH, FAR_TAIL, TINY_LOG_HALF_WIDTH, Z_LIMIT, WIDE_TANH,
        )  # fmt: skip
        centred = (_column(log_w, kcol, k)[:, None] + _exclusive_cumsum(log_mass, col, C)) - top
        y = centred + log_mass
        s_v = s_v + tl.exp(centred)
        new_peak = tl.maximum(peak, y)
        s_y = s_y * tl.exp(peak - new_peak) + tl.exp(y - new_peak)
        peak = new_peak
    return tl.log(s_v), peak, tl.log(s_y)


@triton.jit
def _write_gradients(
    params_ptr, tab_ptr, pbase, HW, m2, col, log_w, kcol,
    centre, upper_edge, lower_edge, first, last, loc_off, scale_off,
    n_levels, min_log_scale, top, log_s_v, peak, log_s_y, g, grad_ptr, pmask,
    C: tl.constexpr, CP: tl.constexpr, K: tl.constexpr, COUPLING: tl.constexpr,
    BLOCK: tl.constexpr, KP: tl.constexpr,
    WIDE_HALF_WIDTH: tl.constexpr, FAR_TAIL: tl.constexpr, TINY_LOG_HALF_WIDTH: tl.constexpr,
    Z_LIMIT: tl.constexpr, WIDE_TANH: tl.constexpr,
):  # fmt: skip
    """Gradient of ``sum(g * out)`` with respect to every raw parameter, written to ``grad``
    (``B x P x H x W``, every channel): posteriors before (``q``) and after (``r``) each
    channel from ``_normalisers``' results, then the chain rule (see ``lean.py``). ``g`` is
    ``0`` in padding columns and at masked pixels."""
    d_log_w = tl.zeros([BLOCK, KP], tl.float32)
    for k in range(K):
        (log_mass, raw_ls, inv_scale, upper, lower, flip, a, bb, wide, aw, bw, log_ratio,
         one_minus_rho, tiny, safe_h, neg_expm1, h, right, left) = _component(
            params_ptr, tab_ptr, pbase, HW, m2, col, k,
            centre, upper_edge, lower_edge, first, last, loc_off, scale_off,
            n_levels, min_log_scale, C, CP, COUPLING,
            WIDE_HALF_WIDTH, FAR_TAIL, TINY_LOG_HALF_WIDTH, Z_LIMIT, WIDE_TANH,
        )  # fmt: skip
        d_mu, d_ls = _component_grads(
            first, last, inv_scale, upper, lower, flip, a, bb, wide, aw, bw, log_ratio,
            one_minus_rho, tiny, safe_h, neg_expm1, h, right, left,
        )  # fmt: skip
        centred = (_column(log_w, kcol, k)[:, None] + _exclusive_cumsum(log_mass, col, C)) - top
        y = centred + log_mass
        before = tl.exp(centred - log_s_v)  # q_kc
        after = tl.exp((y - peak) - log_s_y)  # r_kc
        g_v = g * (after - before)  # d out_c / d v_kc, times g_c
        d_log_w = tl.where(kcol[None, :] == k, tl.sum(g_v, axis=1)[:, None], d_log_w)
        # L_kc enters out_c directly and every later channel's v_kc'.
        d_mass = g * after + _strict_suffix_sum(g_v, col, C)
        d_mu = d_mass * d_mu
        # Below the clamp the raw log-scale gets no gradient (as clamp's backward).
        d_ls = tl.where(raw_ls >= min_log_scale, d_mass * d_ls, 0.0)
        tl.store(grad_ptr + pbase[:, None] + (scale_off + k)[None, :].to(tl.int64) * HW,
                 d_ls, mask=m2)  # fmt: skip
        tl.store(grad_ptr + pbase[:, None] + (loc_off + k)[None, :].to(tl.int64) * HW,
                 d_mu, mask=m2)  # fmt: skip
        if COUPLING:
            # mu_c = loc + sum_j tanh(alpha_cj) x_j: d alpha_cj = d mu_c x_j (1 - tanh^2).
            for j in tl.static_range(C - 1):
                off = tl.load(tab_ptr + 2 * CP + col * CP + j, mask=col < C, other=-1)
                ptr = pbase[:, None] + (off + k)[None, :].to(tl.int64) * HW
                has = m2 & (off >= 0)[None, :]
                t = _coupling_tanh(tl.load(params_ptr + ptr, mask=has, other=0.0), WIDE_TANH)
                d_alpha = d_mu * _column(centre, col, j)[:, None] * (1.0 - t * t)
                tl.store(grad_ptr + ptr, d_alpha, mask=has)
    # Through log_softmax: d logits = d lw - softmax * sum_k d lw.
    d_logits = d_log_w - tl.exp(log_w) * tl.sum(d_log_w, axis=1)[:, None]
    kmask = kcol < K
    tl.store(
        grad_ptr + pbase[:, None] + kcol[None, :].to(tl.int64) * HW,
        d_logits,
        mask=pmask[:, None] & kmask[None, :],
    )


@triton.jit
def dlm_forward_kernel(
    params_ptr, value_ptr, tab_ptr, out_ptr, top_ptr,
    N, HW, P, n_levels, min_log_scale,
    C: tl.constexpr, CP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
    COUPLING: tl.constexpr, BLOCK: tl.constexpr,
    WIDE_HALF_WIDTH: tl.constexpr, FAR_TAIL: tl.constexpr, TINY_LOG_HALF_WIDTH: tl.constexpr,
    Z_LIMIT: tl.constexpr, WIDE_TANH: tl.constexpr,
):  # fmt: skip
    """``out[b, c, s] = log p(x_c | x_<c)`` and ``top[b, c, s] = max_k v_kc``.

    ``out_c = logsumexp_k(v_kc + L_kc) - logsumexp_k(v_kc)``, both online over ``k`` with
    ``L`` added to ``v - top`` (see ``lean.py``: keeps precision when ``v ~ -1e7``): one pass.
    """
    pmask, b, s = _pixels(tl.program_id(0), N, HW, BLOCK)
    pbase = b * P * HW + s  # params[b, 0, s]
    col, m2, vptr, centre, upper_edge, lower_edge, first, last, loc_off, scale_off = _geometry(
        value_ptr, tab_ptr, b, s, pmask, HW, n_levels, C, CP
    )
    log_w, kcol = _log_weights(params_ptr, pbase, pmask, HW, K, KP)
    top = tl.full([BLOCK, CP], float("-inf"), tl.float32)
    peak = tl.full([BLOCK, CP], float("-inf"), tl.float32)
    s_v = tl.zeros([BLOCK, CP], tl.float32)
    s_y = tl.zeros([BLOCK, CP], tl.float32)
    for k in range(K):
        log_mass = _log_mass(
            params_ptr, tab_ptr, pbase, HW, m2, col, k,
            centre, upper_edge, lower_edge, first, last, loc_off, scale_off,
            n_levels, min_log_scale, C, CP, COUPLING,
            WIDE_HALF_WIDTH, FAR_TAIL, TINY_LOG_HALF_WIDTH, Z_LIMIT, WIDE_TANH,
        )  # fmt: skip
        v = _column(log_w, kcol, k)[:, None] + _exclusive_cumsum(log_mass, col, C)
        new_top = tl.maximum(top, v)
        y = (v - new_top) + log_mass  # L added to a moderate number
        shift = top - new_top  # <= 0 (-inf at k = 0, where nothing was kept)
        s_v = s_v * tl.exp(shift) + tl.exp(v - new_top)
        peak = peak + shift
        new_peak = tl.maximum(peak, y)
        s_y = s_y * tl.exp(peak - new_peak) + tl.exp(y - new_peak)
        peak = new_peak
        top = new_top
    out = (peak + tl.log(s_y)) - tl.log(s_v)
    tl.store(out_ptr + vptr, out, mask=m2)
    tl.store(top_ptr + vptr, top, mask=m2)


@triton.jit
def dlm_backward_kernel(
    params_ptr, value_ptr, tab_ptr, top_ptr, grad_out_ptr, grad_ptr,
    N, HW, P, n_levels, min_log_scale,
    C: tl.constexpr, CP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
    COUPLING: tl.constexpr, BLOCK: tl.constexpr,
    WIDE_HALF_WIDTH: tl.constexpr, FAR_TAIL: tl.constexpr, TINY_LOG_HALF_WIDTH: tl.constexpr,
    Z_LIMIT: tl.constexpr, WIDE_TANH: tl.constexpr,
):  # fmt: skip
    """Gradient of ``sum(grad_out * out)`` with respect to every raw parameter, written to
    ``grad`` (``B x P x H x W``, every channel of it): two passes over the components."""
    pmask, b, s = _pixels(tl.program_id(0), N, HW, BLOCK)
    pbase = b * P * HW + s
    col, m2, vptr, centre, upper_edge, lower_edge, first, last, loc_off, scale_off = _geometry(
        value_ptr, tab_ptr, b, s, pmask, HW, n_levels, C, CP
    )
    log_w, kcol = _log_weights(params_ptr, pbase, pmask, HW, K, KP)
    top = tl.load(top_ptr + vptr, mask=m2, other=0.0)
    g = tl.load(grad_out_ptr + vptr, mask=m2, other=0.0)  # 0 in padding columns
    log_s_v, peak, log_s_y = _normalisers(
        params_ptr, tab_ptr, pbase, HW, m2, col, log_w, kcol,
        centre, upper_edge, lower_edge, first, last, loc_off, scale_off,
        n_levels, min_log_scale, top, C, CP, K, COUPLING, BLOCK,
        WIDE_HALF_WIDTH, FAR_TAIL, TINY_LOG_HALF_WIDTH, Z_LIMIT, WIDE_TANH,
    )  # fmt: skip
    _write_gradients(
        params_ptr, tab_ptr, pbase, HW, m2, col, log_w, kcol,
        centre, upper_edge, lower_edge, first, last, loc_off, scale_off,
        n_levels, min_log_scale, top, log_s_v, peak, log_s_y, g, grad_ptr, pmask,
        C, CP, K, COUPLING, BLOCK, KP,
        WIDE_HALF_WIDTH, FAR_TAIL, TINY_LOG_HALF_WIDTH, Z_LIMIT, WIDE_TANH,
    )  # fmt: skip


@triton.jit
def dlm_forward_grad_kernel(
    params_ptr, value_ptr, tab_ptr, out_ptr, top_ptr, grad_ptr,
    N, HW, P, n_levels, min_log_scale,
    C: tl.constexpr, CP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
    COUPLING: tl.constexpr, BLOCK: tl.constexpr,
    WIDE_HALF_WIDTH: tl.constexpr, FAR_TAIL: tl.constexpr, TINY_LOG_HALF_WIDTH: tl.constexpr,
    Z_LIMIT: tl.constexpr, WIDE_TANH: tl.constexpr,
):  # fmt: skip
    """Forward with gradient: ``out`` and ``top`` as ``dlm_forward_kernel``, and in ``grad``
    the gradient of ``sum(out)`` (upstream gradient 1 at every sub-pixel) with respect to
    every raw parameter, in one launch.

    Three passes over the components, the same work as forward + backward: the maximum
    ``top`` first, then both normalisers against it (``out`` from them, so that it is
    normalised exactly as the posteriors are), then the gradients. What it saves is the
    second launch, ``top``'s round trip through memory and the read of the upstream
    gradient; the parameters are read from memory by one program, its later passes finding
    them in cache.
    """
    pmask, b, s = _pixels(tl.program_id(0), N, HW, BLOCK)
    pbase = b * P * HW + s
    col, m2, vptr, centre, upper_edge, lower_edge, first, last, loc_off, scale_off = _geometry(
        value_ptr, tab_ptr, b, s, pmask, HW, n_levels, C, CP
    )
    log_w, kcol = _log_weights(params_ptr, pbase, pmask, HW, K, KP)
    top = _running_top(
        params_ptr, tab_ptr, pbase, HW, m2, col, log_w, kcol,
        centre, upper_edge, lower_edge, first, last, loc_off, scale_off,
        n_levels, min_log_scale, C, CP, K, COUPLING, BLOCK,
        WIDE_HALF_WIDTH, FAR_TAIL, TINY_LOG_HALF_WIDTH, Z_LIMIT, WIDE_TANH,
    )  # fmt: skip
    log_s_v, peak, log_s_y = _normalisers(
        params_ptr, tab_ptr, pbase, HW, m2, col, log_w, kcol,
        centre, upper_edge, lower_edge, first, last, loc_off, scale_off,
        n_levels, min_log_scale, top, C, CP, K, COUPLING, BLOCK,
        WIDE_HALF_WIDTH, FAR_TAIL, TINY_LOG_HALF_WIDTH, Z_LIMIT, WIDE_TANH,
    )  # fmt: skip
    tl.store(out_ptr + vptr, (peak + log_s_y) - log_s_v, mask=m2)
    tl.store(top_ptr + vptr, top, mask=m2)
    g = tl.where(m2, 1.0, 0.0)  # 0 in padding columns and at masked pixels
    _write_gradients(
        params_ptr, tab_ptr, pbase, HW, m2, col, log_w, kcol,
        centre, upper_edge, lower_edge, first, last, loc_off, scale_off,
        n_levels, min_log_scale, top, log_s_v, peak, log_s_y, g, grad_ptr, pmask,
        C, CP, K, COUPLING, BLOCK, KP,
        WIDE_HALF_WIDTH, FAR_TAIL, TINY_LOG_HALF_WIDTH, Z_LIMIT, WIDE_TANH,
    )  # fmt: skip
