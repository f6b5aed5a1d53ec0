"""The fused decode step: one C++ call per token (``torch.classes.sparkformer.DecodePlan``, ops/csrc/step_ops.cpp).

``CpuEngine.step`` issues ~15 small torch ops per layer around its kernels (norms, RoPE, cache writes, residual adds);
on a small model (SmolLM2-135M: 30 layers, 0.27 GB in bf16) their dispatch costs as much as a third of a token. The
plan built here hands the C++ side the engine's weights, caches and RoPE tables once; each step then runs the embedding
row, every layer and the LM head without returning to Python, calling the same kernels the Python step calls. The
Python step stays the reference (``CpuEngine(..., fused=False)``; tests compare the two) and serves what the plan does
not cover: thresholded (sparsified) or routed layers, activations the kernels lack, per-component profiling, and
engines without the C++ extension.

Encoding (must match step_ops.cpp): ints = a header (``_HEADER`` order) then ``_LAYER_INTS`` per layer; tensors =
embed, head, final_norm, (cos, sin, perm) per RoPE table, then ten per layer (w_qkv, w_o, norms, qk_norms, three FFN
tensors, three cache tensors; empty tensors fill the gaps); floats = eps, attention scale, attention softcap (0:
none), final softcap (0: none), embedding scale, Spark FFN fraction. A quantized matrix is passed as its uint8 rows
with its format code (``ops.quant.CODES``; -1: float).
"""

from __future__ import annotations

import torch

from sparkformer.ops import _extension
from sparkformer.ops.quant import CODES, QuantGeglu, QuantMatrix, QuantSparkFFN, ext_supports
from sparkformer.ops.sparse_ffn_decode import FUSED_ACTIVATIONS

_ACT_CODES = {"gelu_tanh": 0, "silu": 1}
_FFN_CODES = {"geglu": 0, "spark": 1, "quant_gated": 2, "quant_spark": 3}
_EMPTY = torch.empty(0)


def fused_blockers(engine) -> list[str]:
    """Why ``engine`` cannot run the fused step (empty when it can)."""
    why = []
    if engine.impl not in ("auto", "ext"):
        why.append(f"impl={engine.impl!r} asks for the Python kernels")
    elif not _extension.available():
        why.append("the C++ extension is not available")
    if engine.cfg.ffn_activation not in FUSED_ACTIVATIONS:
        why.append(f"activation {engine.cfg.ffn_activation!r} has no fused kernel")
    missing = sorted({f for f in _formats(engine) if not ext_supports(f)})
    if missing:
        why.append(f"the C++ extension has no kernels for {', '.join(missing)}")
    for i, st in enumerate(engine.layers):
        if st.sparse is not None:
            why.append(f"layer {i} has thresholded inputs (sparsified)")
        if st.routed is not None or st.ffn_kind == "routed":
            why.append(f"layer {i} has a routed FFN")
    return why


def _formats(engine) -> set[str]:
    """The block formats an engine's matrices are in."""
    out = set()
    for w in (engine.embed, engine.head):
        if isinstance(w, QuantMatrix):
            out.add(w.fmt)
    for st in engine.layers:
        for w in (st.w_qkv, st.w_o):
            if isinstance(w, QuantMatrix):
                out.add(w.fmt)
        if isinstance(st.ffn, QuantSparkFFN):
            out |= {st.ffn.k1.fmt, st.ffn.fmt}
        elif isinstance(st.ffn, QuantGeglu):
            out |= {st.ffn.gate_up.fmt, st.ffn.down.fmt}
    return out


def _matrix(w) -> tuple[torch.Tensor, int]:
    return (w.data, CODES[w.fmt]) if isinstance(w, QuantMatrix) else (w, -1)


