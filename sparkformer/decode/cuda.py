"""The CUDA decode engine: batch-1 decode with the Triton kernels, one CUDA graph per token.

    engine = make_engine(model, dtype="bf16", device="cuda")     # or make_random_engine(cfg, ..., device="cuda")
    for tok in engine.generate(prompt_ids, max_new_tokens=64): ...

The engine protocol of ``sparkformer.decode.protocol`` over the same decode layout as the CPU engine, same math:
- every per-token launch reads the token, the position and the context length from device tensors, and all
  buffers are allocated up front, so the whole step (embedding -> layers -> LM head -> greedy argmax -> pos += 1)
  is captured once in a CUDA graph and replayed at every position. The host syncs only to read a sampled token.
- dense layers: cuBLAS GEMVs (``torch.mv``: fused q/k/v, o, [gate; up], down), Triton flash-decoding with the
  Gemma-2 soft-cap (``DenseAttnPlan``), fused glue kernels; Spark layers: the same GEMVs and glue, Spark attention
  (``SparkAttnPlan``: two launches, output written straight into the o-projection input) and the Spark FFN
  (``SparkFFNPlan``: two launches, or three without output atomics; the launch shape is picked by timing CUDA-graph
  replays over the model's own layers). Both kinds run under the same graph treatment, so the dense model is an
  honest competitor. ``fuse_norm=True`` folds the residual add + pre-norm into the q/k/v GEMV (``res_norm_gemv``,
  both kinds alike); ``pdl=True`` launches the Spark kernels with programmatic dependent launch (Hopper+). Both
  default off until a device run shows them faster (env ``SPARKFORMER_CUDA_FUSE_NORM=1`` / ``SPARKFORMER_CUDA_PDL=1``
  turn them on where the engine is built for you, e.g. ``bench decode``).
- routed FFN layers (``routers=``) run in torch ops with data-dependent sizes, so an engine that has them runs
  eagerly (no graph): correct, not yet fast.
- ``prefill`` runs the prompt as one batch of GEMMs (the training form: chunked attention with the decode hard cap,
  the Spark FFN as predictor GEMM -> per-token threshold -> masked K2/V GEMMs, exact to rounding), fills the cache,
  and returns the last logits. Engines with routed layers prefill one decode step per token.

Off CUDA (Triton interpreter, ``graph=False``) the same code runs eagerly on CPU tensors: that is how the tests
check it against the CPU engine without a GPU.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Callable

import torch

from sparkformer.decode.layout import DecodeLayer, ModelLayout
from sparkformer.decode.protocol import DecodeStats, Engine, check_max_len
from sparkformer.decode.routed import routed_ffn_decode
from sparkformer.ops.activations import ACTIVATIONS, softcap
from sparkformer.ops.attn_prefill import prefill_attention
from sparkformer.ops.rope import apply_rope, rope_tables
from sparkformer.ops.spark_attn_decode import SparkCache, read_key_rows, spark_cache_write
from sparkformer.ops.spark_ffn_decode import spark_ffn_decode_reference
from sparkformer.ops.stat_topk import stat_topk
from sparkformer.ops.triton_decode import (DenseAttnPlan, embed_norm, geglu_act, res_norm_gemv, residual_norm,
                                           rope_cache)
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
                 graph: bool | None = None, track_stats: bool = True, fuse_norm: bool | None = None,
                 pdl: bool | None = None):
        cfg = layout.cfg
        if cfg.ffn_activation not in ACTIVATIONS_SUPPORTED:
            raise ValueError(f"the CUDA engine supports activations {ACTIVATIONS_SUPPORTED}, not "
                             f"{cfg.ffn_activation!r}; use device='cpu'")
        if cfg.qk_norm or any(st.qk_norms is not None or st.rope_theta not in (None, cfg.rope_theta)
                              for st in layout.layers):
            raise ValueError("the CUDA engine has no q/k norms or per-layer RoPE bases yet: Gemma-3 style models "
                             "(qk_norm, rope_local_theta) run on the CPU engine; use device='cpu'")
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
        self.fuse_norm = _env_flag("SPARKFORMER_CUDA_FUSE_NORM") if fuse_norm is None else bool(fuse_norm)
        self.pdl = _env_flag("SPARKFORMER_CUDA_PDL") if pdl is None else bool(pdl)
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
        self.h_alt = torch.zeros(d, dtype=f32, device=dev)  # the other half of the fused path's residual ping-pong
        self.xn = torch.zeros(d, dtype=dt, device=dev)
        self.qkv = torch.zeros((H + 2 * KV) * hd, dtype=dt, device=dev)
        self.q = torch.zeros(H, hd, dtype=f32, device=dev)
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
            self.ffn_plan = SparkFFNPlan.for_weights(*st.ffn, cfg.spark_ffn_fraction, activation=cfg.ffn_activation,
                                                     pdl=self.pdl)
        if any(s.attn_kind == "spark" for s in layers):
            self.attn_plan = SparkAttnPlan(H, KV, hd, r, hd, self._cache_len, cfg.spark_attn_topk, dev, pdl=self.pdl)
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
                               out=self.attn.view(cfg.n_heads, cfg.head_dim), kept=self.kept[i], capped=self.capped[i])
        else:
            _, k, v = st.cache
            self.dense_plan.run(self.q, k, v, self.len_t, cfg.attn_scale, st.window, cfg.attn_logit_softcap,
                                self.attn.view(cfg.n_heads, cfg.head_dim))

    def _ffn(self, i: int, st: DecodeLayer) -> torch.Tensor:
        if st.ffn_kind == "spark":
            self.ffn_plan.run(self.xn, *st.ffn, y=self.y32, cnt=self.ffn_cnt[i:i + 1])
            return self.y32
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
        h, h_next, y = self.h, self.h_alt, None
        for i, st in enumerate(self.layers):
            if self.fuse_norm and y is not None:  # previous FFN's residual + this pre-norm in the q/k/v GEMV
                res_norm_gemv(y, h, h_next, self.layers[i - 1].norms[3] if post else None, st.norms[0], st.w_qkv,
                              self.qkv, eps)
                h, h_next = h_next, h
            else:
                torch.mv(st.w_qkv, self.xn, out=self.qkv)
            if st.attn_kind == "spark":
                rope_cache(self.qkv, self.pos_t, self.q, self._rope[r], self._rope[hd - r], st.cache, H, KV, hd, r)
            else:
                rope_cache(self.qkv, self.pos_t, self.q, self._rope[hd], None, st.cache, H, KV, hd, hd)
            self._attention(i, st)
            torch.mv(st.w_o, self.attn, out=self.o)
            residual_norm(self.o, h, st.norms[1] if post else None, st.norms[2], self.xn, eps)
            y = self._ffn(i, st)
            if not self.fuse_norm or i + 1 == len(self.layers):
                nxt = self.layers[i + 1].norms[0] if i + 1 < len(self.layers) else self.final_norm
                residual_norm(y, h, st.norms[3] if post else None, nxt, self.xn, eps)
        self._lm_head()
        self.pos_t.add_(1)

    # ---- graphs -----------------------------------------------------------------------------------------------
    def _tune(self) -> None:
        """Pick the Spark FFN launch shape by timing CUDA-graph replays over this model's own (cold) layer weights."""
        if self.ffn_plan is None or self.device.type != "cuda":
            return
        ws = [st.ffn for st in self.layers if st.ffn_kind == "spark"]
        x = torch.randn(self.cfg.d_model, device=self.device).to(self.dtype)  # zeros would select nothing
        self.ffn_plan = SparkFFNPlan.pick(x, *ws[0], self.cfg.spark_ffn_fraction, weights=ws,
                                          activation=self.cfg.ffn_activation, pdl=self.pdl)

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
        """Feed the prompt; return the last logits (fp32, on the device). One batch of GEMMs (see the module doc);
        with routed layers one decode step per token. ``stats`` count decoded tokens only, as on every engine."""
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        self._check_room(ids.numel())
        dev_ids = ids.to(self.device)
        if any(st.ffn_kind == "routed" for st in self.layers):
            track, self.track_stats = self.track_stats, False
            try:
                for i in range(ids.numel()):
                    self.tok.copy_(dev_ids[i:i + 1])
                    self._run_step()
            finally:
                self.track_stats = track
            return self.logits.clone()
        self.logits.copy_(self._prefill_batch(dev_ids))
        self.set_position(self.pos + ids.numel())
        torch.argmax(self.logits, dim=0, keepdim=True, out=self.tok)  # the next step's input, as after a step
        return self.logits.clone()

    def _rope_rows(self, x: torch.Tensor, pos0: int, split: int | None) -> torch.Tensor:
        """RoPE of rows (..., T, hd) at positions pos0.. (Spark layers: one rotary space per key half)."""
        T = x.shape[-2]
        parts = [(0, x.shape[-1])] if split is None else [(0, split), (split, x.shape[-1])]
        out = []
        for a, b in parts:
            cos, sin = self._rope[b - a]
            out.append(apply_rope(x[..., a:b], cos[pos0: pos0 + T], sin[pos0: pos0 + T]))
        return torch.cat(out, -1)

    def _prefill_batch(self, ids: torch.Tensor) -> torch.Tensor:
        """The prompt through every layer as GEMMs (the CPU engine's training form), writing the cache."""
        cfg, dt, pos0, T = self.cfg, self.dtype, self.pos, ids.numel()
        H, KV, hd, r = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.spark_attn_rank
        act, post = ACTIVATIONS[cfg.ffn_activation], cfg.post_norms

        def rms(x, w):
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, cfg.rms_norm_eps)

        x = self.embed[ids].float() * self._embed_scale  # (T, d) residual stream, fp32
        for st in self.layers:
            xn = rms(x, st.norms[0]).to(dt)
            qkv = (xn @ st.w_qkv.t()).float()
            split = r if st.attn_kind == "spark" else None
            q = self._rope_rows(qkv[:, : H * hd].view(T, H, hd).transpose(0, 1), pos0, split)
            k = self._rope_rows(qkv[:, H * hd: (H + KV) * hd].view(T, KV, hd).transpose(0, 1), pos0, split)
            v = qkv[:, (H + KV) * hd:].view(T, KV, hd).transpose(0, 1)
            if st.attn_kind == "spark":
                _, kp, kr, vc = st.cache
                spark_cache_write(SparkCache(kp, kr, vc), pos0, k.to(dt), v.to(dt))
                kk = torch.cat([read_key_rows(kp, pos0 + T), kr[:, : pos0 + T]], -1).float()
            else:
                _, kc, vc = st.cache
                kc[:, pos0: pos0 + T] = k.to(dt)
                vc[:, pos0: pos0 + T] = v.to(dt)
                kk = kc[:, : pos0 + T].float()
            out, _ = prefill_attention(q, kk, vc[:, : pos0 + T].float(), pos0, kind=st.attn_kind,
                                       scale=cfg.attn_scale, window=st.window, cap=cfg.attn_logit_softcap, rank=r,
                                       topk=cfg.spark_attn_topk)
            o = (out.transpose(0, 1).reshape(T, H * hd).to(dt) @ st.w_o.t()).float()
            x = x + (rms(o, st.norms[1]) if post else o)
            xn = rms(x, st.norms[2]).to(dt)
            if st.ffn_kind == "spark":  # predictor GEMM -> per-token threshold -> the survivors' K2 and V
                k1, k2, vw = st.ffn
                rk = k1.shape[1]
                a = act(stat_topk((xn[:, :rk] @ k1.t()).float(), cfg.spark_ffn_fraction))
                y = ((a * (xn[:, rk:] @ k2.t()).float()).to(dt) @ vw).float()
            else:
                w_gu, w_down = st.ffn
                gu = (xn @ w_gu.t()).float()
                m = gu.shape[1] // 2
                y = ((act(gu[:, :m]) * gu[:, m:]).to(dt) @ w_down.t()).float()
            x = x + (rms(y, st.norms[3]) if post else y)
        last = rms(x[-1], self.final_norm).to(dt)
        return softcap(torch.mv(self.head, last).float(), cfg.final_logit_softcap)

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
        pick = self.ffn_plan.shape()
        pick["us"] = getattr(self.ffn_plan, "pick_us", None)
        pick["candidates"] = getattr(self.ffn_plan, "pick_table", None)
        st = next(s for s in self.layers if s.ffn_kind == "spark")
        x = torch.randn(self.cfg.d_model, device=self.device).to(self.dtype)
        y = self.ffn_plan.run(x, *st.ffn)[0].clone()
        n = int(self.ffn_plan.cnt[0])
        y_ref, n_ref = spark_ffn_decode_reference(x, *st.ffn, self.cfg.spark_ffn_fraction)
        err = float((y - y_ref.float()).norm() / y_ref.float().norm())
        return {"spark_ffn_plan": pick, "ffn_full_shape_check": {"rel_err": err, "selected": n,
                                                                 "selected_ref": int(n_ref)}}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


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
