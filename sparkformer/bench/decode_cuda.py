"""Benchmark: batch-1 decode on CUDA, Spark vs dense on the same engine (``CudaDecodeEngine``), plus HF transformers.

    sparkformer bench decode --device cuda --preset gemma2-2b --context 512,4096 --dtype bf16
    python -m sparkformer.bench.decode_cuda --preset gemma2-2b --context 512,4096 --dtype bf16 --out DIR

Same table and JSON keys as the CPU benchmark (``sparkformer.bench.decode``), and a few more: the GPU's measured copy
bandwidth (``gpu_copy_gb_per_s``: bytes read + written by a large device-to-device copy) and achieved bandwidth of
the FFN and attention alone. Weights are random and full size, cold (the whole model is ~100x the L2); the KV cache
is random up to the context. Each step is one CUDA-graph replay that feeds its own argmax to the next, so timing
covers consecutive tokens with no host in the loop (CUDA events, medians over interleaved dense/Spark repeats).
Components are timed the same way, each as its own graph over all layers: ``attention`` (score/select/gather or
flash-decoding kernels), ``ffn``, ``lm_head``; ``attn_proj`` is the rest of the step (q/k/v/o GEMVs, RoPE and cache
write, norms). HF ``Gemma2ForCausalLM`` (eager attention: the only HF path with Gemma-2's logit soft-cap) runs
per-token decode on the dense shape with a pre-filled DynamicCache, host-synchronised per token as generate is.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from sparkformer.bench.common import env_info, finish, write_result
from sparkformer.bench.decode import comparison, hf_ms_per_token
from sparkformer.bench.decode import print_table as decode_table
from sparkformer.config import ModelConfig, get_preset

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "float32": torch.float32}


def copy_bandwidth(n_bytes: int = 2 << 30, reps: int = 10) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus written (the practical ceiling)."""
    a = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    b.copy_(a)
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(reps):
        b.copy_(a)
    t1.record()
    torch.cuda.synchronize()
    gbs = 2 * n_bytes * reps / (t0.elapsed_time(t1) * 1e-3) / 1e9
    del a, b
    torch.cuda.empty_cache()
    return gbs


def _time(fn, n: int) -> float:
    """Seconds per call of fn over n back-to-back calls (CUDA events)."""
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(n):
        fn()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) * 1e-3 / n


def time_tokens(engine, context: int, tokens: int) -> float:
    """Seconds per token over ``tokens`` consecutive greedy steps from ``context`` (graph replays)."""
    engine.set_position(context)
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    engine.decode_greedy(tokens)
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) * 1e-3 / tokens


def components(engine, context: int, reps: int) -> dict:
    """Seconds per token of each component (its own graph over all layers) and the rest of the step."""
    engine.set_position(context)
    engine.decode_greedy(1)  # buffers hold a real step's intermediates
    engine.set_position(context)
    torch.cuda.synchronize()
    out = {}
    for name in ("attention", "ffn", "lm_head", "step"):
        fn = engine.component_graph(name)
        fn()
        if name == "step":
            engine.set_position(context)
        out[name] = _time(fn, reps)
        engine.set_position(context)
    out["attn_proj"] = max(0.0, out["step"] - out["attention"] - out["ffn"] - out["lm_head"])
    return out


def build_pair(cfg: ModelConfig, dtype: torch.dtype, max_len: int, device: str = "cuda"):
    from sparkformer.cuda_engine import CudaDecodeEngine

    dense = CudaDecodeEngine.random(cfg.replace(ffn="geglu", attention="dense"), dtype, max_len, seed=1,
                                    track_stats=False, device=device)
    spark = CudaDecodeEngine.random(cfg.replace(ffn="spark", attention="spark", spark_attn_hard_cap=True), dtype,
                                    max_len, seed=2, share=dense, track_stats=False, device=device)
    return dense, spark


def ffn_full_shape_check(engine) -> dict:
    """The tuned Spark FFN kernels at full size vs the fp32 reference on the same device (layer 0, random x)."""
    from sparkformer.ops.spark_ffn_decode import spark_ffn_decode_reference

    st = next(s for s in engine.layers if s.ffn_kind == "spark")
    x = torch.randn(engine.cfg.d_model, device=engine.device).to(engine.dtype)
    y = engine.ffn_plan.run(x, *st.ffn).clone()
    n = int(engine.ffn_plan.cnt[0])
    y_ref, n_ref = spark_ffn_decode_reference(x, *st.ffn, engine.cfg.spark_ffn_fraction)
    err = float((y - y_ref.float()).norm() / y_ref.float().norm())
    return {"rel_err": err, "selected": n, "selected_ref": int(n_ref)}


