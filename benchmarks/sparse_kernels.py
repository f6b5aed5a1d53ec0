"""Micro-benchmark of the activation-sparse decode kernels (issue 15) at SmolLM2-135M and Gemma-3-270M shapes.

    python benchmarks/sparse_kernels.py [--threads 1,2] [--repeats 8] [--dtype bf16] [--copies N] [--out DIR]

FFN (per model shape, the model's own activation: SmolLM2 d=576, ffn=1536, silu; Gemma-3-270M d=640, ffn=2048,
gelu_tanh): the dense fused gated FFN ``geglu_decode(act=...)`` vs ``gated_ffn_gather`` over 50% and 30% of the
neurons (random sorted ids, as a router's ``nonzero`` gives them) vs ``cats_ffn_decode`` with the threshold at the
median |act(gate)| of each input (50% kept). Input sparsity: ``torch.mv`` (and our ``matvec``) on W (n_out, n_in)
vs ``sparse_input_matvec`` on W^T at 50% and 60% of the inputs kept (threshold at the matching quantile of |x|),
for W^T (576, 576) (a square projection) and (1536, 576) (SmolLM2's down projection).

Method (as ``sparkformer.bench.kernels``): weights cold -- every implementation cycles over enough copies that one
cycle touches >= 4x the last-level cache; implementations interleaved cycle by cycle in rotating order; medians of
the calls no other process preempted ("clean", when >= 5 of them) else of all calls. Bytes are the weights each
call must read, from the achieved counts; ideal = dense bytes / sparse bytes. "speedup" = median of the dense op
named in the row (torch.mv for the matvecs) / this median; "vs fastest" = the same against the fastest dense op of
the group (our C++ matvec for the matvecs); meas/ideal = "vs fastest" / ideal. Prints a table, then one JSON line;
writes sparse_kernels.json to runs/bench/ (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparkformer.bench.common import OUT_HELP, env_info, write_result  # noqa: E402
from sparkformer.bench.kernels import n_copies, stats_ms, time_cycles  # noqa: E402
from sparkformer.ops import _extension  # noqa: E402
from sparkformer.ops.dense_decode import geglu_decode, matvec, pack_geglu  # noqa: E402
from sparkformer.ops.sparse_ffn_decode import cats_ffn_decode, gated_ffn_gather, sparse_input_matvec  # noqa: E402

MODELS = {"smollm2-135m": (576, 1536, "silu"), "gemma3-270m": (640, 2048, "gelu_tanh")}
MATVECS = [(576, 576), (1536, 576)]  # W^T shapes (n_in, n_out)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
N_INPUTS = 16


def _ms(s: dict) -> float:
    return s["clean_median_ms"] if s["clean_median_ms"] is not None else s["median_ms"]


def _rows(group: str, times: dict, bytes_: dict, kept: dict, dense: str, threads: int,
          dense_all: tuple[str, ...] = ()) -> list[dict]:
    """One row per implementation; "speedup" against ``dense``, "speedup_vs_fastest_dense" against the fastest of
    ``dense`` and ``dense_all`` (our own dense kernels too: a slow baseline flatters)."""
    stats = {k: stats_ms(v) for k, v in times.items()}
    fastest = min(_ms(stats[k]) for k in (dense, *dense_all))
    out = []
    for name, s in stats.items():
        ms = _ms(s)
        out.append({"group": group, "threads": threads, "impl": name, "kept": kept.get(name, 1.0),
                    "bytes": bytes_[name], "ms": ms, "min_ms": s["min_ms"], "max_ms": s["max_ms"],
                    "basis": "clean" if s["clean_median_ms"] is not None else "all",
                    "gbps": bytes_[name] / (ms * 1e-3) / 1e9, "dense": dense,
                    "speedup": _ms(stats[dense]) / ms, "speedup_vs_fastest_dense": fastest / ms,
                    "ideal": bytes_[dense] / bytes_[name]})
    for r in out:  # the quality of a kernel: its speed-up over the fastest dense, against the bytes' ideal
        r["speedup_over_ideal"] = r["speedup_vs_fastest_dense"] / r["ideal"]
    return out


def bench_ffn(model: str, dtype: torch.dtype, threads: int, args) -> list[dict]:
    d, m, act = MODELS[model]
    esz = torch.finfo(dtype).bits // 8
    g = torch.Generator().manual_seed(0)
    dense_bytes = 3 * m * d * esz
    copies = n_copies(dense_bytes, args.copies)
    xs = [torch.randn(d, generator=g) for _ in range(N_INPUTS)]
    fn = F.silu if act == "silu" else (lambda z: F.gelu(z, approximate="tanh"))
    packed, gate_up = [], []
    for _ in range(copies):
        wg, wu, wd = (torch.randn(m, d, generator=g) / d**0.5, torch.randn(m, d, generator=g) / d**0.5,
                      torch.randn(d, m, generator=g) / m**0.5)
        packed.append(pack_geglu(wg, wu, wd, dtype=dtype))
        gate_up.append(torch.stack([wg, wu], 1).to(dtype).contiguous())
    idx = {f: [torch.randperm(m, generator=g)[: int(f * m)].sort().values for _ in range(N_INPUTS)]
           for f in (0.5, 0.3)}
    # CATS threshold per (copy, input): the median |act(gate)|, so half the neurons pass
    thr = [[float(fn(p.w_gate.float() @ x).abs().median()) for x in xs] for p in packed]
    fns = {
        "dense geglu_decode": lambda i: geglu_decode(xs[i % N_INPUTS], *packed[i % copies], act=act),
        "gather 50%": lambda i: gated_ffn_gather(xs[i % N_INPUTS], gate_up[i % copies], packed[i % copies].w_down_t,
                                                 idx[0.5][i % N_INPUTS], act),
        "gather 30%": lambda i: gated_ffn_gather(xs[i % N_INPUTS], gate_up[i % copies], packed[i % copies].w_down_t,
                                                 idx[0.3][i % N_INPUTS], act),
        "cats 50%": lambda i: cats_ffn_decode(xs[i % N_INPUTS], *packed[i % copies],
                                              thr[i % copies][i % N_INPUTS], act),
    }
    kept_cats = sum(int(cats_ffn_decode(xs[j], *packed[0], thr[0][j], act)[1]) for j in range(N_INPUTS)) / N_INPUTS / m
    bytes_ = {"dense geglu_decode": dense_bytes, "gather 50%": 3 * int(0.5 * m) * d * esz,
              "gather 30%": 3 * int(0.3 * m) * d * esz, "cats 50%": (m + 2 * kept_cats * m) * d * esz}
    kept = {"gather 50%": int(0.5 * m) / m, "gather 30%": int(0.3 * m) / m, "cats 50%": kept_cats}
    times = time_cycles(fns, copies, args.repeats)
    return _rows(f"{model} ffn d={d} m={m} {act}", times, bytes_, kept, "dense geglu_decode", threads)


def bench_matvec(shape: tuple[int, int], dtype: torch.dtype, threads: int, args) -> list[dict]:
    n_in, n_out = shape
    esz = torch.finfo(dtype).bits // 8
    g = torch.Generator().manual_seed(1)
    dense_bytes = n_in * n_out * esz
    copies = n_copies(dense_bytes, args.copies)
    ws = [(torch.randn(n_out, n_in, generator=g) / n_in**0.5).to(dtype) for _ in range(copies)]
    wts = [w.t().contiguous() for w in ws]
    xs = [torch.randn(n_in, generator=g).to(dtype) for _ in range(N_INPUTS)]
    thr = {f: [float(x.float().abs().quantile(1 - f)) for x in xs] for f in (0.5, 0.6)}
    fns = {
        "torch.mv": lambda i: torch.mv(ws[i % copies], xs[i % N_INPUTS]),
        "ext matvec": lambda i: matvec(ws[i % copies], xs[i % N_INPUTS]),
        "sparse_input 50%": lambda i: sparse_input_matvec(wts[i % copies], xs[i % N_INPUTS], thr[0.5][i % N_INPUTS]),
        "sparse_input 60%": lambda i: sparse_input_matvec(wts[i % copies], xs[i % N_INPUTS], thr[0.6][i % N_INPUTS]),
    }
    kept = {f"sparse_input {int(f * 100)}%": sum(int(sparse_input_matvec(wts[0], x, t)[1]) for x, t in
                                                  zip(xs, thr[f])) / N_INPUTS / n_in for f in (0.5, 0.6)}
    bytes_ = {"torch.mv": dense_bytes, "ext matvec": dense_bytes,
              **{k: v * n_in * n_out * esz for k, v in kept.items()}}
    times = time_cycles(fns, copies, args.repeats)
    return _rows(f"matvec W^T {n_in}x{n_out}", times, bytes_, kept, "torch.mv", threads, ("ext matvec",))


def print_table(rows: list[dict]) -> None:
    print(f"{'group':<40} {'thr':>3} {'impl':<18} {'kept':>5} {'ms':>7} {'min-max':>15} {'basis':>5} {'GB/s':>5} "
          f"{'speedup':>7} {'vs fastest':>10} {'ideal':>5} {'meas/ideal':>10}")
    for r in rows:
        print(f"{r['group']:<40} {r['threads']:>3} {r['impl']:<18} {r['kept']:>5.2f} {r['ms']:>7.4f} "
              f"{r['min_ms']:>7.4f}-{r['max_ms']:<7.3f} {r['basis']:>5} {r['gbps']:>5.1f} {r['speedup']:>7.2f} "
              f"{r['speedup_vs_fastest_dense']:>10.2f} {r['ideal']:>5.2f} {r['speedup_over_ideal']:>10.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=8, help="interleaved rounds, each one cycle over the copies")
    ap.add_argument("--copies", type=int, default=None, help="weight copies (default: 4x the last-level cache)")
    ap.add_argument("--out", default=None, help=OUT_HELP)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    if not _extension.available():
        print(f"the C++ extension is unavailable: {_extension.error()}", file=sys.stderr)
        return 1
    dtype = DTYPES[args.dtype]
    threads0 = torch.get_num_threads()
    rows = []
    try:
        for t in (int(s) for s in args.threads.split(",")):
            torch.set_num_threads(t)
            for model in MODELS:
                rows += bench_ffn(model, dtype, t, args)
            for shape in MATVECS:
                rows += bench_matvec(shape, dtype, t, args)
    finally:
        torch.set_num_threads(threads0)
    res = {"benchmark": "sparse_kernels", "env": {**env_info(args.dtype), "isa": _extension.isa()},
           "repeats": args.repeats, "rows": rows}
    print_table(rows)
    if not args.no_save:
        print(f"wrote {write_result('sparse_kernels', res, args.out)}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
