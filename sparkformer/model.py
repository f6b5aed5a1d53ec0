"""The Gemma-2-style decoder with dense | Spark FFN and dense | Spark attention, in one readable file.

Layout (Gemma 2): embeddings * sqrt(d) -> N x [x + post_norm(attn(pre_norm(x))); x + post_norm(ffn(pre_norm(x)))]
-> final norm -> tied LM head -> final logit soft-cap. Local (sliding-window) and global layers alternate (Gemma 2) or
follow a period (Gemma 3: 5 local, 1 global, with RMSNorm on each q/k head before RoPE and a local RoPE base).

Spark FFN (per token x, split at r):      a = gelu_tanh(stat_topk(K1 x[:r]));  y = V^T (a * K2 x[r:])
Spark attention (per head, split at r):   w = softmax(stat_topk_inf(q1.k1)) * softplus(q2.k2);  out = w @ v
Training computes both densely; the zeros come from the statistical top-k mask. The KV-cache path here is the
reference for incremental decoding; the fast decode engines live in ``sparkformer.decode``. The attention math
(``spark_attention``, ``chunked_attention``), RoPE and the activations are pure functions in ``sparkformer.ops``,
re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparkformer.config import ModelConfig
# the pure functions live in sparkformer.ops (ops import nothing above them); re-exported here for callers
from sparkformer.ops.activations import ACTIVATIONS, gelu_tanh, softcap  # noqa: F401
from sparkformer.ops.attention import attention_mask, chunked_attention, dense_attention, spark_attention  # noqa: F401
from sparkformer.ops.rope import apply_rope, rope_tables  # noqa: F401
from sparkformer.ops.stat_topk import exact_topk, stat_topk


class RMSNorm(nn.Module):
    """RMSNorm in fp32. Gemma style: ``x / rms(x) * (1 + w)``, w initialised to 0; Llama style: ``* w``, w init 1."""

    def __init__(self, dim: int, eps: float = 1e-6, style: str = "gemma"):
        super().__init__()
        self.eps = eps
        self.offset = 1.0 if style == "gemma" else 0.0
        self.weight = nn.Parameter(torch.zeros(dim) if style == "gemma" else torch.ones(dim))

    def scale(self) -> torch.Tensor:
        """The effective per-channel multiplier (fp32)."""
        return self.weight.float() + self.offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.scale()).to(x.dtype)


class Rotary(nn.Module):
    """RoPE for one rotary space of ``dim`` dims.

    Tables are computed per call (O(T*dim), negligible next to the matmuls) rather than kept as buffers, so a model
    materialised from the meta device (HF ``from_pretrained``) or moved between devices is always right."""

    def __init__(self, dim: int, max_len: int, theta: float):
        super().__init__()
        self.dim, self.max_len, self.theta = dim, max_len, theta

    def forward(self, x: torch.Tensor, pos0: int) -> torch.Tensor:
        """Rotate x (..., T, dim) whose first position is ``pos0``."""
        T = x.shape[-2]
        if pos0 + T > self.max_len:
            raise ValueError(f"position {pos0 + T} exceeds max_seq_len={self.max_len}; raise max_seq_len")
        return apply_rope(x, *rope_tables(self.dim, pos0, T, self.theta, x.device))


# ---- FFN --------------------------------------------------------------------------------------------------------
class GeGLUFFN(nn.Module):
    """Dense gated FFN: ``down(act(gate(x)) * up(x))``, act = gelu_tanh (Gemma) or silu (Llama); 3*d*m params."""

    kind = "geglu"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, m = cfg.d_model, cfg.ffn_dim
        self.gate_proj = nn.Linear(d, m, bias=False)
        self.up_proj = nn.Linear(d, m, bias=False)
        self.down_proj = nn.Linear(m, d, bias=False)
        self.act = ACTIVATIONS[cfg.ffn_activation]
        self.n_neurons = m
        self.last_activity: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class SparkFFN(nn.Module):
    """Spark FFN: the predictor K1 (first r input dims) picks ~f of the d_ff neurons per token; 2*d*d_ff params.

    ``predictor.weight`` = K1 (d_ff, r), ``up_proj.weight`` = K2 (d_ff, d-r), ``down_proj.weight`` = V^T (d, d_ff).
    The activation of neuron i (input of the down projection) is ``gelu_tanh(stat_topk(s))_i * (K2 x2)_i``.
    """

    kind = "spark"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, n, r = cfg.d_model, cfg.spark_ffn_dim, cfg.spark_ffn_rank
        self.rank = r
        self.fraction = cfg.spark_ffn_fraction
        self.exact = cfg.topk_method == "exact"
        self.detach_threshold = cfg.detach_threshold
        self.predictor = nn.Linear(r, n, bias=False)
        self.up_proj = nn.Linear(d - r, n, bias=False)
        self.down_proj = nn.Linear(n, d, bias=False)
        self.act = ACTIVATIONS[cfg.ffn_activation]
        self.n_neurons = n
        self.last_activity: torch.Tensor | None = None

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Sparse gate a = act(top-k(K1 x[:r])): zero for unselected neurons (act(0) = 0 for gelu and silu)."""
        s = self.predictor(x[..., : self.rank])
        if self.exact:
            s = exact_topk(s, self.fraction)
        else:
            s = stat_topk(s, self.fraction, detach_threshold=self.detach_threshold)
        return self.act(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.gate(x)
        self.last_activity = (a != 0).float().mean().detach()
        return self.down_proj(a * self.up_proj(x[..., self.rank :]))


class TopKFFN(nn.Module):
    """The paper's "top-k" ablation: ``V^T act(top-k(K x))`` — top-k on the full first projection, no predictor
    split and no gating half. Same d_ff and parameter count as the Spark FFN (2*d*d_ff)."""

    kind = "topk"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, n = cfg.d_model, cfg.spark_ffn_dim
        self.fraction = cfg.spark_ffn_fraction
        self.exact = cfg.topk_method == "exact"
        self.detach_threshold = cfg.detach_threshold
        self.up_proj = nn.Linear(d, n, bias=False)
        self.down_proj = nn.Linear(n, d, bias=False)
        self.act = ACTIVATIONS[cfg.ffn_activation]
        self.n_neurons = n
        self.last_activity: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.up_proj(x)
        s = exact_topk(s, self.fraction) if self.exact else stat_topk(s, self.fraction,
                                                                       detach_threshold=self.detach_threshold)
        a = self.act(s)
        self.last_activity = (a != 0).float().mean().detach()
        return self.down_proj(a)


# ---- attention --------------------------------------------------------------------------------------------------
class KVCache:
    """Preallocated per-layer K/V (B, n_kv, max_len, head_dim) for the reference incremental-decoding path."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        max_len = max_len or cfg.max_seq_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.batch_size, self.max_len, self.pos = batch_size, max_len, 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos0: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        self.k[layer][:, :, pos0 : pos0 + T] = k
        self.v[layer][:, :, pos0 : pos0 + T] = v
        return self.k[layer][:, :, : pos0 + T], self.v[layer][:, :, : pos0 + T]


class Attention(nn.Module):
    """Grouped-query attention, dense or Spark, causal, optional sliding window and logit soft-cap."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.kind = cfg.attention_kind(layer)
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = cfg.window(layer)
        self.scale = cfg.attn_scale
        self.cap = cfg.attn_logit_softcap
        theta = cfg.layer_rope_theta(layer)
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.d_model, bias=False)
        if self.kind == "spark":
            self.rank = cfg.spark_attn_rank
            self.topk = cfg.spark_attn_topk
            self.exact = cfg.topk_method == "exact"
            self.hard_cap = cfg.spark_attn_hard_cap
            self.rope = nn.ModuleList([Rotary(self.rank, cfg.max_seq_len, theta),
                                       Rotary(self.hd - self.rank, cfg.max_seq_len, theta)])
        else:
            self.rope = nn.ModuleList([Rotary(self.hd, cfg.max_seq_len, theta)])
        if cfg.qk_norm:  # Gemma 3: each q and k head normalised (over head_dim) before RoPE
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps, cfg.norm_style)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps, cfg.norm_style)
        else:
            self.q_norm = self.k_norm = None
        self.last_keys_per_query: torch.Tensor | None = None
        self.last_cap_exceeded: torch.Tensor | None = None

    def _rotate(self, x: torch.Tensor, pos0: int) -> torch.Tensor:
        if self.kind == "spark":
            r = self.rank
            return torch.cat([self.rope[0](x[..., :r], pos0), self.rope[1](x[..., r:], pos0)], dim=-1)
        return self.rope[0](x, pos0)

    def forward(self, x: torch.Tensor, pos0: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._rotate(q, pos0), self._rotate(k, pos0)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, pos0)
        rep = self.n_heads // self.n_kv
        if self.kind == "spark":
            self._kept: list[torch.Tensor] = []
            out, _ = chunked_attention(q, k, v, pos0, kind="spark", scale=self.scale, window=self.window,
                                       cap=self.cap, spark_fn=self._spark)
            if self._kept:
                n_kept = torch.cat([n.flatten() for n in self._kept])
                self.last_keys_per_query = n_kept.float().mean().detach()
                self.last_cap_exceeded = (n_kept > self.topk).float().mean().detach()
        elif self.cap is None:
            mask = attention_mask(T, k.shape[2], pos0, self.window, x.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=rep > 1)
        else:  # the soft-cap is not expressible in SDPA
            out, _ = chunked_attention(q, k, v, pos0, kind="dense", scale=self.scale, window=self.window, cap=self.cap)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))

    def _spark(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Spark attention of one chunk (``chunked_attention``'s shapes); records the keys kept per query. Analysis
        code may replace it on an instance to observe every chunk."""
        out, n_kept = spark_attention(q, k, v, mask, self.rank, self.topk, self.scale, self.cap, self.exact,
                                      self.hard_cap)
        self._kept.append(n_kept.detach())
        return out


# ---- block and model --------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm residual block; Gemma 2 also normalises each sub-block's output (``post_norms``)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.d_model, cfg.rms_norm_eps, cfg.norm_style)  # noqa: E731
        self.input_norm = norm()
        self.attn = Attention(cfg, layer)
        self.pre_ffn_norm = norm()
        self.ffn = {"spark": SparkFFN, "topk": TopKFFN, "geglu": GeGLUFFN}[cfg.ffn_kind(layer)](cfg)
        self.post_attn_norm = norm() if cfg.post_norms else nn.Identity()
        self.post_ffn_norm = norm() if cfg.post_norms else nn.Identity()

    def forward(self, x: torch.Tensor, pos0: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.post_attn_norm(self.attn(self.input_norm(x), pos0, cache))
        return x + self.post_ffn_norm(self.ffn(self.pre_ffn_norm(x)))


@dataclass
class LMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class SparkLM(nn.Module):
    """Gemma-2-style causal LM; ``cfg.ffn`` / ``cfg.attention`` choose dense or Spark per model or per layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, cfg.norm_style)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, out_std if name.endswith(("o_proj", "down_proj")) else std)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, RMSNorm):
                nn.init.constant_(m.weight, 1.0 - m.offset)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> LMOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        pos0 = cache.pos if cache is not None else 0
        limit = cache.max_len if cache is not None else self.config.max_seq_len
        if pos0 + T > limit:
            raise ValueError(f"sequence end {pos0 + T} exceeds the {'cache' if cache else 'model'} length {limit}")
        x = self.embed(input_ids)
        if self.config.embed_scale:
            x = x * torch.tensor(math.sqrt(self.config.d_model), dtype=x.dtype)
        for block in self.layers:
            x = block(x, pos0, cache)
        if cache is not None:
            cache.pos = pos0 + T
        x = self.final_norm(x)
        logits = softcap(F.linear(x, self.head_weight), self.config.final_logit_softcap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return LMOutput(logits=logits, loss=loss)

    # ---- sparsity statistics of the last forward -------------------------------------------------------------
    def sparsity_stats(self) -> dict[str, list]:
        """Per layer: fraction of FFN neurons nonzero, mean keys kept per query, fraction of rows over the cap
        (``None`` for dense layers or before any forward)."""

        def val(t):
            return None if t is None else float(t)

        return {
            "ffn_activity": [val(b.ffn.last_activity) for b in self.layers],
            "keys_per_query": [val(b.attn.last_keys_per_query) for b in self.layers],
            "attn_cap_exceeded": [val(b.attn.last_cap_exceeded) for b in self.layers],
        }

    # ---- generation ------------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.embed.weight
        return KVCache(self.config, batch_size, max_len, dtype=p.dtype, device=p.device)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy (temperature 0) or temperature / nucleus sampling with the KV cache. Returns prompt + new tokens."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0")
        total = input_ids.shape[1] + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_seq_len={self.config.max_seq_len}")
        cache = self.new_cache(input_ids.shape[0], total)
        logits = self(input_ids, cache=cache).logits[:, -1]
        out = [input_ids]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            out.append(nxt[:, None])
            if eos_token_id is not None and bool(done.all()):
                break
            logits = self(nxt[:, None], cache=cache).logits[:, -1]
        return torch.cat(out, dim=1)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, idx = probs.sort(dim=-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p  # keep the smallest prefix whose mass reaches top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sp)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
