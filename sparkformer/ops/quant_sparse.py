"""Activation-sparse decode over block-quantized weights (q8_0 / q4_0): the routed and thresholded layers of
``sparkformer.decode.routed`` / ``decode.sparse`` in the formats of ``sparkformer.ops.quant``.

Layouts (each read a kept neuron or input makes is one contiguous quantized row):

    QuantGatedRows   routed FFN: row i of ``gate_up`` is neuron i's gate row's blocks then its up row's blocks (two
                     quantized rows of d weights back to back), row i of ``down`` its W_down^T row (d_out weights)
    W^T rows         TEAL: row j of a ``QuantMatrix`` (n_in, n_out) is input j's column of W, quantized along the
                     output dimension, so y = sum over kept j of x_j * dequant(row j)
    CATS             the dense layout's [W_gate; W_up] rows (``QuantGeglu.gate_up``, integer dot products) and the
                     W_down^T rows above

Ops (C++ in ``csrc/quant_sparse_ops.cpp``, every ISA through the quantized kernel table of ``csrc/quant.h``), each
beside its plain-PyTorch reference, which computes the kernels' math (gate/up dot products on the activation quantized
per call to int8 blocks, as ``quant.quant_matvec_reference``; row accumulations on dequantized rows in fp32):

    quant_gated_gather(x, rows, idx, act, verify)           the neurons ``idx`` (+ optional verify stage)
    quant_lowrank_routed_ffn(x, A, B, f, act, rows, ...)    a low-rank predictor (float A, B) picks them, then gather
    quant_sparse_input_matvec(w_t, x, t)                    TEAL: inputs |x_j| > t
    quant_teal_ffn_decode(x, gate_up_t, down_t, t_in, t_down, act)
    quant_cats_ffn_decode(x, gate_up, down_t, t, act)       the gate GEMV over every neuron, then the kept ones

``impl``: auto (C++ when it builds, else torch) | ext | torch (dequantize, then float ops: no activation
quantization) | reference. Every op returns y (d_out,) fp32 and its counts as ints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sparkformer.ops import _extension
from sparkformer.ops.activations import ACTIVATIONS
from sparkformer.ops.quant import FORMATS, QuantMatrix, check_format, dequantize, quant_matvec_reference, quantize, \
    row_bytes
from sparkformer.ops.sparse_ffn_decode import fused_act_name
from sparkformer.ops.stat_topk import stat_threshold

__all__ = ["QuantGatedRows", "dequantize_gated_rows", "gated_rows", "quant_cats_ffn_decode",
           "quant_cats_ffn_decode_reference", "quant_gated_gather", "quant_gated_gather_reference",
           "quant_lowrank_routed_ffn", "quant_lowrank_routed_ffn_reference", "quant_sparse_input_matvec",
           "quant_sparse_input_matvec_reference", "quant_teal_ffn_decode", "quant_teal_ffn_decode_reference",
           "quantize_gated_rows"]

IMPLS = ("auto", "ext", "torch", "reference")


@dataclass
class QuantGatedRows:
    """A gated FFN laid out per neuron for gathers: ``gate_up`` (m, 2 * row_bytes(fmt, d)) uint8, neuron i's gate
    row then its up row; ``down`` (m, d_out) its W_down^T rows (format ``down.fmt``)."""

    gate_up: torch.Tensor
    fmt: str
    d: int
    down: QuantMatrix

    @property
    def n_neurons(self) -> int:
        return self.gate_up.shape[0]

    @property
    def nbytes(self) -> int:
        return self.gate_up.numel() + self.down.nbytes


def quantize_gated_rows(w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor, fmt: str,
                        down_fmt: str | None = None) -> QuantGatedRows:
    """From float (m, d) gate and up rows and W_down^T (m, d_out): gate/up in ``fmt``, down in ``down_fmt``."""
    down_fmt = fmt if down_fmt is None else down_fmt
    check_format(fmt, w_gate.shape[1], "routed FFN gate/up")
    check_format(down_fmt, w_down_t.shape[1], "routed FFN W_down^T")
    gate_up = torch.cat([quantize(w_gate.float(), fmt).data, quantize(w_up.float(), fmt).data], 1).contiguous()
    return QuantGatedRows(gate_up, fmt, w_gate.shape[1], quantize(w_down_t.float(), down_fmt))


def gated_rows(rows: QuantGatedRows) -> tuple[QuantMatrix, QuantMatrix]:
    """The gate rows and the up rows as two (strided) quantized matrices."""
    b = row_bytes(rows.fmt, rows.d)
    return QuantMatrix(rows.gate_up[:, :b], rows.fmt, rows.d), QuantMatrix(rows.gate_up[:, b:], rows.fmt, rows.d)


def dequantize_gated_rows(rows: QuantGatedRows, dtype: torch.dtype = torch.float32):
    """(w_gate (m, d), w_up (m, d), w_down_t (m, d_out)) the quantized rows stand for."""
    g, u = gated_rows(rows)
    return dequantize(g, dtype), dequantize(u, dtype), dequantize(rows.down, dtype)


def _impl(impl: str, *fmts: str) -> str:
    """The path to run: ``auto`` is C++ when it builds and takes every format involved (``quant.FORMATS``: the C++ ops
    here take q8_0 / q4_0), else torch."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r} ({' | '.join(IMPLS)})")
    other = [f for f in fmts if f not in FORMATS]
    if impl == "auto":
        return "ext" if _extension.available() and not other else "torch"
    if impl == "ext" and other:
        raise ValueError(f"the C++ sparse quantized ops take {', '.join(FORMATS)}, not {', '.join(other)}; use "
                         "impl='auto' (torch for those) or 'torch'")
    return impl


