"""The CPU decode engine: batch-1 prefill + per-token decode over the decode layout, with fused C++ kernels.

    engine = make_engine(model, dtype="bf16")                  # or CpuEngine(random_layout(cfg, ...)) for speed
    for tok in engine.generate(prompt_ids, max_new_tokens=64, temperature=0.8, top_p=0.95): ...

Caches, chosen at build time so that every read streams: dense layers cache K blocked (KV, L/64, hd, 64) and V
row-major; Spark layers cache the predictor half of the keys blocked feature-major (KV, L/64, r, 64) and each key's
other half next to its value in one (KV, L, hd-r+hd) buffer, so the predictor over all keys is one forward stream and
each kept key costs one contiguous read (``ops.spark_attn_decode`` explains). Weights: ``sparkformer.decode.layout``.

Dense and Spark models run here with the same kernel machinery (``sparkformer.ops``: fused C++ ops when the
extension builds, fast pure-torch otherwise), the same threads and dtype: the dense model is an honest competitor.
Prefill: dense layers in the training form (GEMMs, chunked attention); with the C++ extension, Spark layers sparse
with the decode selections (``spark_ffn_prefill``; Spark attention as decode steps over the written cache).

Memory pages matter for batch-1 decode: with PyTorch's large tensors on transparent huge pages a core streams ~30%
more bytes per second on the machines we measured. The ``sparkformer`` CLI sets ``THP_MEM_ALLOC_ENABLE=1`` for this;
from Python, set it in the environment before the process allocates its first large tensor.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from sparkformer.decode.fused import FusedStep, fused_blockers
from sparkformer.decode.layout import DecodeLayer, ModelLayout, weight_tensors
from sparkformer.decode.pages import pack_on_huge_pages
from sparkformer.decode.protocol import DecodeStats, Engine, check_max_len
from sparkformer.decode.routed import routed_ffn_decode, routed_float_ffn, routed_prefill_mask
from sparkformer.decode.sparse import ffn_numel, masked, sparse_ffn_decode, sparse_matvec, sparse_prefill_weights
from sparkformer.ops import _extension
from sparkformer.ops.activations import ACTIVATIONS, gelu_tanh, softcap
from sparkformer.ops.attn_prefill import prefill_attention, spark_prefill_attention
from sparkformer.ops.quant import QuantGeglu, QuantMatrix, QuantSparkFFN, dequantize, geglu_decode_quant, \
    quant_ffn_rows, quant_matvec, spark_ffn_decode_quant
from sparkformer.ops.dense_decode import GegluWeights, dense_attn_decode, dense_cache_keys, dense_cache_write, geglu_decode, matvec, \
    new_dense_cache
from sparkformer.ops.rope import apply_rope, rope_tables
from sparkformer.ops.spark_attn_decode import new_spark_cache, read_key_rows, spark_attn_decode, spark_cache_write
from sparkformer.ops.spark_ffn_decode import SparkFFNWeights, spark_ffn_decode
from sparkformer.ops.spark_ffn_prefill import spark_ffn_prefill
from sparkformer.ops.sparse_ffn_decode import FUSED_ACTIVATIONS, gated_ffn_gather, gated_ffn_gather_verify, \
    lowrank_routed_ffn
from sparkformer.ops.stat_topk import stat_threshold, stat_topk

IMPLS = ("auto", "ext", "torch", "reference")


class CpuEngine(Engine):
    """Batch-1 prefill + decode on CPU; see the module docstring. ``impl``: auto (C++ when it builds), ext, torch or
    reference (the plain-PyTorch references of the fused kernels). ``fused``: run each decode step as one C++ call
    where the engine allows it (``sparkformer.decode.fused``); False keeps the per-op Python step."""

    def __init__(self, layout: ModelLayout, max_len: int | None = None, impl: str = "auto", fused: bool = True):
        if impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")
        cfg = layout.cfg
        self.cfg, self.embed, self.head, self.layers = cfg, layout.embed, layout.head, layout.layers
        self.final_norm = layout.final_norm
        # the fused kernels implement gelu_tanh and silu (act=); without the extension the non-gelu activations keep
        # the pure-torch decode paths below
        self._act = None if cfg.ffn_activation == "gelu_tanh" else ACTIVATIONS[cfg.ffn_activation]
        self._fused_act = cfg.ffn_activation in FUSED_ACTIVATIONS and impl != "torch" and (
            impl != "auto" or _extension.available())
        # routed FFN layers: the fused gather of the kept neurons (C++), when the extension runs the step
        self._gather = self._gather_verify = self._routed_fused = None
        if cfg.ffn_activation in FUSED_ACTIVATIONS and impl in ("auto", "ext") and (
                impl == "ext" or _extension.available()):
            act_name = cfg.ffn_activation
            self._gather = lambda x, gu, wd, idx: gated_ffn_gather(x, gu, wd, idx, act_name, impl="ext")
            self._gather_verify = lambda x, gu, wd, idx, w, t: gated_ffn_gather_verify(x, gu, wd, idx, act_name, w, t,
                                                                                         impl="ext")

            def routed_step(x, rf):  # the whole low-rank routed step in one C++ call
                A, B, _, f, _ = rf.fast
                w, t = rf.verify if rf.verify is not None else (None, 0.0)
                return lowrank_routed_ffn(x, A, B, f, act_name, rf.gate_up, rf.w_down_t, w, t,
                                          score_act=rf.router.act, impl="ext")
            self._routed_fused = routed_step
        self.dtype = layout.dtype  # activations and KV cache
        self.weight_format = layout.weight_format
        self.huge_pages = pack_on_huge_pages(weight_tensors(layout))  # before anything keeps a pointer to them
        self.weight_bytes = layout.weight_bytes()
        self.max_len = check_max_len(cfg, max_len)
        self.impl = impl
        self.fused = fused
        self._fused_step: FusedStep | None | bool = None  # built at the first step; False: the engine can't
        self.pos = 0
        self._stats = DecodeStats()
        self.timers: dict[str, float] | None = None  # per-component seconds when profiling is on
        hd = cfg.head_dim
        # RoPE tables per base (Gemma 3: local layers have their own); self._rope / _rope_step: cfg.rope_theta's
        self._ropes = {}
        for theta in {cfg.rope_theta} | {st.rope_theta for st in self.layers if st.rope_theta is not None}:
            self._rope = {}
            for dim in {hd, cfg.spark_attn_rank, hd - cfg.spark_attn_rank}:
                cos, sin = rope_tables(dim, 0, self.max_len, theta)
                self._rope[dim] = (cos.contiguous(), sin.contiguous())
            # decode RoPE in three ops on q and k together: x * cos + x[perm] * sin_signed, with the rotate-half
            # permutation and its signs folded into full-width tables (Spark layers: one rotary space per half)
            self._rope_step = {split: self._rope_step_tables(split) for split in (None, cfg.spark_attn_rank)}
            self._ropes[theta] = (self._rope, self._rope_step)
        self._rope, self._rope_step = self._ropes[cfg.rope_theta]
        self._embed_scale = torch.tensor(math.sqrt(cfg.d_model) if cfg.embed_scale else 1.0, dtype=self.dtype).float()
        self._post = cfg.post_norms
        self._alloc_cache()

    def _alloc_cache(self) -> None:
        self._fused_step = None  # the plan holds the cache tensors
        cfg, L, dt = self.cfg, self.max_len, self.dtype
        KV, hd, r = cfg.n_kv_heads, cfg.head_dim, cfg.spark_attn_rank
        for st in self.layers:
            if st.attn_kind == "spark":
                st.cache = new_spark_cache(KV, L, hd, r, dtype=dt)
            else:
                st.cache = new_dense_cache(KV, L, hd, dtype=dt)

    @property
    def stats(self) -> DecodeStats:
        return self._stats

    def _reset_stats(self) -> None:
        self._stats = DecodeStats()

    def fill_cache_random(self, context: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        for st in self.layers:
            for t in st.cache:
                t.normal_(0.0, 1.0, generator=g)
        self.set_position(context)

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # w is (1 + weight) for Gemma-style norms, precomputed; one fused op instead of five
        return F.rms_norm(x, (x.shape[-1],), w, self.cfg.rms_norm_eps)

    def _rope_step_tables(self, split: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hd = self.cfg.head_dim
        parts = [(0, hd)] if split is None else [(0, split), (split, hd)]
        cos, sin, perm = [], [], []
        for a, b in parts:
            c, s_ = self._rope[b - a]
            half = (b - a) // 2
            sign = torch.cat([-torch.ones(half), torch.ones(half)])
            cos.append(c)
            sin.append(s_ * sign)
            perm.append(torch.cat([torch.arange(a + half, b), torch.arange(a, a + half)]))
        return torch.cat(cos, -1).contiguous(), torch.cat(sin, -1).contiguous(), torch.cat(perm)

    def _rope_qk(self, qk: torch.Tensor, pos: int, split: int | None, theta: float | None = None) -> torch.Tensor:
        """RoPE of the stacked q and k heads (H + KV, hd) at one position: ``model.apply_rope`` on the whole head
        (dense) or on each half in its own rotary space (Spark), as the training form does."""
        cos, sin, perm = (self._ropes[theta][1] if theta is not None else self._rope_step)[split]
        return qk * cos[pos] + qk.index_select(-1, perm) * sin[pos]

    # ---- decode ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, token: int | torch.Tensor) -> torch.Tensor:
        """Feed one token at the current position; return the next-token logits (vocab,) in fp32."""
        cfg = self.cfg
        pos = self.pos
        if pos >= self.max_len:
            raise ValueError(f"context full: position {pos} >= cache size {self.max_len}; build the engine with a "
                             "larger max_len or reset()")
        token = int(token)
        if not 0 <= token < cfg.vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary (0..{cfg.vocab_size - 1})")
        H, KV, hd, r = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.spark_attn_rank
        impl, prof = self.impl, self.timers is not None
        if self.fused and not prof:  # one C++ call for the whole token (profiling needs the per-op path)
            if self._fused_step is None:
                self._fused_step = FusedStep(self) if not fused_blockers(self) else False
            if self._fused_step:
                logits = self._fused_step.step(token, pos, self._stats, H)
                self.pos = pos + 1
                self._stats.tokens += 1
                return logits
        t = time.perf_counter() if prof else 0.0
        h = self._embed_rows(torch.tensor([token]))[0] * self._embed_scale
        for st in self.layers:
            xn = self._rms(h, st.norms[0])
            sp = st.sparse
            if sp is not None and sp.w_qkv_t is not None:
                qkv, n_in = sparse_matvec(sp.w_qkv_t, xn, sp.thresholds.qkv, impl)
                self._count_read(n_in / xn.numel(), sp.w_qkv_t.numel())
            else:
                qkv = self._mv(st.w_qkv, xn)
            qk = qkv[: (H + KV) * hd].view(H + KV, hd)
            if st.qk_norms is not None:  # Gemma 3: RMSNorm of each q and k head before RoPE
                qk = torch.cat([self._rms(qk[:H].float(), st.qk_norms[0]), self._rms(qk[H:].float(), st.qk_norms[1])])
            qk = self._rope_qk(qk, pos, r if st.attn_kind == "spark" else None, st.rope_theta)
            q, k = qk[:H], qk[H:]
            v = qkv[(H + KV) * hd:].view(KV, hd)
            c = st.cache
            if st.attn_kind == "spark":
                spark_cache_write(c, pos, k, v)
                if prof:
                    t = self._tick("attn_proj", t)
                out, kept, capped = spark_attn_decode(q, c.kp, c.kr, c.v, pos + 1, cfg.spark_attn_topk,
                                                      cfg.attn_scale, st.window, cfg.attn_logit_softcap, impl=impl)
                self._stats.keys_kept += int(kept.sum())
                self._stats.key_rows += H
                self._stats.cap_fired += int(capped.sum())
            else:
                dense_cache_write(c, pos, k, v)
                if prof:
                    t = self._tick("attn_proj", t)
                out = dense_attn_decode(q, c.k, c.v, pos + 1, cfg.attn_scale, st.window,
                                        cfg.attn_logit_softcap, impl=impl)
            if prof:
                t = self._tick("attention", t)
            if sp is not None and sp.w_o_t is not None:
                o, n_in = sparse_matvec(sp.w_o_t, out.reshape(-1), sp.thresholds.o, impl)
                self._count_read(n_in / out.numel(), sp.w_o_t.numel())
            else:
                o = self._mv(st.w_o, out.reshape(-1).float())
            h = h + (self._rms(o, st.norms[1]) if self._post else o)
            xn = self._rms(h, st.norms[2])
            if prof:
                t = self._tick("attn_proj", t)
            if sp is not None and sp.has_ffn:
                y, read = sparse_ffn_decode(sp, st.ffn, xn, ACTIVATIONS[cfg.ffn_activation], cfg.ffn_activation,
                                            self.dtype, impl)
                self._count_read(read, ffn_numel(st.ffn))
            elif isinstance(st.ffn, QuantSparkFFN):
                y, n_sel = spark_ffn_decode_quant(xn, st.ffn, cfg.spark_ffn_fraction, self._act or gelu_tanh,
                                                  self.impl)
                self._count_ffn(n_sel, st.ffn.rows.shape[0])
            elif isinstance(st.ffn, QuantGeglu):
                y = geglu_decode_quant(xn, st.ffn, self._act or gelu_tanh, self.impl)
            elif st.ffn_kind == "spark":
                if self._act is None or self._fused_act:
                    y, n_sel = spark_ffn_decode(xn, *st.ffn, cfg.spark_ffn_fraction, impl=impl,
                                                act=cfg.ffn_activation)
                else:
                    y, n_sel = _spark_ffn_decode_act(xn, *st.ffn, cfg.spark_ffn_fraction, self._act)
                self._count_ffn(int(n_sel), st.ffn.k1.shape[0])
            elif st.ffn_kind == "routed":
                y, n_sel = routed_ffn_decode(st.routed, xn, ACTIVATIONS[cfg.ffn_activation], self.dtype, self._mv,
                                             self._gather, self._gather_verify, self._routed_fused, impl=impl)
                self._count_ffn(n_sel, st.routed.gate_up.shape[0])
                self._stats.ffn_gate_up_neurons += st.routed.last_gate_up
            elif self._act is None or self._fused_act:
                y = geglu_decode(xn, *st.ffn, impl=impl, act=cfg.ffn_activation)
            else:
                y = _gated_ffn_decode_torch(xn, *st.ffn, self._act)
            if prof:
                t = self._tick("ffn", t)
            y = y.float()
            h = h + (self._rms(y, st.norms[3]) if self._post else y)
        logits = self._mv(self.head, self._rms(h, self.final_norm)).float()
        logits = softcap(logits, cfg.final_logit_softcap)
        if prof:
            self._tick("lm_head", t)
        self.pos = pos + 1
        self._stats.tokens += 1
        return logits

    # ---- prefill ------------------------------------------------------------------------------------------------
    def _sparse_prefill(self) -> bool:
        """Spark layers prefill in the sparse form (C++ ops) unless the pure-torch or reference path was asked for."""
        return self.impl in ("auto", "ext") and _extension.available()

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor | list[int]) -> torch.Tensor:
        """Run the prompt in one batch, fill the cache; return the last logits (fp32). Dense layers run in the
        training form (chunked attention, GEMMs). With the C++ extension, Spark layers run sparse with the same
        per-token selections as decode: Spark FFN by ``spark_ffn_prefill`` (predictor GEMM, then only the selected
        neurons), Spark attention as decode steps over the written cache; without it, in the training form."""
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        T = ids.numel()
        self._check_room(T)
        cfg, pos0 = self.cfg, self.pos
        H, KV, hd, r = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.spark_attn_rank
        dt = self.dtype
        act = self._act or gelu_tanh
        sparse = self._sparse_prefill()
        x = self._embed_rows(ids) * self._embed_scale  # (T, d), residual stream in fp32
        for layer in self.layers:
            st = self._float_weights(layer)  # quantized layers: this layer's weights dequantized for the GEMMs
            th = st.sparse.thresholds if st.sparse is not None else None
            xn = self._rms(x, st.norms[0]).to(dt)
            qkv = (masked(xn, th and th.qkv) @ st.w_qkv.t()).float()
            q = qkv[:, : H * hd].view(T, H, hd).transpose(0, 1)
            k = qkv[:, H * hd: (H + KV) * hd].view(T, KV, hd).transpose(0, 1)
            v = qkv[:, (H + KV) * hd:].view(T, KV, hd).transpose(0, 1)
            split = r if st.attn_kind == "spark" else None
            if st.qk_norms is not None:  # Gemma 3: RMSNorm of each q and k head before RoPE
                q, k = self._rms(q, st.qk_norms[0]), self._rms(k, st.qk_norms[1])
            q = self._rope_rows(q, pos0, split, st.rope_theta)
            k = self._rope_rows(k, pos0, split, st.rope_theta)
            c = st.cache
            if st.attn_kind == "spark" and sparse:  # T decode steps of the C++ op over the written cache
                spark_cache_write(c, pos0, k.to(dt), v.to(dt))
                out, _, _ = spark_prefill_attention(q, c, pos0, topk=cfg.spark_attn_topk, scale=cfg.attn_scale,
                                                    window=st.window, cap=cfg.attn_logit_softcap, impl="ext")
            else:
                if st.attn_kind == "spark":
                    spark_cache_write(c, pos0, k.to(dt), v.to(dt))
                    kk = torch.cat([read_key_rows(c.kp, pos0 + T), c.kr[:, : pos0 + T]], -1).float()
                else:
                    dense_cache_write(c, pos0, k.to(dt), v.to(dt))
                    kk = dense_cache_keys(c, pos0 + T).float()
                vv = c.v[:, : pos0 + T].float()
                out, _ = prefill_attention(q, kk, vv, pos0, kind=st.attn_kind, scale=cfg.attn_scale,
                                           window=st.window, cap=cfg.attn_logit_softcap, rank=r,
                                           topk=cfg.spark_attn_topk)
            out = out.transpose(0, 1).reshape(T, H * hd)
            o = (masked(out.to(dt), th and th.o) @ st.w_o.t()).float()
            x = x + (self._rms(o, st.norms[1]) if self._post else o)
            xn = self._rms(x, st.norms[2]).to(dt)
            if st.ffn_kind == "spark" and self._act is None and sparse:
                # sparse form: the predictor GEMM, then only the selected neurons' K2/V rows (C++ op)
                y, n_sel = spark_ffn_prefill(xn, *st.ffn, cfg.spark_ffn_fraction, impl="ext")
                self._stats.prefill_ffn_neurons += int(n_sel.sum())
                self._stats.prefill_ffn_rows += T
            elif st.ffn_kind == "spark":
                k1, k2, vw = st.ffn
                a = act(stat_topk((xn[:, : k1.shape[1]] @ k1.t()).float(), cfg.spark_ffn_fraction))
                y = ((a * (xn[:, k1.shape[1]:] @ k2.t()).float()).to(dt) @ vw).float()
            else:
                wg, wu, wd_t = st.ffn
                xf = masked(xn, th and th.gate_up)
                g = act((xf @ wg.t()).float())
                if th is not None and th.gate_act is not None:  # CATS: |act(gate)| <= t drops the neuron
                    g = masked(g, th.gate_act)
                a = masked(g * (xf @ wu.t()).float(), th and th.down)
                if st.routed is not None:  # the same per-token selection as decode
                    a = a * routed_prefill_mask(st.routed, xn, a)
                y = (a.to(dt) @ wd_t).float()
            x = x + (self._rms(y, st.norms[3]) if self._post else y)
        self.pos = pos0 + T
        last = self._rms(x[-1], self.final_norm)
        return softcap(self._mv(self.head, last).float(), cfg.final_logit_softcap)

    def _float_weights(self, st: DecodeLayer) -> DecodeLayer:
        """A quantized layer's weights dequantized to the activation dtype (prefill runs GEMMs on them; the
        copy lives for one layer), sharing the layer's cache; float layers as they are."""
        if self.weight_format is None:
            return st
        dt = self.dtype

        def fl(w):
            return dequantize(w, dt)

        if st.routed is not None:  # the per-neuron rows decode gathers from
            ffn = routed_float_ffn(st.routed, dt)
        elif isinstance(st.ffn, QuantSparkFFN):
            k2, v = quant_ffn_rows(st.ffn)
            ffn = SparkFFNWeights(fl(st.ffn.k1), fl(k2), fl(v))
        else:
            gu, down = fl(st.ffn.gate_up), fl(st.ffn.down)
            m = gu.shape[0] // 2
            ffn = GegluWeights(gu[:m], gu[m:], down.t().contiguous())
        w_qkv, w_o = fl(st.w_qkv), fl(st.w_o)
        if st.sparse is not None:  # thresholded sites: the W^T rows decode reads, so prefill selects on the same
            w_qkv, w_o, ffn = sparse_prefill_weights(st.sparse, w_qkv, w_o, ffn, dt)
        return DecodeLayer(st.attn_kind, st.ffn_kind, st.window, w_qkv, w_o, st.norms, ffn, routed=st.routed,
                           sparse=st.sparse, cache=st.cache, qk_norms=st.qk_norms, rope_theta=st.rope_theta)

    def _count_read(self, fraction: float, weights: int) -> None:
        """Thresholded matrices: the fraction of their weights this token read."""
        self._stats.sparse_weights_read += fraction * weights
        self._stats.sparse_weights += weights

    def _mv(self, w: torch.Tensor | QuantMatrix, x: torch.Tensor) -> torch.Tensor:
        if isinstance(w, QuantMatrix):
            return quant_matvec(w, x, self.impl)
        return matvec(w, x, impl=self.impl)

    def _embed_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(T, d) fp32 embedding rows (a quantized table dequantizes just the rows it is asked for)."""
        if isinstance(self.embed, QuantMatrix):
            return dequantize(self.embed.index_select(ids))
        return self.embed[ids].float()

    def _count_ffn(self, n_sel: int, width: int) -> None:
        s = self._stats
        s.ffn_neurons += n_sel
        s.ffn_width += width
        s.ffn_layers += 1

    def _rope_rows(self, x: torch.Tensor, pos0: int, split: int | None, theta: float | None = None) -> torch.Tensor:
        T = x.shape[-2]
        rope = self._ropes[theta][0] if theta is not None else self._rope
        if split is None:
            cos, sin = rope[x.shape[-1]]
            return apply_rope(x, cos[pos0: pos0 + T], sin[pos0: pos0 + T])
        a, b = x[..., :split], x[..., split:]
        (ca, sa), (cb, sb) = rope[a.shape[-1]], rope[b.shape[-1]]
        return torch.cat([apply_rope(a, ca[pos0: pos0 + T], sa[pos0: pos0 + T]),
                          apply_rope(b, cb[pos0: pos0 + T], sb[pos0: pos0 + T])], -1)


def _gated_ffn_decode_torch(x, wg, wu, wd_t, act):
    """Dense gated FFN decode in torch ops, for activations the fused kernel does not implement; gate and up are one
    matvec when their rows are adjacent in memory (``pack_geglu``'s layout)."""
    m = wg.shape[0]
    x = x.to(wg.dtype)
    if wu.data_ptr() == wg.data_ptr() + wg.numel() * wg.element_size() and wg.is_contiguous() and wu.is_contiguous():
        gu = torch.mv(wg.as_strided((2 * m, wg.shape[1]), (wg.shape[1], 1)), x).float()
        g, u = gu[:m], gu[m:]
    else:
        g, u = torch.mv(wg, x).float(), torch.mv(wu, x).float()
    return (act(g) * u).to(wd_t.dtype) @ wd_t


def _spark_ffn_decode_act(x, k1, k2, v, fraction, act):
    """Spark FFN decode for activations the fused kernel does not implement (pure torch, same selection)."""
    r = k1.shape[1]
    s = torch.mv(k1, x[:r].to(k1.dtype)).float()
    theta = stat_threshold(s, fraction)
    idx = torch.nonzero(s > theta).squeeze(1)
    h = act(s.index_select(0, idx) - theta) * torch.mv(k2.index_select(0, idx), x[r:].to(k2.dtype)).float()
    return h.to(v.dtype) @ v.index_select(0, idx), idx.numel()
