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
import json
import statistics
import sys
import time

import torch

from sparkformer.bench.common import env_info, summary, write_result
from sparkformer.config import ModelConfig, get_preset
from sparkformer.flops import token_cost

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


def hf_ms_per_token(cfg: ModelConfig, dtype: torch.dtype, context: int, tokens: int, repeats: int) -> dict | None:
    """Per-token decode of HF Gemma2ForCausalLM (eager, same dense shape and dtype) on CUDA, pre-filled cache."""
    try:
        import inspect

        from transformers import DynamicCache, Gemma2Config, Gemma2ForCausalLM
    except ImportError:
        return None
    d = cfg.replace(ffn="geglu", attention="dense")
    hc = Gemma2Config(vocab_size=d.vocab_size, hidden_size=d.d_model, intermediate_size=d.ffn_dim,
                      num_hidden_layers=d.n_layers, num_attention_heads=d.n_heads, num_key_value_heads=d.n_kv_heads,
                      head_dim=d.head_dim, max_position_embeddings=max(d.max_seq_len, context + tokens + 1),
                      sliding_window=d.sliding_window, query_pre_attn_scalar=d.query_pre_attn_scalar or d.head_dim,
                      attn_implementation="eager")
    with torch.device("meta"):
        model = Gemma2ForCausalLM(hc)
    model = model.to_empty(device="cuda").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.eval()
    cache_kw = "past_key_values" if "past_key_values" in inspect.signature(model.forward).parameters else "cache"
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up
            cache = DynamicCache(config=hc) if "config" in inspect.signature(DynamicCache).parameters else DynamicCache()
            shape = (1, d.n_kv_heads, context, d.head_dim)
            for i in range(d.n_layers):
                cache.update(torch.randn(shape, dtype=dtype, device="cuda"),
                             torch.randn(shape, dtype=dtype, device="cuda"), i)
            tok = torch.ones(1, 1, dtype=torch.long, device="cuda")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for j in range(tokens):
                pos = torch.tensor([[context + j]], device="cuda")
                out = model(input_ids=tok, position_ids=pos, use_cache=True, **{cache_kw: cache})
                cache = getattr(out, cache_kw, None) or getattr(out, "past_key_values", cache)
                tok = out.logits[:, -1:].argmax(-1)
                int(tok)  # generate reads each token on the host
            times.append((time.perf_counter() - t0) / tokens)
    del model, cache
    gc.collect()
    torch.cuda.empty_cache()
    return summary(times[1:])


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
    b = 4 if dtype == torch.float32 else 2
    dcost = token_cost(cfg.replace(ffn="geglu", attention="dense"), context, b)
    scost = token_cost(cfg.replace(ffn="spark", attention="spark"), context, b,
                       ffn_fraction=st.get("ffn_activity"), keys=round(st.get("keys_per_query", cfg.spark_attn_topk)))
    dm, sm = statistics.median(d_t), statistics.median(s_t)
    res = {
        "device": torch.cuda.get_device_name(0), "dtype": dtype_name, "context": context, "layers": cfg.n_layers,
        "tokens": tokens, "repeats": repeats,
        "dense_ms_per_token": dm * 1e3, "spark_ms_per_token": sm * 1e3,
        "dense_ms": {k: v * 1e3 for k, v in summary(d_t).items() if k != "n"},
        "spark_ms": {k: v * 1e3 for k, v in summary(s_t).items() if k != "n"},
        "speedup": dm / sm,
        "ideal_speedup": dcost.bytes / scost.bytes,
        "dense_bytes_per_token": dcost.bytes, "spark_bytes_per_token": scost.bytes,
        "dense_gb_per_s": dcost.bytes / dm / 1e9, "spark_gb_per_s": scost.bytes / sm / 1e9,
        "gpu_copy_gb_per_s": peak,
        "ffn_speedup": d_comp["ffn"] / s_comp["ffn"],
        "attention_speedup": d_comp["attention"] / s_comp["attention"],
        "ideal_ffn_speedup": dcost.ffn_bytes / scost.ffn_bytes,
        "ideal_attention_speedup": dcost.kv_bytes / scost.kv_bytes,
        "dense_ffn_gb_per_s": dcost.ffn_bytes / d_comp["ffn"] / 1e9,
        "spark_ffn_gb_per_s": scost.ffn_bytes / s_comp["ffn"] / 1e9,
        "dense_attention_gb_per_s": dcost.kv_bytes / d_comp["attention"] / 1e9,
        "spark_attention_gb_per_s": scost.kv_bytes / s_comp["attention"] / 1e9,
        "dense_components_ms": {k: v * 1e3 for k, v in d_comp.items()},
        "spark_components_ms": {k: v * 1e3 for k, v in s_comp.items()},
        "achieved": st,
        "spark_ffn_plan": ffn_pick,
        "ffn_full_shape_check": ffn_check,
        "setup_s": t_build,
    }
    res["measured_over_ideal"] = res["speedup"] / res["ideal_speedup"]
    res["hf_ms_per_token"] = None
    if hf:
        try:
            h = hf_ms_per_token(cfg, dtype, context, max(4, tokens // 4), 2)
            res["hf_ms_per_token"] = h["median"] * 1e3 if h else None
        except Exception as e:  # HF is a reference point, not the measurement: keep the run
            res["hf_error"] = f"{type(e).__name__}: {e}"[:300]
    return res


def print_table(runs: list[dict]) -> None:
    hdr = (f"{'dtype':5s} {'ctx':>5s} {'dense ms':>9s} {'spark ms':>9s} {'speedup':>8s} {'ideal':>6s} "
           f"{'meas/ideal':>10s} {'FFN x':>6s} {'attn x':>6s} {'dense GB/s':>10s} {'spark GB/s':>10s} {'HF ms':>8s} "
           f"{'neurons/tok':>11s} {'keys/q':>7s} {'cap':>5s}")
    print(hdr)
    for r in runs:
        a = r["achieved"]
        hf = f"{r['hf_ms_per_token']:8.2f}" if r["hf_ms_per_token"] else f"{'-':>8s}"
        print(f"{r['dtype']:5s} {r['context']:5d} {r['dense_ms_per_token']:9.3f} {r['spark_ms_per_token']:9.3f} "
              f"{r['speedup']:8.2f} {r['ideal_speedup']:6.2f} {r['measured_over_ideal']:10.2f} {r['ffn_speedup']:6.2f} "
              f"{r['attention_speedup']:6.2f} {r['dense_gb_per_s']:10.0f} {r['spark_gb_per_s']:10.0f} {hf} "
              f"{a.get('ffn_neurons_per_layer', 0):11.0f} {a.get('keys_per_query', 0):7.1f} "
              f"{a.get('cap_fired_fraction', 0):5.2f}")
    print("components (ms/token, dense | spark) and achieved GB/s (dense | spark; GPU copy = ceiling):")
    for r in runs:
        d, s = r["dense_components_ms"], r["spark_components_ms"]
        print(f"  {r['dtype']} ctx {r['context']}: " + ", ".join(
            f"{k} {d.get(k, 0):.3f} | {s.get(k, 0):.3f}" for k in ("attn_proj", "attention", "ffn", "lm_head")))
        print(f"    FFN {r['dense_ffn_gb_per_s']:.0f} | {r['spark_ffn_gb_per_s']:.0f} GB/s, attention "
              f"{r['dense_attention_gb_per_s']:.0f} | {r['spark_attention_gb_per_s']:.0f} GB/s, "
              f"copy {r['gpu_copy_gb_per_s']:.0f} GB/s")


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
    print_table(res["runs"])
    if not args.no_save:
        write_result(args.name or f"decode_cuda_{args.preset}", res, args.out)
    print(json.dumps(res))
    return 0


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
