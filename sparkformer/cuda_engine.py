"""The CUDA decode engine: batch-1 decode with the Triton kernels, one CUDA graph per token.

    engine = CudaDecodeEngine.from_model(model, dtype=torch.bfloat16)      # or .random(cfg, ...) for speed
    for tok in engine.generate(prompt_ids, max_new_tokens=64): ...

Same API as the CPU ``DecodeEngine`` (``prefill``, ``step``, ``generate``, ``reset``, ``stats``), same math:
- every per-token launch reads the token, the position and the context length from device tensors, and all
  buffers are allocated up front, so the whole step (embedding -> 26 layers -> LM head -> greedy argmax -> pos += 1)
  is captured once in a CUDA graph and replayed at every position. The host syncs only to read a sampled token.
- dense layers: cuBLAS GEMVs (``torch.mv``: fused q/k/v, o, [gate; up], down), Triton flash-decoding with the
  Gemma-2 soft-cap (``DenseAttnPlan``), fused glue kernels; Spark layers: the same GEMVs and glue, Spark attention
  (``SparkAttnPlan``) and the Spark FFN (``SparkFFNPlan``, whose launch shape is picked by timing on the device).
  Both kinds run under the same graph treatment, so the dense model is an honest competitor.
- ``prefill`` feeds the prompt through the decode step one token at a time (exact, not fast).

Off CUDA (Triton interpreter, ``graph=False``) the same code runs eagerly on CPU tensors: that is how the tests
check it against the CPU engine without a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from sparkformer.config import ModelConfig
from sparkformer.model import SparkLM, rope_tables
from sparkformer.ops.triton_decode import DenseAttnPlan, embed_norm, geglu_act, residual_norm, rope_cache
from sparkformer.ops.triton_spark_attn import SparkAttnPlan
from sparkformer.ops.triton_spark_ffn import SparkFFNPlan

__all__ = ["CudaDecodeEngine", "CudaLayer"]

KP_BLOCK = 64  # keys per tile of the blocked predictor-half cache (same as the CPU layout)


@dataclass
class CudaLayer:
    attn_kind: str
    ffn_kind: str
    window: int | None
    w_qkv: torch.Tensor  # (H*hd + 2*KV*hd, d)
    w_o: torch.Tensor  # (d, H*hd)
    norms: torch.Tensor  # (4, d) fp32: input, post-attn, pre-ffn, post-ffn multipliers
    ffn: tuple  # spark: (k1 (n, r), k2 (n, d-r), v (n, d)); geglu: (w_gu (2m, d), w_down (d, m))
    cache: tuple = ()  # ("spark", kp, kr, v) | ("dense", k, v)


class CudaDecodeEngine:
    """Batch-1 decode on CUDA (or eagerly on CPU under TRITON_INTERPRET); see the module docstring."""

    def __init__(self, cfg: ModelConfig, embed: torch.Tensor, layers: list[CudaLayer], final_norm: torch.Tensor,
                 max_len: int, head: torch.Tensor | None = None, graph: bool | None = None,
                 track_stats: bool = True):
        if cfg.ffn_activation not in ("gelu_tanh", "silu"):
            raise ValueError(f"unsupported activation {cfg.ffn_activation}")
        self.cfg, self.embed, self.layers, self.final_norm = cfg, embed, layers, final_norm
        self.head = embed if head is None else head
        self.device = embed.device
        self.dtype = embed.dtype
        self.graph_enabled = (self.device.type == "cuda") if graph is None else graph
        self.track_stats = track_stats
        self.max_len = -(-max_len // KP_BLOCK) * KP_BLOCK
        self.pos = 0
        d, H, KV, hd, r = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.spark_attn_rank
        dev, dt, f32 = self.device, self.dtype, torch.float32
        self._embed_scale = float(torch.tensor(math.sqrt(d) if cfg.embed_scale else 1.0, dtype=dt).float())
        self._rope = {n: tuple(t.to(dev).contiguous() for t in rope_tables(n, 0, self.max_len, cfg.rope_theta))
                      for n in {hd, r, hd - r}}
        self._alloc_cache()
        # static buffers: every launch of a step reads and writes only these
        self.tok = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos_t = torch.zeros(1, dtype=torch.int32, device=dev)
        self.len_t = torch.ones(1, dtype=torch.int32, device=dev)
        self.h = torch.zeros(d, dtype=f32, device=dev)
        self.xn = torch.zeros(d, dtype=dt, device=dev)
        self.qkv = torch.zeros((H + 2 * KV) * hd, dtype=dt, device=dev)
        self.q = torch.zeros(H, hd, dtype=f32, device=dev)
        self.attn32 = torch.zeros(H, hd, dtype=f32, device=dev)
        self.attn = torch.zeros(H * hd, dtype=dt, device=dev)
        self.o = torch.zeros(d, dtype=dt, device=dev)
        self.y32 = torch.zeros(d, dtype=f32, device=dev)
        self.y = torch.zeros(d, dtype=dt, device=dev)
        kinds_ffn = {st.ffn_kind for st in layers}
        if "geglu" in kinds_ffn:
            m = next(st.ffn[1].shape[1] for st in layers if st.ffn_kind == "geglu")
            self.gu = torch.zeros(2 * m, dtype=dt, device=dev)
            self.a = torch.zeros(m, dtype=dt, device=dev)
        self.logits_lp = torch.zeros(self.head.shape[0], dtype=dt, device=dev)
        self.logits = torch.zeros(self.head.shape[0], dtype=f32, device=dev)
        n = len(layers)
        self.ffn_cnt = torch.zeros(n, dtype=torch.int32, device=dev)
        self.kept = torch.zeros(n, H, dtype=torch.int64, device=dev)
        self.capped = torch.zeros(n, H, dtype=torch.int8, device=dev)
        self._stat_tot = torch.zeros(3, dtype=torch.int64, device=dev)  # ffn neurons, keys kept, cap fired
        self._stat_rows = [0, 0, 0]  # tokens, ffn layer-steps, spark attention head-rows
        self.ffn_plan = self.attn_plan = self.dense_plan = None
        if "spark" in kinds_ffn:
            st = next(s for s in layers if s.ffn_kind == "spark")
            self.ffn_plan = SparkFFNPlan.for_weights(*st.ffn, cfg.spark_ffn_fraction, activation=cfg.ffn_activation)
        if any(s.attn_kind == "spark" for s in layers):
            self.attn_plan = SparkAttnPlan(H, KV, hd, r, hd, self.max_len, cfg.spark_attn_topk, dev)
        if any(s.attn_kind == "dense" for s in layers):
            self.dense_plan = DenseAttnPlan(H, KV, hd, hd, dev)
        self._graph = None
        self._components: dict[str, torch.cuda.CUDAGraph] = {}

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: SparkLM, dtype: torch.dtype = torch.bfloat16, max_len: int | None = None,
                   device: str | torch.device = "cuda", **kw) -> "CudaDecodeEngine":
        """Copy a ``SparkLM``'s weights into decode layout on ``device``."""
        if not isinstance(model, SparkLM):
            raise TypeError(f"CudaDecodeEngine.from_model needs a SparkLM, got {type(model).__name__}")
        cfg = model.config
        max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        dev = torch.device(device)
        put = lambda t: t.detach().to(device=dev, dtype=dtype).contiguous()  # noqa: E731
        layers = []
        with torch.no_grad():
            for i, blk in enumerate(model.layers):
                a, f = blk.attn, blk.ffn
                if f.kind not in ("spark", "geglu"):
                    raise ValueError(f"the decode engine supports ffn kinds geglu and spark, not {f.kind}")
                norms = torch.stack([nm.scale() if hasattr(nm, "scale") else torch.ones(cfg.d_model) for nm in
                                     (blk.input_norm, blk.post_attn_norm, blk.pre_ffn_norm, blk.post_ffn_norm)])
                if f.kind == "spark":
                    ffn = (put(f.predictor.weight), put(f.up_proj.weight), put(f.down_proj.weight.t()))
                else:
                    ffn = (put(torch.cat([f.gate_proj.weight, f.up_proj.weight])), put(f.down_proj.weight))
                layers.append(CudaLayer(a.kind, f.kind, cfg.window(i),
                                        put(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
                                        put(a.o_proj.weight), norms.float().to(dev), ffn))
            head = None if model.lm_head is None else put(model.lm_head.weight)
            return cls(cfg, put(model.embed.weight), layers, model.final_norm.scale().float().to(dev), max_len,
                       head, **kw)

    @classmethod
    def random(cls, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, max_len: int | None = None,
               seed: int = 0, share: "CudaDecodeEngine | None" = None, device: str | torch.device = "cuda",
               **kw) -> "CudaDecodeEngine":
        """Random full-size weights made directly on the device (speed only: the threshold enforces sparsity).
        ``share``: reuse that engine's embedding / LM head and attention projections (same shapes)."""
        dev = torch.device(device)
        max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        g = torch.Generator(device=dev).manual_seed(seed)
        d, H, KV, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

        def rnd(*shape):
            return torch.empty(*shape, dtype=dtype, device=dev).normal_(0.0, cfg.init_std, generator=g)

        layers = []
        for i in range(cfg.n_layers):
            if cfg.ffn_kind(i) == "spark":
                n, r = cfg.spark_ffn_dim, cfg.spark_ffn_rank
                ffn = (rnd(n, r), rnd(n, d - r), rnd(n, d))
            else:
                ffn = (rnd(2 * cfg.ffn_dim, d), rnd(d, cfg.ffn_dim))
            if share is not None:
                w_qkv, w_o = share.layers[i].w_qkv, share.layers[i].w_o
            else:
                w_qkv, w_o = rnd((H + 2 * KV) * hd, d), rnd(d, H * hd)
            layers.append(CudaLayer(cfg.attention_kind(i), cfg.ffn_kind(i), cfg.window(i), w_qkv, w_o,
                                    torch.ones(4, d, device=dev), ffn))
        embed = share.embed if share is not None else rnd(cfg.vocab_size, d)
        return cls(cfg, embed, layers, torch.ones(d, device=dev), max_len, **kw)

    def _alloc_cache(self) -> None:
        cfg, L, dt, dev = self.cfg, self.max_len, self.dtype, self.device
        KV, hd, r = cfg.n_kv_heads, cfg.head_dim, cfg.spark_attn_rank
        for st in self.layers:
            if st.attn_kind == "spark":
                kp = torch.zeros(KV, L // KP_BLOCK, r, KP_BLOCK, dtype=dt, device=dev)
                krv = torch.zeros(KV, L, hd - r + hd, dtype=dt, device=dev)  # a kept key's kr and v adjacent
                st.cache = ("spark", kp, krv[..., : hd - r], krv[..., hd - r:])
            else:
                st.cache = ("dense", torch.zeros(KV, L, hd, dtype=dt, device=dev),
                            torch.zeros(KV, L, hd, dtype=dt, device=dev))

    def reset(self) -> None:
        """Forget the sequence (the cache is overwritten, not reallocated)."""
        self.set_position(0)
        self._stat_tot.zero_()
        self._stat_rows = [0, 0, 0]

    def set_position(self, pos: int) -> None:
        """Move to ``pos`` (the next token is written there); positions below it are taken as filled."""
        self.pos = int(pos)
        self.pos_t.fill_(self.pos)

    # ---- one decode step: the launches the graph captures ------------------------------------------------------
    def _attention(self, i: int, st: CudaLayer) -> None:
        cfg = self.cfg
        if st.attn_kind == "spark":
            _, kp, kr, v = st.cache
            self.attn_plan.run(self.q, kp, kr, v, self.len_t, cfg.attn_scale, st.window, cfg.attn_logit_softcap,
                               out=self.attn32, kept=self.kept[i], capped=self.capped[i])
            self.attn.copy_(self.attn32.view(-1))
        else:
            _, k, v = st.cache
            self.dense_plan.run(self.q, k, v, self.len_t, cfg.attn_scale, st.window, cfg.attn_logit_softcap,
                                self.attn.view(cfg.n_heads, cfg.head_dim))

    def _ffn(self, i: int, st: CudaLayer) -> torch.Tensor:
        if st.ffn_kind == "spark":
            return self.ffn_plan.run(self.xn, *st.ffn, y=self.y32, cnt=self.ffn_cnt[i:i + 1])
        w_gu, w_down = st.ffn
        torch.mv(w_gu, self.xn, out=self.gu)
        geglu_act(self.gu, self.a, self.cfg.ffn_activation)
        torch.mv(w_down, self.a, out=self.y)
        return self.y

    def _lm_head(self) -> None:
        cap = self.cfg.final_logit_softcap
        torch.mv(self.head, self.xn, out=self.logits_lp)
        if cap is None:
            self.logits.copy_(self.logits_lp)
        else:
            torch.div(self.logits_lp, cap, out=self.logits)
            self.logits.tanh_().mul_(cap)
        torch.argmax(self.logits, dim=0, keepdim=True, out=self.tok)

    def _body(self) -> None:
        cfg = self.cfg
        eps, post = cfg.rms_norm_eps, cfg.post_norms
        H, KV, hd, r = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.spark_attn_rank
        embed_norm(self.tok, self.embed, self._embed_scale, self.h, self.layers[0].norms[0], self.xn, self.pos_t,
                   self.len_t, eps)
        for i, st in enumerate(self.layers):
            torch.mv(st.w_qkv, self.xn, out=self.qkv)
            if st.attn_kind == "spark":
                rope_cache(self.qkv, self.pos_t, self.q, self._rope[r], self._rope[hd - r], st.cache, H, KV, hd, r)
            else:
                rope_cache(self.qkv, self.pos_t, self.q, self._rope[hd], None, st.cache, H, KV, hd, hd)
            self._attention(i, st)
            torch.mv(st.w_o, self.attn, out=self.o)
            residual_norm(self.o, self.h, st.norms[1] if post else None, st.norms[2], self.xn, eps)
            y = self._ffn(i, st)
            nxt = self.layers[i + 1].norms[0] if i + 1 < len(self.layers) else self.final_norm
            residual_norm(y, self.h, st.norms[3] if post else None, nxt, self.xn, eps)
        self._lm_head()
        self.pos_t.add_(1)

    # ---- graphs -----------------------------------------------------------------------------------------------
    def _tune(self) -> None:
        """Pick the Spark FFN launch shape by timing it over this model's own (cold) layer weights."""
        if self.ffn_plan is None or self.device.type != "cuda":
            return
        ws = [st.ffn for st in self.layers if st.ffn_kind == "spark"]
        x = torch.randn(self.cfg.d_model, device=self.device).to(self.dtype)  # zeros would select nothing
        best = SparkFFNPlan.pick(x, *ws[0], self.cfg.spark_ffn_fraction, weights=ws)
        best.activation = self.cfg.ffn_activation
        self.ffn_plan = best

    def _capture(self, fn: Callable[[], None]) -> "torch.cuda.CUDAGraph":
        pos, tok = self.pos_t.clone(), self.tok.clone()
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(2):  # compiles and warms every kernel; writes only slots the next steps overwrite
                fn()
                self.pos_t.copy_(pos)
                self.tok.copy_(tok)
        torch.cuda.current_stream(self.device).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        self.pos_t.copy_(pos)
        self.tok.copy_(tok)
        return g

    def _ensure_graph(self) -> None:
        if self._graph is None and self.graph_enabled:
            self._tune()
            self._graph = self._capture(self._body)

    def _run_step(self) -> None:
        if self.pos >= self.max_len:
            raise ValueError(f"context full: position {self.pos} >= cache size {self.max_len}; build the engine "
                             "with a larger max_len or reset()")
        if self.graph_enabled:
            self._ensure_graph()
            self._graph.replay()
        else:
            self._body()
        self.pos += 1
        if self.track_stats:
            self._accumulate_stats()

    def _accumulate_stats(self) -> None:
        spark_ffn = [i for i, st in enumerate(self.layers) if st.ffn_kind == "spark"]
        spark_attn = [i for i, st in enumerate(self.layers) if st.attn_kind == "spark"]
        if spark_ffn:
            self._stat_tot[0] += self.ffn_cnt[spark_ffn].sum()
        if spark_attn:
            self._stat_tot[1] += self.kept[spark_attn].sum()
            self._stat_tot[2] += self.capped[spark_attn].sum()
        self._stat_rows[0] += 1
        self._stat_rows[1] += len(spark_ffn)
        self._stat_rows[2] += len(spark_attn) * self.cfg.n_heads

    def stats_summary(self) -> dict:
        """Achieved sparsity over the decoded tokens (syncs), in the CPU engine's ``DecodeStats.summary`` form."""
        tot = self._stat_tot.tolist()
        out = {"tokens": self._stat_rows[0]}
        if self._stat_rows[1]:
            out["ffn_neurons_per_layer"] = tot[0] / self._stat_rows[1]
            out["ffn_activity"] = out["ffn_neurons_per_layer"] / self.cfg.spark_ffn_dim
        if self._stat_rows[2]:
            out["keys_per_query"] = tot[1] / self._stat_rows[2]
            out["cap_fired_fraction"] = tot[2] / self._stat_rows[2]
        return out

    # ---- public decode API --------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, token: int | torch.Tensor) -> torch.Tensor:
        """Feed one token at the current position; return the next-token logits (vocab,) fp32 on the device."""
        if isinstance(token, torch.Tensor):
            self.tok.copy_(token.reshape(1))
        else:
            self.tok.fill_(int(token))
        self._run_step()
        return self.logits.clone()

    @torch.no_grad()
    def decode_greedy(self, n: int) -> None:
        """n greedy steps entirely on the device (each step's argmax feeds the next): no host sync at all."""
        for _ in range(n):
            self._run_step()

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor | list[int]) -> torch.Tensor:
        """Feed the prompt (one decode step per token, exact); return the last logits (fp32, on the device)."""
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("empty prompt")
        if self.pos + ids.numel() > self.max_len:
            raise ValueError(f"prompt of {ids.numel()} tokens at position {self.pos} exceeds the cache size "
                             f"{self.max_len}")
        dev_ids = ids.to(self.device)
        for i in range(ids.numel()):
            self.tok.copy_(dev_ids[i:i + 1])
            self._run_step()
        return self.logits.clone()

    def generate(self, prompt: torch.Tensor | list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 stop: Callable[[list[int]], bool] | None = None) -> Iterator[int]:
        """Yield new token ids one at a time (streaming), as ``DecodeEngine.generate``."""
        from sparkformer.engine import generate_tokens

        return generate_tokens(self, prompt, max_new_tokens, temperature, top_p, eos_token_id, generator, stop)

    # ---- benchmarking helpers -----------------------------------------------------------------------------------
    def fill_cache_random(self, context: int, seed: int = 0) -> None:
        """Random K/V at [0, context) and move there (costs the same as a real cache of that length)."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        for st in self.layers:
            for t in st.cache[1:]:
                base = t if t._base is None else t._base
                base.normal_(0.0, 1.0, generator=g)
        self.set_position(context)

    def component_graph(self, name: str) -> Callable[[], None]:
        """A replayable callable running one component of a step for all layers: "attention" (score/select/
        gather kernels only), "ffn", "lm_head" or "step" (everything). Reuses the current buffers as inputs."""
        fns = {
            "attention": lambda: [self._attention(i, st) for i, st in enumerate(self.layers)],
            "ffn": lambda: [self._ffn(i, st) for i, st in enumerate(self.layers)],
            "lm_head": self._lm_head,
            "step": self._body,
        }
        fn = fns[name]
        if not self.graph_enabled:
            return fn
        self._ensure_graph()
        if name == "step":
            return self._graph.replay
        if name not in self._components:
            self._components[name] = self._capture(fn)
        return self._components[name].replay
