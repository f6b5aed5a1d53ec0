"""Statistical top-k: a linear-time, sort-free top-k along the last dim (Spark Transformer, §1 of the spec).

    theta = mean(x) + std(x) * ndtri(1 - k/n)      population std, fp32 statistics
    stat_topk(x)     = relu(x - theta)             soft threshold (Spark FFN)
    stat_topk_inf(x) = x if x > theta else -inf    attention form (feeds a softmax)

With a validity ``mask`` the statistics use only the valid entries of each row and invalid entries never survive.
A row with at most k valid entries keeps all of them (theta = -inf). ``exact_topk`` / ``exact_topk_inf`` are the
sort-based baselines (``torch.topk``) with the same interface.

The threshold: one definition
-----------------------------
``stat_z(f)`` is z = ndtri(1 - f), in float64 with 1 - f clamped to [1e-12, 1 - 1e-12] (so |z| <= 7.03, finite for
every f); ``stat_z_table(k, L)`` is z(k / n) for every valid count n <= L (0 where n <= k), for kernels that read z
by n. ``stat_threshold(x, k, mask)`` is theta, and it is the reference: every other place that selects (the torch
decode, batched and prefill paths in ``sparkformer.ops`` call it; the fused kernels compute it themselves and are
tested against it) means this function. ``k`` is a count (any integer: int, numpy or 0-dim integer tensor) or a
fraction in (0, 1] (any real); ``x`` needs at least one dim (a 0-dim tensor is refused) and a floating dtype.

Non-finite entries, one rule for every form: the statistics are over the *finite* valid entries of a row (n is
their count), ``+inf`` is always kept, ``-inf`` and NaN are never kept (0 in the soft form, -inf in the attention
form), and no other entry of the row is affected by them.

Numerics (statistics in fp32, fp64 for fp64 input, whatever x's dtype; z rounded to that dtype; population std;
theta within 2e-6 std of a float64 two-pass theta of the same values, plus half an ulp of theta itself, at any
offset or scale: ``test_stat_topk``):

- the fast form, one pass of two torch reductions (sum(x) and sum(x^2); ``var_mean`` is ~10x slower on CPU) and
  var = E[x^2] - mean^2, is used for a row only where it cannot cancel: all entries finite, no square overflowing
  or underflowing (2^-100 <= E[x^2] < inf) and mean^2 <= 4 var (|mean| <= 2 std). The per-row arithmetic runs in
  numpy (IEEE like torch's elementwise ops; numpy's sqrt is correctly rounded, torch's fp32 CPU sqrt is not always),
  which for small row counts costs less than a dozen one-element torch ops.
- every other row goes the careful way: over its finite entries, scaled by a power of two (exact, so values near
  1e20 or 1e-30 neither overflow nor underflow), two passes about the mean with the correction term (the corrected
  two-pass algorithm), so a common offset costs nothing: randn + 1e4 keeps its ~8% (where the old one-pass form
  kept none; theta's own fp32 rounding, half of 1e-3, is then the largest error). On CPU only the rows that fail
  the check are recomputed; on other devices and under ``torch.compile`` every row goes the careful way, with no
  data-dependent branch (the same selections, tested).
- a constant row has std 0 and theta = its value, so nothing is above it (as in the C++ and Triton kernels and
  gemma3n), for any target.
- 1-D unmasked CPU input that is not fp64 (the batch-1 decode hot path) does the same arithmetic on numpy scalars
  (no tensor bookkeeping, z cached per fraction), about half the time of the old one-pass tensor form; it returns
  the same bits as the general path (tested).

The kernels that compute theta themselves, each tested against ``stat_threshold`` (selections equal except for
entries within 1e-4 * std of theta; the C++ theta itself, through a test hook, to ``THETA_TOL`` * std on rows with
|mean| <= 2 std, where both this function and the kernels are exact to ~1e-6 std):

- C++ (``csrc/ops.cpp``, every ISA): FFN decode, FFN prefill and attention over the plain key layout (or split
  across threads): two passes about the mean, fp32 lanes flushed into double every 1024 entries, theta in double
  rounded to fp32; z from its own ``ndtri`` (Acklam + one Halley step, equal to torch's to 1e-12).
  Attention over the blocked key layout, one kv head per thread: one pass, the sum and sum of squares accumulated
  by the scoring kernel itself (fp32 within 4 vectors of keys, double across), as here but in double.
- Triton (``triton_spark_ffn.py``, ``triton_spark_attn.py``): per-block (mean, M2) in fp32 combined by Chan's
  formula; z = ``stat_z(f)`` (FFN) or ``stat_z_table`` (attention, indexed by the valid count) rounded to fp32.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["THETA_TOL", "achieved_count", "exact_topk", "exact_topk_inf", "stat_threshold", "stat_topk",
           "stat_topk_inf", "stat_z", "stat_z_table"]

# std below this is treated as zero in the backward: keeps 1/std finite on constant rows.
_STD_FLOOR = 1e-15
# 1 - f is clamped to [_P_CLAMP, 1 - _P_CLAMP] before ndtri: z stays finite for f -> 0 and f -> 1.
_P_CLAMP = 1e-12
# How far (in units of the row's std) a kernel's theta may sit from ``stat_threshold`` on rows with
# |mean| <= 2 std: the tolerance the C++ threshold is tested to (both forms, every ISA; measured <= 6e-6).
THETA_TOL = 2e-5


@functools.lru_cache(maxsize=4096)
def stat_z(fraction: float) -> float:
    """z = ndtri(1 - fraction): theta = mean + std * z keeps ~fraction of a Gaussian row.

    Computed in float64 with 1 - fraction clamped to [1e-12, 1 - 1e-12] (|z| <= 7.03). A fraction >= 1 means
    "keep everything", which a threshold cannot say: callers return theta = -inf for it (as ``stat_threshold``
    does). Cached per fraction (a Python float), so a decode step pays nothing for it."""
    p = torch.tensor(1.0 - float(fraction), dtype=torch.float64).clamp(_P_CLAMP, 1.0 - _P_CLAMP)
    return float(torch.special.ndtri(p))


def stat_z_table(k: int, max_len: int, device=None) -> torch.Tensor:
    """fp32 table z[n] = stat_z(k / n) for valid counts n in [0, max_len], 0 where n <= k (keep-all rows).

    For kernels that learn n on the device (the Triton attention decode); each entry equals
    ``float32(stat_z(k / n))`` bit for bit, so the kernel's z is the reference's."""
    n = torch.arange(max_len + 1, dtype=torch.float64)
    p = (1.0 - k / n.clamp_min(1)).clamp(_P_CLAMP, 1.0 - _P_CLAMP)
    z = torch.where(n > k, torch.special.ndtri(p), torch.zeros_like(p))
    return z.to(torch.float32).to(device)


def _normalize_k(k) -> int | float:
    """``k`` as an int count (>= 0; any integer type) or a float fraction (in (0, 1]; any real type)."""
    t = type(k)
    if t is float:
        if 0.0 < k <= 1.0:
            return k
    elif t is int:
        if k >= 0:
            return k
    elif t is bool or t.__name__ == "bool_":
        raise TypeError("k must be an int count or a float fraction, not bool")
    else:
        try:
            k = operator.index(k)  # numpy / torch integers
        except TypeError:
            if not isinstance(k, (numbers.Real, torch.Tensor)):
                raise TypeError(f"k must be an int count or a float fraction, got {t.__name__}") from None
            try:
                k = float(k)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"k must be an int count or a float fraction, got {t.__name__}") from None
        return _normalize_k(k)
    if t is int:
        raise ValueError(f"k={k}: a count must be >= 0")
    raise ValueError(f"k={k}: a fraction must be in (0, 1]; pass an int for a count")


def _check_x(x: torch.Tensor, mask: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x is a 0-dim tensor: statistical top-k selects along the last dim, so x needs at least "
                         "one (e.g. x.reshape(1))")
    if not x.is_floating_point():
        raise ValueError(f"x has dtype {x.dtype}: statistical top-k needs a floating-point tensor")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        try:
            ok = torch.broadcast_shapes(mask.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x's shape {tuple(x.shape)}")


def _target_fraction(k: int | float, n_valid: torch.Tensor) -> torch.Tensor:
    """Per-row target fraction (float64) for a (normalized) count or fraction ``k`` over rows of ``n_valid``
    valid entries."""
    if isinstance(k, int):
        return k / n_valid.clamp_min(1).to(torch.float64)
    return torch.full_like(n_valid, float(k), dtype=torch.float64)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# A row takes the one-pass statistics only where they cannot cancel (module doc): mean^2 <= _COND * var, and
# _TINY <= E[x^2] < inf (no square under- or overflows).
_COND = 4.0
_TINY = 2.0 ** -100


def _careful_stats(xs: torch.Tensor, valid: torch.Tensor | None):
    """Per-row (mean, std, n) over the finite valid entries of xs (stat dtype; keepdim): each row scaled by a power
    of two (exact) so that its largest entry is below 1, then two passes about the mean with the correction term."""
    fin = torch.isfinite(xs)
    valid = fin if valid is None else valid & fin
    n = valid.sum(-1, keepdim=True).to(xs.dtype)
    denom = n.clamp_min(1)
    xv = xs.masked_fill(~valid, 0)
    _, e = torch.frexp(xv.abs().amax(-1, keepdim=True))
    scale = torch.ldexp(torch.ones_like(denom), -e.clamp(-100, 100))
    y = xv * scale
    m0 = y.sum(-1, keepdim=True) / denom
    d = (y - m0).masked_fill_(~valid, 0)
    s1 = d.sum(-1, keepdim=True)
    ss = torch.linalg.vector_norm(d, dim=-1, keepdim=True).square()
    mean = m0 + s1 / denom
    std = ((ss - s1 * s1 / denom) / denom).clamp_min(0).sqrt()
    return mean / scale, std / scale, n


def _theta(mean, std, n, k):
    """theta = mean + std * z (torch, keepdim rows); -inf where the target keeps every valid entry. Also returns z."""
    frac = _target_fraction(k, n)
    z = torch.special.ndtri((1.0 - frac).clamp(_P_CLAMP, 1.0 - _P_CLAMP)).to(mean.dtype)  # = stat_z per row
    return torch.where(frac >= 1.0, torch.full_like(mean, float("-inf")), mean + std * z), z


def _z_rows(k: int | float, n: np.ndarray, dtype) -> tuple:
    """(target fraction, z rounded to ``dtype``) per row of ``n`` valid entries (scalars for a fraction k);
    z = stat_z(fraction)."""
    if isinstance(k, int):
        frac = k / np.maximum(n, 1.0)
        p = torch.from_numpy(np.clip(1.0 - frac, _P_CLAMP, 1.0 - _P_CLAMP))
        return frac, torch.special.ndtri(p).numpy().astype(dtype)
    return k, dtype.type(stat_z(k))


def _cpu_parts(xs: torch.Tensor, mask: torch.Tensor | None, k: int | float) -> tuple:
    """(theta, mean, std, z, n, careful) for the rows of CPU ``xs`` (stat dtype): numpy arrays of shape (rows,) (z a
    scalar for a fraction k), n in float64.

    The one-pass statistics come from two torch reductions; the per-row arithmetic and the check of each row
    (module doc) run in numpy (IEEE, as torch's ops; numpy's sqrt is correctly rounded, torch's fp32 CPU sqrt is not
    always): cheaper than a dozen small torch ops, and the 1-D shortcut does the same on scalars. Rows that fail
    the check are recomputed by ``_careful_stats``."""
    L = xs.shape[-1]
    rows = xs.reshape(-1, L)
    mrows = None
    if mask is None:
        n = np.full(rows.shape[0], float(L))
        xm = rows
    else:
        mrows = mask.expand(xs.shape).reshape(-1, L)
        n = mrows.sum(-1).numpy().astype(np.float64)
        xm = rows.masked_fill(~mrows, 0)
    total = xm.sum(-1).numpy()
    q = torch.linalg.vector_norm(xm, dim=-1).numpy()
    dt = total.dtype
    frac, z = _z_rows(k, n, dt)
    with np.errstate(all="ignore"):
        denom = np.maximum(n, 1.0).astype(dt)
        mean = total / denom
        var = np.maximum(q * q / denom - mean * mean, dt.type(0))
        m64, v = mean.astype(np.float64), var.astype(np.float64)
        m2 = m64 * m64
        ok = np.isfinite(v) & (m2 <= _COND * v) & (v + m2 >= _TINY)
        if isinstance(k, int):
            ok |= frac >= 1.0  # keep-all rows: their statistics are not used
        std = np.sqrt(var)
        careful = not ok.all()
        if careful:
            bad = np.flatnonzero(~ok)
            idx = torch.from_numpy(bad)
            m_c, s_c, n_c = _careful_stats(rows.index_select(0, idx),
                                           None if mrows is None else mrows.index_select(0, idx))
            mean[bad], std[bad], n[bad] = m_c.numpy()[:, 0], s_c.numpy()[:, 0], n_c.numpy()[:, 0]
            frac, z = _z_rows(k, n, dt)
        theta = mean + std * z
        if isinstance(k, int):
            theta[frac >= 1.0] = -np.inf
    return theta, mean, std, z, n, careful


def _parts(x: torch.Tensor, mask: torch.Tensor | None, k: int | float, need_all: bool = True):
    """(theta, mean, std, z, n, careful) per row of x, as tensors of shape ``x.shape[:-1] + (1,)`` in the stat
    dtype (only theta unless ``need_all``); ``careful``: whether any row went the careful way (then it may hold
    non-finite entries)."""
    xs = x.detach().to(_stat_dtype(x))
    shape = x.shape[:-1] + (1,)
    if x.shape[-1] == 0 or (not isinstance(k, int) and k >= 1.0):  # every valid entry kept: no statistics needed
        zero = xs.new_zeros(shape)
        return torch.full_like(zero, float("-inf")), zero, zero, zero, zero, False
    if x.device.type != "cpu" or torch.compiler.is_compiling():  # no data-dependent branch: every row careful
        mean, std, n = _careful_stats(xs, None if mask is None else mask.expand_as(x))
        theta, z = _theta(mean, std, n, k)
        return theta, mean, std, z, n, True
    theta, mean, std, z, n, careful = _cpu_parts(xs, mask, k)
    if not need_all:
        return torch.from_numpy(theta).reshape(shape), None, None, None, None, careful
    z = np.full(theta.shape, z, dtype=theta.dtype) if np.ndim(z) == 0 else z
    return (*(torch.from_numpy(a.astype(theta.dtype, copy=False)).reshape(shape) for a in (theta, mean, std, z, n)),
            careful)


# The smallest double whose fp32 rounding overflows: an fp32 norm q with q * q >= this squares to inf in fp32.
_SQ_OVERFLOW = (2.0 - 2.0 ** -24) * 2.0 ** 127


def _threshold_1d(x: torch.Tensor, k: int | float) -> torch.Tensor:
    """``stat_threshold`` of an unmasked 1-D CPU x (not fp64), shape (1,), ``k`` normalized (the batch-1 decode hot
    path): ``_cpu_parts``'s arithmetic on numpy fp32 scalars instead of arrays, the same IEEE operations in the same
    order, so the same bits (tested)."""
    n = x.shape[0]
    frac = k / n if type(k) is int else k
    if frac >= 1.0:
        return torch.full((1,), float("-inf"), dtype=torch.float32)
    xs = x.detach() if x.dtype == torch.float32 else x.detach().float()
    total, q = xs.sum().item(), torch.linalg.vector_norm(xs).item()
    if math.isfinite(total) and q * q < _SQ_OVERFLOW:  # (q * q is exact in double) no fp32 overflow warnings below
        f = np.float32
        mean = f(total) / f(n)
        var = f(q) * f(q) / f(n) - mean * mean
        var = var if var > 0 else f(0.0)
        m2, v = float(mean) ** 2, float(var)
        if m2 <= _COND * v and v + m2 >= _TINY:
            return torch.tensor([float(mean + np.sqrt(var) * f(stat_z(frac)))], dtype=torch.float32)
    return torch.from_numpy(_cpu_parts(xs[None], None, k)[0])  # the careful way, as the general path


def stat_threshold(x: torch.Tensor, k: int | float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The per-row threshold theta = mean + std * stat_z(k / n) over the valid entries of each row of x.

    Args:
        x: (..., n) scores, any float dtype (at least one dim).
        k: target count (any integer) or fraction of the valid entries (any real in (0, 1]).
        mask: optional bool validity mask broadcastable to x (statistics over the valid entries only).

    Returns:
        theta, shape ``x.shape[:-1] + (1,)`` (so ``x > theta`` broadcasts; (1,) for 1-D x), fp32 (fp64 for fp64
        input), no gradient; ``-inf`` for rows whose target keeps every valid entry (k >= n valid, fraction 1).
        Numerics and non-finite entries: see the module doc (fp32, population std, statistics over the finite
        valid entries that do not cancel).
    """
    k = _normalize_k(k)
    if (mask is None and type(x) is torch.Tensor and x.dim() == 1 and x.shape[0] > 0 and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)):
        return _threshold_1d(x, k)
    _check_x(x, mask)
    with torch.no_grad():
        return _parts(x, mask, k, need_all=False)[0]


