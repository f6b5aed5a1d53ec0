"""Benchmark: batch-1 decode, Spark vs dense on the same engine, plus HF transformers on the dense shape; one driver
over ``sparkformer.decode.make_random_engine`` / ``make_engine`` for every device.

    sparkformer bench decode --preset gemma2-2b --context 512,2048,4096 --dtype bf16,fp32 [--layers N] [--tokens N]
    sparkformer bench decode --device cuda --preset gemma2-2b --context 512,4096 --dtype bf16
    sparkformer bench decode --model smollm2-135m --routers runs/routing/sparkify-r128 --context 512

With ``--model`` the named model runs (``sparkformer.loading``): with routers, routed vs the same model dense; without,
the model alone (its ms/token and achieved sparsity). On CUDA every step is a CUDA-graph replay feeding its argmax to
the next; components are timed as their own graphs (``CudaEngine.component_times``), and the run records the GPU's
copy bandwidth, the tuned Spark FFN launch shape and a full-size check of it. On CPU the timed steps are the ones
users run (the fused C++ step where the engine has it); the per-component split comes from one extra, untimed run of
the per-op step with its timers on (``profiled_components``), so its sum is somewhat above the timed ms/token.

Weights are random and full size (speed does not depend on training: the statistical threshold enforces the
sparsity) and cold (a 2B model is far larger than the last-level cache). The KV cache is filled with random keys and
values up to the context (the content does not change the cost; the selection counts are measured and reported).
Dense and Spark engines are built side by side and timed interleaved: by default in whole runs of --tokens steps
(A B A B: each engine decodes consecutively, as in use), or token by token (``--interleave token``: A B B A ...,
so both see the same state of the host's memory bandwidth, which drifts 30-40% over minutes on shared machines,
at the price of each step following the other engine's); medians with min-max, and ``paired_speedup``, the
median of the paired ratios (per run or per token). The two
models share the LM head / embedding and the attention projection weights, which are identical in shape and role
in both (it lets two fp32 2B-shape models fit in 24 GB); every token still reads them, so nothing is cached across
the two. HF ``Gemma2ForCausalLM`` (eager attention, same dense shape, same dtype and threads) is timed on the same
per-token steps with a pre-filled cache, after the engines are freed.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from sparkformer.bench.common import OUT_HELP, env_info, summary, write_result
from sparkformer.config import ModelConfig, get_preset
from sparkformer.decode import QUANT_FORMATS, Engine, make_random_engine, resolve_dtype
from sparkformer.flops import DTYPE_BYTES, KV_BYTES, token_cost

DEVICE_DEFAULTS = {"cpu": {"context": "512,2048,4096", "dtype": "bf16,fp32", "tokens": 8},
                   "cuda": {"context": "512,4096", "dtype": "bf16", "tokens": 32}}


def time_tokens(engine: Engine, context: int, tokens: int) -> float:
    """Seconds per token over ``tokens`` greedy decode steps starting at ``context``."""
    engine.set_position(context)
    engine.synchronize()
    t0 = time.perf_counter()
    engine.decode_greedy(tokens)
    engine.synchronize()
    return (time.perf_counter() - t0) / tokens


def timed_run(engine: Engine, context: int, tokens: int, times: list) -> None:
    """One timed run of ``tokens`` steps as users run them (CPU: the fused C++ step, no per-op timers); appends
    seconds/token."""
    engine.timers = None
    times.append(time_tokens(engine, context, tokens))


def lockstep_run(dense: Engine, spark: Engine, context: int, tokens: int, d_t: list, s_t: list, pairs: list) -> None:
    """One timed run in which the two engines alternate token by token (which one goes first alternates too), so
    both see the same state of the host's memory bandwidth; appends per-run means like ``timed_run`` and every
    token's dense/Spark time ratio to ``pairs``."""
    times: dict[int, list[float]] = {id(dense): [], id(spark): []}
    toks = {id(dense): 1, id(spark): 1}
    for e in (dense, spark):
        e.set_position(context)
        e.timers = None
    for i in range(tokens):
        for e in ((dense, spark) if i % 2 == 0 else (spark, dense)):
            t0 = time.perf_counter()
            logits = e.step(toks[id(e)])
            times[id(e)].append(time.perf_counter() - t0)
            toks[id(e)] = int(logits.argmax())
    td, ts = times[id(dense)], times[id(spark)]
    pairs.extend(a / b for a, b in zip(td, ts))
    d_t.append(sum(td) / tokens)
    s_t.append(sum(ts) / tokens)


