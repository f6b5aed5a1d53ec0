"""The one conversion from a model to the decode layout, shared by every engine.

    layout = model_layout(model, torch.bfloat16, routers=None)     # a SparkLM's weights, copied and re-laid out
    layout = random_layout(cfg, torch.bfloat16, seed=0)            # full-size random weights made in that layout

Layout, chosen so that every per-token read streams:
- attention: q/k/v projections fused into one (H*hd + 2*KV*hd, d) matrix; o (d, H*hd).
- norms: one (4, d) fp32 tensor per layer holding the multipliers (1 + w for Gemma-style norms) of the input,
  post-attention, pre-FFN and post-FFN norms; Gemma 3 adds ``qk_norms`` (2, hd), the per-head q and k norms, and
  a per-layer ``rope_theta`` (local layers use their own RoPE base).
- Spark FFN: K1 (d_ff, r) contiguous; each neuron's K2 row and V row adjacent in one buffer (``SparkFFNWeights``).
- GeGLU FFN: [W_gate; W_up; W_down^T] in one (3, m, d) buffer (``GegluWeights``), read as a few long streams.
- Routed FFN (a dense gated FFN with a router choosing its neurons per token, ``routers=``): each neuron's gate and
  up rows side by side (m, 2, d) and W_down^T (m, d), so the kept neurons are one gather each (``decode.routed``).

Engines take a ``ModelLayout`` and may re-pack what their kernels need (the CUDA engine keeps K2 and V as two
contiguous matrices); nothing else reads the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparkformer.config import ModelConfig
from sparkformer.decode.routed import RoutedFFN, attach_router, quantize_routed
from sparkformer.decode.sparse import SparseLayer, make_sparse_layer, quantize_sparse_layer
from sparkformer.model import SparkLM
from sparkformer.ops.dense_decode import GegluWeights, pack_geglu
from sparkformer.ops.quant import QuantGeglu, QuantMatrix, QuantSparkFFN, format_plan, quantize, quantize_geglu, \
    quantize_spark_ffn
from sparkformer.ops.spark_ffn_decode import SparkFFNWeights, prepare_spark_ffn

FFN_KINDS = ("geglu", "spark")


@dataclass
class DecodeLayer:
    """One layer's decode weights (the cache is the engine's)."""

    attn_kind: str  # "dense" | "spark"
    ffn_kind: str  # "geglu" | "spark" | "routed"
    window: int | None
    w_qkv: torch.Tensor
    w_o: torch.Tensor
    norms: torch.Tensor  # (4, d) fp32
    ffn: tuple  # SparkFFNWeights (k1, k2, v) or GegluWeights (w_gate, w_up, w_down_t)
    routed: RoutedFFN | None = None  # ffn_kind "routed": the router and the gathered layout
    sparse: SparseLayer | None = None  # thresholded input sites (sparkformer.sparsity): transposed weights
    cache: tuple = field(default=())  # filled by the engine
    qk_norms: torch.Tensor | None = None  # (2, hd) fp32 multipliers of the per-head q and k RMSNorms (Gemma 3)
    rope_theta: float | None = None  # this layer's RoPE base; None: cfg.rope_theta


@dataclass
class ModelLayout:
    cfg: ModelConfig
    embed: torch.Tensor | QuantMatrix  # (vocab, d)
    head: torch.Tensor | QuantMatrix  # (vocab, d); the embedding itself when tied
    final_norm: torch.Tensor  # (d,) fp32 multiplier
    layers: list[DecodeLayer]
    dtype: torch.dtype | None = None  # activations and KV cache (default: the weights' float dtype)
    weight_format: str | None = None  # None (float weights) or a block-quantized format of sparkformer.ops.quant

    def __post_init__(self):
        if self.dtype is None:
            self.dtype = self.embed.dtype

    def weight_bytes(self) -> int:
        """Bytes of all weight storage the layout holds (shared storage counted once)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _weight_tensors(self)}
        return sum(storages.values())