class _StatTopK(torch.autograd.Function):
    """relu(x - theta) with a hand-written backward: two passes instead of autograd's chain through the stats.

    d theta / d x_j = (1/n + z (x_j - mean) / (n std)) on valid entries, so with S = sum_i g_i [y_i > 0]:
    grad_j = g_j [y_j > 0] - S (1/n + z (x_j - mean) / (n std))      (the second term is dropped when detached).
    """

    @staticmethod
    def forward(ctx, x, k, mask, detach_threshold):
        with torch.no_grad():
            theta, mean, std0, z, n, careful = _parts(x, mask, k)
            keep_all = torch.isneginf(theta)
            shift = torch.where(keep_all, torch.zeros_like(theta), theta).to(x.dtype)
            y = (x - shift).clamp_min_(0)
            if bool(keep_all.any()):
                y = torch.where(keep_all, x, y)
            if mask is not None:
                y = y.masked_fill_(~mask.expand_as(x), 0)
            if careful:  # non-finite entries: +inf kept, -inf and NaN never
                y = y.nan_to_num_(nan=0.0, posinf=float("inf"), neginf=0.0)
        ctx.detach_threshold = detach_threshold
        ctx.careful = careful
        ctx.save_for_backward(x, y, mask, mean, std0.clamp_min(_STD_FLOOR), z, n, keep_all, std0)
        return y

    @staticmethod
    def backward(ctx, g):
        x, y, mask, mean, std, z, n, keep_all, std0 = ctx.saved_tensors
        gy = g.masked_fill(y == 0, 0)
        if ctx.detach_threshold:
            return gy, None, None, None
        # rows that keep everything are not shifted: no threshold gradient there
        s = gy.sum(-1, keepdim=True, dtype=mean.dtype).masked_fill(keep_all, 0)
        b = s * z / (n.clamp_min(1) * std)
        b = b.masked_fill(std0 < _STD_FLOOR, 0)  # std is clamped there: d std / d x = 0
        a = s / n.clamp_min(1) - b * mean
        grad = (gy.clone() if ctx.careful else gy).sub_(a.to(g.dtype)).addcmul_(x, b.to(g.dtype), value=-1)
        if ctx.careful:  # entries outside the statistics (non-finite) get no threshold term
            grad = torch.where(torch.isfinite(x), grad, gy)
        if mask is not None:
            grad = grad.masked_fill_(~mask.expand_as(x), 0)
        return grad, None, None, None