def profiled_components(engine: Engine, context: int, tokens: int) -> dict:
    """Per-component seconds per token (CPU) from one extra, untimed run of the per-op step with its timers on: the
    fused step the timed runs use is one C++ call with nothing to split, so these sum to more than its ms/token (the
    per-op step's Python overhead, ~10 us an op). Engines that time components as their own graphs: {}."""
    if engine.device_type != "cpu":
        return {}
    engine.timers = {}
    time_tokens(engine, context, tokens)
    comps = {k: v / tokens for k, v in engine.timers.items()}
    engine.timers = None
    return comps


def build_pair(cfg: ModelConfig, dtype: torch.dtype, max_len: int, impl: str | None = None,
               device: str = "cpu") -> tuple[Engine, Engine]:
    """Dense and Spark engines of the same shape over random weights, sharing embedding and attention projections."""
    kw = {"impl": impl} if device == "cpu" else {"track_stats": False}
    dense = make_random_engine(cfg.replace(ffn="geglu", attention="dense"), dtype, max_len, device, seed=1, **kw)
    spark = make_random_engine(cfg.replace(ffn="spark", attention="spark", spark_attn_hard_cap=True), dtype,
                               max_len, device, seed=2, share=dense, **kw)
    return dense, spark


def hf_ms_per_token(cfg: ModelConfig, dtype: torch.dtype, context: int, tokens: int, repeats: int,
                    device: str = "cpu", warmup: int = 0) -> dict | None:
    """Per-token decode of HF Gemma2ForCausalLM (eager attention) on the dense shape with a pre-filled cache (what
    generate does), on ``device``; each token is read on the host as generate does. ``warmup`` untimed rounds."""
    try:
        from transformers import DynamicCache, Gemma2Config, Gemma2ForCausalLM
    except ImportError:
        return None
    import inspect

    dcfg = cfg.replace(ffn="geglu", attention="dense")
    hc = Gemma2Config(vocab_size=dcfg.vocab_size, hidden_size=dcfg.d_model, intermediate_size=dcfg.ffn_dim,
                      num_hidden_layers=dcfg.n_layers, num_attention_heads=dcfg.n_heads,
                      num_key_value_heads=dcfg.n_kv_heads, head_dim=dcfg.head_dim,
                      max_position_embeddings=max(dcfg.max_seq_len, context + tokens + 1),
                      sliding_window=dcfg.sliding_window, query_pre_attn_scalar=dcfg.query_pre_attn_scalar or dcfg.head_dim,
                      attn_implementation="eager")
    with torch.device("meta"):
        model = Gemma2ForCausalLM(hc)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.eval()
    cuda = torch.device(device).type == "cuda"
    cache_kw = "past_key_values" if "past_key_values" in inspect.signature(model.forward).parameters else "cache"
    times = []
    with torch.no_grad():
        for _ in range(warmup + repeats):
            cache = DynamicCache(config=hc) if "config" in inspect.signature(DynamicCache).parameters else DynamicCache()
            shape = (1, dcfg.n_kv_heads, context, dcfg.head_dim)
            for i in range(dcfg.n_layers):
                cache.update(torch.randn(shape, dtype=dtype, device=device),
                             torch.randn(shape, dtype=dtype, device=device), i)
            tok = torch.ones(1, 1, dtype=torch.long, device=device)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for j in range(tokens):
                pos = torch.tensor([[context + j]], device=device)
                out = model(input_ids=tok, position_ids=pos, use_cache=True, **{cache_kw: cache})
                cache = getattr(out, cache_kw, None) or getattr(out, "past_key_values", cache)
                tok = out.logits[:, -1:].argmax(-1)
                int(tok)  # generate reads each token on the host
            times.append((time.perf_counter() - t0) / tokens)
    del model, cache
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return summary(times[warmup:])


