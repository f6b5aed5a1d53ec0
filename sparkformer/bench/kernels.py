"""Benchmark: batch-1 decode kernels, Spark vs the fastest dense we have, at Gemma-2 2B shapes.

    python -m sparkformer.bench.kernels [--dtypes fp32,bf16] [--contexts 4096,8192] [--repeats 15] [--threads 2]
    (also ``sparkformer bench kernels`` where the CLI lists it)

FFN: dense GeGLU (d=2304, m=9216) vs Spark FFN of equal parameters (d_ff=13824, r=1024, f=0.08).
Attention: 8 query heads / 4 kv heads, head_dim 256, Spark r=128, k=256, soft-cap 50, scale 1/16, at each
context, vs dense attention decode (two matvecs + softmax over all keys).

Method. Weights / caches are cold: every implementation cycles over enough independent copies that one
cycle touches at least 4x the last-level cache (``--copies`` overrides). Each call gets the next of 16
random inputs. Implementations are timed interleaved (one cycle of A, one of B, ...; ``--repeats`` rounds
after a warm-up round), every call timed on its own; we report medians with min-max over all calls, and
the median over "clean" calls -- those during which the process took no involuntary context switch, i.e.
no other process took a core mid-call (on a shared machine the all-calls median mostly measures the
neighbours). Ratios use clean medians when every implementation compared has >= 5 clean calls, else
all-calls medians; the JSON says which ("basis"). Bytes read are the weights / cache entries the
implementation must touch, from the *achieved* selection counts; GB/s = bytes / median. "ideal" = dense
bytes / sparse bytes, "measured" = dense time / sparse time, against the fastest dense implementation.
Tensors use torch's default allocation; ``--thp`` asks for transparent huge pages (for dense and sparse
alike; each section records the huge-page kB in use). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from sparkformer.bench.common import OUT_HELP, env_info, write_result

from sparkformer.ops import _extension
from sparkformer.ops.dense_decode import GegluWeights, dense_attn_decode, geglu_decode, pack_geglu
from sparkformer.ops.spark_attn_decode import KP_BLOCK, spark_attn_decode, to_blocked
from sparkformer.ops.spark_ffn_decode import prepare_spark_ffn, spark_ffn_decode

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# issue #4 targets: measured speed-up of Spark over the fastest dense
TARGETS = {("ffn", "fp32"): 3.2, ("ffn", "bf16"): 3.0, ("attn", 4096): 2.5, ("attn", 8192): 2.9}


def llc_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB if unknown."""
    best = 0
    for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        s = p.read_text().strip()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
        best = max(best, int(s.rstrip("KMG")) * mult)
    return best or 32 << 20


def n_copies(touched_bytes: float, override: int | None, factor: float = 4.0, cap: int = 64) -> int:
    """Copies so one cycle touches >= factor x the last-level cache (at least 2, at most cap)."""
    if override:
        return override
    return min(cap, max(2, math.ceil(factor * llc_bytes() / touched_bytes)))