def bench_one(cfg: ModelConfig, dtype_name: str, context: int, tokens: int, repeats: int, hf: bool,
              peak: float) -> dict:
    dtype = DTYPES[dtype_name]
    max_len = context + 2 * tokens + 16  # timed runs restart at context; the component graphs run `tokens` steps
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, max_len))
    dense, spark = build_pair(cfg, dtype, max_len)
    for e in (dense, spark):
        e.fill_cache_random(context)
    t_build = time.perf_counter()
    time_tokens(dense, context, 2)  # captures the graphs (and picks the Spark FFN launch shape)
    time_tokens(spark, context, 2)
    t_build = time.perf_counter() - t_build
    d_t, s_t = [], []
    for _ in range(repeats):  # interleaved A B A B
        d_t.append(time_tokens(dense, context, tokens))
        s_t.append(time_tokens(spark, context, tokens))
    spark.track_stats = True  # sparsity actually achieved, measured on separate steps
    spark.reset()
    spark.set_position(context)
    spark.decode_greedy(tokens)
    st = spark.stats_summary()
    reps = tokens
    d_comp = components(dense, context, reps)
    s_comp = components(spark, context, reps)
    ffn_check = ffn_full_shape_check(spark)
    ffn_pick = {k: getattr(spark.ffn_plan, k) for k in ("fuse_out", "block_n", "block_k", "block_c", "sub",
                                                         "block_s", "splits", "warps")}
    ffn_pick["ms"] = getattr(spark.ffn_plan, "pick_ms", None)
    del dense, spark
    gc.collect()
    torch.cuda.empty_cache()
    res = {"device": torch.cuda.get_device_name(0),
           **comparison(cfg, dtype_name, context, tokens, repeats, d_t, s_t, d_comp, s_comp, st),
           "gpu_copy_gb_per_s": peak}
    for side, comp in (("dense", d_comp), ("spark", s_comp)):  # bytes each sparse component must read / its time
        res[f"{side}_ffn_gb_per_s"] = res[f"{side}_ffn_bytes_per_token"] / comp["ffn"] / 1e9
        res[f"{side}_attention_gb_per_s"] = res[f"{side}_kv_bytes_per_token"] / comp["attention"] / 1e9
    res.update(spark_ffn_plan=ffn_pick, ffn_full_shape_check=ffn_check, setup_s=t_build)
    res["hf_ms_per_token"] = None
    if hf:
        try:
            h = hf_ms_per_token(cfg, dtype, context, max(4, tokens // 4), 2, device="cuda", warmup=1)
            res["hf_ms_per_token"] = h["median"] * 1e3 if h else None
        except Exception as e:  # HF is a reference point, not the measurement: keep the run
            res["hf_error"] = f"{type(e).__name__}: {e}"[:300]
    return res


def print_table(runs: list[dict]) -> None:
    decode_table(runs, ms_digits=3, gb_digits=0)
    print("achieved GB/s (dense | spark; GPU copy = ceiling):")
    for r in runs:
        print(f"  {r['dtype']} ctx {r['context']}: FFN {r['dense_ffn_gb_per_s']:.0f} | {r['spark_ffn_gb_per_s']:.0f}, "
              f"attention {r['dense_attention_gb_per_s']:.0f} | {r['spark_attention_gb_per_s']:.0f}, "
              f"copy {r['gpu_copy_gb_per_s']:.0f}")


def run(args: argparse.Namespace) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("bench decode --device cuda needs a CUDA GPU")
    overrides = {"n_layers": args.layers} if getattr(args, "layers", None) else {}
    cfg = get_preset(args.preset, **overrides)
    peak = copy_bandwidth()
    print(f"{torch.cuda.get_device_name(0)}: device-to-device copy {peak:.0f} GB/s (read + write)", flush=True)
    runs = []
    for dtype in args.dtype.split(","):
        for ctx in [int(c) for c in str(args.context).split(",")]:
            r = bench_one(cfg, dtype, ctx, args.tokens, args.repeats, not args.no_hf, peak)
            runs.append(r)
            print(f"done {dtype} ctx {ctx}: {r['dense_ms_per_token']:.3f} -> {r['spark_ms_per_token']:.3f} ms/token "
                  f"({r['speedup']:.2f}x; FFN {r['ffn_speedup']:.2f}x)", flush=True)
            if getattr(args, "out", None) and not getattr(args, "no_save", False):  # partial results survive
                write_result((args.name or f"decode_cuda_{args.preset}") + ".partial", {"runs": runs}, args.out)
    import triton

    env = env_info(args.dtype)
    env["triton"] = triton.__version__
    env["cuda_runtime"] = torch.version.cuda
    return {"benchmark": "decode", "device": "cuda", "preset": args.preset, "layers": cfg.n_layers,
            "engine": "CudaDecodeEngine (Triton + cuBLAS, CUDA graph per token)", "env": env, "runs": runs}


def cli(args: argparse.Namespace) -> int:
    """Entry point for ``sparkformer bench decode --device cuda`` (takes the CPU benchmark's parsed args)."""
    for k, v in (("tokens", 32), ("repeats", 5), ("no_hf", False), ("name", None), ("out", None),
                 ("no_save", False), ("layers", None)):
        if not hasattr(args, k):
            setattr(args, k, v)
    res = run(args)
    return finish(res, lambda: print_table(res["runs"]), args.name or f"decode_cuda_{args.preset}", args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="batch-1 decode on CUDA: Spark vs dense engine, and HF transformers")
    p.add_argument("--preset", default="gemma2-2b")
    p.add_argument("--context", default="512,4096")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--tokens", type=int, default=32, help="decode steps per timed run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--name", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--no-save", action="store_true")
    return cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