def stat_topk(
    x: torch.Tensor,
    k: int | float,
    mask: torch.Tensor | None = None,
    detach_threshold: bool = False,
) -> torch.Tensor:
    """Soft-threshold statistical top-k: ``relu(x - theta)`` (survivors are shifted down by theta).

    A row that keeps everything (at most k valid entries) is passed through unshifted; invalid entries become 0.
    Output has x's dtype; the statistics are computed in fp32. Gradients flow through theta unless detached.
    Non-finite entries: see the module doc (+inf kept, -inf and NaN become 0, statistics over finite entries).
    """
    k = _normalize_k(k)
    _check_x(x, mask)
    return _StatTopK.apply(x, k, mask, detach_threshold)


def stat_topk_inf(
    x: torch.Tensor,
    k: int | float,
    mask: torch.Tensor | None = None,
    detach_threshold: bool = False,
) -> torch.Tensor:
    """Attention-form statistical top-k: entries above theta keep their value, the rest (and invalid ones) -> -inf.

    The comparison selects; gradients flow to the kept values (theta only decides membership). Non-finite entries:
    +inf is kept, -inf and NaN become -inf (see the module doc).
    """
    theta = stat_threshold(x, k, mask)
    if x.dtype != torch.float64:
        theta = theta.to(x.dtype)
    if mask is not None:  # invalid entries become -inf first: -inf > theta is false even for keep-all rows
        x = x.masked_fill(~mask, float("-inf"))
    return torch.where(x > theta, x, float("-inf"))  # NaN > theta is false: never kept


