"""Prefill attention over one sequence's KV cache, as the decode engine needs it.

``model.chunked_attention`` (the training form chunked over queries and grouped by KV head) for a single sequence
(q (H, T, D), cache (KV, pos0 + T, D)), with the decode kernels' hard cap on Spark layers so prefill selects what
decode would. Both dense and Spark prefill go through here, so the prefill comparison is like for like.
"""

from __future__ import annotations

import torch

from sparkformer.model import chunked_attention

__all__ = ["prefill_attention"]


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
