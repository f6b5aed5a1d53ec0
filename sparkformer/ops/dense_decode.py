"""Dense batch-1 decode baselines, made as fast as we can: GeGLU FFN, attention, matvec.

A speed-up is only as honest as its baseline, so the dense model gets the same treatment as the sparse one:
a fused C++ kernel (same ISA dispatch, threads and fp32 accumulation) next to a plain-PyTorch reference and
the fastest pure-PyTorch form.

GeGLU layout for decode: ``pack_geglu`` stores, for each neuron j, its gate row, up row and down-projection
column back to back (one (m, 3, d) buffer), so the fused kernel reads all FFN weights in a single forward
stream and never goes back to memory for W_down.

Dense attention cache layout: v (n_kv, L_max, dv) row-major; k either row-major (n_kv, L_max, D) or, faster
(~10% on the whole op), blocked like Spark's predictor half: (n_kv, L_max // B, D, B) with B a multiple of 64
(``to_blocked(k.transpose(1, 2))``), so the scoring pass is one forward stream with sums in registers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from sparkformer.ops import _extension
from sparkformer.ops.spark_attn_decode import feature_major, valid_range

__all__ = [
    "GegluWeights",
    "dense_attn_decode",
    "dense_attn_decode_reference",
    "dense_attn_decode_torch",
    "geglu_decode",
    "geglu_decode_reference",
    "geglu_decode_torch",
    "matvec",
    "pack_geglu",
]


class GegluWeights(NamedTuple):
    """Decode layout of a GeGLU FFN: three (m, d)-shaped views, w_down_t being W_down transposed."""

    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down_t: torch.Tensor


def pack_geglu(
    w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, dtype: torch.dtype | None = None
) -> GegluWeights:
    """Interleave nn.Linear-layout weights (w_gate, w_up: (m, d); w_down: (d_out, m)) into one (m, 3, d)
    buffer (requires d_out == d) and return views into it."""
    dtype = dtype or w_gate.dtype
    m, d = w_gate.shape
    if w_down.shape != (d, m):
        raise ValueError(f"w_down must be (d, m) = {(d, m)}, got {tuple(w_down.shape)}")
    packed = torch.empty(m, 3, d, dtype=dtype)
    packed[:, 0] = w_gate
    packed[:, 1] = w_up
    packed[:, 2] = w_down.t()
    return GegluWeights(packed[:, 0], packed[:, 1], packed[:, 2])


def geglu_decode_reference(x, w_gate, w_up, w_down_t):
    """y = W_down (gelu_tanh(W_gate x) * (W_up x)) in fp32 on upcast weights (w_down_t = W_down^T)."""
    xf = x.float()
    h = F.gelu(w_gate.float() @ xf, approximate="tanh") * (w_up.float() @ xf)
    return (w_down_t.float().t() @ h).to(x.dtype)


def geglu_decode_torch(x, w_gate, w_up, w_down_t):
    """Fastest pure-PyTorch form: torch.mv (not F.linear) in the weights' dtype."""
    xw = x.to(w_gate.dtype)
    h = F.gelu(torch.mv(w_gate, xw), approximate="tanh") * torch.mv(w_up, xw)
    return torch.mv(w_down_t.t(), h).to(x.dtype)


def geglu_decode(x, w_gate, w_up, w_down_t, *, workspace=None, impl: str = "auto") -> torch.Tensor:
    """Dense GeGLU FFN for one token.

    Args:
        x: (d,) activation, any float dtype (fp32 compute; result in x's dtype).
        w_gate, w_up: (m, d); w_down_t: (m, d_out) = W_down transposed. fp32 or bf16, one dtype, last dim
            contiguous (``pack_geglu`` gives the best layout).
        workspace: optional float32 scratch of at least threads * d_out + 64 elements.
        impl: "auto" | "ext" | "torch" | "reference".
    """
    if impl == "auto":
        impl = "ext" if _extension.available() else "torch"
    if impl == "ext":
        return torch.ops.sparkformer.geglu_decode(x, w_gate, w_up, w_down_t, workspace)
    if impl == "torch":
        return geglu_decode_torch(x, w_gate, w_up, w_down_t)
    if impl == "reference":
        return geglu_decode_reference(x, w_gate, w_up, w_down_t)
    raise ValueError(f"unknown impl {impl!r} (auto | ext | torch | reference)")


