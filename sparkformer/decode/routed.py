"""Routed FFN layers in the decode engines: a pretrained dense gated FFN whose neurons a router picks per token.

A router is any object with ``n_neurons``, ``to(dtype)``, ``eval()``, ``neuron_mask(x) -> (T, n) bool`` and, where
it has a cheap decode form, ``decode_form(dtype) -> (A, B, n, f, act) | None``: scores ``s = |act(y[:n]) * y[n:]|``
with ``y = B (A x)``, neurons kept where ``s > stat_threshold(s, f)`` (``sparkformer.bricks.routing.LowRankPredictor``,
the predictor of ``bricks sparkify``, whose training-form selection is the same threshold). The engines depend only on
this protocol, not on the bricks package.

Quantized (``quantize_routed``, the CPU engine's q8_0 / q4_0): each neuron's gate and up rows are one contiguous
quantized row and its W_down^T row another (``ops.quant_sparse.QuantGatedRows``), so a kept neuron is two reads; the
router stays float, in bf16 (its scores pick the neurons; a low-rank predictor is ~(r / d) of the FFN's weights).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch

from sparkformer.ops.dense_decode import GegluWeights
from sparkformer.ops.quant_sparse import QuantGatedRows, dequantize_gated_rows, quant_gated_gather, \
    quant_lowrank_routed_ffn, quantize_gated_rows
from sparkformer.ops.sparse_ffn_decode import fused_act_name
from sparkformer.ops.stat_topk import stat_threshold

FUSED_SCORE_ACTS = ("silu", "gelu_tanh")  # predictor score activations the fused C++ step implements


@dataclass
class RoutedFFN:
    router: Any  # the router, copied into the engine's dtype
    gate_up: torch.Tensor  # (m, 2, d): each neuron's gate and up rows side by side
    w_down_t: torch.Tensor  # (m, d)
    fast: tuple | None  # router.decode_form(dtype): (A, B, n, f, act) or None
    verify: tuple | None = None  # router.verify_form(): (weights (m,) fp32, threshold) or None
    last_gate_up: int = 0  # neurons whose gate/up rows the last token read (the predicted set)
    quant: QuantGatedRows | None = None  # quantized layouts: the rows (gate_up / w_down_t are its uint8 buffers)

    def to(self, device: torch.device) -> "RoutedFFN":
        fast = None if self.fast is None else (self.fast[0].to(device), self.fast[1].to(device), *self.fast[2:])
        verify = None if self.verify is None else (self.verify[0].to(device), self.verify[1])
        return RoutedFFN(self.router.to(device), self.gate_up.to(device), self.w_down_t.to(device), fast, verify)


def attach_router(layer, router, w_gate: torch.Tensor, w_up: torch.Tensor, index: int, dtype: torch.dtype) -> None:
    """Make decode layer ``layer`` (a dense gated FFN) a routed one driven by a copy of ``router``."""
    if layer.ffn_kind != "geglu":
        raise ValueError(f"layer {index}: routers apply to dense gated FFN layers, this one is {layer.ffn_kind!r}")
    n = w_gate.shape[0]
    if getattr(router, "n_neurons", None) != n:
        raise ValueError(f"layer {index}: router is for {getattr(router, 'n_neurons', '?')} neurons, the FFN has {n}; "
                         "were the routers made for another model?")
    gate_up = torch.stack([w_gate, w_up], 1).to(dtype).contiguous()
    layer.routed = _routed(router, dtype, gate_up, layer.ffn[2])
    layer.ffn_kind = "routed"


def _routed(router, dtype: torch.dtype, gate_up, w_down_t, quant=None) -> RoutedFFN:
    """A RoutedFFN over these weights, driven by a copy of ``router`` in ``dtype`` (its decode and verify forms)."""
    r = copy.deepcopy(router).to(dtype).eval()
    form = r.decode_form(dtype) if hasattr(r, "decode_form") else None
    verify = r.verify_form() if hasattr(r, "verify_form") else None
    return RoutedFFN(r, gate_up, w_down_t, form, verify, quant=quant)


def quantize_routed(rf: RoutedFFN, fmt: str, down_fmt: str | None = None,
                    router_dtype: torch.dtype = torch.bfloat16) -> RoutedFFN:
    """A float routed FFN in a block-quantized format: gate/up rows in ``fmt``, W_down^T rows in ``down_fmt``
    (default ``fmt``), a copy of the router in ``router_dtype`` (the quantized engine's activation dtype)."""
    if rf.quant is not None:  # already quantized (a layout shared with another engine)
        return rf
    rows = quantize_gated_rows(rf.gate_up[:, 0], rf.gate_up[:, 1], rf.w_down_t, fmt, down_fmt)
    return _routed(rf.router, router_dtype, rows.gate_up, rows.down.data, rows)


def dequantize_routed(rf: RoutedFFN, dtype: torch.dtype) -> RoutedFFN:
    """The float routed FFN a quantized one stands for (its weights dequantized, the router copied to ``dtype``)."""
    wg, wu, wd_t = dequantize_gated_rows(rf.quant, dtype)
    return _routed(rf.router, dtype, torch.stack([wg, wu], 1).contiguous(), wd_t)


def routed_float_ffn(rf: RoutedFFN, dtype: torch.dtype) -> GegluWeights:
    """(w_gate, w_up, w_down_t) of a quantized routed FFN, dequantized (prefill's GEMMs run on them)."""
    return GegluWeights(*dequantize_gated_rows(rf.quant, dtype))


def routed_neurons(rf: RoutedFFN, x: torch.Tensor, mv: Callable) -> torch.Tensor:
    """Indices of the neurons ``rf``'s router keeps for one token ``x`` (d,) in the engine's dtype."""
    if rf.fast is not None:  # a low-rank predictor with statistical selection: its scores and threshold in a few ops
        A, B, n, f, score_act = rf.fast
        y = mv(B, mv(A, x).to(x.dtype)).float()
        s = (score_act(y[:n]) * y[n:]).abs_()
        return (s > stat_threshold(s, f)).nonzero().squeeze(1)
    return rf.router.neuron_mask(x[None])[0].nonzero().squeeze(1)


def routed_ffn_decode(rf: RoutedFFN, xn: torch.Tensor, act: Callable, dtype: torch.dtype,
                      mv: Callable, gather: Callable | None = None,
                      gather_verify: Callable | None = None, fused: Callable | None = None,
                      impl: str = "auto") -> tuple[torch.Tensor, int]:
    """Gated FFN over the neurons the router keeps for this token: one gather of their gate/up rows, one of their
    W_down columns. With a verify stage, only the predicted neurons whose exact |act(g) u| * w passes the threshold
    read their W_down row. ``gather(x, gate_up, w_down_t, idx)`` / ``gather_verify(..., idx, w, t) -> (y, kept)``:
    fused kernels for the whole step, when the engine has them; ``fused(x, rf) -> (y, proposed, kept)``: the whole
    step of a low-rank predictor in one call (scores, threshold, gather, verify). Quantized rows (``rf.quant``): the
    ops of ``ops.quant_sparse`` (``impl`` as theirs). Returns (y (d,), neurons run)."""
    if rf.quant is not None:
        return _quant_routed_decode(rf, xn, fused_act_name(act), dtype, mv, impl)
    if fused is not None and rf.fast is not None and getattr(rf.router, "act", None) in FUSED_SCORE_ACTS:
        y, proposed, kept = fused(xn.float(), rf)
        rf.last_gate_up = int(proposed)
        return y, int(kept)
    x = xn.to(dtype)
    idx = routed_neurons(rf, x, mv)
    rf.last_gate_up = idx.numel()
    if rf.verify is None and gather is not None:
        return gather(x, rf.gate_up, rf.w_down_t, idx), idx.numel()
    if rf.verify is not None and gather_verify is not None:
        y, kept = gather_verify(x, rf.gate_up, rf.w_down_t, idx, *rf.verify)
        return y, int(kept)
    gu = (rf.gate_up.index_select(0, idx).view(-1, x.numel()) @ x).float().view(-1, 2)
    h = act(gu[:, 0]) * gu[:, 1]
    if rf.verify is not None:
        w, t = rf.verify
        keep = (h.abs() * w.index_select(0, idx) > t).nonzero().squeeze(1)
        idx, h = idx.index_select(0, keep), h.index_select(0, keep)
    return h.to(dtype) @ rf.w_down_t.index_select(0, idx), idx.numel()


def _quant_routed_decode(rf: RoutedFFN, xn: torch.Tensor, act: str, dtype: torch.dtype, mv: Callable,
                         impl: str) -> tuple[torch.Tensor, int]:
    if rf.fast is not None and getattr(rf.router, "act", None) in FUSED_SCORE_ACTS:  # the whole step in one call
        A, B, _, f, _ = rf.fast
        y, proposed, kept = quant_lowrank_routed_ffn(xn.float(), A, B, f, act, rf.quant, rf.verify,
                                                     score_act=rf.router.act, impl=impl)
    else:
        idx = routed_neurons(rf, xn.to(dtype), mv)
        y, kept = quant_gated_gather(xn.float(), rf.quant, idx, act, rf.verify, impl=impl)
        proposed = idx.numel()
    rf.last_gate_up = proposed
    return y, kept


def routed_prefill_mask(rf: RoutedFFN, xn: torch.Tensor, activation: torch.Tensor | None = None) -> torch.Tensor:
    """(T, m) mask of the neurons kept per prompt token: the same selections as decode (``activation``: the exact
    act(g) * u, for routers with a verify stage)."""
    return rf.router.neuron_mask(xn, activation if getattr(rf.router, "needs_activation", False) else None)
