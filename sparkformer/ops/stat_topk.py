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

# var below this is treated as zero: keeps d sqrt(var) finite on constant rows without changing any real value.
_VAR_FLOOR = 1e-30


def _target_fraction(k: int | float, n_valid: torch.Tensor, n: int) -> torch.Tensor:
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


def stat_threshold(
    x: torch.Tensor,
    k: int | float,
    mask: torch.Tensor | None = None,
    detach_threshold: bool = False,
) -> torch.Tensor:
    """The per-row threshold theta, shape ``x.shape[:-1] + (1,)``, fp32 (or fp64 for fp64 input).

    Rows whose target keeps every valid entry get ``-inf``. ``mask`` (bool, broadcastable to x) marks valid entries.
    """
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.to(stat_dtype)
    n = x.shape[-1]
    if mask is None:
        var, mean = torch.var_mean(xs, dim=-1, keepdim=True, correction=0)
        n_valid = torch.full(mean.shape, n, device=x.device, dtype=torch.float64)
    else:
        m = mask.expand_as(x)
        cnt = m.sum(-1, keepdim=True)
        denom = cnt.clamp_min(1).to(stat_dtype)
        xm = torch.where(m, xs, torch.zeros((), dtype=stat_dtype, device=x.device))
        mean = xm.sum(-1, keepdim=True) / denom
        dev = torch.where(m, xs - mean, torch.zeros((), dtype=stat_dtype, device=x.device))
        var = (dev * dev).sum(-1, keepdim=True) / denom
        n_valid = cnt.to(torch.float64)
    frac = _target_fraction(k, n_valid, n)
    keep_all = frac >= 1.0
    z = torch.special.ndtri((1.0 - frac).clamp(1e-12, 1.0 - 1e-12)).to(stat_dtype)
    theta = mean + var.clamp_min(_VAR_FLOOR).sqrt() * z
    theta = torch.where(keep_all, torch.full_like(theta, float("-inf")), theta)
    return theta.detach() if detach_threshold else theta


def stat_topk(
    x: torch.Tensor,
    k: int | float,
    mask: torch.Tensor | None = None,
    detach_threshold: bool = False,
) -> torch.Tensor:
    """Soft-threshold statistical top-k: ``relu(x - theta)`` (survivors are shifted down by theta).

    A row that keeps everything (at most k valid entries) is passed through unshifted; invalid entries become 0.
    Output has x's dtype; the statistics are computed in fp32.
    """
    theta = stat_threshold(x, k, mask, detach_threshold)
    finite = torch.isfinite(theta)
    shifted = x - torch.where(finite, theta, torch.zeros_like(theta)).to(x.dtype)
    out = torch.where(finite, F.relu(shifted), x)
    if mask is not None:
        out = out.masked_fill(~mask, 0)
    return out


def stat_topk_inf(
    x: torch.Tensor,
    k: int | float,
    mask: torch.Tensor | None = None,
    detach_threshold: bool = False,
) -> torch.Tensor:
    """Attention-form statistical top-k: entries above theta keep their value, the rest (and invalid ones) -> -inf.

    The comparison selects; gradients flow to the kept values (theta only decides membership).
    """
    theta = stat_threshold(x, k, mask, detach_threshold=True)
    keep = x.to(theta.dtype) > theta
    if mask is not None:
        keep = keep & mask
    return x.masked_fill(~keep, float("-inf"))


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