def weight_tensors(layout: ModelLayout):
    """Every weight tensor a layout holds (views included; norms aside), for packing or counting."""
    return _weight_tensors(layout)


def _weight_tensors(layout: ModelLayout):
    def plain(w):
        if isinstance(w, QuantMatrix):
            return [w.data]
        if isinstance(w, QuantSparkFFN):
            return [w.k1.data, w.rows]
        if isinstance(w, QuantGeglu):
            return [w.gate_up.data, w.down.data]
        return list(w) if isinstance(w, tuple) else [w]

    for w in (layout.embed, layout.head):
        yield from plain(w)
    for st in layout.layers:
        for w in (st.w_qkv, st.w_o, st.ffn):
            yield from plain(w)
        if st.routed is not None:
            yield st.routed.gate_up
        if st.sparse is not None:
            yield from st.sparse.tensors()


def _norm_scale(norm, d: int) -> torch.Tensor:
    return norm.scale() if hasattr(norm, "scale") else torch.ones(d)  # nn.Identity: no post norms


def model_layout(model: SparkLM, dtype: torch.dtype, routers=None, sparsity=None) -> ModelLayout:
    """Copy a ``SparkLM``'s weights into decode layout (the model can be freed afterwards).

    ``routers``: optional per-layer router (or None) for dense gated FFN layers, e.g. the predictors of
    ``sparkformer sparsify --method predictor``: those layers run only the neurons their router selects per token.
    ``sparsity``: optional ``sparkformer.sparsity.SparseSpec`` (input / gate-activation thresholds per layer)."""
    if not isinstance(model, SparkLM):
        raise TypeError(f"the decode layout is made from a SparkLM, got {type(model).__name__} (for a transformers "
                        "SparkForCausalLM pass its .model; for other HF models use sparkformer.loading.load_model)")
    cfg = model.config
    bad = sorted({cfg.ffn_kind(i) for i in range(cfg.n_layers)} - set(FFN_KINDS))
    if bad:
        raise ValueError(f"the decode engines support ffn kinds {', '.join(FFN_KINDS)}, not {bad} "
                         "(use SparkLM.generate)")
    routers = list(routers) if routers is not None else [None] * cfg.n_layers
    if len(routers) != cfg.n_layers:
        raise ValueError(f"got {len(routers)} routers for a {cfg.n_layers}-layer model (one per layer, None = dense)")
    if sparsity is not None:
        sparsity.validate(cfg.n_layers)
    d = cfg.d_model
    layers = []
    with torch.no_grad():
        for i, blk in enumerate(model.layers):
            a, f = blk.attn, blk.ffn
            w_qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).to(dtype).contiguous()
            norms = torch.stack([_norm_scale(n, d) for n in
                                 (blk.input_norm, blk.post_attn_norm, blk.pre_ffn_norm, blk.post_ffn_norm)]).float()
            if f.kind == "spark":
                ffn = prepare_spark_ffn(torch.cat([f.predictor.weight, f.up_proj.weight], 1),
                                        f.down_proj.weight.t(), f.rank, dtype)
            else:
                ffn = pack_geglu(f.gate_proj.weight, f.up_proj.weight, f.down_proj.weight, dtype)
            layer = DecodeLayer(a.kind, f.kind, cfg.window(i), w_qkv, a.o_proj.weight.to(dtype).contiguous(), norms,
                                ffn, rope_theta=cfg.layer_rope_theta(i))
            if getattr(a, "q_norm", None) is not None:
                layer.qk_norms = torch.stack([a.q_norm.scale(), a.k_norm.scale()]).float()
            if routers[i] is not None:
                attach_router(layer, routers[i], f.gate_proj.weight, f.up_proj.weight, i, dtype)
            if sparsity is not None:
                if f.kind != "geglu" and any(getattr(sparsity.layers[i], s) is not None
                                             for s in ("gate_up", "down", "gate_act")):
                    raise ValueError(f"layer {i}: FFN thresholds apply to dense gated FFN layers, this one is "
                                     f"{f.kind!r}")
                if routers[i] is not None and sparsity.layers[i].active():
                    raise ValueError(f"layer {i}: a router and thresholds on one layer are not supported")
                layer.sparse = make_sparse_layer(sparsity.layers[i], w_qkv, a.o_proj.weight,
                                                 getattr(f, "gate_proj", None) and f.gate_proj.weight,
                                                 getattr(f, "up_proj", None) and f.up_proj.weight, dtype)
            layers.append(layer)
        embed = model.embed.weight.to(dtype).contiguous()
        head = embed if model.lm_head is None else model.lm_head.weight.to(dtype).contiguous()
        return ModelLayout(cfg, embed, head, model.final_norm.scale().float(), layers)