def time_prefill(dense: Engine, spark: Engine, n: int, repeats: int) -> dict:
    """Prefill of n random tokens from an empty cache, dense and Spark interleaved (after one warm-up each)."""
    ids = torch.randint(0, dense.cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
    t = {"dense": [], "spark": []}
    for rep in range(repeats + 1):
        for name, e in (("dense", dense), ("spark", spark)):
            e.reset()
            e.synchronize()
            t0 = time.perf_counter()
            e.prefill(ids)
            e.synchronize()
            if rep:
                t[name].append(time.perf_counter() - t0)
    dm, sm = statistics.median(t["dense"]), statistics.median(t["spark"])
    return {"tokens": n, "repeats": repeats, "dense_s": dm, "spark_s": sm, "spark_over_dense": sm / dm,
            "dense_tokens_per_s": n / dm, "spark_tokens_per_s": n / sm}


def comparison(cfg: ModelConfig, dtype_name: str, context: int, tokens: int, repeats: int, d_t: list[float],
               s_t: list[float], d_comp: dict, s_comp: dict, achieved: dict,
               pairs: list[float] | None = None, interleave: str = "run") -> dict:
    """The dense-vs-Spark result of one (dtype, context) from seconds per token (per timed run) and per-component
    seconds per token: ms, measured and byte-ideal ratios, bytes and achieved GB/s (CPU and CUDA benchmarks alike).
    ``pairs``: dense/Spark time ratios of paired measurements (per run, or per token in lockstep runs); their median
    is ``paired_speedup``, which a drifting host disturbs less than the ratio of the two medians."""
    b, kb = DTYPE_BYTES[dtype_name], KV_BYTES.get(dtype_name)
    dcost = token_cost(cfg.replace(ffn="geglu", attention="dense"), context, b, kv_dtype_bytes=kb)
    scost = token_cost(cfg.replace(ffn="spark", attention="spark"), context, b,
                       ffn_fraction=achieved.get("ffn_activity"),
                       keys=round(achieved.get("keys_per_query", cfg.spark_attn_topk)), kv_dtype_bytes=kb)
    dm, sm = statistics.median(d_t), statistics.median(s_t)
    res = {
        "dtype": dtype_name, "context": context, "layers": cfg.n_layers, "tokens": tokens, "repeats": repeats,
        "dense_ms_per_token": dm * 1e3, "spark_ms_per_token": sm * 1e3,
        "dense_ms": {k: v * 1e3 for k, v in summary(d_t).items() if k != "n"},
        "spark_ms": {k: v * 1e3 for k, v in summary(s_t).items() if k != "n"},
        "speedup": dm / sm,
        "ideal_speedup": dcost.bytes / scost.bytes,
        "dense_bytes_per_token": dcost.bytes, "spark_bytes_per_token": scost.bytes,
        "dense_gb_per_s": dcost.bytes / dm / 1e9, "spark_gb_per_s": scost.bytes / sm / 1e9,
        "ffn_speedup": d_comp.get("ffn", 0) / max(s_comp.get("ffn", 1e-12), 1e-12),
        "attention_speedup": d_comp.get("attention", 0) / max(s_comp.get("attention", 1e-12), 1e-12),
        "ideal_ffn_speedup": dcost.ffn_bytes / scost.ffn_bytes,
        "ideal_attention_speedup": dcost.kv_bytes / scost.kv_bytes,
        "dense_ffn_bytes_per_token": dcost.ffn_bytes, "spark_ffn_bytes_per_token": scost.ffn_bytes,
        "dense_kv_bytes_per_token": dcost.kv_bytes, "spark_kv_bytes_per_token": scost.kv_bytes,
        "dense_components_ms": {k: v * 1e3 for k, v in d_comp.items()},
        "spark_components_ms": {k: v * 1e3 for k, v in s_comp.items()},
        "achieved": achieved,
    }
    res["measured_over_ideal"] = res["speedup"] / res["ideal_speedup"]
    pairs = pairs if pairs is not None else [a / b for a, b in zip(d_t, s_t)]
    res["interleave"] = interleave
    res["paired_speedup"] = statistics.median(pairs)
    res["paired_speedup_iqr"] = [float(q) for q in statistics.quantiles(pairs, n=4)[::2]] if len(pairs) > 1 else None
    res["paired_over_ideal"] = res["paired_speedup"] / res["ideal_speedup"]
    return res


def bench_one(cfg: ModelConfig, dtype_name: str, context: int, tokens: int, repeats: int, impl: str | None,
              hf: bool, prefill: int = 0, prefill_repeats: int = 2, interleave: str = "run", device: str = "cpu",
              peak: float | None = None) -> dict:
    """One (dtype, context) of the Spark vs dense comparison on ``device``."""
    dtype = dtype_name if dtype_name in QUANT_FORMATS else resolve_dtype(dtype_name)
    max_len = max(context + 2 * tokens + 16, prefill)  # timed runs restart at context; CUDA components run `tokens`
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, max_len))
    dense, spark = build_pair(cfg, dtype, max_len, impl, device)
    pre = time_prefill(dense, spark, prefill, prefill_repeats) if prefill else None
    for e in (dense, spark):
        e.fill_cache_random(context)
    t_build = time.perf_counter()
    time_tokens(dense, context, 2)  # warm-up (first-touch pages, thread pools; CUDA: graph capture, FFN tuning)
    time_tokens(spark, context, 2)
    t_build = time.perf_counter() - t_build
    d_t, s_t, pairs = [], [], []
    if device == "cpu":  # CPU: the sparsity of the timed steps themselves; CUDA: measured on separate steps below
        spark.reset()
    for _ in range(repeats):  # interleaved
        if interleave == "token":
            lockstep_run(dense, spark, context, tokens, d_t, s_t, pairs)
        else:
            timed_run(dense, context, tokens, d_t)
            timed_run(spark, context, tokens, s_t)
    if device != "cpu":
        spark.track_stats = True
        spark.reset()
        spark.set_position(context)
        spark.decode_greedy(tokens)
    st = spark.stats.summary()
    d_comp, s_comp = profiled_components(dense, context, tokens), profiled_components(spark, context, tokens)
    if not d_comp:  # engines that time components as their own graphs
        d_comp, s_comp = dense.component_times(context, tokens), spark.component_times(context, tokens)
    extras = spark.bench_extras()
    del dense, spark
    gc.collect()
    res = {**comparison(cfg, dtype_name, context, tokens, repeats, d_t, s_t, d_comp, s_comp, st,
                        pairs if interleave == "token" else None, interleave), "prefill": pre}
    if device != "cpu":
        torch.cuda.empty_cache()
        res = {"device": torch.cuda.get_device_name(0), **res, "gpu_copy_gb_per_s": peak, **extras,
               "setup_s": t_build}
        for side, comp in (("dense", d_comp), ("spark", s_comp)):  # bytes each sparse component must read / time
            res[f"{side}_ffn_gb_per_s"] = res[f"{side}_ffn_bytes_per_token"] / comp["ffn"] / 1e9
            res[f"{side}_attention_gb_per_s"] = res[f"{side}_kv_bytes_per_token"] / comp["attention"] / 1e9
    res["hf_ms_per_token"] = None
    if hf and dtype_name not in QUANT_FORMATS:  # HF transformers has no such CPU format
        try:  # HF is a reference point, not the measurement: keep the run if it fails
            h = (hf_ms_per_token(cfg, dtype, context, max(2, tokens // 2), max(1, repeats // 2)) if device == "cpu"
                 else hf_ms_per_token(cfg, dtype, context, max(4, tokens // 4), 2, device=device, warmup=1))
            res["hf_ms_per_token"] = h["median"] * 1e3 if h else None
        except Exception as e:  # noqa: BLE001
            res["hf_error"] = f"{type(e).__name__}: {e}"[:300]
    return res


def print_table(runs: list[dict], ms_digits: int = 1, gb_digits: int = 1) -> None:
    """The decode table (CPU and CUDA benchmarks; the GPU's milliseconds need more digits)."""
    md, gd = ms_digits, gb_digits
    hdr = (f"{'dtype':5s} {'ctx':>5s} {'dense ms':>9s} {'spark ms':>9s} {'speedup':>8s} {'paired':>7s} {'ideal':>6s} "
           f"{'meas/ideal':>10s} "
           f"{'FFN x':>6s} {'attn x':>6s} {'dense GB/s':>10s} {'spark GB/s':>10s} {'HF ms':>8s} {'neurons/tok':>11s} "
           f"{'keys/q':>7s} {'cap':>5s} {'llama.cpp ms':>12s}")
    print(hdr)
    for r in runs:
        a = r["achieved"]
        hf = f"{r['hf_ms_per_token']:8.{md}f}" if r["hf_ms_per_token"] else f"{'-':>8s}"
        print(f"{r['dtype']:5s} {r['context']:5d} {r['dense_ms_per_token']:9.{md}f} {r['spark_ms_per_token']:9.{md}f} "
              f"{r['speedup']:8.2f} {r.get('paired_speedup', float('nan')):7.2f} {r['ideal_speedup']:6.2f} "
              f"{r['measured_over_ideal']:10.2f} {r['ffn_speedup']:6.2f} "
              f"{r['attention_speedup']:6.2f} {r['dense_gb_per_s']:10.{gd}f} {r['spark_gb_per_s']:10.{gd}f} {hf} "
              f"{a.get('ffn_neurons_per_layer', 0):11.0f} {a.get('keys_per_query', 0):7.1f} "
              f"{a.get('cap_fired_fraction', 0):5.2f} {_ms(r.get('llamacpp_ms_per_token'), md, 12)}")
    for r in runs:
        if r.get("prefill"):
            p = r["prefill"]
            print(f"prefill {p['tokens']} tokens ({r['dtype']}): dense {p['dense_s']:.2f} s, spark {p['spark_s']:.2f} s, "
                  f"spark/dense {p['spark_over_dense']:.2f}")
    print("components (ms/token, dense | spark):")
    for r in runs:
        d, s = r["dense_components_ms"], r["spark_components_ms"]
        print(f"  {r['dtype']} ctx {r['context']}: " + ", ".join(
            f"{k} {d.get(k, 0):.{md}f} | {s.get(k, 0):.{md}f}" for k in ("attn_proj", "attention", "ffn", "lm_head")))


def _ms(v: float | None, digits: int, width: int) -> str:
    return f"{v:{width}.{digits}f}" if v else f"{'-':>{width}s}"


def _bench_one_in_child(threads: int, *args) -> dict:
    _return_freed_memory()
    torch.set_num_threads(threads)
    return bench_one(*args)


def _return_freed_memory(threshold: int = 4 << 20) -> None:
    """glibc: serve every allocation >= 4 MB by mmap and give it back on free. By default glibc raises that threshold
    after large frees, and a decode loop that grows a KV cache by torch.cat (HF's) then fragments the heap until a
    24 GB machine runs out (seen with the fp32 2B models on huge pages). No-op elsewhere."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (also turns the dynamic threshold off)
    except (OSError, AttributeError):
        pass


def print_gpu_table(runs: list[dict]) -> None:
    print("achieved GB/s (dense | spark; GPU copy = ceiling):")
    for r in runs:
        print(f"  {r['dtype']} ctx {r['context']}: FFN {r['dense_ffn_gb_per_s']:.0f} | {r['spark_ffn_gb_per_s']:.0f}, "
              f"attention {r['dense_attention_gb_per_s']:.0f} | {r['spark_attention_gb_per_s']:.0f}, "
              f"copy {r['gpu_copy_gb_per_s']:.0f}")


def _device_env(args: argparse.Namespace) -> dict:
    env = env_info(args.dtype)
    if args.device != "cpu":
        import triton

        env.update(triton=triton.__version__, cuda_runtime=torch.version.cuda)
    return env


def run(args: argparse.Namespace, on_result=None) -> dict:
    """The Spark vs dense table over (dtype, context): on CPU each configuration in a fresh process, on CUDA in
    this one (after measuring the GPU's copy bandwidth)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {}
    if args.layers:
        overrides["n_layers"] = args.layers
    cfg = get_preset(args.preset, **overrides)
    cuda = args.device != "cpu"
    per_weight = [d for d in args.dtype.split(",") if d not in DTYPE_BYTES]
    if per_weight:  # the byte ideal of a random shape assumes one format for every matrix
        raise ValueError(f"--dtype {','.join(per_weight)}: the random-weight shapes take one format for every matrix "
                         "(fp32, bf16 or a block format such as q8_0); per-matrix mixes run with --model")
    if getattr(args, "llamacpp", None):  # llama.cpp's CPU decode beside each row (sparkformer.bench.llamacpp)
        if cuda:
            raise ValueError("--llamacpp measures llama.cpp's CPU build: drop it with --device cuda")
        from sparkformer.bench.llamacpp import check_binary, random_model_row

        check_binary(args.llamacpp)
    peak = None
    if cuda:
        from sparkformer.decode.cuda import copy_bandwidth

        peak = copy_bandwidth()
        print(f"{torch.cuda.get_device_name(0)}: device-to-device copy {peak:.0f} GB/s (read + write)", flush=True)
    runs = []
    # CPU: each (dtype, context) in a fresh process: full-size models are most of the RAM, and memory the allocator
    # keeps after one configuration's models are freed must not push the next one out of memory (or into other pages)
    ctx_mp = multiprocessing.get_context("spawn")
    for dtype in args.dtype.split(","):
        for ctx in [int(c) for c in str(args.context).split(",")]:
            job = (cfg, dtype, ctx, args.tokens, args.repeats, args.impl, not args.no_hf, args.prefill,
                   args.prefill_repeats, args.interleave, args.device, peak)
            if cuda:
                r = bench_one(*job)
            else:
                with ProcessPoolExecutor(max_workers=1, mp_context=ctx_mp) as pool:
                    r = pool.submit(_bench_one_in_child, torch.get_num_threads(), *job).result()
            if getattr(args, "llamacpp", None):  # after this row's engines are freed (its process has ended)
                r.update(random_model_row(cfg, dtype, ctx, torch.get_num_threads(), args.tokens, args.repeats,
                                          args.llamacpp))
            runs.append(r)
            print(f"done {dtype} ctx {ctx}: {r['dense_ms_per_token']:.3f} -> {r['spark_ms_per_token']:.3f} ms/token "
                  f"({r['speedup']:.2f}x; FFN {r['ffn_speedup']:.2f}x)", flush=True)
            if on_result is not None:  # save what is done so far: a crash later loses only the rest
                on_result(runs)
    from sparkformer.ops import _extension

    res = {"benchmark": "decode", "device": args.device, "preset": args.preset, "layers": cfg.n_layers,
           "impl": args.impl, "env": _device_env(args), "runs": runs}
    if cuda:
        res["engine"] = "CudaEngine (Triton + cuBLAS, CUDA graph per token)"
    else:
        res["extension"] = _extension.available()
    return res


def _cli(args: argparse.Namespace) -> int:
    kind = "cpu" if args.device == "cpu" else "cuda"
    for k, v in DEVICE_DEFAULTS[kind].items():  # device defaults for what was not given
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.model is not None:  # a real model: routed vs dense, or the model alone (sparkformer.bench.routed)
        from sparkformer.bench.common import finish
        from sparkformer.bench.routed import print_table as model_table, run as run_model

        args.context = int(str(args.context).split(",")[0])
        res = run_model(args)
        return finish(res, lambda: model_table(res["runs"]), args.name or "decode_model", args)
    if kind == "cuda" and args.impl is not None:
        raise ValueError("--impl chooses CPU kernels; the CUDA engine has one implementation (drop --impl)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench decode --device cuda needs a CUDA GPU, and none is visible")
    if kind == "cpu":
        args.impl = args.impl or "auto"
    name = args.name or f"decode{'_cuda' if kind == 'cuda' else ''}_{args.preset}"

    def save_partial(runs: list[dict]) -> None:
        write_result(name, {"benchmark": "decode", "preset": args.preset, "complete": False, "runs": runs}, args.out)

    res = run(args, None if args.no_save else save_partial)
    print_table(res["runs"], *((3, 0) if kind == "cuda" else (1, 1)))
    if kind == "cuda":
        print_gpu_table(res["runs"])
    if not args.no_save:
        write_result(name, {**res, "complete": True}, args.out)
    print(json.dumps(res))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("decode", help="batch-1 decode: Spark vs dense engine, and HF transformers")
    p.add_argument("--preset", default="gemma2-2b", help="the shape of the random-weight Spark/dense pair")
    p.add_argument("--model", default=None,
                   help="time a real model instead (built-in name, HF folder, .gguf, checkpoint, sparsified folder)")
    p.add_argument("--routers", default=None, help="with --model: router file or sparsified folder (routed vs dense)")
    p.add_argument("--context", default=None, help="comma list (default cpu 512,2048,4096; cuda 512,4096; --model: "
                                                    "the first value, default 512)")
    p.add_argument("--dtype", default=None, help="comma list of fp32, bf16 (default cpu bf16,fp32; cuda bf16)")
    p.add_argument("--layers", type=int, default=None, help="fewer layers of the same shape (quick runs)")
    p.add_argument("--tokens", type=int, default=None, help="decode steps per timed run (default cpu 8, cuda 32)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--impl", default=None, choices=["auto", "ext", "torch"], help="CPU kernels (default auto)")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    p.add_argument("--llamacpp", default=None, metavar="PATH|auto",
                   help="also time llama.cpp's llama-bench (auto: the one `make llamacpp` built) on the same weights "
                        "as GGUF, same depth, threads and format (bf16, q8_0, q4_0): llamacpp_ms_per_token per row")
    p.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N: Triton kernels + CUDA graphs")
    p.add_argument("--prefill", type=int, default=0, help="also time a prefill of this many tokens (0: off)")
    p.add_argument("--prefill-repeats", type=int, default=2)
    p.add_argument("--interleave", default="run", choices=["run", "token"],
                   help="run: alternate whole timed runs of --tokens steps; token: the two engines alternate every "
                        "token (both see the same memory-bandwidth state; paired_speedup = median per-token ratio)")
    p.add_argument("--name", default=None, help="result file name (default decode_<preset>, decode_cuda_<preset>)")
    p.add_argument("--out", default=None, help=OUT_HELP)
    p.add_argument("--no-save", action="store_true")
    p.set_defaults(func=_cli)
