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
tested against it) means this function. Its numerics:

- statistics in fp32 (fp64 for fp64 input), whatever x's dtype; z rounded to that dtype; population std;
- one pass of two reductions, sum(x) and sum(x^2) (``var_mean`` is ~10x slower on CPU), var = E[x^2] - mean^2
  clamped at 0 and no floor, so a constant row whose squares are exact (zeros, say) gets theta = its value and
  nothing is above it (as in the C++ and Triton kernels and gemma3n);
- the cancellation in E[x^2] - mean^2 grows as (mean / std)^2: against a float64 two-pass theta the error is
  ~1e-6 * std for |mean| <= std, ~6e-5 * std at |mean| = 10 std, ~2e-4 * std at 30 std (``test_stat_topk``).
  So it is exact enough (inside the kernel tests' 1e-4 * std boundary tolerance) while |mean| <= ~10 std; a row
  with a larger common offset loses digits and should be centred first. At the far end, a constant row whose
  squares round leaves a std of ~3e-4 * |value| (so theta = value +- that * |z|).
- 1-D unmasked input (the batch-1 decode hot path) takes a shortcut with the same two reductions and no tensor
  bookkeeping (z cached per fraction); it returns the same bits (tested).

The kernels that compute theta themselves, each tested against ``stat_threshold`` (selections equal except for
entries within 1e-4 * std of theta; the C++ theta itself, through a test hook, to ``THETA_TOL`` * std on rows with
|mean| <= 2 std):

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

import torch
import torch.nn.functional as F

__all__ = ["THETA_TOL", "achieved_count", "exact_topk", "exact_topk_inf", "stat_threshold", "stat_topk",
           "stat_topk_inf", "stat_z", "stat_z_table"]

# var below this is treated as zero in the backward: keeps 1/std finite on constant rows.
_VAR_FLOOR = 1e-30
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


def _check_k(k: int | float) -> None:
    """``k`` is a count (int >= 0) or a fraction of the row's valid entries (float in (0, 1])."""
    if isinstance(k, bool):
        raise TypeError("k must be an int count or a float fraction, not bool")
    if isinstance(k, int):
        if k < 0:
            raise ValueError(f"k={k}: a count must be >= 0")
    elif not 0.0 < float(k) <= 1.0:
        raise ValueError(f"k={k}: a fraction must be in (0, 1]; pass an int for a count")


def _target_fraction(k: int | float, n_valid: torch.Tensor) -> torch.Tensor:
    """Per-row target fraction (float64) for a count or fraction ``k`` over rows of ``n_valid`` valid entries."""
    _check_k(k)
    if isinstance(k, int):
        return k / n_valid.clamp_min(1).to(torch.float64)
    return torch.full_like(n_valid, float(k), dtype=torch.float64)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _row_stats(x: torch.Tensor, mask: torch.Tensor | None):
    """Per-row mean, population variance and valid count (keepdim), in fp32 (fp64 for fp64 input): one pass of
    two reductions, sum and sum of squares (see the module doc for when E[x^2] - mean^2 is exact enough)."""
    stat_dtype = _stat_dtype(x)
    xs = x.to(stat_dtype)
    if mask is None:
        n = torch.full(x.shape[:-1] + (1,), x.shape[-1], device=x.device, dtype=stat_dtype)
    else:
        mask = mask.expand_as(x)
        n = mask.sum(-1, keepdim=True).to(stat_dtype)
        xs = xs.masked_fill(~mask, 0)
    denom = n.clamp_min(1)
    mean = xs.sum(-1, keepdim=True) / denom
    sq = torch.linalg.vector_norm(xs, dim=-1, keepdim=True).square() / denom
    var = (sq - mean.square()).clamp_min(0)
    return mean, var, n


def _theta(mean, var, n, k):
    """theta = mean + std * z; -inf where the target keeps every valid entry. Also returns z and the std floored
    for division (the backward's; theta uses the unfloored std, so a row with var = 0 gets theta = its mean)."""
    frac = _target_fraction(k, n)
    z = torch.special.ndtri((1.0 - frac).clamp(_P_CLAMP, 1.0 - _P_CLAMP)).to(mean.dtype)  # = stat_z per row
    theta = torch.where(frac >= 1.0, torch.full_like(mean, float("-inf")), mean + var.sqrt() * z)
    return theta, z, var.clamp_min(_VAR_FLOOR).sqrt()


def _threshold_1d(x: torch.Tensor, k: int | float) -> torch.Tensor:
    """``stat_threshold`` of an unmasked 1-D x, shape (1,): the same two reductions and the same rounding, without
    the per-row tensors of the general path (about half its cost; the batch-1 decode hot path)."""
    _check_k(k)
    n = x.shape[0]
    frac = k / n if isinstance(k, int) else float(k)
    stat_dtype = _stat_dtype(x)
    if frac >= 1.0:
        return torch.full((1,), float("-inf"), dtype=stat_dtype, device=x.device)
    xs = x.detach().to(stat_dtype)
    mean = xs.sum(-1, keepdim=True) / n
    sq = torch.linalg.vector_norm(xs, dim=-1, keepdim=True).square() / n
    return mean + (sq - mean.square()).clamp_min(0).sqrt() * stat_z(frac)


def stat_threshold(x: torch.Tensor, k: int | float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The per-row threshold theta = mean + std * stat_z(k / n) over the valid entries of each row of x.

    Args:
        x: (..., n) scores, any float dtype.
        k: target count (int) or fraction of the valid entries (float in (0, 1]).
        mask: optional bool validity mask broadcastable to x (statistics over the valid entries only).

    Returns:
        theta, shape ``x.shape[:-1] + (1,)`` (so ``x > theta`` broadcasts; (1,) for 1-D x), fp32 (fp64 for fp64
        input), no gradient; ``-inf`` for rows whose target keeps every valid entry (k >= n valid, fraction 1).
        Numerics: see the module doc (fp32, population std, one-pass sum / sum of squares).
    """
    if mask is None and x.dim() == 1 and x.shape[0] > 0:
        return _threshold_1d(x, k)
    with torch.no_grad():
        mean, var, n = _row_stats(x, mask)
        return _theta(mean, var, n, k)[0]


class _StatTopK(torch.autograd.Function):
    """relu(x - theta) with a hand-written backward: two passes instead of autograd's chain through the stats.

    d theta / d x_j = (1/n + z (x_j - mean) / (n std)) on valid entries, so with S = sum_i g_i [y_i > 0]:
    grad_j = g_j [y_j > 0] - S (1/n + z (x_j - mean) / (n std))      (the second term is dropped when detached).
    """

    @staticmethod
    def forward(ctx, x, k, mask, detach_threshold):
        with torch.no_grad():
            mean, var, n = _row_stats(x, mask)
            theta, z, std = _theta(mean, var, n, k)
            keep_all = torch.isneginf(theta)
            shift = torch.where(keep_all, torch.zeros_like(theta), theta).to(x.dtype)
            y = (x - shift).clamp_min_(0)
            if bool(keep_all.any()):
                y = torch.where(keep_all, x, y)
            if mask is not None:
                y = y.masked_fill_(~mask.expand_as(x), 0)
        ctx.detach_threshold = detach_threshold
        ctx.save_for_backward(x, y, mask, mean, std, z, n, keep_all, var)
        return y

    @staticmethod
    def backward(ctx, g):
        x, y, mask, mean, std, z, n, keep_all, var = ctx.saved_tensors
        gy = g.masked_fill(y == 0, 0)
        if ctx.detach_threshold:
            return gy, None, None, None
        # rows that keep everything are not shifted: no threshold gradient there
        s = gy.sum(-1, keepdim=True, dtype=mean.dtype).masked_fill(keep_all, 0)
        b = s * z / (n.clamp_min(1) * std)
        b = b.masked_fill(var < _VAR_FLOOR, 0)  # std is clamped there: d std / d x = 0
        a = s / n.clamp_min(1) - b * mean
        grad = gy.sub_(a.to(g.dtype)).addcmul_(x, b.to(g.dtype), value=-1)
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
    """
    _check_k(k)  # validate k up front
    return _StatTopK.apply(x, k, mask, detach_threshold)


def stat_topk_inf(
    x: torch.Tensor,
    k: int | float,
    mask: torch.Tensor | None = None,
    detach_threshold: bool = False,
) -> torch.Tensor:
    """Attention-form statistical top-k: entries above theta keep their value, the rest (and invalid ones) -> -inf.

    The comparison selects; gradients flow to the kept values (theta only decides membership).
    """
    theta = stat_threshold(x, k, mask)
    if x.dtype != torch.float64:
        theta = theta.to(x.dtype)
    if mask is not None:  # invalid entries become -inf first: -inf > theta is false even for keep-all rows
        x = x.masked_fill(~mask, float("-inf"))
    return x.masked_fill(x <= theta, float("-inf"))


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