def random_layout(cfg: ModelConfig, dtype: torch.dtype, seed: int = 0, share: ModelLayout | None = None,
                  device: str | torch.device = "cpu") -> ModelLayout:
    """Full-size random weights made directly in decode layout, on ``device`` (speed benchmarks: speed does not
    depend on training, the statistical threshold enforces the sparsity). ``share``: reuse that layout's embedding /
    LM head and attention projections (same shapes), so two full-size models fit in memory side by side."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    d, H, KV, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def rnd(*shape):
        return torch.empty(*shape, dtype=dtype, device=dev).normal_(0.0, cfg.init_std, generator=g)

    layers = []
    for i in range(cfg.n_layers):
        if cfg.ffn_kind(i) == "spark":
            n, r = cfg.spark_ffn_dim, cfg.spark_ffn_rank
            k1 = rnd(n, r)
            packed = rnd(n, 2 * d - r)  # prepare_spark_ffn's layout: K2 row then V row
            ffn = SparkFFNWeights(k1, packed[:, : d - r], packed[:, d - r:])
        elif cfg.ffn_kind(i) == "geglu":
            packed = rnd(3, cfg.ffn_dim, d)  # pack_geglu's layout
            ffn = GegluWeights(packed[0], packed[1], packed[2])
        else:
            raise ValueError(f"layer {i}: the decode engines support ffn kinds {', '.join(FFN_KINDS)}, "
                             f"not {cfg.ffn_kind(i)!r}")
        if share is not None:
            w_qkv, w_o = share.layers[i].w_qkv, share.layers[i].w_o
        else:
            w_qkv, w_o = rnd((H + 2 * KV) * hd, d), rnd(d, H * hd)
        layers.append(DecodeLayer(cfg.attention_kind(i), cfg.ffn_kind(i), cfg.window(i), w_qkv, w_o,
                                  torch.ones(4, d, device=dev), ffn, rope_theta=cfg.layer_rope_theta(i),
                                  qk_norms=torch.ones(2, hd, device=dev) if cfg.qk_norm else None))
    embed = share.embed if share is not None else rnd(cfg.vocab_size, d)
    return ModelLayout(cfg, embed, embed, torch.ones(d, device=dev), layers, dtype)


def quantize_layout(layout: ModelLayout, fmt: str) -> ModelLayout:
    """Every matrix a decode step reads, block-quantized: ``fmt`` is one format for all (q8_0, q4_0) or a mix of
    ``sparkformer.ops.quant.MIXES`` (e.g. q4_0m: q4_0 layers, q8_0 embedding / LM head), each matrix in its role's
    format: the LM head (which also serves embedding lookups: one row dequantized per token), q/k/v (one matrix),
    o, the dense gate/up (one matrix) and down, and the Spark predictor K1 and K2 + V (each neuron's K2 and V rows one
    quantized row). Activations and the KV cache stay in bf16; norms in fp32. Matrices already quantized (shared with
    another layout) are kept as they are."""
    plan = format_plan(fmt)

    def q(t, role):
        return t if isinstance(t, QuantMatrix) else quantize(t, plan(role))

    layers = []
    for st in layout.layers:
        # routed / thresholded layers: decode.routed's and decode.sparse's quantized rows
        routed = None if st.routed is None else quantize_routed(st.routed, plan("gate_up"), plan("down"))
        sparse = None if st.sparse is None else quantize_sparse_layer(st.sparse, st.ffn, plan)
        if isinstance(st.ffn, (QuantSparkFFN, QuantGeglu)):
            ffn = st.ffn
        elif routed is not None:  # the routed rows are the layer's FFN: no dense copy
            ffn = (routed.gate_up, routed.w_down_t)
        elif st.ffn_kind == "spark":
            k1, k2, v = st.ffn
            ffn = quantize_spark_ffn(k1, k2, v, plan("k2v"), plan("k1"))
        else:
            ffn = quantize_geglu(*st.ffn, plan("gate_up"), plan("down"))
        layers.append(DecodeLayer(st.attn_kind, st.ffn_kind, st.window, q(st.w_qkv, "qkv"), q(st.w_o, "o"), st.norms,
                                  ffn, routed=routed, sparse=sparse, qk_norms=st.qk_norms, rope_theta=st.rope_theta))
    head = q(layout.head, "head")
    embed = head if layout.embed is layout.head else q(layout.embed, "embed")
    return ModelLayout(layout.cfg, embed, head, layout.final_norm, layers, torch.bfloat16, fmt)


def quantized_model(model: SparkLM, fmt, method: str | None = None) -> SparkLM:
    """A copy of ``model`` whose weights are what the quantized engine reads (each matrix quantized along the rows
    the engine's dot products run over, then dequantized): the training-form forward of it measures the quality cost
    of the format (weights only; the engine also quantizes activations per token to int8). ``fmt``: a format or mix
    name (as ``quantize_layout``), or a function ``(role, layer) -> format or None`` (None: keep that matrix float;
    layer None for the embedding / LM head), e.g. to measure one matrix type's sensitivity. ``method``: the
    quantizer's (``sparkformer.ops.quant.quantize``; default: the format's own, as the engine)."""
    import copy

    from sparkformer.ops.quant import dequantize

    if isinstance(fmt, str):
        by_role = format_plan(fmt)

        def plan(role, layer):
            return by_role(role)
    else:
        plan = fmt

    def fq(w: torch.Tensor, role: str, layer: int | None) -> torch.Tensor:  # rows along the input dimension
        f = plan(role, layer)
        return w if f is None else dequantize(quantize(w.detach(), f, method=method), w.dtype)

    out = copy.deepcopy(model).eval()
    with torch.no_grad():
        for i, blk in enumerate(out.layers):
            a, f = blk.attn, blk.ffn
            for lin, role in ((a.q_proj, "qkv"), (a.k_proj, "qkv"), (a.v_proj, "qkv"), (a.o_proj, "o")):
                lin.weight.copy_(fq(lin.weight, role, i))
            if f.kind == "spark":  # K1 = predictor, K2 = up rows, V = down columns (one row per neuron)
                f.predictor.weight.copy_(fq(f.predictor.weight, "k1", i))
                f.up_proj.weight.copy_(fq(f.up_proj.weight, "k2v", i))
                f.down_proj.weight.copy_(fq(f.down_proj.weight.t(), "k2v", i).t())
            else:
                for lin, role in ((f.gate_proj, "gate_up"), (f.up_proj, "gate_up"), (f.down_proj, "down")):
                    lin.weight.copy_(fq(lin.weight, role, i))
        tied = out.lm_head is None
        out.embed.weight.copy_(fq(out.embed.weight, "head" if tied else "embed", None))
        if not tied:
            out.lm_head.weight.copy_(fq(out.lm_head.weight, "head", None))
    return out
