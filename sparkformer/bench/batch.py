"""Benchmark: where batching ends the Spark FFN's decode gain.

    sparkformer bench batch --preset gemma2-2b --batch 1,2,4,8,16,32 --dtype bf16,fp32

At batch 1 each token reads only its ~8% of K2/V rows; a batch of B tokens (B sequences decoded in lockstep) shares
one read of the weights, but the Spark FFN must read the *union* of the B selections (``spark_ffn_decode_batch``),
which approaches all neurons as B grows, while the dense GeGLU reads its weights once for any B. Attention is not
part of this: each sequence reads its own KV cache whatever B is, so Spark attention's saving does not shrink with B.

Per layer, ``--layers`` layers of random full-width weights (more than the last-level cache, so reads are cold),
dense and Spark interleaved: batch 1 uses the fused C++ decode kernels (as the engine does), B > 1 the batched
PyTorch forms (three GEMMs for dense; predictor GEMM + union gather for Spark). Reports ms per layer-step, tokens/s,
the union fraction and the byte-ideal ratio (dense FFN bytes / (K1 + union x (K2 + V) bytes)).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparkformer.bench.common import OUT_HELP, env_info, finish, summary
from sparkformer.config import get_preset
from sparkformer.decode import resolve_dtype
from sparkformer.model import gelu_tanh
from sparkformer.ops.dense_decode import geglu_decode
from sparkformer.ops.spark_ffn_decode import spark_ffn_decode, spark_ffn_decode_batch


def _dense_batch(x, wg, wu, wd_t):
    xw = x.to(wg.dtype)
    h = gelu_tanh((xw @ wg.t()).float()) * (xw @ wu.t()).float()
    return (h.to(wd_t.dtype) @ wd_t).float()


def bench_dtype(cfg, dtype_name: str, batches: list[int], layers: int, repeats: int, steps: int) -> list[dict]:
    dtype = resolve_dtype(dtype_name)
    g = torch.Generator().manual_seed(0)
    d, m, n, r = cfg.d_model, cfg.ffn_dim, cfg.spark_ffn_dim, cfg.spark_ffn_rank
    f = cfg.spark_ffn_fraction

    def rnd(*shape):
        return torch.empty(*shape, dtype=dtype).normal_(0.0, cfg.init_std, generator=g)

    dense = []
    spark = []
    for _ in range(layers):
        p = rnd(3, m, d)
        dense.append((p[0], p[1], p[2]))
        kv = rnd(n, 2 * d - r)
        spark.append((rnd(n, r), kv[:, : d - r], kv[:, d - r:]))
    el = torch.empty((), dtype=dtype).element_size()
    out = []
    for B in batches:
        x = torch.randn(B, d, generator=g)
        unions = []

        def run_dense():
            for w in dense:
                for _ in range(steps):
                    geglu_decode(x[0], *w) if B == 1 else _dense_batch(x, *w)

        def run_spark():
            for w in spark:
                for _ in range(steps):
                    if B == 1:
                        _, k = spark_ffn_decode(x[0], *w, f)
                        unions.append(int(k))
                    else:
                        unions.append(spark_ffn_decode_batch(x, *w, f)[2])

        t = {"dense": [], "spark": []}
        for rep in range(repeats + 1):  # interleaved, first round is warm-up
            for name, fn in (("dense", run_dense), ("spark", run_spark)):
                t0 = time.perf_counter()
                fn()
                if rep:
                    t[name].append((time.perf_counter() - t0) / (layers * steps))
        dm, sm = statistics.median(t["dense"]), statistics.median(t["spark"])
        union = statistics.mean(unions) / n
        dense_bytes = 3 * m * d * el
        spark_bytes = (n * r + union * n * (2 * d - r)) * el
        out.append({"dtype": dtype_name, "batch": B, "dense_ms": dm * 1e3, "spark_ms": sm * 1e3,
                    "dense_ms_range": {k: v * 1e3 for k, v in summary(t["dense"]).items() if k != "n"},
                    "spark_ms_range": {k: v * 1e3 for k, v in summary(t["spark"]).items() if k != "n"},
                    "speedup": dm / sm, "ideal_speedup": dense_bytes / spark_bytes, "union_fraction": union,
                    "dense_tokens_per_s_per_layer": B / dm, "spark_tokens_per_s_per_layer": B / sm})
        print(f"done {dtype_name} batch {B}: dense {dm * 1e3:.2f} ms, spark {sm * 1e3:.2f} ms, union {union:.1%}",
              flush=True)
    return out


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    batches = [int(b) for b in args.batch.split(",")]
    runs = []
    for dt in args.dtype.split(","):
        runs += bench_dtype(cfg, dt, batches, args.layers, args.repeats, args.steps)
    return {"benchmark": "batch-ffn", "preset": args.preset, "layers": args.layers, "env": env_info(args.dtype),
            "runs": runs}


def print_table(runs: list[dict]) -> None:
    print(f"{'dtype':5s} {'batch':>5s} {'dense ms':>9s} {'spark ms':>9s} {'speedup':>8s} {'ideal':>6s} {'union':>6s} "
          f"{'dense tok/s':>11s} {'spark tok/s':>11s}   (per layer)")
    for r in runs:
        print(f"{r['dtype']:5s} {r['batch']:5d} {r['dense_ms']:9.3f} {r['spark_ms']:9.3f} {r['speedup']:8.2f} "
              f"{r['ideal_speedup']:6.2f} {r['union_fraction']:6.1%} {r['dense_tokens_per_s_per_layer']:11.0f} "
              f"{r['spark_tokens_per_s_per_layer']:11.0f}")


def _cli(args: argparse.Namespace) -> int:
    res = run(args)
    return finish(res, lambda: print_table(res["runs"]), args.name or f"batch_ffn_{args.preset}", args)


def add_parser(sub) -> None:
    p = sub.add_parser("batch", help="batched decode: where the Spark FFN's gain ends (union of selections)")
    p.add_argument("--preset", default="gemma2-2b")
    p.add_argument("--batch", default="1,2,4,8,16,32", help="batch sizes")
    p.add_argument("--dtype", default="bf16,fp32")
    p.add_argument("--layers", type=int, default=4, help="layers of random weights cycled through (cold reads)")
    p.add_argument("--steps", type=int, default=2, help="decode steps per layer per timed round")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--name", default=None, help="result file name (default batch_ffn_<preset>)")
    p.add_argument("--out", default=None, help=OUT_HELP)
    p.add_argument("--no-save", action="store_true")
    p.set_defaults(func=_cli)


__all__ = ["run", "bench_dtype"]
