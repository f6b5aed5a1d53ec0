"""The CUDA decode engine: batch-1 decode with the Triton kernels, one CUDA graph per token.

    engine = make_engine(model, dtype="bf16", device="cuda")     # or make_random_engine(cfg, ..., device="cuda")
    for tok in engine.generate(prompt_ids, max_new_tokens=64): ...

The engine protocol of ``sparkformer.decode.protocol`` over the same decode layout as the CPU engine, same math:
- every per-token launch reads the token, the position and the context length from device tensors, and all
  buffers are allocated up front, so the whole step (embedding -> layers -> LM head -> greedy argmax -> pos += 1)
  is captured once in a CUDA graph and replayed at every position. The host syncs only to read a sampled token.
- dense layers: cuBLAS GEMVs (``torch.mv``: fused q/k/v, o, [gate; up], down), Triton flash-decoding with the
  Gemma-2 soft-cap (``DenseAttnPlan``), fused glue kernels; Spark layers: the same GEMVs and glue, Spark attention
  (``SparkAttnPlan``) and the Spark FFN (``SparkFFNPlan``, whose launch shape is picked by timing on the device).
  Both kinds run under the same graph treatment, so the dense model is an honest competitor.
- routed FFN layers (``routers=``) run in torch ops with data-dependent sizes, so an engine that has them runs
  eagerly (no graph): correct, not yet fast.
- ``prefill`` feeds the prompt through the decode step one token at a time (exact, not fast).

Off CUDA (Triton interpreter, ``graph=False``) the same code runs eagerly on CPU tensors: that is how the tests
check it against the CPU engine without a GPU.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from sparkformer.decode.layout import DecodeLayer, ModelLayout
from sparkformer.decode.protocol import DecodeStats, Engine, check_max_len
from sparkformer.decode.routed import routed_ffn_decode
from sparkformer.ops.activations import ACTIVATIONS
from sparkformer.ops.rope import rope_tables
from sparkformer.ops.spark_ffn_decode import spark_ffn_decode_reference
from sparkformer.ops.triton_decode import DenseAttnPlan, embed_norm, geglu_act, residual_norm, rope_cache
from sparkformer.ops.triton_spark_attn import SparkAttnPlan
from sparkformer.ops.triton_spark_ffn import SparkFFNPlan

__all__ = ["CudaEngine", "copy_bandwidth"]

KP_BLOCK = 64  # keys per tile of the blocked predictor-half cache (same as the CPU layout)
ACTIVATIONS_SUPPORTED = ("gelu_tanh", "silu")


def _device_layers(layout: ModelLayout, dev: torch.device) -> list[DecodeLayer]:
    """The decode layout as these kernels read it, on ``dev``: Spark K2 and V as two contiguous matrices, GeGLU as
    [gate; up] (2m, d) and W_down (d, m)."""
    put = lambda t: t.detach().to(dev).contiguous()  # noqa: E731
    out = []
    for st in layout.layers:
        if st.ffn_kind == "spark":
            ffn = tuple(put(t) for t in st.ffn)
        elif st.ffn_kind == "geglu":
            wg, wu, wd_t = st.ffn
            ffn = (put(torch.cat([wg, wu])), put(wd_t.t()))
        else:  # routed: its own gathered layout
            ffn = ()
        out.append(DecodeLayer(st.attn_kind, st.ffn_kind, st.window, put(st.w_qkv), put(st.w_o),
                               st.norms.float().to(dev), ffn, None if st.routed is None else st.routed.to(dev)))
    return out


class CudaEngine(Engine):
    """Batch-1 decode on CUDA (or eagerly on CPU under TRITON_INTERPRET); see the module docstring."""

    device_type = "cuda"

    def __init__(self, layout: ModelLayout, max_len: int | None = None, device: str | torch.device = "cuda",
                 graph: bool | None = None, track_stats: bool = True):
        cfg = layout.cfg
        if cfg.ffn_activation not in ACTIVATIONS_SUPPORTED:
            raise ValueError(f"the CUDA engine supports activations {ACTIVATIONS_SUPPORTED}, not "
                             f"{cfg.ffn_activation!r}; use device='cpu'")
        dev = torch.device(device)
        layers = _device_layers(layout, dev)
        routed = any(st.ffn_kind == "routed" for st in layers)
        if routed and graph:
            raise ValueError("routed FFN layers select a data-dependent number of neurons and cannot run in a CUDA "
                             "graph; leave graph unset (False is chosen for engines with routers)")
        self.cfg, self.layers = cfg, layers
        self.embed = layout.embed.to(dev).contiguous()
        self.head = self.embed if layout.head is layout.embed else layout.head.to(dev).contiguous()
        self.final_norm = layout.final_norm.float().to(dev)
        self.device = dev
        self.dtype = self.embed.dtype
        self.graph_enabled = (dev.type == "cuda" and not routed) if graph is None else graph
        self.track_stats = track_stats
        self.max_len = check_max_len(cfg, max_len)
        self._cache_len = -(-self.max_len // KP_BLOCK) * KP_BLOCK  # the blocked key cache holds whole tiles
        self.pos = 0
        self.timers = None  # components are timed as their own graphs (component_times), not inside a step
        d, H, KV, hd, r = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.spark_attn_rank
        dt, f32 = self.dtype, torch.float32
        self._embed_scale = float(torch.tensor(math.sqrt(d) if cfg.embed_scale else 1.0, dtype=dt).float())
        self._rope = {n: tuple(t.to(dev).contiguous() for t in rope_tables(n, 0, self._cache_len, cfg.rope_theta))
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
        self._reset_stats()
        self.ffn_plan = self.attn_plan = self.dense_plan = None
        if "spark" in kinds_ffn:
            st = next(s for s in layers if s.ffn_kind == "spark")
            self.ffn_plan = SparkFFNPlan.for_weights(*st.ffn, cfg.spark_ffn_fraction, activation=cfg.ffn_activation)
        if any(s.attn_kind == "spark" for s in layers):
            self.attn_plan = SparkAttnPlan(H, KV, hd, r, hd, self._cache_len, cfg.spark_attn_topk, dev)
        if any(s.attn_kind == "dense" for s in layers):
            self.dense_plan = DenseAttnPlan(H, KV, hd, hd, dev)
        self._graph = None
        self._components: dict[str, torch.cuda.CUDAGraph] = {}

    def _alloc_cache(self) -> None:
        cfg, L, dt, dev = self.cfg, self._cache_len, self.dtype, self.device
        KV, hd, r = cfg.n_kv_heads, cfg.head_dim, cfg.spark_attn_rank
        for st in self.layers:
            if st.attn_kind == "spark":
                kp = torch.zeros(KV, L // KP_BLOCK, r, KP_BLOCK, dtype=dt, device=dev)
                krv = torch.zeros(KV, L, hd - r + hd, dtype=dt, device=dev)  # a kept key's kr and v adjacent
                st.cache = ("spark", kp, krv[..., : hd - r], krv[..., hd - r:])
            else:
                st.cache = ("dense", torch.zeros(KV, L, hd, dtype=dt, device=dev),
                            torch.zeros(KV, L, hd, dtype=dt, device=dev))

    def _reset_stats(self) -> None:
        self._stat_tot.zero_()
        self._stat_rows = [0, 0, 0]
        self._routed_stats = [0, 0, 0]  # neurons, width, layer-steps (routed layers run eagerly, counted on the host)

    def set_position(self, pos: int) -> None:
        super().set_position(pos)
        self.pos_t.fill_(self.pos)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- one decode step: the launches the graph captures ------------------------------------------------------
    def _attention(self, i: int, st: DecodeLayer) -> None:
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

    def _ffn(self, i: int, st: DecodeLayer) -> torch.Tensor:
        if st.ffn_kind == "spark":
            return self.ffn_plan.run(self.xn, *st.ffn, y=self.y32, cnt=self.ffn_cnt[i:i + 1])
        if st.ffn_kind == "routed":  # eager (data-dependent sizes): engines with routed layers run without graphs
            y, n_sel = routed_ffn_decode(st.routed, self.xn, ACTIVATIONS[self.cfg.ffn_activation], self.dtype, torch.mv)
            if self.track_stats:
                rs = self._routed_stats
                rs[0], rs[1], rs[2] = rs[0] + n_sel, rs[1] + st.routed.gate_up.shape[0], rs[2] + 1
            self.y.copy_(y)
            return self.y
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

    @property
    def stats(self) -> DecodeStats:
        """Achieved sparsity since the last reset (syncs), in the same form as every engine's."""
        tot = self._stat_tot.tolist()
        tokens, ffn_steps, key_rows = self._stat_rows
        spark_n = self.cfg.spark_ffn_dim
        rn, rw, rl = self._routed_stats
        return DecodeStats(tokens=tokens, ffn_neurons=tot[0] + rn, ffn_width=ffn_steps * spark_n + rw,
                           ffn_layers=ffn_steps + rl, keys_kept=tot[1], key_rows=key_rows, cap_fired=tot[2])

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
        """Feed the prompt (one decode step per token, exact); return the last logits (fp32, on the device).
        ``stats`` count decoded tokens only, as on every engine."""
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        self._check_room(ids.numel())
        dev_ids = ids.to(self.device)
        track, self.track_stats = self.track_stats, False
        try:
            for i in range(ids.numel()):
                self.tok.copy_(dev_ids[i:i + 1])
                self._run_step()
        finally:
            self.track_stats = track
        return self.logits.clone()

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

    def component_times(self, context: int, tokens: int) -> dict[str, float]:
        """Seconds per token of each component, each its own graph over all layers (CUDA events); ``attn_proj`` is
        the rest of the step (q/k/v/o GEMVs, RoPE and cache write, norms)."""
        self.set_position(context)
        self.decode_greedy(1)  # buffers hold a real step's intermediates
        self.set_position(context)
        self.synchronize()
        out = {}
        for name in ("attention", "ffn", "lm_head", "step"):
            fn = self.component_graph(name)
            fn()
            if name == "step":
                self.set_position(context)
            out[name] = _time_calls(fn, tokens)
            self.set_position(context)
        out["attn_proj"] = max(0.0, out.pop("step") - out["attention"] - out["ffn"] - out["lm_head"])
        return out

    def bench_extras(self) -> dict:
        """The Spark FFN launch shape the tuner picked and a full-size check of it against the fp32 reference."""
        if self.ffn_plan is None:
            return {}
        pick = {k: getattr(self.ffn_plan, k) for k in ("fuse_out", "block_n", "block_k", "block_c", "sub", "block_s",
                                                       "splits", "warps")}
        pick["ms"] = getattr(self.ffn_plan, "pick_ms", None)
        st = next(s for s in self.layers if s.ffn_kind == "spark")
        x = torch.randn(self.cfg.d_model, device=self.device).to(self.dtype)
        y = self.ffn_plan.run(x, *st.ffn).clone()
        n = int(self.ffn_plan.cnt[0])
        y_ref, n_ref = spark_ffn_decode_reference(x, *st.ffn, self.cfg.spark_ffn_fraction)
        err = float((y - y_ref.float()).norm() / y_ref.float().norm())
        return {"spark_ffn_plan": pick, "ffn_full_shape_check": {"rel_err": err, "selected": n,
                                                                 "selected_ref": int(n_ref)}}


def _time_calls(fn: Callable[[], object], n: int) -> float:
    """Seconds per call of fn over n back-to-back calls (CUDA events)."""
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(n):
        fn()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) * 1e-3 / n


def copy_bandwidth(n_bytes: int = 2 << 30, reps: int = 10) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus written (the practical ceiling)."""
    a = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    b.copy_(a)
    t = _time_calls(functools.partial(b.copy_, a), reps)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n_bytes / t / 1e9
