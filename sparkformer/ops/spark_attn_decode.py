"""Spark attention for one query position (batch-1 decode): reference, fast pure-PyTorch path, C++ op.

Cache layout (per layer). The query/key head dim D is split at r:

    kp: predictor half of the keys, feature-major, in one of two layouts:
        (n_kv, L_max // B, r, B)  *blocked* (recommended, B = KP_BLOCK = 64, any multiple of 64 works):
                                  each block of B keys is an (r, B) tile and the tiles are back to back,
                                  so scoring all keys is one forward stream with the partial sums in
                                  registers -- measured 1.4-1.6x faster scoring than the plain layout;
        (n_kv, r, L_max)          plain feature-major (one row per key feature).
        ``to_blocked`` / ``feature_major`` convert; writing key t of kv head g into a blocked cache is
        ``kp[g, t // B, :, t % B] = k[g, :r]``.
    kr: (n_kv, L_max, D - r)   other half of the keys, row-major
    v:  (n_kv, L_max, dv)      values, row-major
        Best as two views of one (n_kv, L_max, (D - r) + dv) buffer, so a kept key's other half and value
        are one contiguous run (~20% faster gathers than separate tensors). ``new_spark_cache`` allocates
        this recommended layout and ``spark_cache_write`` stores one position.

Math (shared spec, section 3), per query head h (GQA: head h reads kv head h // (n_heads // n_kv);
selection is per query head). Valid keys are positions [lo, length), lo = max(0, length - window)
(window None: lo = 0); n = length - lo.

    p_j   = scale * q[:r] . kp[:, j]                   (then cap * tanh(p_j / cap) if softcap)
    keep  = all n keys                                 if n <= k
          = {j : p_j > mean(p) + std(p) * ndtri(1 - k/n)}   otherwise: stat_topk.stat_threshold(p, k) over
                                                             the valid keys (population std)
            - hard cap: if more than k survive, keep the k largest p_j (ties -> the more recent key)
              and report `capped` for that head;
            - if none survives (only for degenerate scores, e.g. all equal), keep the k largest instead
              (same tie rule), `capped` stays False.
    w_j   = softmax_{keep}(p)_j * softplus(scale * q[r:] . kr[j])     (not renormalised)
    out   = sum_{j in keep} w_j v[j]

Contract of all three implementations: ``(out (n_heads, dv) in q's dtype, kept (n_heads,) int64,
capped (n_heads,) bool)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from sparkformer.ops import _extension
from sparkformer.ops.stat_topk import stat_threshold

__all__ = [
    "KP_BLOCK",
    "SparkCache",
    "feature_major",
    "new_spark_cache",
    "read_key_rows",
    "spark_cache_write",
    "write_key_rows",
    "to_blocked",
    "spark_attn_decode",
    "spark_attn_decode_reference",
    "spark_attn_decode_torch",
    "spark_attn_workspace",
    "valid_range",
]


KP_BLOCK = 64


def to_blocked(kp: torch.Tensor, block: int = KP_BLOCK) -> torch.Tensor:
    """(n_kv, r, L_max) -> the blocked layout (n_kv, L_max // block, r, block), a new contiguous tensor."""
    n_kv, r, l_max = kp.shape
    if block % 64 or l_max % block:
        raise ValueError(f"block must be a multiple of 64 dividing L_max={l_max}, got {block}")
    return kp.view(n_kv, r, l_max // block, block).permute(0, 2, 1, 3).contiguous()


def feature_major(kp: torch.Tensor) -> torch.Tensor:
    """Either layout -> (n_kv, r, L_max) (a view for the plain layout, a copy for the blocked one)."""
    if kp.dim() == 3:
        return kp
    n_kv, n_blocks, r, block = kp.shape
    return kp.permute(0, 2, 1, 3).reshape(n_kv, r, n_blocks * block)


def _kp_range(kp: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """(n_kv, r, hi - lo): the predictor half of keys [lo, hi), from either layout (copies only the blocks
    needed when blocked)."""
    if kp.dim() == 3:
        return kp[:, :, lo:hi]
    block = kp.shape[3]
    b0, b1 = lo // block, -(-hi // block)
    return feature_major(kp[:, b0:b1])[:, :, lo - b0 * block : hi - b0 * block]


class SparkCache(NamedTuple):
    """One layer's Spark attention cache: kp (either layout), kr and v (usually views of one buffer)."""

    kp: torch.Tensor
    kr: torch.Tensor
    v: torch.Tensor


def _round_to_block(max_len: int, block: int) -> int:
    if block % 64:
        raise ValueError(f"block must be a multiple of 64, got {block}")
    return -(-max_len // block) * block


def new_spark_cache(n_kv: int, max_len: int, head_dim: int, r: int, dv: int | None = None,
                    dtype: torch.dtype = torch.float32, block: int | None = KP_BLOCK) -> SparkCache:
    """Zeroed cache in the fastest decode layout: kp blocked (``block=None``: plain feature-major), kr and v
    views of one (n_kv, L, (head_dim - r) + dv) buffer. ``max_len`` is rounded up to a multiple of ``block``."""
    dv = head_dim if dv is None else dv
    if block:
        max_len = _round_to_block(max_len, block)
        kp = torch.zeros(n_kv, max_len // block, r, block, dtype=dtype)
    else:
        kp = torch.zeros(n_kv, r, max_len, dtype=dtype)
    krv = torch.zeros(n_kv, max_len, head_dim - r + dv, dtype=dtype)
    return SparkCache(kp, krv[..., : head_dim - r], krv[..., head_dim - r :])


def write_key_rows(keys: torch.Tensor, pos0: int, rows: torch.Tensor) -> None:
    """Store rows (n_kv, T, width) at positions pos0.. of keys kept blocked (n_kv, L // B, width, B) or
    feature-major (n_kv, width, L)."""
    T = rows.shape[1]
    if keys.dim() == 4:  # index (block, offset) per position
        pos = torch.arange(pos0, pos0 + T)
        B = keys.shape[3]
        keys[:, pos // B, :, pos % B] = rows.transpose(0, 1)
    else:
        keys[:, :, pos0: pos0 + T] = rows.transpose(1, 2)


def read_key_rows(keys: torch.Tensor, hi: int) -> torch.Tensor:
    """(n_kv, hi, width): positions [0, hi) of keys kept blocked or feature-major (copies only the blocks needed)."""
    return _kp_range(keys, 0, hi).transpose(1, 2)


def spark_cache_write(cache: SparkCache, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store key k (n_kv, head_dim) and value v (n_kv, dv) of position ``pos``, or k (n_kv, T, head_dim) and
    v (n_kv, T, dv) of positions pos .. pos + T - 1 (prefill)."""
    r = cache.kp.shape[-2]
    if k.dim() == 3:
        T = k.shape[1]
        write_key_rows(cache.kp, pos, k[..., :r])
        cache.kr[:, pos: pos + T] = k[..., r:]
        cache.v[:, pos: pos + T] = v
        return
    if cache.kp.dim() == 4:  # the per-token path: one position, plain indexing
        block = cache.kp.shape[3]
        cache.kp[:, pos // block, :, pos % block] = k[:, :r]
    else:
        cache.kp[:, :, pos] = k[:, :r]
    cache.kr[:, pos] = k[:, r:]
    cache.v[:, pos] = v


def valid_range(length: int, window: int | None) -> tuple[int, int]:
    """(lo, n): the first valid cache position and the number of valid keys."""
    lo = max(0, length - window) if window is not None else 0
    return lo, length - lo


def _top(p: torch.Tensor, cand: torch.Tensor, k: int) -> torch.Tensor:
    """The k best of candidate positions `cand` by (p desc, position desc), in position order."""
    cand = cand.flip(0)  # later positions first, so the stable sort breaks ties towards them
    order = torch.sort(p[cand], descending=True, stable=True).indices[:k]
    return cand[order].sort().values


def spark_attn_decode_reference(
    q: torch.Tensor,
    kp: torch.Tensor,
    kr: torch.Tensor,
    v: torch.Tensor,
    length: int,
    k: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The specification, one query head at a time, fp32 on upcast cache entries (slow; for tests)."""
    n_heads, _ = q.shape
    n_kv, r = kp.shape[0], kp.shape[-2]
    group = n_heads // n_kv
    lo, n = valid_range(length, window)
    kp = _kp_range(kp, lo, length)  # (n_kv, r, n)
    out = torch.zeros(n_heads, v.shape[2])
    kept = torch.zeros(n_heads, dtype=torch.long)
    capped = torch.zeros(n_heads, dtype=torch.bool)
    for h in range(n_heads):
        if n == 0:
            continue
        g = h // group
        qh = q[h].float()
        p = scale * (qh[:r] @ kp[g].float())
        if softcap is not None:
            p = softcap * torch.tanh(p / softcap)
        if n <= k:
            keep = torch.arange(n)
        else:
            theta = stat_threshold(p, k)
            keep = torch.nonzero(p > theta).squeeze(1)
            if keep.numel() == 0:
                keep = _top(p, torch.arange(n), k)
            elif keep.numel() > k:
                keep = _top(p, keep, k)
                capped[h] = True
        gate = F.softplus(scale * (kr[g, lo + keep].float() @ qh[r:]))
        w = torch.softmax(p[keep], dim=0) * gate
        out[h] = w @ v[g, lo + keep].float()
        kept[h] = keep.numel()
    return out.to(q.dtype), kept, capped


def spark_attn_decode_torch(
    q: torch.Tensor,
    kp: torch.Tensor,
    kr: torch.Tensor,
    v: torch.Tensor,
    length: int,
    k: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fast pure-PyTorch path: one batched matmul over the predictor half, a masked top-k, and gathers
    of only the kept keys' other half and values. bf16 caches are multiplied in bf16 here."""
    n_heads, _ = q.shape
    n_kv, r = kp.shape[0], kp.shape[-2]
    group = n_heads // n_kv
    lo, n = valid_range(length, window)
    dv = v.shape[2]
    if n == 0:
        return (q.new_zeros(n_heads, dv), torch.zeros(n_heads, dtype=torch.long),
                torch.zeros(n_heads, dtype=torch.bool))
    qf = q.float()
    qp = (qf[:, :r] * scale).to(kp.dtype).view(n_kv, group, r)
    p = torch.bmm(qp, _kp_range(kp, lo, length)).float().view(n_heads, n)
    if softcap is not None:
        p = softcap * torch.tanh(p / softcap)
    capped = torch.zeros(n_heads, dtype=torch.bool)
    if n <= k:
        vals, idx = p, torch.arange(n).expand(n_heads, n)
    else:
        theta = stat_threshold(p, k)  # (n_heads, 1)
        passed = p > theta
        count = passed.sum(1)
        capped = count > k
        masked = torch.where(passed, p, float("-inf"))
        vals, idx = masked.topk(k, dim=1)
        for h in torch.nonzero(count == 0).flatten().tolist():  # degenerate rows: the k best of all
            idx[h] = _top(p[h], torch.arange(n), k)
            vals[h] = p[h, idx[h]]
    kept = torch.isfinite(vals).sum(1)
    g = (torch.arange(n_heads) // group)[:, None]
    pos = lo + idx
    gate = F.softplus(scale * torch.einsum("hkd,hd->hk", kr[g, pos].float(), qf[:, r:]))
    w = torch.softmax(vals, dim=1) * gate  # -inf (not kept) -> weight 0
    out = torch.einsum("hk,hkd->hd", w, v[g, pos].float())
    return out.to(q.dtype), kept, capped


def spark_attn_decode(
    q: torch.Tensor,
    kp: torch.Tensor,
    kr: torch.Tensor,
    v: torch.Tensor,
    length: int,
    k: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    *,
    workspace: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spark attention output of one query position, for all query heads.

    Args:
        q: (n_heads, D) query (after RoPE), any float dtype; computed in fp32.
        kp: predictor half of the cached keys, fp32 or bf16: blocked (n_kv, L_max // B, r, B) (faster; see
            the module doc) or plain feature-major (n_kv, r, L_max).
        kr: (n_kv, L_max, D - r) other half of the cached keys; same dtype.
        v: (n_kv, L_max, dv) cached values; same dtype. For all three only the last dim must be contiguous,
            so slices of a bigger cache (e.g. one layer of a stacked cache) are fine.
        length: number of filled cache positions (keys 0..length-1; the current token included).
        k: at most this many keys per query head (statistical target and hard cap), e.g. 256.
        scale: logit scale for both halves (e.g. head_dim ** -0.5).
        window: sliding window (local layers) or None.
        softcap: Gemma-2 logit soft-cap on the predictor logits, or None.
        workspace: optional float32 scratch of ``spark_attn_workspace(...)`` elements (else a per-thread
            buffer is reused).
        impl: "auto" (C++ op if available, else "torch") | "ext" | "torch" | "reference".

    Returns:
        (out (n_heads, dv) in q's dtype, kept (n_heads,) int64, capped (n_heads,) bool).
    """
    if impl == "auto":
        impl = "ext" if _extension.available() else "torch"
    if impl == "ext":
        return torch.ops.sparkformer.spark_attn_decode(
            q, kp, kr, v, int(length), int(k), float(scale), window, None if softcap is None else float(softcap),
            workspace,
        )
    if impl == "torch":
        return spark_attn_decode_torch(q, kp, kr, v, length, k, scale, window, softcap)
    if impl == "reference":
        return spark_attn_decode_reference(q, kp, kr, v, length, k, scale, window, softcap)
    raise ValueError(f"unknown impl {impl!r} (auto | ext | torch | reference)")


def spark_attn_workspace(n_heads: int, head_dim: int, max_len: int) -> torch.Tensor:
    """A float32 scratch tensor big enough for ``spark_attn_decode`` with up to max_len valid keys."""
    return torch.empty(n_heads * head_dim + 3 * n_heads * max_len + 4 * n_heads + 2 + 64, dtype=torch.float32)
