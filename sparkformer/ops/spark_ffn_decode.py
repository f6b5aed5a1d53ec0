"""Spark FFN for one token (batch-1 decode): the reference, a fast pure-PyTorch path, and the C++ op.

Math (shared spec, section 2), for x of length d split at r, weights K1 (d_ff, r), K2 (d_ff, d - r),
V (d_ff, d_out):

    s     = K1 x[:r]                                   # predictor, reads all of K1
    theta = mean(s) + std(s) * ndtri(1 - f)            # sparkformer.ops.stat_topk.stat_threshold
    a     = gelu_tanh(relu(s - theta))                 # nonzero only on S = {i : s_i > theta} (or silu: act=)
    h_i   = a_i * (K2[i] . x[r:])        for i in S    # reads |S| rows of K2
    y     = sum_{i in S} h_i V[i]                      # reads |S| rows of V

Three implementations, one contract -- ``(y, n_selected)`` with y in x's dtype and n_selected = |S| as
an int64 scalar tensor:

- ``spark_ffn_decode_reference``: plain dense PyTorch in fp32; the specification.
- ``spark_ffn_decode_torch``: the fast pure-PyTorch path (mv + threshold + index_select + embedding_bag),
  used when the C++ extension is unavailable. bf16 weights are multiplied in bf16 here (torch.mv needs one
  dtype), so it is looser than the other two for bf16.
- ``torch.ops.sparkformer.spark_ffn_decode``: the fused C++ kernel (AVX-512 / AVX2 / scalar), fp32
  accumulation for fp32 and bf16 weights, both cores via at::parallel_for.

``spark_ffn_decode(..., impl="auto")`` picks the C++ op when it is available.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from sparkformer.ops import _extension
from sparkformer.ops.activations import ACTIVATIONS
from sparkformer.ops.sparse_ffn_decode import fused_act_name
from sparkformer.ops.stat_topk import stat_threshold

__all__ = [
    "SparkFFNWeights",
    "prepare_spark_ffn",
    "spark_ffn_decode",
    "spark_ffn_decode_batch",
    "spark_ffn_decode_reference",
    "spark_ffn_decode_torch",
    "spark_ffn_workspace",
]


def spark_ffn_decode_reference(
    x: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v: torch.Tensor, fraction: float, act="gelu_tanh"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification: dense fp32 arithmetic on upcast weights (slow; for tests)."""
    r = k1.shape[1]
    xf = x.float()
    s = k1.float() @ xf[:r]
    theta = stat_threshold(s, fraction)
    selected = s > theta
    a = ACTIVATIONS[fused_act_name(act)](torch.relu(s - theta))  # zero outside `selected` (act(0) = 0)
    h = a * (k2.float() @ xf[r:])
    y = v.float().t() @ h
    return y.to(x.dtype), selected.sum()