def _involuntary_switches() -> int:
    """Involuntary context switches of this process so far (all threads)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


def time_cycles(fns: dict[str, Callable[[int], object]], copies: int,
                repeats: int) -> dict[str, list[tuple[float, bool]]]:
    """fns[name](i) runs call i (on copy i % copies). One warm-up cycle each, then `repeats` rounds of
    one cycle per implementation, in rotating order. Returns, per call, (seconds, preempted): preempted
    when the kernel took an involuntary context switch during the call (another process got the core)."""
    times: dict[str, list[tuple[float, bool]]] = {k: [] for k in fns}
    names = list(fns)
    for name in names:
        for i in range(copies):
            fns[name](i)
    for rep in range(repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            fn, out = fns[name], times[name]
            for i in range(copies):
                cs = _involuntary_switches()
                t0 = time.perf_counter()
                fn(rep * copies + i)
                t1 = time.perf_counter()
                out.append((t1 - t0, _involuntary_switches() != cs))
    return times


MIN_CLEAN = 5  # calls without preemption needed before their median is used


def stats_ms(calls: list[tuple[float, bool]]) -> dict:
    ts = [t for t, _ in calls]
    clean = [t for t, pre in calls if not pre]
    return {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3,
            "calls": len(ts), "clean_calls": len(clean),
            "clean_median_ms": statistics.median(clean) * 1e3 if len(clean) >= MIN_CLEAN else None}


def _row(name: str, impl: str, bytes_: float, calls: list[tuple[float, bool]], extra: dict | None = None) -> dict:
    s = stats_ms(calls)
    return {"name": name, "impl": impl, "bytes": bytes_, "gbps": bytes_ / (s["median_ms"] * 1e-3) / 1e9, **s,
            **(extra or {})}


def _compare(rows: list[dict], dense_names: tuple[str, ...], sparse_name: str, dense_bytes: float) -> dict:
    """Sparse vs the fastest dense. Basis "clean": medians of unpreempted calls, when the sparse row and at
    least one dense row have enough of them (dense rows without are left out: on a loaded machine those are
    the slow ones). Else basis "all": medians of all calls. The all-calls ratio is reported too."""
    dense_rows = [r for r in rows if r["name"] in dense_names]
    sparse = next(r for r in rows if r["name"] == sparse_name)
    dense_clean = [r for r in dense_rows if r["clean_median_ms"] is not None]
    clean = sparse["clean_median_ms"] is not None and bool(dense_clean)
    key = "clean_median_ms" if clean else "median_ms"
    dense = min(dense_clean if clean else dense_rows, key=lambda r: r[key])
    ideal = dense_bytes / sparse["bytes"]
    measured = dense[key] / sparse[key]
    dense_all = min(dense_rows, key=lambda r: r["median_ms"])
    return {"dense_impl": dense["name"], "dense_ms": dense[key], "sparse_ms": sparse[key],
            "basis": "clean" if clean else "all", "ideal_ratio": ideal, "measured_ratio": measured,
            "measured_over_ideal": measured / ideal,
            "measured_ratio_all_calls": dense_all["median_ms"] / sparse["median_ms"]}


# ------------------------------------------------------------------------------------------------
# FFN
# ------------------------------------------------------------------------------------------------
def bench_ffn(dtype_name: str, args: argparse.Namespace) -> dict:
    dtype = DTYPES[dtype_name]
    esz = torch.finfo(dtype).bits // 8
    d, m, d_ff, r, f = args.d_model, args.ffn_dim, args.spark_ffn_dim, args.rank, args.fraction
    g = torch.Generator().manual_seed(0)
    dense_bytes = 3 * d * m * esz
    expect_sparse = (d_ff * r + f * d_ff * (2 * d - r)) * esz
    copies = n_copies(expect_sparse, args.copies)
    xs = [torch.randn(d, generator=g) for _ in range(16)]

    def rnd(*shape, std=0.02):
        return torch.randn(*shape, generator=g).mul_(std)

    packed = [pack_geglu(rnd(m, d), rnd(m, d), rnd(d, m), dtype=dtype) for _ in range(copies)]
    # nn.Linear layout for torch.mv: gate, up (m, d) and W_down (d, m), each contiguous
    plain = [GegluWeights(p.w_gate.clone(), p.w_up.clone(), p.w_down_t.t().contiguous().t()) for p in packed]
    spark = [prepare_spark_ffn(rnd(d_ff, d), rnd(d_ff, d), r, dtype=dtype) for _ in range(copies)]
    counts: dict[str, list[torch.Tensor]] = {"spark C++": [], "spark torch": []}

    fns: dict[str, Callable[[int], object]] = {}
    if _extension.available():
        fns["dense C++ (packed)"] = lambda i: geglu_decode(xs[i % 16], *packed[i % copies], impl="ext")
    fns["dense torch.mv"] = lambda i: geglu_decode(xs[i % 16], *plain[i % copies], impl="torch")
    if _extension.available():
        fns["spark C++"] = lambda i: counts["spark C++"].append(
            spark_ffn_decode(xs[i % 16], *spark[i % copies], f, impl="ext")[1])
    if not args.no_torch_sparse:
        fns["spark torch"] = lambda i: counts["spark torch"].append(
            spark_ffn_decode(xs[i % 16], *spark[i % copies], f, impl="torch")[1])
    with torch.inference_mode():
        times = time_cycles(fns, copies, args.repeats)

    rows = []
    for name, ts in times.items():
        if name.startswith("spark"):
            sel = statistics.mean(int(c) for c in counts[name])
            rows.append(_row(name, name, (d_ff * r + sel * (2 * d - r)) * esz, ts,
                             {"neurons_selected_mean": sel, "neurons_target": f * d_ff}))
        else:
            rows.append(_row(name, name, dense_bytes, ts))
    sparse_name = "spark C++" if "spark C++" in times else "spark torch"
    cmp = _compare(rows, ("dense C++ (packed)", "dense torch.mv"), sparse_name, dense_bytes)
    target = TARGETS[("ffn", dtype_name)]
    hugepages_kb = _anon_hugepages_kb()
    del packed, plain, spark
    gc.collect()
    return {"part": "ffn", "dtype": dtype_name, "copies": copies, "anon_hugepages_kb": hugepages_kb, "shape": {"d": d, "m": m, "d_ff": d_ff, "r": r,
            "fraction": f}, "rows": rows, **cmp, "target": target, "meets_target": cmp["measured_ratio"] >= target}


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------
def bench_attn(dtype_name: str, ctx: int, args: argparse.Namespace) -> dict:
    dtype = DTYPES[dtype_name]
    esz = torch.finfo(dtype).bits // 8
    H, KV, D, r, k = args.heads, args.kv_heads, args.head_dim, args.attn_rank, args.topk
    scale, cap = args.scale, args.softcap
    g = torch.Generator().manual_seed(1)
    dense_bytes = KV * ctx * 2 * D * esz
    expect_sparse = (KV * r * ctx + H * min(k, ctx) * (2 * D - r)) * esz
    copies = n_copies(expect_sparse, args.copies)
    qs = [torch.randn(H, D, generator=g) for _ in range(16)]

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    # plain layouts: dense k, v row-major; Spark kp (KV, r, L), kr and v separate tensors
    dense = [(rnd(KV, ctx, D), rnd(KV, ctx, D)) for _ in range(copies)]
    sparse = [(rnd(KV, r, ctx), rnd(KV, ctx, D - r), rnd(KV, ctx, D)) for _ in range(copies)]
    # recommended decode layouts (new_dense_cache / new_spark_cache): blocked keys; Spark kr|v in one buffer
    fast = ctx % KP_BLOCK == 0
    dense_fast = [(to_blocked(kk.transpose(1, 2), KP_BLOCK), vv) for kk, vv in dense] if fast else None
    sparse_fast = []
    for kp, kr, v in sparse if fast else ():
        krv = torch.cat([kr, v], dim=-1)
        sparse_fast.append((to_blocked(kp, KP_BLOCK), krv[..., : D - r], krv[..., D - r:]))
    kept: dict[str, list] = {"spark C++": [], "spark C++ (plain layout)": [], "spark torch": []}

    def spark_call(name, impl, caches):
        def fn(i):
            _, kc, cp = spark_attn_decode(qs[i % 16], *caches[i % copies], ctx, k, scale, None, cap, impl=impl)
            kept[name].append((kc, cp))
        return fn

    fns: dict[str, Callable[[int], object]] = {}
    if _extension.available():
        if fast:
            fns["dense C++"] = lambda i: dense_attn_decode(qs[i % 16], *dense_fast[i % copies], ctx, scale, None, cap,
                                                           impl="ext")
        fns["dense C++ (row keys)"] = lambda i: dense_attn_decode(qs[i % 16], *dense[i % copies], ctx, scale, None,
                                                                  cap, impl="ext")
    fns["dense torch (bmm)"] = lambda i: dense_attn_decode(qs[i % 16], *dense[i % copies], ctx, scale, None, cap,
                                                           impl="torch")
    if _extension.available():
        if fast:
            fns["spark C++"] = spark_call("spark C++", "ext", sparse_fast)
        fns["spark C++ (plain layout)"] = spark_call("spark C++ (plain layout)", "ext", sparse)
    if not args.no_torch_sparse:
        fns["spark torch"] = spark_call("spark torch", "torch", sparse)
    with torch.inference_mode():
        times = time_cycles(fns, copies, args.repeats)

    rows = []
    for name, ts in times.items():
        if name.startswith("spark"):
            kc = torch.stack([a for a, _ in kept[name]]).float()
            cp = torch.stack([b for _, b in kept[name]]).float()
            rows.append(_row(name, name, (KV * r * ctx + kc.sum(1).mean().item() * (2 * D - r)) * esz, ts,
                             {"keys_kept_mean": kc.mean().item(), "keys_kept_max": kc.max().item(),
                              "cap_fired_rate": cp.mean().item()}))
        else:
            rows.append(_row(name, name, dense_bytes, ts))
    sparse_name = next(n for n in ("spark C++", "spark C++ (plain layout)", "spark torch") if n in times)
    cmp = _compare(rows, ("dense C++", "dense C++ (row keys)", "dense torch (bmm)"), sparse_name, dense_bytes)
    target = TARGETS.get(("attn", ctx))
    hugepages_kb = _anon_hugepages_kb()
    del dense, sparse, dense_fast, sparse_fast
    gc.collect()
    return {"part": "attn", "dtype": dtype_name, "context": ctx, "copies": copies, "anon_hugepages_kb": hugepages_kb,
            "shape": {"heads": H, "kv_heads": KV, "head_dim": D, "r": r, "k": k, "softcap": cap, "scale": scale,
                      "kp_block": KP_BLOCK},
            "rows": rows, **cmp, "target": target,
            "meets_target": None if target is None else cmp["measured_ratio"] >= target}


# ------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    ext = _extension.available()
    load0 = os.getloadavg()
    sections = []
    for dt in args.dtypes.split(","):
        if "ffn" in args.parts:
            sections.append(bench_ffn(dt, args))
            print_section(sections[-1], flush=True)
        if "attn" in args.parts:
            for ctx in (int(c) for c in args.contexts.split(",")):
                sections.append(bench_attn(dt, ctx, args))
                print_section(sections[-1], flush=True)
    return {
        "benchmark": "kernels",
        "env": {**env_info(args.dtypes), "isa": _extension.isa(), "extension": ext, "llc_bytes": llc_bytes(),
                "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE"),
                "loadavg_start": load0, "loadavg_end": os.getloadavg()},
        "repeats": args.repeats,
        "sections": sections,
        "summary": {
            (f"{s['part']}_{s['dtype']}" + (f"_{s['context']}" if s["part"] == "attn" else "")): {
                "measured": round(s["measured_ratio"], 3), "basis": s["basis"], "ideal": round(s["ideal_ratio"], 3),
                "measured_over_ideal": round(s["measured_over_ideal"], 3), "target": s["target"],
                "meets_target": s["meets_target"]}
            for s in sections
        },
    }


def _anon_hugepages_kb() -> int | None:
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def print_section(s: dict, flush: bool = False) -> None:
    if s["part"] == "ffn":
        sh = s["shape"]
        title = (f"FFN {s['dtype']}: dense GeGLU d={sh['d']} m={sh['m']} vs Spark d_ff={sh['d_ff']} r={sh['r']} "
                 f"f={sh['fraction']}  ({s['copies']} weight copies)")
    else:
        sh = s["shape"]
        title = (f"Attention {s['dtype']} context {s['context']}: {sh['heads']}q/{sh['kv_heads']}kv heads, "
                 f"head_dim {sh['head_dim']}, r={sh['r']} k={sh['k']}  ({s['copies']} cache copies)")
    print(title)
    print(f"  {'implementation':24s} {'median ms':>10s} {'min':>8s} {'max':>8s} {'clean ms':>9s} {'n':>7s} "
          f"{'MB read':>9s} {'GB/s':>7s}  achieved")
    for r in s["rows"]:
        ach = ""
        if "neurons_selected_mean" in r:
            ach = f"{r['neurons_selected_mean']:.0f} neurons (target {r['neurons_target']:.0f})"
        elif "keys_kept_mean" in r:
            ach = f"{r['keys_kept_mean']:.1f} keys/head (max {r['keys_kept_max']:.0f}), cap fired {r['cap_fired_rate']:.0%}"
        cm = f"{r['clean_median_ms']:9.3f}" if r["clean_median_ms"] is not None else f"{'-':>9s}"
        print(f"  {r['name']:24s} {r['median_ms']:10.3f} {r['min_ms']:8.3f} {r['max_ms']:8.3f} {cm} "
              f"{r['clean_calls']:>3d}/{r['calls']:<3d} {r['bytes'] / 1e6:9.1f} {r['gbps']:7.1f}  {ach}")
    tgt = f", target {s['target']}x -> {'MET' if s['meets_target'] else 'short'}" if s["target"] else ""
    print(f"  vs {s['dense_impl']}: ideal {s['ideal_ratio']:.2f}x, measured {s['measured_ratio']:.2f}x "
          f"({s['basis']} calls; all calls {s['measured_ratio_all_calls']:.2f}x), "
          f"measured/ideal {s['measured_over_ideal']:.2f}{tgt}\n", flush=flush)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--parts", default="ffn,attn")
    p.add_argument("--contexts", default="4096,8192")
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds (each one cycle over the copies)")
    p.add_argument("--copies", type=int, default=None, help="weight/cache copies (default: >= 4x last-level cache)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--d-model", type=int, default=2304)
    p.add_argument("--ffn-dim", type=int, default=9216)
    p.add_argument("--spark-ffn-dim", type=int, default=13824)
    p.add_argument("--rank", type=int, default=1024)
    p.add_argument("--fraction", type=float, default=0.08)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--attn-rank", type=int, default=128)
    p.add_argument("--topk", type=int, default=256)
    p.add_argument("--scale", type=float, default=256**-0.5)
    p.add_argument("--softcap", type=float, default=50.0)
    p.add_argument("--no-torch-sparse", action="store_true", help="skip the pure-torch Spark paths")
    p.add_argument("--thp", action="store_true",
                   help="allocate with transparent huge pages (restarts python with THP_MEM_ALLOC_ENABLE=1, which "
                        "torch reads once at start-up); default: torch's default allocation")
    p.add_argument("--out", default=None, help=OUT_HELP)
    p.add_argument("--no-save", action="store_true")


def _cli(args: argparse.Namespace) -> int:
    if args.thp and os.environ.get("THP_MEM_ALLOC_ENABLE") != "1":
        print("note: --thp needs THP_MEM_ALLOC_ENABLE=1 in the environment before python starts; running without")
    res = run(args)
    e = res["env"]
    print(f"{e['cpu']}, {e['threads']} threads, torch {e['torch']}, kernels: {e['isa']}, "
          f"load average {e['loadavg_start'][0]:.2f} -> {e['loadavg_end'][0]:.2f}")
    for name, s in res["summary"].items():
        tgt = f" (target {s['target']}x: {'MET' if s['meets_target'] else 'short'})" if s["target"] else ""
        print(f"  {name:16s} measured {s['measured']:.2f}x  ideal {s['ideal']:.2f}x  "
              f"measured/ideal {s['measured_over_ideal']:.2f}{tgt}")
    if not args.no_save:
        write_result("kernels", res, args.out)
    print(json.dumps(res))
    return 0


def add_parser(sub) -> None:
    """Register ``sparkformer bench kernels``."""
    p = sub.add_parser("kernels", help="decode kernels: Spark FFN / attention vs dense, cold weights")
    add_arguments(p)
    p.set_defaults(func=_cli)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparkformer.bench.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    if args.thp and os.environ.get("THP_MEM_ALLOC_ENABLE") != "1":
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
        rest = list(sys.argv[1:] if argv is None else argv)
        os.execv(sys.executable, [sys.executable, "-m", "sparkformer.bench.kernels", *rest])
    return _cli(args)


if __name__ == "__main__":
    raise SystemExit(main())