# ---- exact baselines (sort-based) ---------------------------------------------------------------------------------
def _kth_largest(x: torch.Tensor, k: int, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None:
        x = x.masked_fill(~mask.expand_as(x), float("-inf"))
    return torch.topk(x, k, dim=-1, sorted=False).values.min(dim=-1, keepdim=True).values


def _count(k: int | float, n: int) -> int:
    return k if isinstance(k, int) else max(1, round(float(k) * n))


def exact_topk(x: torch.Tensor, k: int | float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact top-k masking with ``torch.topk``: keep the k largest values of each row, zero the rest.

    The baseline the paper's statistical top-k replaces (no shift; a hard mask)."""
    kk = _count(k, x.shape[-1])
    if kk >= x.shape[-1]:
        return x if mask is None else x.masked_fill(~mask, 0)
    kth = _kth_largest(x.detach(), kk, mask)
    keep = x >= kth
    if mask is not None:
        keep = keep & mask
    return x * keep


def exact_topk_inf(x: torch.Tensor, k: int | float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact top-k in attention form: the k largest valid entries keep their value, the rest -> -inf."""
    kk = _count(k, x.shape[-1])
    keep = torch.ones_like(x, dtype=torch.bool) if kk >= x.shape[-1] else x >= _kth_largest(x.detach(), kk, mask)
    if mask is not None:
        keep = keep & mask
    return x.masked_fill(~keep, float("-inf"))


def achieved_count(y: torch.Tensor, inf_form: bool = False) -> torch.Tensor:
    """Entries kept per row of a (soft or -inf form) top-k output."""
    return (torch.isfinite(y) if inf_form else y != 0).sum(-1)