def _act(act: str | Callable) -> tuple[str, Callable]:
    name = fused_act_name(act)
    return name, ACTIVATIONS[name]


def _x_rows(x: torch.Tensor, w: QuantMatrix, exact: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Dot products of rows of ``w`` with x: the kernels' integer scheme (reference) or fp32 on dequantized rows."""
    if exact:
        return lambda rows: quant_matvec_reference(w.index_select(rows), x)
    xf = x.float()
    return lambda rows: dequantize(w.index_select(rows)) @ xf


# ------------------------------------------------------------------------------------------------
# Routed FFN: the gather over chosen neurons
# ------------------------------------------------------------------------------------------------
def _gather(x, rows: QuantGatedRows, idx, act, verify, exact: bool):
    _, fn = _act(act)
    g, u = gated_rows(rows)
    idx = idx.long()
    h = fn(_x_rows(x, g, exact)(idx)) * _x_rows(x, u, exact)(idx)
    if verify is not None:
        w, t = verify
        keep = (h.abs() * w.float().index_select(0, idx) > t).nonzero().squeeze(1)
        idx, h = idx.index_select(0, keep), h.index_select(0, keep)
    return h @ dequantize(rows.down.index_select(idx)), idx.numel()


def quant_gated_gather_reference(x, rows: QuantGatedRows, idx, act, verify=None):
    """sum over i in idx of act(g_i) u_i W_down^T[i] (g, u: integer dot products on x quantized per call); with
    ``verify`` = (weights (m,), threshold) only the i with |h_i| weights[i] > threshold. Returns (y, kept)."""
    return _gather(x, rows, idx, act, verify, True)


def quant_gated_gather(x: torch.Tensor, rows: QuantGatedRows, idx: torch.Tensor, act: str | Callable,
                       verify: tuple[torch.Tensor, float] | None = None,
                       impl: str = "auto") -> tuple[torch.Tensor, int]:
    """Gated FFN of one token over the neurons ``idx`` (int32/int64) of quantized rows: (y (d_out,) fp32, W_down^T
    rows read). ``verify``: (weights (m,) fp32, threshold), the verify stage of ``decode.routed``."""
    impl = _impl(impl, rows.fmt, rows.down.fmt)
    if impl == "ext":
        name, _ = _act(act)
        w, t = verify if verify is not None else (None, 0.0)
        y, kept = torch.ops.sparkformer.quant_gated_gather(x, rows.gate_up, FORMATS[rows.fmt], rows.down.data,
                                                           FORMATS[rows.down.fmt], rows.down.cols, idx, name, w,
                                                           float(t))
        return y, int(kept)
    return _gather(x, rows, idx, act, verify, impl == "reference")


def _lowrank_scores(x, A, B, m, score_act):
    yb = B.float() @ (A.float() @ x.float())
    return (ACTIVATIONS[fused_act_name(score_act)](yb[:m]) * yb[m:]).abs()


def quant_lowrank_routed_ffn_reference(x, A, B, f, act, rows: QuantGatedRows, verify=None, score_act=None):
    """A low-rank predictor's step: s = |act(g) u| with [g; u] = B (A x) in fp32 on the float A, B, the neurons with
    s > stat_threshold(s, f), then ``quant_gated_gather_reference``. Returns (y, proposed, kept)."""
    s = _lowrank_scores(x, A, B, rows.n_neurons, score_act if score_act is not None else act)
    idx = (s > stat_threshold(s, f)).nonzero().squeeze(1)
    y, kept = quant_gated_gather_reference(x, rows, idx, act, verify)
    return y, idx.numel(), kept


def quant_lowrank_routed_ffn(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, f: float, act: str | Callable,
                             rows: QuantGatedRows, verify: tuple[torch.Tensor, float] | None = None,
                             score_act: str | Callable | None = None,
                             impl: str = "auto") -> tuple[torch.Tensor, int, int]:
    """The whole routed step in one call: predictor A (r, d), B (2m, r) fp32 or bf16 (kept float: a small matrix
    whose scores pick the neurons), then the quantized gather. Returns (y (d_out,) fp32, proposed, kept)."""
    impl = _impl(impl, rows.fmt, rows.down.fmt)
    if not 0.0 < float(f) <= 1.0:
        raise ValueError(f"f must be in (0, 1], got {f}")
    if impl == "ext":
        name, _ = _act(act)
        sname = None if score_act is None else fused_act_name(score_act)
        w, t = verify if verify is not None else (None, 0.0)
        y, prop, kept = torch.ops.sparkformer.quant_lowrank_routed_ffn(
            x, A, B, float(f), name, rows.gate_up, FORMATS[rows.fmt], rows.down.data, FORMATS[rows.down.fmt],
            rows.down.cols, w, float(t), sname)
        return y, int(prop), int(kept)
    if impl == "reference":
        return quant_lowrank_routed_ffn_reference(x, A, B, f, act, rows, verify, score_act)
    s = _lowrank_scores(x, A, B, rows.n_neurons, score_act if score_act is not None else act)
    idx = (s > stat_threshold(s, f)).nonzero().squeeze(1)
    y, kept = _gather(x, rows, idx, act, verify, False)
    return y, idx.numel(), kept


# ------------------------------------------------------------------------------------------------
# TEAL: thresholded inputs over W^T rows
# ------------------------------------------------------------------------------------------------
def _check_t(t: float) -> float:
    t = float(t)
    if t != t:
        raise ValueError("threshold is NaN")
    return t


def quant_sparse_input_matvec_reference(w_t: QuantMatrix, x: torch.Tensor, t: float) -> tuple[torch.Tensor, int]:
    """y = sum over j with |x_j| > t of x_j * dequant(row j of W^T), fp32. Returns (y, inputs kept)."""
    xf = x.float()
    keep = xf.abs() > _check_t(t)
    return dequantize(w_t).t() @ torch.where(keep, xf, torch.zeros_like(xf)), int(keep.sum())


def _sparse_mv_torch(w_t: QuantMatrix, x: torch.Tensor, t: float) -> tuple[torch.Tensor, int]:
    xf = x.float()
    idx = (xf.abs() > _check_t(t)).nonzero().squeeze(1)
    return xf.index_select(0, idx) @ dequantize(w_t.index_select(idx)), idx.numel()


def quant_sparse_input_matvec(w_t: QuantMatrix, x: torch.Tensor, t: float,
                              impl: str = "auto") -> tuple[torch.Tensor, int]:
    """TEAL's skip on quantized W^T rows (``w_t`` (n_in, n_out), each row quantized along n_out): only the inputs
    |x_j| > t read their row. A negative t keeps every input. Returns (y (n_out,) fp32, inputs kept)."""
    impl = _impl(impl, w_t.fmt)
    if impl == "ext":
        y, n = torch.ops.sparkformer.quant_sparse_input_matvec(w_t.data, FORMATS[w_t.fmt], w_t.cols, x, _check_t(t))
        return y, int(n)
    if impl == "torch":
        return _sparse_mv_torch(w_t, x, t)
    return quant_sparse_input_matvec_reference(w_t, x, t)


def _teal(x, gate_up_t, down_t, t_in, t_down, act, mv):
    _, fn = _act(act)
    m = down_t.shape[0]
    gu, n_in = mv(gate_up_t, x, t_in)
    y, n_h = mv(down_t, fn(gu[:m]) * gu[m:], t_down)
    return y, n_in, n_h


def quant_teal_ffn_decode_reference(x, gate_up_t: QuantMatrix, down_t: QuantMatrix, t_in, t_down, act):
    """``quant_sparse_input_matvec_reference`` on [W_gate; W_up]^T (d, 2m), h = act(g) u, then on W_down^T (m, d_out)
    with the neurons |h_i| > t_down. Returns (y, inputs kept, neurons kept)."""
    return _teal(x, gate_up_t, down_t, t_in, t_down, act, quant_sparse_input_matvec_reference)


def quant_teal_ffn_decode(x: torch.Tensor, gate_up_t: QuantMatrix, down_t: QuantMatrix, t_in: float, t_down: float,
                          act: str | Callable, impl: str = "auto") -> tuple[torch.Tensor, int, int]:
    """TEAL's gated FFN step in one call (negative thresholds keep everything at that site)."""
    impl = _impl(impl, gate_up_t.fmt, down_t.fmt)
    if gate_up_t.cols != 2 * down_t.shape[0]:
        raise ValueError(f"gate_up_t has rows of {gate_up_t.cols}, W_down^T has {down_t.shape[0]} neurons (need 2m)")
    if impl == "ext":
        name, _ = _act(act)
        y, n_in, n_h = torch.ops.sparkformer.quant_teal_ffn_decode(
            x, gate_up_t.data, FORMATS[gate_up_t.fmt], down_t.data, FORMATS[down_t.fmt], down_t.cols,
            _check_t(t_in), _check_t(t_down), name)
        return y, int(n_in), int(n_h)
    return _teal(x, gate_up_t, down_t, t_in, t_down, act,
                 _sparse_mv_torch if impl == "torch" else quant_sparse_input_matvec_reference)


# ------------------------------------------------------------------------------------------------
# CATS: the gate GEMV, then the kept neurons' up and W_down^T rows
# ------------------------------------------------------------------------------------------------
def _cats(x, gate_up: QuantMatrix, down_t: QuantMatrix, t, act, exact: bool):
    _, fn = _act(act)
    m = down_t.shape[0]
    dots = _x_rows(x, gate_up, exact)
    a = fn(dots(torch.arange(m)))
    idx = (a.abs() > _check_t(t)).nonzero().squeeze(1)
    h = a.index_select(0, idx) * dots(idx + m)
    return h @ dequantize(down_t.index_select(idx)), idx.numel()


def quant_cats_ffn_decode_reference(x, gate_up: QuantMatrix, down_t: QuantMatrix, t, act):
    """a = act(W_gate x) over every neuron (integer dot products), the i with |a_i| > t, then
    sum_i a_i (up_i . x) W_down^T[i]. ``gate_up`` (2m, d): the gate rows then the up rows. Returns (y, kept)."""
    return _cats(x, gate_up, down_t, t, act, True)


def quant_cats_ffn_decode(x: torch.Tensor, gate_up: QuantMatrix, down_t: QuantMatrix, t: float, act: str | Callable,
                          impl: str = "auto") -> tuple[torch.Tensor, int]:
    """CATS over quantized weights: (y (d_out,) fp32, neurons kept)."""
    impl = _impl(impl, gate_up.fmt, down_t.fmt)
    if gate_up.shape[0] != 2 * down_t.shape[0]:
        raise ValueError(f"gate_up has {gate_up.shape[0]} rows, W_down^T {down_t.shape[0]} neurons (need 2m)")
    if impl == "ext":
        name, _ = _act(act)
        y, kept = torch.ops.sparkformer.quant_cats_ffn_decode(x, gate_up.data, FORMATS[gate_up.fmt], down_t.data,
                                                              FORMATS[down_t.fmt], down_t.cols, _check_t(t), name)
        return y, int(kept)
    return _cats(x, gate_up, down_t, t, act, impl == "reference")