def spark_ffn_decode_torch(
    x: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v: torch.Tensor, fraction: float, act="gelu_tanh"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast pure-PyTorch path: reads all of K1 but only the selected rows of K2 and V."""
    r = k1.shape[1]
    xw = x.to(k1.dtype)
    s = torch.mv(k1, xw[:r]).float()
    theta = stat_threshold(s, fraction)
    idx = torch.nonzero(s > theta).squeeze(1)
    z = s.index_select(0, idx) - theta
    a = F.gelu(z, approximate="tanh") if act == "gelu_tanh" else ACTIVATIONS[fused_act_name(act)](z)
    h = a * torch.mv(k2.index_select(0, idx), xw[r:]).float()
    y = F.embedding_bag(idx[None], v, per_sample_weights=h.to(v.dtype)[None], mode="sum")[0]
    return y.to(x.dtype), idx.new_tensor(idx.numel())


def spark_ffn_decode(
    x: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    v: torch.Tensor,
    fraction: float,
    *,
    workspace: torch.Tensor | None = None,
    impl: str = "auto",
    act="gelu_tanh",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spark FFN output for one token and the number of neurons it used.

    Args:
        x: (d,) activation, any float dtype (computed in fp32; y comes back in x's dtype).
        k1: (d_ff, r) predictor weights, fp32 or bf16; rows contiguous (best: the whole tensor contiguous).
        k2: (d_ff, d - r) rest of the first projection, same dtype; only the last dim must be contiguous.
        v: (d_ff, d_out) second projection, one neuron per row, same dtype; last dim contiguous.
        fraction: target fraction of active neurons f (e.g. 0.08).
        workspace: optional float32 scratch of ``spark_ffn_workspace(...)`` elements; without it the op
            reuses a per-thread buffer, so steady-state calls allocate only the output.
        impl: "auto" (C++ op if available, else "torch") | "ext" | "torch" | "reference".
        act: activation of the selected neurons' margins, act(s - theta): "gelu_tanh" (Spark) | "silu"
            (or ``ACTIVATIONS[name]``).

    Returns:
        (y (d_out,) in x's dtype, n_selected: int64 scalar tensor).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    act = act if act == "gelu_tanh" else fused_act_name(act)
    if impl == "auto":
        impl = "ext" if _extension.available() else "torch"
    if impl == "ext":
        return torch.ops.sparkformer.spark_ffn_decode(x, k1, k2, v, float(fraction), workspace, act)
    if impl == "torch":
        return spark_ffn_decode_torch(x, k1, k2, v, fraction, act)
    if impl == "reference":
        return spark_ffn_decode_reference(x, k1, k2, v, fraction, act)
    raise ValueError(f"unknown impl {impl!r} (auto | ext | torch | reference)")


def spark_ffn_decode_batch(
    x: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v: torch.Tensor, fraction: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Spark FFN for B tokens at once (batched decode), pure PyTorch.

    Every row keeps its own selection (the same math as ``spark_ffn_decode``), but the K2 and V rows are read once
    for the *union* of the rows' selections, so the bytes read grow with the union: with independent 8% selections
    about 1 - 0.92^B of the neurons (28% at B = 4, 74% at B = 16), which is where batching eats the sparse gain.

    Args:
        x: (B, d) activations; k1, k2, v as in ``spark_ffn_decode``.
    Returns:
        (y (B, d_out) in x's dtype, n_selected (B,) int64, size of the union).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (B, d), got {tuple(x.shape)}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    r = k1.shape[1]
    xw = x.to(k1.dtype)
    s = (xw[:, :r] @ k1.t()).float()  # (B, d_ff): all of K1, once for the batch
    theta = stat_threshold(s, fraction)  # (B, 1)
    selected = s > theta
    union = selected.any(0).nonzero().squeeze(1)
    a = F.gelu(torch.relu(s.index_select(1, union) - theta), approximate="tanh")  # 0 where a row did not select
    h = a * (xw[:, r:] @ k2.index_select(0, union).t()).float()
    y = h.to(v.dtype) @ v.index_select(0, union)
    return y.to(x.dtype), selected.sum(1), union.numel()


def spark_ffn_workspace(d_ff: int, d_out: int, threads: int | None = None) -> torch.Tensor:
    """A float32 scratch tensor big enough for ``spark_ffn_decode`` at this shape and thread count."""
    threads = torch.get_num_threads() if threads is None else threads
    return torch.empty(3 * d_ff + threads * d_out + 64, dtype=torch.float32)


class SparkFFNWeights(NamedTuple):
    """Decode layout of one Spark FFN: k1 contiguous; k2 and v views into one (d_ff, (d - r) + d_out)
    buffer, so each selected neuron's K2 row and V row are adjacent in memory (one stream per neuron)."""

    k1: torch.Tensor
    k2: torch.Tensor
    v: torch.Tensor


def prepare_spark_ffn(
    k: torch.Tensor, v: torch.Tensor, r: int, dtype: torch.dtype | None = None
) -> SparkFFNWeights:
    """Re-lay out Spark FFN weights for decode.

    Args:
        k: (d_ff, d) first projection (columns [:r] are the predictor K1, [r:] are K2).
        v: (d_ff, d_out) second projection, one row per neuron.
        r: predictor width.
        dtype: storage dtype (default: k's).
    """
    dtype = dtype or k.dtype
    d_ff, d = k.shape
    k1 = k[:, :r].to(dtype).contiguous()
    packed = torch.empty(d_ff, d - r + v.shape[1], dtype=dtype)
    packed[:, : d - r] = k[:, r:]
    packed[:, d - r :] = v
    return SparkFFNWeights(k1, packed[:, : d - r], packed[:, d - r :])
