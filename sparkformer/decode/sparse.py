"""Thresholded layers in the decode engines: the input sites of a ``SparseSpec`` (``sparkformer.sparsity``), run so
that the skipped weights are not read.

Layout per site (made once, when the engine is built):

    qkv, o    W^T (in, out) row-major: an input entry j with |x_j| <= t skips row j, one contiguous stream per kept
              input (``sparse_input_matvec``)
    gate_up   [W_gate; W_up]^T (d, 2m): the same skip on the FFN input
    down      W_down^T (m, d) (the dense layout already): neurons with |h_i| <= t skip their row
    gate_act  CATS: the gate GEMV over every neuron, then only the kept neurons' up and W_down^T rows
              (``cats_ffn_decode``)

Prefill applies the same masks to its GEMMs (same selections as decode and as the training form).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sparkformer.ops import _extension
from sparkformer.ops import sparse_ffn_decode as ops
from sparkformer.ops.dense_decode import matvec

__all__ = ["SparseLayer", "make_sparse_layer", "masked", "sparse_matvec", "sparse_ffn_decode"]


@dataclass
class SparseLayer:
    thresholds: object  # sparkformer.sparsity.LayerThresholds (duck-typed: qkv, o, gate_up, down, gate_act)
    w_qkv_t: torch.Tensor | None = None  # (d, n_qkv)
    w_o_t: torch.Tensor | None = None  # (H*hd, d)
    gate_up_t: torch.Tensor | None = None  # (d, 2m)

    def to(self, device) -> "SparseLayer":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SparseLayer(self.thresholds, mv(self.w_qkv_t), mv(self.w_o_t), mv(self.gate_up_t))

    @property
    def has_ffn(self) -> bool:
        th = self.thresholds
        return th.gate_up is not None or th.down is not None or th.gate_act is not None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.w_qkv_t, self.w_o_t, self.gate_up_t) if t is not None]


def make_sparse_layer(thresholds, w_qkv: torch.Tensor, w_o: torch.Tensor, w_gate: torch.Tensor | None,
                      w_up: torch.Tensor | None, dtype: torch.dtype) -> SparseLayer | None:
    """The transposed copies a layer's active sites read; None when no site is active."""
    if thresholds is None or not thresholds.active():
        return None
    if (thresholds.gate_up is not None or thresholds.down is not None or thresholds.gate_act is not None) \
            and w_gate is None:
        raise ValueError("FFN thresholds apply to dense gated FFN layers")
    t = lambda w: w.t().to(dtype).contiguous()  # noqa: E731
    return SparseLayer(thresholds,
                       t(w_qkv) if thresholds.qkv is not None else None,
                       t(w_o) if thresholds.o is not None else None,
                       t(torch.cat([w_gate, w_up])) if thresholds.gate_up is not None else None)


def masked(x: torch.Tensor, t: float | None) -> torch.Tensor:
    """x with the entries |x| <= t zeroed (the training form's mask); x itself when the site is dense."""
    return x if t is None else x * (x.abs() > t)


def _ext_ready(impl: str) -> bool:
    return impl == "ext" or _extension.available()


def sparse_matvec(w_t: torch.Tensor, x: torch.Tensor, t: float, impl: str = "auto") -> tuple[torch.Tensor, int]:
    """W x over the inputs with |x_j| > t only, W given as W^T (in, out): (y (out,) fp32, inputs kept)."""
    y, n = ops.sparse_input_matvec(w_t, x.float(), t, impl=impl)  # fp32 x: the mask as in the training form
    return y.float(), int(n)


def sparse_ffn_decode(sp: SparseLayer, ffn: tuple, xn: torch.Tensor, act: Callable, act_name: str, dtype,
                      impl: str = "auto") -> tuple[torch.Tensor, float]:
    """One token through a thresholded gated FFN: (y (d,) fp32, fraction of FFN weights read)."""
    th = sp.thresholds
    w_gate, w_up, w_down_t = ffn
    m, d = w_gate.shape
    x = xn.float()
    if th.gate_act is not None:  # CATS
        y, n = ops.cats_ffn_decode(x, w_gate, w_up, w_down_t, th.gate_act, act_name, impl=impl)
        return y.float(), (m + 2 * int(n)) / (3 * m)
    if sp.gate_up_t is not None and impl in ("auto", "ext") and _ext_ready(impl) and act_name in ops.FUSED_ACTIVATIONS:
        # the whole TEAL FFN step in one C++ call (a negative threshold keeps every entry)
        t_down = th.down if th.down is not None else -1.0
        y, n_in, n_h = ops.teal_ffn_decode(x, sp.gate_up_t, w_down_t, th.gate_up, t_down, act_name, impl="ext")
        return y.float(), (2 * int(n_in) / d + int(n_h) / m) / 3.0
    if sp.gate_up_t is not None:
        gu, n_in = sparse_matvec(sp.gate_up_t, x, th.gate_up, impl)
        read = 2 * n_in / d
    else:
        gu = torch.cat([matvec(w_gate, x, impl=impl), matvec(w_up, x, impl=impl)]).float()
        read = 2.0
    h = act(gu[:m]) * gu[m:]
    if th.down is not None:
        y, n_h = sparse_matvec(w_down_t, h, th.down, impl)
        read += n_h / m
    else:
        y = (h.to(dtype) @ w_down_t).float()
        read += 1.0
    return y, read / 3.0