def _ffn(st) -> tuple[int, list[torch.Tensor], list[int]]:
    """(FFN code, its three tensors, [fmt_a, fmt_b, p0, p1, p2]) of one layer."""
    f = st.ffn
    if isinstance(f, QuantSparkFFN):
        return (_FFN_CODES["quant_spark"], [f.k1.data, f.rows, _EMPTY],
                [CODES[f.k1.fmt], CODES[f.fmt], f.k1.cols, f.n2, f.nv])
    if isinstance(f, QuantGeglu):
        return (_FFN_CODES["quant_gated"], [f.gate_up.data, f.down.data, _EMPTY],
                [CODES[f.gate_up.fmt], CODES[f.down.fmt], 0, 0, 0])
    return _FFN_CODES[st.ffn_kind], list(f), [-1, -1, 0, 0, 0]


def build_plan(engine):
    """The ``DecodePlan`` of a ``CpuEngine`` (its weights and caches are shared, not copied)."""
    why = fused_blockers(engine)
    if why:
        raise ValueError("the fused decode step cannot run this engine: " + "; ".join(why))
    cfg = engine.cfg
    embed, fmt_embed = _matrix(engine.embed)
    head, fmt_head = _matrix(engine.head)
    ropes: dict[tuple, int] = {}
    tensors = [embed, head, engine.final_norm]
    rope_tensors, layer_ints, layer_tensors = [], [], []
    for st in engine.layers:
        theta = st.rope_theta if st.rope_theta is not None else cfg.rope_theta
        split = cfg.spark_attn_rank if st.attn_kind == "spark" else None
        if (theta, split) not in ropes:
            ropes[(theta, split)] = len(ropes)
            rope_tensors += list(engine._ropes[theta][1][split])
        w_qkv, fmt_qkv = _matrix(st.w_qkv)
        w_o, fmt_o = _matrix(st.w_o)
        code, ffn, extra = _ffn(st)
        cache = list(st.cache) + [_EMPTY] * (3 - len(st.cache))
        layer_ints += [1 if st.attn_kind == "spark" else 0, code, -1 if st.window is None else st.window,
                       ropes[(theta, split)], fmt_qkv, fmt_o, *extra]
        layer_tensors += [w_qkv, w_o, st.norms, _EMPTY if st.qk_norms is None else st.qk_norms, *ffn, *cache]
    header = [len(engine.layers), len(ropes), cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.spark_attn_rank,
              cfg.d_model, cfg.vocab_size, int(bool(cfg.post_norms)), _ACT_CODES[cfg.ffn_activation], fmt_embed,
              fmt_head, cfg.spark_attn_topk]
    floats = [cfg.rms_norm_eps, cfg.attn_scale, cfg.attn_logit_softcap or 0.0, cfg.final_logit_softcap or 0.0,
              float(engine._embed_scale), cfg.spark_ffn_fraction]
    return torch.classes.sparkformer.DecodePlan(tensors + rope_tensors + layer_tensors, header + layer_ints,
                                                [float(v) for v in floats])


class FusedStep:
    """A built plan and the per-token counts the engine's stats add up."""

    def __init__(self, engine):
        self.plan = build_plan(engine)
        spark_ffn = [st for st in engine.layers if st.ffn_kind == "spark"]
        self.spark_ffn_layers = len(spark_ffn)
        self.spark_ffn_width = sum(st.ffn.rows.shape[0] if isinstance(st.ffn, QuantSparkFFN) else st.ffn.k1.shape[0]
                                   for st in spark_ffn)
        self.spark_attn_layers = sum(st.attn_kind == "spark" for st in engine.layers)

    def step(self, token: int, pos: int, stats, n_heads: int) -> torch.Tensor:
        logits, counts = self.plan.step(token, pos)
        neurons, kept, capped = counts.tolist()
        if self.spark_ffn_layers:
            stats.ffn_neurons += neurons
            stats.ffn_width += self.spark_ffn_width
            stats.ffn_layers += self.spark_ffn_layers
        if self.spark_attn_layers:
            stats.keys_kept += kept
            stats.key_rows += n_heads * self.spark_attn_layers
            stats.cap_fired += capped
        return logits
