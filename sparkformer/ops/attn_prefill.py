"""Prefill attention over one sequence's KV cache, as the decode engine needs it.

``prefill_attention``: ``attention.chunked_attention`` (the training form chunked over queries and grouped by KV head)
for a single sequence (q (H, T, D), cache (KV, pos0 + T, D)), with the decode kernels' hard cap on Spark layers so
prefill selects what decode would. Dense prefill uses it, and Spark prefill when the C++ extension is missing.

``spark_prefill_attention``: Spark prefill as T decode steps over the already-written cache: the C++ decode op
per query position. The training form computes both halves of every score and softmaxes whole rows before the cap
throws most of them away; the decode op scores the predictor half, selects at most k keys, and touches the other
half and V only for those, which makes it cheaper than dense prefill attention at T = 2048 (``benchmarks``: see
docs/results.md). Same selection and result as the training form with the hard cap (tested).
"""

from __future__ import annotations

import torch

from sparkformer.ops.attention import chunked_attention
from sparkformer.ops.spark_attn_decode import SparkCache, spark_attn_decode

__all__ = ["prefill_attention", "spark_prefill_attention"]


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
    out, kept = chunked_attention(q[None], k[None], v[None], pos0, kind=kind, scale=scale, window=window, cap=cap,
                                  rank=rank, topk=topk, hard_cap=True, chunk=chunk)
    return out[0], None if kept is None else kept[0]


def spark_prefill_attention(q: torch.Tensor, cache: SparkCache, pos0: int, *, topk: int, scale: float,
                            window: int | None = None, cap: float | None = None, impl: str = "auto"
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spark attention of T new queries (H, T, D) whose keys and values are already in ``cache`` at positions
    [pos0, pos0 + T): one decode-op call per position. Returns (out (H, T, dv) fp32, keys kept (H, T),
    cap fired (H, T))."""
    H, T, _ = q.shape
    if pos0 + T > cache.v.shape[1]:
        raise ValueError(f"positions up to {pos0 + T} exceed the cache size {cache.v.shape[1]}")
    out = torch.empty(T, H, cache.v.shape[-1])
    kept = torch.empty(T, H, dtype=torch.long)
    capped = torch.empty(T, H, dtype=torch.bool)
    qt = q.transpose(0, 1)
    for t in range(T):
        o, kept[t], capped[t] = spark_attn_decode(qt[t], cache.kp, cache.kr, cache.v, pos0 + t + 1, topk, scale,
                                                  window, cap, impl=impl)
        out[t] = o
    return out.transpose(0, 1), kept.t(), capped.t()
