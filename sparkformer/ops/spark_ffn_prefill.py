"""Spark FFN over the T tokens of a prompt (prefill) in its sparse form: the reference and the C++ op.

Same math per token as ``spark_ffn_decode`` (statistical threshold over the predictor scores, gelu_tanh on the
survivors, K2 and V only for the selected neurons). The dense training form computes ``x[r:] K2^T`` for every
neuron and multiplies the 92% zeros too, so it costs as much as a dense GeGLU of equal parameters; here only the
predictor is a GEMM (r of d input dims), and the rest touches ~8% of the neurons per token:

- ``spark_ffn_prefill_reference``: dense fp32 PyTorch (the specification, and the fallback).
- ``torch.ops.sparkformer.spark_ffn_prefill``: per block of tokens the selection is transposed (tokens grouped by
  neuron), so each selected neuron's K2 and V rows are read once per block and applied to all the block's tokens
  that chose it.

``spark_ffn_prefill(..., impl="auto")`` uses the C++ op when the extension is available.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparkformer.ops import _extension
from sparkformer.ops.stat_topk import stat_threshold

__all__ = ["spark_ffn_prefill", "spark_ffn_prefill_reference"]


def spark_ffn_prefill_reference(x: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v: torch.Tensor,
                                fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense fp32 arithmetic on upcast weights: (y (T, d_out) fp32, neurons selected per token (T,) int64)."""
    r = k1.shape[1]
    xf = x.float()
    s = xf[:, :r] @ k1.float().t()
    theta = stat_threshold(s, float(fraction))  # per row, fp32, as decode's threshold
    a = F.gelu(torch.relu(s - theta), approximate="tanh")
    y = (a * (xf[:, r:] @ k2.float().t())) @ v.float()
    return y, (s > theta).sum(-1)


def spark_ffn_prefill(x: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v: torch.Tensor, fraction: float, *,
                      impl: str = "auto", block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Spark FFN of T tokens; returns (y (T, d_out) fp32, neurons selected per token (T,) int64).

    Args:
        x: (T, d) normalised inputs, in the weights' dtype (the predictor GEMM runs in it, as decode's matvec).
        k1: (d_ff, r) predictor weights; k2: (d_ff, d - r); v: (d_ff, d_out); fp32 or bf16, rows contiguous.
        fraction: target fraction of active neurons per token.
        impl: "auto" (C++ op if available, else "reference") | "ext" | "reference".
        block: tokens per block of the C++ op (each selected K2/V row is read once per block).
    """
    if x.dim() != 2 or x.shape[1] != k1.shape[1] + k2.shape[1]:
        raise ValueError(f"x must be (T, {k1.shape[1] + k2.shape[1]}) (r + d - r columns of k1, k2), got "
                         f"{tuple(x.shape)}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if impl == "auto":
        impl = "ext" if _extension.available() else "reference"
    if impl == "reference":
        return spark_ffn_prefill_reference(x, k1, k2, v, fraction)
    if impl != "ext":
        raise ValueError(f"unknown impl {impl!r} (auto | ext | reference)")
    r = k1.shape[1]
    s = (x[:, :r].to(k1.dtype) @ k1.t()).float()  # every neuron's score is needed: one GEMM over r dims
    return torch.ops.sparkformer.spark_ffn_prefill(x[:, r:].float(), s, k2, v, float(fraction), int(block))
