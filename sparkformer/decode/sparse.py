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

Quantized (``quantize_sparse_layer``, the CPU engine's q8_0 / q4_0): each W^T row above is quantized along the output
dimension as its own row of blocks (y = sum over kept j of x_j * dequant(row j)); the FFN sites read W_down^T rows
(``down_t``, quantized along d), CATS the dense layout's gate and up rows (integer dot products). The dense copies the
float layout also keeps (``DecodeLayer.w_qkv`` ...) are quantized as usual; prefill reads the transposed ones, so its
selections see the weights decode reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sparkformer.ops import _extension
from sparkformer.ops import sparse_ffn_decode as ops
from sparkformer.ops.dense_decode import GegluWeights, matvec
from sparkformer.ops.quant import QuantGeglu, QuantMatrix, dequantize, quant_matvec, quantize
from sparkformer.ops.quant_sparse import quant_cats_ffn_decode, quant_sparse_input_matvec, quant_teal_ffn_decode

__all__ = ["SparseLayer", "dequantize_sparse_layer", "ffn_numel", "make_sparse_layer", "masked",
           "quantize_sparse_layer", "sparse_ffn_decode", "sparse_matvec", "sparse_prefill_weights"]


@dataclass
class SparseLayer:
    thresholds: object  # sparkformer.sparsity.LayerThresholds (duck-typed: qkv, o, gate_up, down, gate_act)
    w_qkv_t: torch.Tensor | None = None  # (d, n_qkv)
    w_o_t: torch.Tensor | None = None  # (H*hd, d)
    gate_up_t: torch.Tensor | None = None  # (d, 2m)
    down_t: QuantMatrix | None = None  # quantized layouts, FFN sites: W_down^T (m, d) rows (the float one is ffn[2])

    def to(self, device) -> "SparseLayer":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SparseLayer(self.thresholds, mv(self.w_qkv_t), mv(self.w_o_t), mv(self.gate_up_t))

    @property
    def has_ffn(self) -> bool:
        th = self.thresholds
        return th.gate_up is not None or th.down is not None or th.gate_act is not None

    def tensors(self) -> list[torch.Tensor]:
        ts = (self.w_qkv_t, self.w_o_t, self.gate_up_t, self.down_t)
        return [t.data if isinstance(t, QuantMatrix) else t for t in ts if t is not None]


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


def quantize_sparse_layer(sp: SparseLayer, ffn, plan) -> SparseLayer:
    """``sp`` (float) with its W^T rows block-quantized along the output dimension, ``plan(role)`` giving each
    matrix's format (roles of ``ops.quant.ROLES``: qkv, o, gate_up, down); FFN sites also get W_down^T rows from
    ``ffn`` = the float (w_gate, w_up, w_down_t)."""
    if any(isinstance(t, QuantMatrix) for t in (sp.w_qkv_t, sp.w_o_t, sp.gate_up_t, sp.down_t)):
        return sp  # already quantized (a layout shared with another engine)

    def q(t, role):
        return None if t is None else quantize(t.float(), plan(role))

    down_t = q(ffn[2], "down") if sp.has_ffn else None
    return SparseLayer(sp.thresholds, q(sp.w_qkv_t, "qkv"), q(sp.w_o_t, "o"), q(sp.gate_up_t, "gate_up"), down_t)


def dequantize_sparse_layer(sp: SparseLayer, dtype: torch.dtype) -> SparseLayer:
    """The float layer a quantized one stands for (``down_t`` dropped: float layers read ``ffn[2]``)."""
    def f(t):
        return None if t is None else dequantize(t, dtype)

    return SparseLayer(sp.thresholds, f(sp.w_qkv_t), f(sp.w_o_t), f(sp.gate_up_t))


def sparse_prefill_weights(sp: SparseLayer, w_qkv: torch.Tensor, w_o: torch.Tensor, ffn, dtype: torch.dtype):
    """(w_qkv, w_o, ffn) for prefill's GEMMs of a quantized layer: where a site reads quantized W^T rows in decode,
    those rows dequantized and transposed back (the dense copies are rounded along the other dimension); the rest as
    given (``ffn``: float GegluWeights)."""
    if not any(isinstance(t, QuantMatrix) for t in (sp.w_qkv_t, sp.w_o_t, sp.gate_up_t, sp.down_t)):
        return w_qkv, w_o, ffn

    def back(t):
        return dequantize(t, dtype).t()

    if isinstance(sp.w_qkv_t, QuantMatrix):
        w_qkv = back(sp.w_qkv_t)
    if isinstance(sp.w_o_t, QuantMatrix):
        w_o = back(sp.w_o_t)
    wg, wu, wd_t = ffn
    if isinstance(sp.gate_up_t, QuantMatrix):
        gu = back(sp.gate_up_t)
        wg, wu = gu[: wg.shape[0]], gu[wg.shape[0]:]
    if sp.down_t is not None:
        wd_t = dequantize(sp.down_t, dtype)
    return w_qkv, w_o, GegluWeights(wg, wu, wd_t)


def ffn_numel(ffn) -> int:
    """Weights of a layer's FFN (float tuple or ``QuantGeglu``), the denominator of the thresholded-read stats."""
    if isinstance(ffn, QuantGeglu):
        return ffn.gate_up.numel() + ffn.down.numel()
    return sum(w.numel() for w in ffn)


def masked(x: torch.Tensor, t: float | None) -> torch.Tensor:
    """x with the entries |x| <= t zeroed (the training form's mask); x itself when the site is dense."""
    return x if t is None else x * (x.abs() > t)


def _ext_ready(impl: str) -> bool:
    return impl == "ext" or _extension.available()


def sparse_matvec(w_t: torch.Tensor, x: torch.Tensor, t: float, impl: str = "auto") -> tuple[torch.Tensor, int]:
    """W x over the inputs with |x_j| > t only, W given as W^T (in, out) (float or quantized rows): (y (out,) fp32,
    inputs kept)."""
    if isinstance(w_t, QuantMatrix):
        return quant_sparse_input_matvec(w_t, x, t, impl)
    y, n = ops.sparse_input_matvec(w_t, x.float(), t, impl=impl)  # fp32 x: the mask as in the training form
    return y.float(), int(n)


def sparse_ffn_decode(sp: SparseLayer, ffn: tuple, xn: torch.Tensor, act: Callable, act_name: str, dtype,
                      impl: str = "auto") -> tuple[torch.Tensor, float]:
    """One token through a thresholded gated FFN: (y (d,) fp32, fraction of FFN weights read)."""
    if isinstance(ffn, QuantGeglu):
        return _quant_ffn_decode(sp, ffn, xn.float(), act, act_name, impl)
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


def _quant_ffn_decode(sp: SparseLayer, ffn: QuantGeglu, x: torch.Tensor, act: Callable, act_name: str,
                      impl: str) -> tuple[torch.Tensor, float]:
    """``sparse_ffn_decode`` over quantized weights (``quantize_sparse_layer``'s layout)."""
    th = sp.thresholds
    m, d = sp.down_t.shape[0], x.numel()
    if th.gate_act is not None:  # CATS: the gate rows of the dense layout, then the kept neurons
        y, n = quant_cats_ffn_decode(x, ffn.gate_up, sp.down_t, th.gate_act, act_name, impl)
        return y, (m + 2 * n) / (3 * m)
    t_down = th.down if th.down is not None else -1.0  # negative: every neuron
    if sp.gate_up_t is not None:
        y, n_in, n_h = quant_teal_ffn_decode(x, sp.gate_up_t, sp.down_t, th.gate_up, t_down, act_name, impl)
        return y, (2 * n_in / d + n_h / m) / 3.0
    gu = quant_matvec(ffn.gate_up, x, impl)  # the down site alone: dense gate/up
    y, n_h = quant_sparse_input_matvec(sp.down_t, act(gu[:m]) * gu[m:], t_down, impl)
    return y, (2.0 + n_h / m) / 3.0
