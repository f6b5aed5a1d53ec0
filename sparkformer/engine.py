"""The decode engine: weights laid out for batch-1 decode, a static KV cache, prefill then a per-token loop.

    engine = DecodeEngine.from_model(model, dtype=torch.bfloat16)      # or DecodeEngine.random(cfg, ...) for speed
    for tok in engine.generate(prompt_ids, max_new_tokens=64, temperature=0.8, top_p=0.95): ...

Layout, chosen at load time so that every read streams:
- attention: q/k/v projections fused into one (H*hd + 2*KV*hd, d) matrix. Dense layers cache K blocked
  (KV, L/64, hd, 64) and V row-major; Spark layers cache the predictor half of the keys blocked feature-major
  (KV, L/64, r, 64) and each key's other half next to its value in one (KV, L, hd-r+hd) buffer, so the predictor over
  all keys is one forward stream and each kept key costs one contiguous read (ops.spark_attn_decode explains).
- Spark FFN: K1 (d_ff, r) contiguous; each neuron's K2 row and V row adjacent in one buffer.
- GeGLU FFN: [W_gate; W_up; W_down^T] in one (3, m, d) buffer, read as a few long forward streams.
- Routed FFN (a pretrained gated FFN with a sparkified predictor or brick router, ``from_model(..., routers=)``):
  each neuron's gate and up rows side by side (m, 2, d) and W_down^T (m, d), so the kept neurons are one gather each.

Both dense and Spark models run here with the same kernels machinery (``sparkformer.ops``: fused C++ ops when the
extension builds, fast pure-torch otherwise), the same threads and dtype: the dense model is an honest competitor.
Prefill runs the training form (dense compute; the statistical top-k masks) over the prompt in one batch.

Memory pages matter for batch-1 decode: with PyTorch's large tensors on transparent huge pages a core streams ~30%
more bytes per second on the machines we measured. The ``sparkformer`` CLI sets ``THP_MEM_ALLOC_ENABLE=1`` for this;
from Python, set it in the environment before the process allocates its first large tensor.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from sparkformer.config import ModelConfig
from sparkformer.model import ACTIVATIONS, SparkLM, apply_rope, gelu_tanh, rope_tables, sample_next, softcap
from sparkformer.ops import _extension
from sparkformer.ops.attn_prefill import prefill_attention, spark_prefill_attention
from sparkformer.ops.dense_decode import GegluWeights, dense_attn_decode, dense_cache_keys, dense_cache_write, \
    geglu_decode, matvec, new_dense_cache, pack_geglu
from sparkformer.ops.spark_attn_decode import new_spark_cache, read_key_rows, spark_attn_decode, spark_cache_write
from sparkformer.ops.spark_ffn_decode import SparkFFNWeights, prepare_spark_ffn, spark_ffn_decode
from sparkformer.ops.spark_ffn_prefill import spark_ffn_prefill
from sparkformer.ops.stat_topk import stat_threshold, stat_topk

SUPPORTED_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"unsupported engine dtype {dtype}; supported: float32, bfloat16")
        return dtype
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported engine dtype {dtype!r}; supported: {', '.join(SUPPORTED_DTYPES)}")
    return SUPPORTED_DTYPES[dtype]


@dataclass
class LayerState:
    """One layer's decode weights and cache."""

    attn_kind: str
    ffn_kind: str
    window: int | None
    w_qkv: torch.Tensor
    w_o: torch.Tensor
    norms: torch.Tensor  # (4, d) fp32: 1 + w for input, post-attn, pre-ffn, post-ffn norms
    ffn: tuple  # SparkFFNWeights (k1, k2, v) or GegluWeights (w_gate, w_up, w_down_t)
    cache: tuple = ()  # DenseCache (k, v) or SparkCache (kp, kr, v)
    router: object = None  # ffn_kind "routed": a bricks Router choosing this layer's neurons per token
    gate_up: torch.Tensor | None = None  # routed: (m, 2, d) each neuron's gate and up rows side by side
    router_fast: tuple | None = None  # routed by a plain sparkified predictor: (A, B, n, ndtri(1 - f), act)


