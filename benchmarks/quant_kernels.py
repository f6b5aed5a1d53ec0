"""Micro-benchmark of the dense batch-1 decode kernels at SmolLM2-135M and Gemma-2-2B shapes, per weight format and ISA.

    python benchmarks/quant_kernels.py [--models smollm2,gemma2] [--formats bf16,q8_0,q4_0,q4_1]
                                       [--isa avx512vnni,avx512] [--threads 2] [--repeats 5] [--cold 4] [--big]

Each row is one op as the decode step calls it: ``matvec`` (bf16) or ``quant_matvec`` (q8_0 / q4_0 / q4_1) on a
(rows, cols) weight -- the attention projections, the gate+up and down FFN matrices, the LM head -- and
``geglu_decode`` (bf16, the fused gated FFN), and on the gemma2 shape ``quant_ffn_gather`` (the Spark FFN's K2 dot
products and V row accumulation over 1104 of 13824 neurons, each copy its own random neuron set; bytes = the
selected rows). Weights are cold (on ordinary pages: the engine moves its weights onto 2 MiB pages): the op cycles over enough copies that one cycle touches
>= 4x the last-level cache (--cold), as the decode of a model larger than the cache reads them. us = median time per
call (op overhead included: activation quantization, threading; the "overhead" row, a (4, 32) matrix, is the cost of a
call from Python), GB/s = weight bytes / that time (q4_1: 5 bits per weight, its minima included); p10 the same at the
10th percentile (on a machine shared with other work the median catches preemptions). bf16 runs once for avx512 and
avx512vnni (VNNI changes only the integer kernels). Rows over 1 GB (Gemma-2's bf16 head) run only with --big. Prints a
table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparkformer.bench.kernels import llc_bytes  # noqa: E402
from sparkformer.ops import _extension  # noqa: E402
from sparkformer.ops.quant import CODES, quantize, quantize_spark_ffn, row_bytes  # noqa: E402

# (name, rows, cols) of each matvec; FFN (d, d_ff, act) of the fused float FFN
MODELS = {
    "smollm2": ([("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536),
                 ("head", 49152, 576)], (576, 1536, "silu")),
    "gemma2": ([("qkv", 4096, 2304), ("o", 2304, 2048), ("gate_up", 18432, 2304), ("down", 2304, 9216),
                ("head", 256000, 2304)], (2304, 9216, "gelu_tanh")),
}
# Spark FFN of the gemma2-2b Spark preset: (neurons, predictor width r, selected per token at the 8% target)
SPARK = {"gemma2": (13824, 256, 1104)}
BIG = 1 << 30


def _weights(rows: int, cols: int, fmt: str, copies: int) -> list[torch.Tensor]:
    """`copies` distinct weight buffers of one shape (quantized once, then copied: quantizing is slow)."""
    w = torch.randn(rows, cols) * 0.05
    one = w.to(torch.bfloat16) if fmt == "bf16" else quantize(w, fmt).data
    return [one] + [one.clone() for _ in range(copies - 1)]


def _time(fn, copies: int, repeats: int) -> tuple[float, float]:
    """(median, 10th percentile) seconds per call over `repeats` cycles through the copies (one warm-up cycle
    first). The low percentile is the figure on a machine shared with other work, where the median catches
    preemptions."""
    for i in range(copies):
        fn(i)
    ts = []
    for _ in range(repeats):
        for i in range(copies):
            t0 = time.perf_counter()
            fn(i)
            ts.append(time.perf_counter() - t0)
    ts.sort()
    return statistics.median(ts), ts[len(ts) // 10]


def _copies(nbytes: int, factor: float) -> int:
    return min(512, max(1, math.ceil(factor * llc_bytes() / nbytes)))


def bench_model(model: str, fmts: list[str], isas: list[str], repeats: int, big: bool, cold: float) -> list[dict]:
    shapes, (d, dff, act) = MODELS[model]
    out = []
    for fmt in fmts:
        jobs = []
        for name, rows, cols in shapes:
            nbytes = rows * cols * 2 if fmt == "bf16" else rows * row_bytes(fmt, cols)
            if nbytes > BIG and not big:
                continue
            copies = _copies(nbytes, cold)
            ws = _weights(rows, cols, fmt, copies)
            x = torch.randn(cols)
            if fmt == "bf16":
                fn = (lambda ws, x: lambda i: torch.ops.sparkformer.matvec(ws[i % len(ws)], x))(ws, x)
            else:
                f = CODES[fmt]
                fn = (lambda ws, x, f, n: lambda i: torch.ops.sparkformer.quant_matvec(ws[i % len(ws)], f, n, x))(
                    ws, x, f, cols)
            jobs.append((f"{name} {rows}x{cols}", nbytes, copies, fn, ws))
        if fmt == "bf16":  # the fused float FFN
            nbytes = 3 * d * dff * 2
            copies = _copies(nbytes, cold)
            g = [(torch.randn(dff, d) * 0.05).to(torch.bfloat16) for _ in range(3)]
            sets = [g] + [[t.clone() for t in g] for _ in range(copies - 1)]
            x = torch.randn(d)
            fn = (lambda sets, x: lambda i: torch.ops.sparkformer.geglu_decode(x, *sets[i % len(sets)], None, act))(
                sets, x)
            jobs.append((f"geglu {d}x{dff}", nbytes, copies, fn, sets))
        if fmt != "bf16" and model in SPARK:  # the Spark FFN gather: K2 dot + V row of each selected neuron
            m, r, sel = SPARK[model]
            one = quantize_spark_ffn(torch.randn(m, r) * 0.05, torch.randn(m, d - r) * 0.05, torch.randn(m, d) * 0.05,
                                     fmt)
            copies = _copies(one.rows.numel(), cold)  # a different neuron set per copy: a cycle is cold
            sets = [(one.rows if i == 0 else one.rows.clone(),
                     torch.randperm(m)[:sel].sort().values.to(torch.int32)) for i in range(copies)]
            a, x2, f = torch.rand(sel), torch.randn(d - r), CODES[fmt]
            fn = (lambda sets, a, x2, f, n2: lambda i: torch.ops.sparkformer.quant_ffn_gather(
                sets[i % len(sets)][1], a, sets[i % len(sets)][0], f, n2, d, x2))(sets, a, x2, f, d - r)
            jobs.append((f"spark_gather {sel}/{m}", sel * one.rows.shape[1], copies, fn, sets))
        # the call overhead (checks, activation quantization, output, dispatch from Python): a (4, 32) matrix
        tiny = _weights(4, 32, fmt, 1)
        x = torch.randn(32)
        fn = (lambda w, x: lambda i: torch.ops.sparkformer.matvec(w, x))(tiny[0], x) if fmt == "bf16" else \
            (lambda w, x, f: lambda i: torch.ops.sparkformer.quant_matvec(w, f, 32, x))(tiny[0], x, CODES[fmt])
        jobs.insert(0, ("overhead 4x32", tiny[0].numel() * tiny[0].element_size(), 200, fn, tiny))
        for label, nbytes, copies, fn, _ in jobs:
            for isa in isas:
                if fmt == "bf16" and isa == "avx512vnni" and "avx512" in isas:
                    continue  # VNNI is integer-only: its float kernels are the AVX-512 ones
                _extension.set_isa(isa)
                med, p10 = _time(fn, copies, repeats)
                out.append({"model": model, "op": label, "fmt": fmt, "isa": isa, "bytes": nbytes,
                            "us": med * 1e6, "gbps": nbytes / med / 1e9, "us_p10": p10 * 1e6,
                            "gbps_p10": nbytes / p10 / 1e9})
        _extension.set_isa("auto")
        del jobs
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,gemma2")
    ap.add_argument("--formats", default="bf16,q8_0,q4_0,q4_1")
    ap.add_argument("--isa", default="", help="comma list (default: every SIMD ISA this CPU has)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--big", action="store_true", help="also rows over 1 GB of weights")
    ap.add_argument("--cold", type=float, default=4.0, help="one cycle of copies touches this x the LLC")
    args = ap.parse_args(argv)
    if not _extension.available():
        print("the C++ extension is unavailable:", _extension.error())
        return 1
    torch.set_num_threads(args.threads)
    if args.isa:
        isas = args.isa.split(",")
    else:
        isas = _extension.supported_isas(("avx512vnni", "avx512", "avx2"))
    rows = []
    for model in args.models.split(","):
        rows += bench_model(model, args.formats.split(","), isas, args.repeats, args.big, args.cold)
    print(f"{'model':8} {'op':22} {'fmt':5} {'isa':10} {'MB':>8} {'us/call':>9} {'GB/s':>6} {'p10 us':>9} {'GB/s':>6}")
    for r in rows:
        print(f"{r['model']:8} {r['op']:22} {r['fmt']:5} {r['isa']:10} {r['bytes'] / 1e6:8.2f} {r['us']:9.1f} "
              f"{r['gbps']:6.1f} {r['us_p10']:9.1f} {r['gbps_p10']:6.1f}")
    print(json.dumps({"bench": "quant_kernels", "threads": args.threads, "cpu": _extension.info()["cpu_flags"],
                      "rows": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}
                               for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
