"""Dense batch-1 decode baselines, made as fast as we can: GeGLU FFN, attention, matvec.

A speed-up is only as honest as its baseline, so the dense model gets the same treatment as the sparse one:
a fused C++ kernel (same ISA dispatch, threads and fp32 accumulation) next to a plain-PyTorch reference and
the fastest pure-PyTorch form.

GeGLU layout for decode: ``pack_geglu`` puts W_gate, W_up and W_down^T (each (m, d), one row per neuron) in
one (3, m, d) buffer. The kernel reads each neuron's gate and up rows as two streams, then the down rows four
far-apart streams at a time, all front to back (see kernels_impl.h for why the streams are arranged so).

Dense attention cache layout: v (n_kv, L_max, dv) row-major; k either row-major (n_kv, L_max, D) or, faster
(~10% on the whole op), blocked like Spark's predictor half: (n_kv, L_max // B, D, B) with B a multiple of 64
(``to_blocked(k.transpose(1, 2))``), so the scoring pass is one forward stream with sums in registers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from sparkformer.ops import _extension
from sparkformer.ops.activations import ACTIVATIONS
from sparkformer.ops.spark_attn_decode import KP_BLOCK, _round_to_block, feature_major, read_key_rows, valid_range, \
    write_key_rows
from sparkformer.ops.sparse_ffn_decode import fused_act_name

__all__ = [
    "DenseCache",
    "GegluWeights",
    "dense_cache_keys",
    "dense_cache_write",
    "new_dense_cache",
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
    """Copy nn.Linear-layout weights (w_gate, w_up: (m, d); w_down: (d, m)) into one (3, m, d) buffer
    [W_gate; W_up; W_down^T] and return its three (m, d) views."""
    dtype = dtype or w_gate.dtype
    m, d = w_gate.shape
    if w_down.shape != (d, m):
        raise ValueError(f"w_down must be (d, m) = {(d, m)}, got {tuple(w_down.shape)}")
    packed = torch.empty(3, m, d, dtype=dtype)
    packed[0] = w_gate
    packed[1] = w_up
    packed[2] = w_down.t()
    return GegluWeights(packed[0], packed[1], packed[2])


def geglu_decode_reference(x, w_gate, w_up, w_down_t, act="gelu_tanh"):
    """y = W_down (act(W_gate x) * (W_up x)) in fp32 on upcast weights (w_down_t = W_down^T)."""
    fn = ACTIVATIONS[fused_act_name(act)]
    xf = x.float()
    h = fn(w_gate.float() @ xf) * (w_up.float() @ xf)
    return (w_down_t.float().t() @ h).to(x.dtype)


def geglu_decode_torch(x, w_gate, w_up, w_down_t, act="gelu_tanh"):
    """Fastest pure-PyTorch form: torch.mv (not F.linear) in the weights' dtype."""
    xw = x.to(w_gate.dtype)
    if act == "gelu_tanh":
        g = F.gelu(torch.mv(w_gate, xw), approximate="tanh")
    else:
        g = ACTIVATIONS[fused_act_name(act)](torch.mv(w_gate, xw))
    return torch.mv(w_down_t.t(), g * torch.mv(w_up, xw)).to(x.dtype)


def geglu_decode(x, w_gate, w_up, w_down_t, *, workspace=None, impl: str = "auto",
                 act="gelu_tanh") -> torch.Tensor:
    """Dense gated FFN for one token (GeGLU with the default act, SwiGLU with act="silu").

    Args:
        x: (d,) activation, any float dtype (fp32 compute; result in x's dtype).
        w_gate, w_up: (m, d); w_down_t: (m, d_out) = W_down transposed. fp32 or bf16, one dtype, last dim
            contiguous (``pack_geglu`` gives the best layout).
        workspace: optional float32 scratch of at least threads * d_out + 2 * m + 64 elements.
        impl: "auto" | "ext" | "torch" | "reference".
        act: the gate activation, "gelu_tanh" | "silu" (or ``ACTIVATIONS[name]``).
    """
    act = act if act == "gelu_tanh" else fused_act_name(act)
    if impl == "auto":
        impl = "ext" if _extension.available() else "torch"
    if impl == "ext":
        return torch.ops.sparkformer.geglu_decode(x, w_gate, w_up, w_down_t, workspace, act)
    if impl == "torch":
        return geglu_decode_torch(x, w_gate, w_up, w_down_t, act)
    if impl == "reference":
        return geglu_decode_reference(x, w_gate, w_up, w_down_t, act)
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


class DenseCache(NamedTuple):
    """One layer's dense attention cache: k (row-major or blocked) and v (row-major)."""

    k: torch.Tensor
    v: torch.Tensor


def new_dense_cache(n_kv: int, max_len: int, head_dim: int, dv: int | None = None,
                    dtype: torch.dtype = torch.float32, block: int | None = KP_BLOCK) -> DenseCache:
    """Zeroed cache in the fastest decode layout: keys blocked (n_kv, L // block, head_dim, block)
    (``block=None``: row-major), values row-major. ``max_len`` is rounded up to a multiple of ``block``."""
    dv = head_dim if dv is None else dv
    if block:
        max_len = _round_to_block(max_len, block)
        k = torch.zeros(n_kv, max_len // block, head_dim, block, dtype=dtype)
    else:
        k = torch.zeros(n_kv, max_len, head_dim, dtype=dtype)
    return DenseCache(k, torch.zeros(n_kv, max_len, dv, dtype=dtype))


def dense_cache_write(cache: DenseCache, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store key k (n_kv, head_dim) and value v (n_kv, dv) of position ``pos``, or k (n_kv, T, head_dim) and
    v (n_kv, T, dv) of positions pos .. pos + T - 1 (prefill)."""
    if k.dim() == 3:
        T = k.shape[1]
        if cache.k.dim() == 4:
            write_key_rows(cache.k, pos, k)
        else:
            cache.k[:, pos: pos + T] = k
        cache.v[:, pos: pos + T] = v
        return
    if cache.k.dim() == 4:  # the per-token path: one position, plain indexing
        block = cache.k.shape[3]
        cache.k[:, pos // block, :, pos % block] = k
    else:
        cache.k[:, pos] = k
    cache.v[:, pos] = v


def dense_cache_keys(cache: DenseCache, hi: int) -> torch.Tensor:
    """(n_kv, hi, head_dim): the keys of positions [0, hi) from either layout."""
    return read_key_rows(cache.k, hi) if cache.k.dim() == 4 else cache.k[:, :hi]


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
