"""Statistical top-k: a linear-time, sort-free top-k along the last dim (Spark Transformer, §1 of the spec).

    theta = mean(x) + std(x) * ndtri(1 - k/n)      population std, fp32 statistics
    stat_topk(x)     = relu(x - theta)             soft threshold (Spark FFN)
    stat_topk_inf(x) = x if x > theta else -inf    attention form (feeds a softmax)

With a validity ``mask`` the statistics use only the valid entries of each row and invalid entries never survive.
A row with at most k valid entries keeps all of them (theta = -inf). ``exact_topk`` / ``exact_topk_inf`` are the
sort-based baselines (``torch.topk``) with the same interface.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# var below this is treated as zero: keeps 1/std finite on constant rows without changing any real value.
_VAR_FLOOR = 1e-30


def _target_fraction(k: int | float, n_valid: torch.Tensor) -> torch.Tensor:
    """Per-row target fraction; ``k`` is a count (int) or a fraction of the row's valid entries (float in (0, 1])."""
    if isinstance(k, bool):
        raise TypeError("k must be an int count or a float fraction, not bool")
    if isinstance(k, int):
        if k < 0:
            raise ValueError(f"k={k}: a count must be >= 0")
        return k / n_valid.clamp_min(1).to(torch.float64)
    if not 0.0 < float(k) <= 1.0:
        raise ValueError(f"k={k}: a fraction must be in (0, 1]; pass an int for a count")
    return torch.full_like(n_valid, float(k), dtype=torch.float64)


def _row_stats(x: torch.Tensor, mask: torch.Tensor | None):
    """Per-row mean, population variance and valid count (keepdim), in fp32 (fp64 for fp64 input).

    Two plain reductions (sum and sum of squares) instead of ``var_mean``, which is ~10x slower on CPU; the
    cancellation in E[x^2] - mean^2 only matters when |mean| / std > ~1e3, far outside scores seen here."""
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
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
    """theta = mean + std * ndtri(1 - f); -inf where the target keeps every valid entry. Also returns z, std."""
    frac = _target_fraction(k, n)
    z = torch.special.ndtri((1.0 - frac).clamp(1e-12, 1.0 - 1e-12)).to(mean.dtype)
    std = var.clamp_min(_VAR_FLOOR).sqrt()
    theta = torch.where(frac >= 1.0, torch.full_like(mean, float("-inf")), mean + std * z)
    return theta, z, std


def stat_threshold(x: torch.Tensor, k: int | float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The per-row threshold theta, shape ``x.shape[:-1] + (1,)``, fp32 (fp64 for fp64 input), no gradient.

    Rows whose target keeps every valid entry get ``-inf``. ``mask`` (bool, broadcastable to x) marks valid entries.
    """
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
    _target_fraction(k, torch.ones(1))  # validate k up front
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