@dataclass
class DecodeStats:
    """Achieved sparsity over the decoded tokens (not the targets)."""

    tokens: int = 0
    ffn_neurons: int = 0  # summed over layers and tokens
    ffn_layers: int = 0
    keys_kept: int = 0  # summed over heads, layers and tokens
    key_rows: int = 0
    cap_fired: int = 0
    prefill_ffn_neurons: int = 0  # sparse Spark FFN prefill: summed over layers and prompt tokens
    prefill_ffn_rows: int = 0  # (layer, prompt token) pairs behind prefill_ffn_neurons

    def summary(self, n_ffn: int | None = None) -> dict:
        out = {"tokens": self.tokens}
        if self.prefill_ffn_rows:
            out["prefill_ffn_neurons_per_layer"] = self.prefill_ffn_neurons / self.prefill_ffn_rows
        if self.ffn_layers:
            out["ffn_neurons_per_layer"] = self.ffn_neurons / self.ffn_layers
            if n_ffn:
                out["ffn_activity"] = self.ffn_neurons / self.ffn_layers / n_ffn
        if self.key_rows:
            out["keys_per_query"] = self.keys_kept / self.key_rows
            out["cap_fired_fraction"] = self.cap_fired / self.key_rows
        return out


class DecodeEngine:
    """Batch-1 prefill + decode over decode-layout weights; see the module docstring."""

    def __init__(self, cfg: ModelConfig, embed: torch.Tensor, layers: list[LayerState], final_norm: torch.Tensor,
                 max_len: int, impl: str = "auto", head: torch.Tensor | None = None):
        self.cfg, self.embed, self.layers, self.final_norm = cfg, embed, layers, final_norm
        self.head = embed if head is None else head  # tied unless the model has its own LM head
        # the fused kernels implement gelu_tanh; other activations run the pure-torch decode path below
        self._act = None if cfg.ffn_activation == "gelu_tanh" else ACTIVATIONS[cfg.ffn_activation]
        self.dtype = embed.dtype
        self.max_len = max_len
        self.impl = impl
        self.pos = 0
        self.stats = DecodeStats()
        self.timers: dict[str, float] | None = None  # per-component seconds when profiling is on
        hd = cfg.head_dim
        self._rope = {}
        for dim in {hd, cfg.spark_attn_rank, hd - cfg.spark_attn_rank}:
            cos, sin = rope_tables(dim, 0, max_len, cfg.rope_theta)
            self._rope[dim] = (cos.contiguous(), sin.contiguous())
        # decode RoPE in three ops on q and k together: x * cos + x[perm] * sin_signed, with the rotate-half
        # permutation and its signs folded into full-width tables (Spark layers: one rotary space per half)
        self._rope_step = {split: self._rope_step_tables(split) for split in (None, cfg.spark_attn_rank)}
        self._embed_scale = torch.tensor(math.sqrt(cfg.d_model) if cfg.embed_scale else 1.0, dtype=self.dtype).float()
        self._post = cfg.post_norms

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: SparkLM, dtype: str | torch.dtype = torch.float32, max_len: int | None = None,
                   impl: str = "auto", routers=None) -> "DecodeEngine":
        """Copy a ``SparkLM``'s weights into decode layout (the model can be freed afterwards).

        ``routers``: optional per-layer ``sparkformer.bricks.routing.Router`` (or None) for dense gated FFN layers,
        e.g. ``load_routers("predictor.safetensors")[0]`` from ``sparkformer bricks sparkify``: those layers run
        only the neurons their router selects per token (decode and prefill alike)."""
        if not isinstance(model, SparkLM):
            raise TypeError(f"DecodeEngine.from_model needs a SparkLM, got {type(model).__name__} "
                            "(for a transformers SparkForCausalLM pass its .model)")
        dtype = resolve_dtype(dtype)
        cfg = model.config
        max_len = cls._check_len(cfg, max_len)
        bad = sorted({cfg.ffn_kind(i) for i in range(cfg.n_layers)} - {"geglu", "spark"})
        if bad:
            raise ValueError(f"the decode engine supports ffn kinds geglu and spark, not {bad} (use SparkLM.generate)")
        routers = list(routers) if routers is not None else [None] * cfg.n_layers
        if len(routers) != cfg.n_layers:
            raise ValueError(f"got {len(routers)} routers for a {cfg.n_layers}-layer model (one per layer, None = dense)")
        layers = []
        with torch.no_grad():
            for i, blk in enumerate(model.layers):
                a = blk.attn
                w_qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).to(dtype).contiguous()
                norms = torch.stack([n.scale() if hasattr(n, "scale") else torch.ones(cfg.d_model) for n in
                                     (blk.input_norm, blk.post_attn_norm, blk.pre_ffn_norm, blk.post_ffn_norm)])
                f = blk.ffn
                if f.kind == "spark":
                    ffn = prepare_spark_ffn(torch.cat([f.predictor.weight, f.up_proj.weight], 1),
                                            f.down_proj.weight.t(), f.rank, dtype)
                else:
                    ffn = pack_geglu(f.gate_proj.weight, f.up_proj.weight, f.down_proj.weight, dtype)
                st = LayerState(a.kind, f.kind, cfg.window(i), w_qkv, a.o_proj.weight.to(dtype).contiguous(), norms,
                                ffn)
                if routers[i] is not None:
                    _attach_router(st, routers[i], f, i, dtype)
                layers.append(st)
            embed = model.embed.weight.to(dtype).contiguous()
            head = None if model.lm_head is None else model.lm_head.weight.to(dtype).contiguous()
            final = model.final_norm.scale()
        eng = cls(cfg, embed, layers, final, max_len, impl, head)
        eng._alloc_cache()
        return eng

    @classmethod
    def random(cls, cfg: ModelConfig, dtype: str | torch.dtype = torch.float32, max_len: int | None = None,
               impl: str = "auto", seed: int = 0, share: "DecodeEngine | None" = None) -> "DecodeEngine":
        """Random weights built directly in decode layout (speed benchmarks of full-size shapes without the
        training-layout copy; speed does not depend on training since the threshold enforces the sparsity).

        ``share``: reuse that engine's embedding / LM head and attention projections (same shapes), so two
        full-size models fit in memory side by side."""
        dtype = resolve_dtype(dtype)
        max_len = cls._check_len(cfg, max_len)
        g = torch.Generator().manual_seed(seed)
        d, H, KV, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        std = cfg.init_std

        def rnd(*shape, scale=std):
            t = torch.empty(*shape, dtype=dtype)
            return t.normal_(0.0, scale, generator=g)

        layers = []
        for i in range(cfg.n_layers):
            if cfg.ffn_kind(i) == "spark":
                n, r = cfg.spark_ffn_dim, cfg.spark_ffn_rank
                k1 = rnd(n, r)
                packed = rnd(n, 2 * d - r)
                ffn = SparkFFNWeights(k1, packed[:, : d - r], packed[:, d - r:])
            else:
                packed = rnd(3, cfg.ffn_dim, d)  # pack_geglu's layout
                ffn = GegluWeights(packed[0], packed[1], packed[2])
            if share is not None:
                w_qkv, w_o = share.layers[i].w_qkv, share.layers[i].w_o
            else:
                w_qkv, w_o = rnd((H + 2 * KV) * hd, d), rnd(d, H * hd)
            layers.append(LayerState(cfg.attention_kind(i), cfg.ffn_kind(i), cfg.window(i), w_qkv, w_o,
                                     torch.ones(4, d), ffn))
        embed = share.embed if share is not None else rnd(cfg.vocab_size, d)
        eng = cls(cfg, embed, layers, torch.ones(d), max_len, impl)
        eng._alloc_cache()
        return eng

    @staticmethod
    def _check_len(cfg: ModelConfig, max_len: int | None) -> int:
        max_len = max_len or cfg.max_seq_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
        return max_len

    def _alloc_cache(self) -> None:
        cfg, L, dt = self.cfg, self.max_len, self.dtype
        KV, hd, r = cfg.n_kv_heads, cfg.head_dim, cfg.spark_attn_rank
        for st in self.layers:
            if st.attn_kind == "spark":
                st.cache = new_spark_cache(KV, L, hd, r, dtype=dt)
            else:
                st.cache = new_dense_cache(KV, L, hd, dtype=dt)

    def reset(self) -> None:
        """Forget the sequence (the cache is overwritten, not reallocated)."""
        self.pos = 0
        self.stats = DecodeStats()

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # w is (1 + weight) for Gemma-style norms, precomputed; one fused op instead of five
        return F.rms_norm(x, (x.shape[-1],), w, self.cfg.rms_norm_eps)

    def _tick(self, name: str, t0: float) -> float:
        t1 = time.perf_counter()
        self.timers[name] = self.timers.get(name, 0.0) + t1 - t0
        return t1

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

    def _rope_qk(self, qk: torch.Tensor, pos: int, split: int | None) -> torch.Tensor:
        """RoPE of the stacked q and k heads (H + KV, hd) at one position: ``model.apply_rope`` on the whole head
        (dense) or on each half in its own rotary space (Spark), as the training form does."""
        cos, sin, perm = self._rope_step[split]
        return qk * cos[pos] + qk.index_select(-1, perm) * sin[pos]

    # ---- decode ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        """Feed one token at the current position; return the next-token logits (vocab,) in fp32."""
        cfg = self.cfg
        pos = self.pos
        if pos >= self.max_len:
            raise ValueError(f"context full: position {pos} >= cache size {self.max_len}; build the engine with a "
                             "larger max_len or reset()")
        H, KV, hd, r = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.spark_attn_rank
        impl, prof = self.impl, self.timers is not None
        t = time.perf_counter() if prof else 0.0
        h = self.embed[token].float() * self._embed_scale
        for st in self.layers:
            xn = self._rms(h, st.norms[0])
            qkv = matvec(st.w_qkv, xn, impl=impl)
            qk = self._rope_qk(qkv[: (H + KV) * hd].view(H + KV, hd), pos, r if st.attn_kind == "spark" else None)
            q, k = qk[:H], qk[H:]
            v = qkv[(H + KV) * hd:].view(KV, hd)
            c = st.cache
            if st.attn_kind == "spark":
                spark_cache_write(c, pos, k, v)
                if prof:
                    t = self._tick("attn_proj", t)
                out, kept, capped = spark_attn_decode(q, c.kp, c.kr, c.v, pos + 1, cfg.spark_attn_topk,
                                                      cfg.attn_scale, st.window, cfg.attn_logit_softcap, impl=impl)
                self.stats.keys_kept += int(kept.sum())
                self.stats.key_rows += H
                self.stats.cap_fired += int(capped.sum())
            else:
                dense_cache_write(c, pos, k, v)
                if prof:
                    t = self._tick("attn_proj", t)
                out = dense_attn_decode(q, c.k, c.v, pos + 1, cfg.attn_scale, st.window,
                                        cfg.attn_logit_softcap, impl=impl)
            if prof:
                t = self._tick("attention", t)
            o = matvec(st.w_o, out.reshape(-1).float(), impl=impl)
            h = h + (self._rms(o, st.norms[1]) if self._post else o)
            xn = self._rms(h, st.norms[2])
            if prof:
                t = self._tick("attn_proj", t)
            if st.ffn_kind == "spark":
                if self._act is None:
                    y, n_sel = spark_ffn_decode(xn, *st.ffn, cfg.spark_ffn_fraction, impl=impl)
                else:
                    y, n_sel = _spark_ffn_decode_act(xn, *st.ffn, cfg.spark_ffn_fraction, self._act)
                self.stats.ffn_neurons += int(n_sel)
                self.stats.ffn_layers += 1
            elif st.ffn_kind == "routed":
                y, n_sel = self._routed_ffn_decode(st, xn)
                self.stats.ffn_neurons += n_sel
                self.stats.ffn_layers += 1
            elif self._act is None:
                y = geglu_decode(xn, *st.ffn, impl=impl)
            else:
                y = _gated_ffn_decode_torch(xn, *st.ffn, self._act)
            if prof:
                t = self._tick("ffn", t)
            y = y.float()
            h = h + (self._rms(y, st.norms[3]) if self._post else y)
        logits = matvec(self.head, self._rms(h, self.final_norm), impl=impl).float()
        logits = softcap(logits, cfg.final_logit_softcap)
        if prof:
            self._tick("lm_head", t)
        self.pos = pos + 1
        self.stats.tokens += 1
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
        if T == 0:
            raise ValueError("empty prompt")
        cfg, pos0 = self.cfg, self.pos
        if pos0 + T > self.max_len:
            raise ValueError(f"prompt of {T} tokens at position {pos0} exceeds the cache size {self.max_len}")
        H, KV, hd, r = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.spark_attn_rank
        dt = self.dtype
        act = self._act or gelu_tanh
        sparse = self._sparse_prefill()
        x = self.embed[ids].float() * self._embed_scale  # (T, d), residual stream in fp32
        for st in self.layers:
            xn = self._rms(x, st.norms[0]).to(dt)
            qkv = (xn @ st.w_qkv.t()).float()
            q = qkv[:, : H * hd].view(T, H, hd).transpose(0, 1)
            k = qkv[:, H * hd: (H + KV) * hd].view(T, KV, hd).transpose(0, 1)
            v = qkv[:, (H + KV) * hd:].view(T, KV, hd).transpose(0, 1)
            split = r if st.attn_kind == "spark" else None
            q = self._rope_rows(q, pos0, split)
            k = self._rope_rows(k, pos0, split)
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
            o = (out.to(dt) @ st.w_o.t()).float()
            x = x + (self._rms(o, st.norms[1]) if self._post else o)
            xn = self._rms(x, st.norms[2]).to(dt)
            if st.ffn_kind == "spark" and self._act is None and sparse:
                # sparse form: the predictor GEMM, then only the selected neurons' K2/V rows (C++ op)
                y, n_sel = spark_ffn_prefill(xn, *st.ffn, cfg.spark_ffn_fraction, impl="ext")
                self.stats.prefill_ffn_neurons += int(n_sel.sum())
                self.stats.prefill_ffn_rows += T
            elif st.ffn_kind == "spark":
                k1, k2, vw = st.ffn
                a = act(stat_topk((xn[:, : k1.shape[1]] @ k1.t()).float(), cfg.spark_ffn_fraction))
                y = ((a * (xn[:, k1.shape[1]:] @ k2.t()).float()).to(dt) @ vw).float()
            else:
                wg, wu, wd_t = st.ffn
                a = act((xn @ wg.t()).float()) * (xn @ wu.t()).float()
                if st.router is not None:  # the same per-token selection as decode
                    a = a * st.router.neuron_mask(xn)
                y = (a.to(dt) @ wd_t).float()
            x = x + (self._rms(y, st.norms[3]) if self._post else y)
        self.pos = pos0 + T
        last = self._rms(x[-1], self.final_norm)
        return softcap(matvec(self.head, last, impl=self.impl).float(), cfg.final_logit_softcap)

    def _routed_ffn_decode(self, st: LayerState, xn: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Gated FFN over the neurons the layer's router keeps for this token: one gather of their gate/up rows,
        one of their W_down columns."""
        act = ACTIVATIONS[self.cfg.ffn_activation]
        x = xn.to(self.dtype)
        fast = st.router_fast
        if fast is not None:  # a sparkified LowRankPredictor: its scores and statistical threshold in a few ops
            A, B, n, c, score_act = fast
            y = matvec(B, matvec(A, x, impl=self.impl).to(self.dtype), impl=self.impl).float()
            s = (score_act(y[:n]) * y[n:]).abs_()
            var, mean = torch.var_mean(s, correction=0)
            idx = (s > mean + var.sqrt() * c).nonzero().squeeze(1)
        else:
            idx = st.router.neuron_mask(x[None])[0].nonzero().squeeze(1)
        gu = (st.gate_up.index_select(0, idx).view(-1, x.numel()) @ x).float().view(-1, 2)
        h = act(gu[:, 0]) * gu[:, 1]
        return h.to(self.dtype) @ st.ffn[2].index_select(0, idx), idx.numel()

    def _rope_rows(self, x: torch.Tensor, pos0: int, split: int | None) -> torch.Tensor:
        T = x.shape[-2]
        if split is None:
            cos, sin = self._rope[x.shape[-1]]
            return apply_rope(x, cos[pos0: pos0 + T], sin[pos0: pos0 + T])
        a, b = x[..., :split], x[..., split:]
        (ca, sa), (cb, sb) = self._rope[a.shape[-1]], self._rope[b.shape[-1]]
        return torch.cat([apply_rope(a, ca[pos0: pos0 + T], sa[pos0: pos0 + T]),
                          apply_rope(b, cb[pos0: pos0 + T], sb[pos0: pos0 + T])], -1)

    # ---- generation -----------------------------------------------------------------------------------------
    def generate(self, prompt: torch.Tensor | list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 stop: Callable[[list[int]], bool] | None = None) -> Iterator[int]:
        """Yield new token ids one at a time (streaming). ``stop(tokens_so_far)`` ends early (e.g. stop strings)."""
        return generate_tokens(self, prompt, max_new_tokens, temperature, top_p, eos_token_id, generator, stop)


def generate_tokens(engine, prompt: torch.Tensor | list[int], max_new_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, eos_token_id: int | None = None, generator: torch.Generator | None = None,
                    stop: Callable[[list[int]], bool] | None = None) -> Iterator[int]:
    """The sampling loop of every engine (anything with ``pos``, ``max_len``, ``prefill`` and ``step``)."""
    prompt = torch.as_tensor(prompt, dtype=torch.long).flatten()
    if engine.pos + prompt.numel() + max_new_tokens > engine.max_len:
        raise ValueError(f"prompt ({prompt.numel()}) + max_new_tokens ({max_new_tokens}) exceeds the cache size "
                         f"{engine.max_len - engine.pos}")
    return _generate_loop(engine, prompt, max_new_tokens, temperature, top_p, eos_token_id, generator, stop)


def _generate_loop(engine, prompt, max_new_tokens, temperature, top_p, eos_token_id, generator, stop):
    logits = engine.prefill(prompt)
    out: list[int] = []
    for i in range(max_new_tokens):
        if generator is not None and generator.device != logits.device:  # a CPU generator with GPU logits
            logits = logits.cpu()
        tok = int(sample_next(logits[None], temperature, top_p, generator)[0])  # the one host sync per token
        out.append(tok)
        yield tok
        if (eos_token_id is not None and tok == eos_token_id) or (stop is not None and stop(out)):
            return
        if i + 1 < max_new_tokens:
            logits = engine.step(tok)


def _attach_router(st: LayerState, router, ffn, layer: int, dtype: torch.dtype) -> None:
    """Make layer ``st`` a routed FFN layer driven by ``router`` (a copy in the engine's dtype)."""
    import copy

    if st.ffn_kind != "geglu":
        raise ValueError(f"layer {layer}: routers apply to dense gated FFN layers, this one is {st.ffn_kind!r}")
    n = ffn.gate_proj.weight.shape[0]
    if getattr(router, "n_neurons", None) != n:
        raise ValueError(f"layer {layer}: router is for {getattr(router, 'n_neurons', '?')} neurons, the FFN has {n}")
    st.router = copy.deepcopy(router).to(dtype).eval()
    st.router_fast = _lowrank_fast_path(st.router, dtype)
    st.gate_up = torch.stack([ffn.gate_proj.weight, ffn.up_proj.weight], 1).to(dtype).contiguous()
    st.ffn_kind = "routed"


def _lowrank_fast_path(router, dtype: torch.dtype) -> tuple | None:
    """(A, B, n, c, act) when ``router`` is a neuron-level low-rank 'gate_up' predictor with statistical selection and the
    model's activation (decode then skips the generic Router calls); else None."""
    from sparkformer.bricks.routing import ACTS, LowRankPredictor

    if not (type(router) is LowRankPredictor and router.groups is None and router.A is not None
            and router.bias is None and router.output == "gate_up" and router.method == "stat"
            and router.fraction < 1.0):
        return None
    f = min(1.0, router.stat_fraction if router.stat_fraction is not None else router.fraction)
    c = float(torch.special.ndtri(torch.tensor(1.0 - f, dtype=torch.float64).clamp(1e-12, 1.0 - 1e-12)))
    return (router.A.detach().to(dtype).contiguous(), router.B.detach().to(dtype).contiguous(), router.n_neurons, c,
            ACTS[router.act])


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


def make_engine(model: SparkLM, dtype: str | torch.dtype = torch.float32, max_len: int | None = None,
                device: str | torch.device = "cpu", **kw):
    """The decode engine for ``device``: ``DecodeEngine`` on CPU, ``CudaDecodeEngine`` (Triton kernels + CUDA graphs)
    on CUDA. Both have ``prefill``, ``step``, ``generate`` and ``reset``."""
    if torch.device(device).type == "cuda":
        from sparkformer.cuda_engine import CudaDecodeEngine  # lazy: CPU-only installs never import triton

        return CudaDecodeEngine.from_model(model, resolve_dtype(dtype), max_len, device=device)
    return DecodeEngine.from_model(model, dtype, max_len, **kw)


def stop_on_strings(decode: Callable[[list[int]], str], stops: list[str]) -> Callable[[list[int]], bool]:
    """A ``stop`` callback for ``generate`` that fires when the decoded text contains any of ``stops``."""
    return lambda toks: any(s in decode(toks) for s in stops)


__all__ = ["DecodeEngine", "DecodeStats", "generate_tokens", "make_engine", "resolve_dtype", "stop_on_strings"]
