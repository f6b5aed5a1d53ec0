"""FLOPs and bytes per decoded token, dense vs Spark, and the byte-ideal decode speedup.

Counts are analytic (a multiply-add = 2 FLOPs; elementwise ops, norms and softmax are left out: they are
< 1% here). "Bytes" are what batch-1 decode must read per token: every weight it touches plus the KV cache it attends
over. A decode step at context L attends over min(L, window) keys on local layers and L keys on global ones.

Spark FFN reads all of K1 (d_ff x r) and, for the ~f*d_ff selected neurons, one row of K2 (d-r) and one row of V (d).
Spark attention reads the predictor half (r dims) of every visible key, then for each query head the other half
and the value of at most k keys (selection is per query head, so GQA siblings are counted separately: an upper bound).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from sparkformer.config import ModelConfig, apply_overrides, get_preset, load_config_file

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "int8": 1,
               "q8_0": 34 / 32, "q4_0": 18 / 32,  # block-quantized: 32 weights + one fp16 scale per block
               "q4_1": 20 / 32}  # ... + one fp16 scale and one fp16 minimum per block
KV_BYTES = {"q8_0": 2, "q4_0": 2, "q4_1": 2}  # quantized engines keep the KV cache in bf16; other dtypes use DTYPE_BYTES


@dataclass
class TokenCost:
    """Per decoded token at a given context."""

    attn_proj_flops: float = 0.0
    attn_score_flops: float = 0.0
    ffn_flops: float = 0.0
    head_flops: float = 0.0
    attn_proj_bytes: float = 0.0
    kv_bytes: float = 0.0
    ffn_bytes: float = 0.0
    head_bytes: float = 0.0
    ffn_active: float = 0.0  # neurons touched per token, summed over layers
    keys_per_query: float = 0.0  # mean over layers

    @property
    def flops(self) -> float:
        return self.attn_proj_flops + self.attn_score_flops + self.ffn_flops + self.head_flops

    @property
    def flops_no_head(self) -> float:
        return self.flops - self.head_flops

    @property
    def bytes(self) -> float:
        return self.attn_proj_bytes + self.kv_bytes + self.ffn_bytes + self.head_bytes


def token_cost(cfg: ModelConfig, context: int, dtype_bytes: float = 2, ffn_fraction: float | None = None,
               keys: int | None = None, kv_dtype_bytes: float | None = None) -> TokenCost:
    """Cost of decoding one token at position ``context`` (it attends over ``context`` cached keys).

    ``dtype_bytes``: bytes per weight (fractional for block-quantized formats: ``WEIGHT_BYTES``); ``kv_dtype_bytes``:
    bytes per cached key/value element (default: the same). ``ffn_fraction`` / ``keys`` override the targets with
    achieved values (e.g. measured by a benchmark)."""
    if context < 1:
        raise ValueError(f"context={context} must be >= 1")
    c = TokenCost()
    d, H, KV, hd, b = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, dtype_bytes
    kb = dtype_bytes if kv_dtype_bytes is None else kv_dtype_bytes
    proj = d * H * hd * 2 + d * KV * hd * 2  # q, o and k, v weights
    for i in range(cfg.n_layers):
        c.attn_proj_flops += 2 * proj
        c.attn_proj_bytes += proj * b
        L = min(context, cfg.window(i) or context)
        if cfg.attention_kind(i) == "spark":
            r = cfg.spark_attn_rank
            k = min(L, keys if keys is not None else cfg.spark_attn_topk)
            c.attn_score_flops += H * (2 * r * L + 2 * (hd - r) * k + 2 * hd * k)
            c.kv_bytes += (KV * r * L + H * k * (hd - r + hd)) * kb
            c.keys_per_query += k / cfg.n_layers
        else:
            c.attn_score_flops += H * 4 * hd * L
            c.kv_bytes += KV * L * 2 * hd * kb
            c.keys_per_query += L / cfg.n_layers
        if cfg.ffn_kind(i) == "spark":
            n, r = cfg.spark_ffn_dim, cfg.spark_ffn_rank
            a = n * (ffn_fraction if ffn_fraction is not None else cfg.spark_ffn_fraction)
            c.ffn_flops += 2 * r * n + 2 * (d - r) * a + 2 * d * a
            c.ffn_bytes += (r * n + a * (d - r) + a * d) * b
            c.ffn_active += a
        elif cfg.ffn_kind(i) == "topk":  # all of K (d_ff x d) to score, then the selected rows of V
            n = cfg.spark_ffn_dim
            a = n * (ffn_fraction if ffn_fraction is not None else cfg.spark_ffn_fraction)
            c.ffn_flops += 2 * d * n + 2 * d * a
            c.ffn_bytes += (d * n + a * d) * b
            c.ffn_active += a
        else:
            c.ffn_flops += 2 * 3 * d * cfg.ffn_dim
            c.ffn_bytes += 3 * d * cfg.ffn_dim * b
            c.ffn_active += cfg.ffn_dim
    c.head_flops = 2 * d * cfg.vocab_size
    c.head_bytes = d * cfg.vocab_size * b
    return c


def dense_and_spark(cfg: ModelConfig) -> tuple[ModelConfig, ModelConfig]:
    """The dense twin and the Spark twin of a config (a config already using Spark keeps its own layer pattern)."""
    dense = cfg.replace(ffn="geglu", attention="dense")
    spark = cfg if cfg.uses_spark else cfg.replace(ffn="spark", attention="spark")
    return dense, spark


def compare(cfg: ModelConfig, context: int, dtype: str = "bf16", ffn_fraction: float | None = None,
            keys: int | None = None) -> dict:
    """Dense vs Spark cost per token, with the ratios other tools read."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(DTYPE_BYTES)}")
    b, kb = DTYPE_BYTES[dtype], KV_BYTES.get(dtype)
    dense_cfg, spark_cfg = dense_and_spark(cfg)
    dense = token_cost(dense_cfg, context, b, kv_dtype_bytes=kb)
    spark = token_cost(spark_cfg, context, b, ffn_fraction, keys, kv_dtype_bytes=kb)
    return {
        "context": context,
        "dtype": dtype,
        "dense": {**asdict(dense), "flops": dense.flops, "flops_no_head": dense.flops_no_head, "bytes": dense.bytes},
        "spark": {**asdict(spark), "flops": spark.flops, "flops_no_head": spark.flops_no_head, "bytes": spark.bytes},
        "flops_ratio": dense.flops / spark.flops,
        "flops_ratio_no_head": dense.flops_no_head / spark.flops_no_head,
        "ffn_flops_ratio": dense.ffn_flops / spark.ffn_flops,
        "ideal_decode_speedup": dense.bytes / spark.bytes,
        "ideal_ffn_speedup": dense.ffn_bytes / spark.ffn_bytes,
        "ideal_attention_speedup": (dense.kv_bytes / spark.kv_bytes),
    }