def matvec(w: torch.Tensor, x: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """y = w x for one vector (e.g. the LM head at batch 1): w (n_out, n_in) fp32/bf16 with contiguous rows,
    fp32 accumulation, both cores; y in x's dtype."""
    if impl == "auto":
        impl = "ext" if _extension.available() else "torch"
    if impl == "ext":
        return torch.ops.sparkformer.matvec(w, x)
    if impl == "torch":
        return torch.mv(w, x.to(w.dtype)).to(x.dtype)
    if impl == "reference":
        return (w.float() @ x.float()).to(x.dtype)
    raise ValueError(f"unknown impl {impl!r} (auto | ext | torch | reference)")


def _rows(k: torch.Tensor) -> torch.Tensor:
    """Keys as (n_kv, L_max, D) from either layout (a copy for the blocked one)."""
    return k if k.dim() == 3 else feature_major(k).transpose(1, 2)


def dense_attn_decode_reference(q, k, v, length, scale, window=None, softcap=None):
    """softmax(scale * q K^T, soft-capped) V over the valid keys, per query head, fp32 (the specification)."""
    k = _rows(k)
    n_heads = q.shape[0]
    n_kv = k.shape[0]
    group = n_heads // n_kv
    lo, n = valid_range(length, window)
    out = torch.zeros(n_heads, v.shape[2])
    for h in range(n_heads):
        if n == 0:
            continue
        g = h // group
        s = scale * (k[g, lo:length].float() @ q[h].float())
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        out[h] = torch.softmax(s, 0) @ v[g, lo:length].float()
    return out.to(q.dtype)


def dense_attn_decode_torch(q, k, v, length, scale, window=None, softcap=None):
    """Two batched matmuls and a softmax (faster than scaled_dot_product_attention for one fp32 query)."""
    k = _rows(k)
    n_heads, d = q.shape
    n_kv = k.shape[0]
    lo, n = valid_range(length, window)
    if n == 0:
        return q.new_zeros(n_heads, v.shape[2])
    qg = (q.float() * scale).to(k.dtype).view(n_kv, n_heads // n_kv, d)
    s = torch.bmm(qg, k[:, lo:length].transpose(1, 2)).float()
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    p = torch.softmax(s, dim=-1).to(v.dtype)
    return torch.bmm(p, v[:, lo:length]).reshape(n_heads, -1).to(q.dtype)


def dense_attn_decode(q, k, v, length, scale, window=None, softcap=None, *, workspace=None, impl: str = "auto"):
    """Dense attention output of one query position for all query heads.

    Args:
        q: (n_heads, D); k: (n_kv, L_max, D) or blocked (n_kv, L_max // B, D, B); v: (n_kv, L_max, dv);
            fp32 or bf16 cache, last dim contiguous.
        length, scale, window, softcap: as in ``spark_attn_decode``.
        workspace: optional float32 scratch of at least
            n_heads * (D + L_max) + (n_kv + threads) * (n_heads // n_kv) * (dv + 2) + 64 elements.
        impl: "auto" | "ext" | "torch" | "reference".

    Returns:
        out (n_heads, dv) in q's dtype.
    """
    if impl == "auto":
        impl = "ext" if _extension.available() else "torch"
    if impl == "ext":
        return torch.ops.sparkformer.dense_attn_decode(
            q, k, v, int(length), float(scale), window, None if softcap is None else float(softcap), workspace
        )
    if impl == "torch":
        return dense_attn_decode_torch(q, k, v, length, scale, window, softcap)
    if impl == "reference":
        return dense_attn_decode_reference(q, k, v, length, scale, window, softcap)
    raise ValueError(f"unknown impl {impl!r} (auto | ext | torch | reference)")
