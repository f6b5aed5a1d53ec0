"""Prefill attention over a KV cache: the training-form math, chunked over queries and grouped by KV head.

The training form (``model.dense_attention`` / ``model.spark_attention``) expands K/V to every query head and
materialises (heads, T, L) score tensors, most of them masked out by causality. For prefill we instead
- fold the query heads that share a KV head into the row dimension (q (KV, rep * c, D) against k (KV, n, D)),
  so K/V are never copied per head;
- take queries in chunks of ``chunk`` positions and give each chunk only the keys it can see (causal and inside
  the window), which skips the masked upper triangle and keeps each chunk's score tensors cache-sized.
Both dense and Spark prefill go through here, so the prefill comparison is like for like. The result equals the
training form (same helpers per chunk; the tests compare them).
"""

from __future__ import annotations

import torch

from sparkformer.model import dense_attention, spark_attention

__all__ = ["prefill_attention"]


def _chunk_mask(a0: int, c: int, lo: int, hi: int, rep: int, window: int | None) -> torch.Tensor:
    """Bool (rep * c, hi - lo): row i (query position a0 + i % c of head i // c in its group) sees key j."""
    qpos = torch.arange(a0, a0 + c)[:, None]
    kpos = torch.arange(lo, hi)[None, :]
    ok = kpos <= qpos
    if window is not None:
        ok &= qpos - kpos < window
    return ok.repeat(rep, 1)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos0: int, *, kind: str, scale: float,
                      window: int | None = None, cap: float | None = None, rank: int | None = None,
                      topk: int | None = None, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention of T new queries over a cache holding positions [0, pos0 + T).

    Args:
        q: (H, T, D) queries after RoPE (absolute positions pos0 .. pos0 + T - 1).
        k, v: (KV, pos0 + T, D) / (KV, pos0 + T, dv) every cached key and value, the new ones included.
        kind: "dense" or "spark" (then ``rank`` = predictor dims r and ``topk`` = k are required; the decode
            kernels' hard cap is applied, as decode does).
        chunk: queries per chunk.

    Returns:
        (out (H, T, dv), keys kept per query (H, T) for Spark, else None).
    """
    H, T, D = q.shape
    KV, L, _ = k.shape
    if L != pos0 + T or v.shape[:2] != (KV, L):
        raise ValueError(f"k/v must hold positions [0, {pos0 + T}), got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if H % KV:
        raise ValueError(f"query heads ({H}) must be a multiple of KV heads ({KV})")
    if kind == "spark" and (rank is None or topk is None):
        raise ValueError("spark prefill needs rank and topk")
    rep = H // KV
    qg = q.view(KV, rep, T, D)
    out = torch.empty(KV, rep, T, v.shape[-1], dtype=v.dtype)
    kept = torch.empty(KV, rep, T, dtype=torch.long) if kind == "spark" else None
    for t0 in range(0, T, chunk):
        c = min(chunk, T - t0)
        a0 = pos0 + t0  # absolute position of the chunk's first query
        hi = a0 + c
        lo = max(0, a0 - window + 1) if window is not None else 0
        qc = qg[:, :, t0: t0 + c].reshape(KV, 1, rep * c, D)
        kc, vc = k[:, None, lo:hi], v[:, None, lo:hi]
        mask = _chunk_mask(a0, c, lo, hi, rep, window)
        if kind == "spark":
            o, n = spark_attention(qc, kc, vc, mask, rank, topk, scale, cap, hard_cap=True)
            kept[:, :, t0: t0 + c] = n.view(KV, rep, c)
        else:
            o = dense_attention(qc, kc, vc, mask, scale, cap)
        out[:, :, t0: t0 + c] = o.view(KV, rep, c, -1)
    return out.view(H, T, -1), None if kept is None else kept.view(H, T)