def format_table(res: dict) -> str:
    d, s = res["dense"], res["spark"]
    rows = [
        ("attention projections GFLOP", "attn_proj_flops", 1e9),
        ("attention scores GFLOP", "attn_score_flops", 1e9),
        ("FFN GFLOP", "ffn_flops", 1e9),
        ("LM head GFLOP", "head_flops", 1e9),
        ("total GFLOP", "flops", 1e9),
        ("total GFLOP, no LM head", "flops_no_head", 1e9),
        ("weights: attention MB", "attn_proj_bytes", 1e6),
        ("KV cache read MB", "kv_bytes", 1e6),
        ("weights: FFN MB", "ffn_bytes", 1e6),
        ("weights: LM head MB", "head_bytes", 1e6),
        ("total MB read", "bytes", 1e6),
        ("FFN neurons used (all layers)", "ffn_active", 1),
        ("keys per query (mean layer)", "keys_per_query", 1),
    ]
    out = [f"per decoded token at context {res['context']}, {res['dtype']}",
           f"{'':32s} {'dense':>12s} {'spark':>12s} {'dense/spark':>12s}"]
    for label, key, scale in rows:
        a, b = d[key] / scale, s[key] / scale
        out.append(f"{label:32s} {a:12.3f} {b:12.3f} {a / b if b else float('inf'):12.2f}")
    return "\n".join(out)


def config_from_args(preset: str | None, config_file: str | None, overrides: list[str]) -> ModelConfig:
    if config_file:
        data = load_config_file(config_file)
        data = data.get("model", data)
        name = data.pop("preset", None) if isinstance(data, dict) else None
        cfg = get_preset(name, **data) if name else ModelConfig.from_dict(data)
    else:
        cfg = get_preset(preset or "gemma2-2b")
    return apply_overrides(cfg, overrides) if overrides else cfg


def _cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(args.preset, args.config, args.overrides)
    contexts = [int(c) for c in str(args.context).split(",")]
    results = [compare(cfg, L, args.dtype, args.ffn_fraction, args.keys) for L in contexts]
    for res in results:
        print(format_table(res))
        print(f"FLOPs ratio {res['flops_ratio']:.2f}x (no LM head {res['flops_ratio_no_head']:.2f}x); "
              f"ideal decode speedup from bytes {res['ideal_decode_speedup']:.2f}x "
              f"(FFN {res['ideal_ffn_speedup']:.2f}x, KV {res['ideal_attention_speedup']:.2f}x)\n")
    last = dict(results[-1])
    last["preset"] = args.preset if not args.config else args.config
    if len(results) > 1:
        last["contexts"] = [{k: r[k] for k in ("context", "flops_ratio", "flops_ratio_no_head", "ideal_decode_speedup")}
                            for r in results]
    print(json.dumps(last))
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("flops", help="FLOPs and bytes per decoded token, dense vs Spark, and the ideal speedup")
    p.add_argument("--preset", default="gemma2-2b")
    p.add_argument("--config", default=None, help="YAML/JSON model config (a `model:` section or top level)")
    p.add_argument("--context", default="8192", help="context length(s), comma-separated")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES))
    p.add_argument("--ffn-fraction", type=float, default=None, help="achieved FFN fraction (default: the target)")
    p.add_argument("--keys", type=int, default=None, help="achieved keys per query (default: the target k)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.set_defaults(func=_cli)
