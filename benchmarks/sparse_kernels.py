"""Micro-benchmark of the activation-sparse decode kernels (issue 15) at SmolLM2-135M and Gemma-3-270M shapes.

    python benchmarks/sparse_kernels.py [--threads 1,2] [--repeats 8] [--dtype bf16] [--copies N] [--out DIR]
                                        [--groups ffn,matvec,fused]

FFN (per model shape, the model's own activation: SmolLM2 d=576, ffn=1536, silu; Gemma-3-270M d=640, ffn=2048,
gelu_tanh): the dense fused gated FFN ``geglu_decode(act=...)`` vs ``gated_ffn_gather`` over 50% and 30% of the
neurons (random sorted ids, as a router's ``nonzero`` gives them) vs ``cats_ffn_decode`` with the threshold at the
median |act(gate)| of each input (50% kept). Input sparsity: ``torch.mv`` (and our ``matvec``) on W (n_out, n_in)
vs ``sparse_input_matvec`` on W^T at 50% and 60% of the inputs kept (threshold at the matching quantile of |x|),
for W^T (576, 576) (a square projection) and (1536, 576) (SmolLM2's down projection).

Fused FFN steps ("fused", SmolLM2's shape, silu): the dense ``geglu_decode`` vs ``lowrank_routed_ffn`` (a random
rank-128 predictor, f calibrated so that ~30% / ~50% of the neurons are kept; "verify 2x": f proposing twice that
and a verify threshold keeping it) vs the same step unfused as the CPU engine runs it today (``decode.routed``:
``routed_neurons`` with our matvec, then the fused gather) and as plain torch ops (``lowrank_routed_ffn_torch``);
``teal_ffn_decode`` with t_in, t_down at the medians (50% of inputs, ~50% of neurons) vs the same two
``sparse_input_matvec`` calls with the activation in between (``decode.sparse``). Bytes: predictor + rows read.

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
from sparkformer.ops.sparse_ffn_decode import cats_ffn_decode, gated_ffn_gather, gated_ffn_gather_verify, \
    lowrank_routed_ffn, lowrank_routed_ffn_torch, sparse_input_matvec, teal_ffn_decode  # noqa: E402

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


def _calibrate(count, target: float, lo: float, hi: float, steps: int = 30) -> float:
    """The parameter in [lo, hi] at which the increasing function count(p) (a kept fraction) reaches target."""
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    return 0.5 * (lo + hi)


def bench_fused(dtype: torch.dtype, threads: int, args, rank: int = 128) -> list[dict]:
    from sparkformer.decode.routed import RoutedFFN, routed_ffn_decode

    d, m, act = MODELS["smollm2-135m"]
    esz = torch.finfo(dtype).bits // 8
    g = torch.Generator().manual_seed(2)
    dense_bytes = 3 * m * d * esz
    pred_bytes = (rank * d + 2 * m * rank) * esz
    copies = n_copies(dense_bytes + pred_bytes, args.copies)
    xs = [torch.randn(d, generator=g) for _ in range(N_INPUTS)]
    W = []
    for _ in range(copies):
        wg, wu, wd = (torch.randn(m, d, generator=g) / d**0.5, torch.randn(m, d, generator=g) / d**0.5,
                      torch.randn(d, m, generator=g) / m**0.5)
        p = pack_geglu(wg, wu, wd, dtype=dtype)
        W.append({"p": p, "gu": torch.stack([wg, wu], 1).to(dtype).contiguous(),
                  "gut": torch.cat([wg, wu]).t().to(dtype).contiguous(),
                  "A": (torch.randn(rank, d, generator=g) / d**0.5).to(dtype).contiguous(),
                  "B": (torch.randn(2 * m, rank, generator=g) / rank**0.5).to(dtype).contiguous()})
    vw = torch.ones(m)
    w0 = W[0]

    def frac(f, vt=None, which=1):  # mean kept fraction over the inputs on copy 0
        extra = () if vt is None else (vw, vt)
        return sum(int(lowrank_routed_ffn(x, w0["A"], w0["B"], f, act, w0["gu"], w0["p"].w_down_t, *extra)[which])
                   for x in xs) / N_INPUTS / m

    cfg = {}  # name -> (f, verify threshold or None)
    for target in (0.3, 0.5):
        cfg[f"routed {int(target * 100)}%"] = (_calibrate(frac, target, 1e-4, 1.0), None)
        f2 = 1.0 if 2 * target >= 1 else _calibrate(frac, 2 * target, 1e-4, 1.0)
        vt = _calibrate(lambda t: -frac(f2, t, 2), -target, 0.0, 10.0)
        cfg[f"routed {int(target * 100)}% verify 2x"] = (f2, vt)
    fns = {"dense geglu_decode": lambda i: geglu_decode(xs[i % N_INPUTS], *W[i % copies]["p"], act=act)}
    kept, bytes_ = {}, {"dense geglu_decode": dense_bytes}
    for name, (f, vt) in cfg.items():
        extra = () if vt is None else (vw, vt)
        rfs = [RoutedFFN(None, w["gu"], w["p"].w_down_t, (w["A"], w["B"], m, f, F.silu),
                         None if vt is None else (vw, vt)) for w in W]
        fns[name] = lambda i, f=f, e=extra: lowrank_routed_ffn(xs[i % N_INPUTS], W[i % copies]["A"],
                                                               W[i % copies]["B"], f, act, W[i % copies]["gu"],
                                                               W[i % copies]["p"].w_down_t, *e)
        fns[name + " unfused engine"] = lambda i, rfs=rfs: routed_ffn_decode(
            rfs[i % copies], xs[i % N_INPUTS], F.silu, dtype, matvec,
            lambda x, gu, wd, idx: gated_ffn_gather(x, gu, wd, idx, act),
            lambda x, gu, wd, idx, w, t: gated_ffn_gather_verify(x, gu, wd, idx, act, w, t))
        fns[name + " unfused torch"] = lambda i, f=f, e=extra: lowrank_routed_ffn_torch(
            xs[i % N_INPUTS].to(dtype), W[i % copies]["A"], W[i % copies]["B"], f, act, W[i % copies]["gu"],
            W[i % copies]["p"].w_down_t, *e)
        n_prop, n_kept = frac(f, vt, 1), frac(f, vt, 2)
        for suffix in ("", " unfused engine", " unfused torch"):
            kept[name + suffix] = n_kept
            bytes_[name + suffix] = pred_bytes + (2 * n_prop + n_kept) * m * d * esz
    # TEAL at the medians: half the inputs, then about half of the neurons
    fn = F.silu
    t_in = [float(x.abs().median()) for x in xs]
    t_h = []
    for x, t in zip(xs, t_in):
        gu = W[0]["gut"].float().t() @ torch.where(x.abs() > t, x, torch.zeros_like(x))
        t_h.append(float((fn(gu[:m]) * gu[m:]).abs().median()))

    def teal_unfused(w, x, ti, th):
        gu, _ = sparse_input_matvec(w["gut"], x, ti)
        gu = gu.float()
        return sparse_input_matvec(w["p"].w_down_t, fn(gu[:m]) * gu[m:], th)

    j = lambda i: (W[i % copies], xs[i % N_INPUTS], t_in[i % N_INPUTS], t_h[i % N_INPUTS])  # noqa: E731
    fns["teal 50%"] = lambda i: teal_ffn_decode(j(i)[1], j(i)[0]["gut"], j(i)[0]["p"].w_down_t, *j(i)[2:], act)
    fns["teal 50% unfused"] = lambda i: teal_unfused(*j(i))
    outs = [teal_ffn_decode(x, W[0]["gut"], W[0]["p"].w_down_t, ti, th, act) for x, ti, th in zip(xs, t_in, t_h)]
    n_in = sum(int(o[1]) for o in outs) / N_INPUTS / d
    n_h = sum(int(o[2]) for o in outs) / N_INPUTS / m
    for name in ("teal 50%", "teal 50% unfused"):
        kept[name] = n_h
        bytes_[name] = (2 * n_in + n_h) * m * d * esz
    times = time_cycles(fns, copies, args.repeats)
    return _rows(f"fused smollm2 ffn d={d} m={m} r={rank} {act}", times, bytes_, kept, "dense geglu_decode", threads)


def print_table(rows: list[dict]) -> None:
    print(f"{'group':<40} {'thr':>3} {'impl':<30} {'kept':>5} {'ms':>7} {'min-max':>15} {'basis':>5} {'GB/s':>5} "
          f"{'speedup':>7} {'vs fastest':>10} {'ideal':>5} {'meas/ideal':>10}")
    for r in rows:
        print(f"{r['group']:<40} {r['threads']:>3} {r['impl']:<30} {r['kept']:>5.2f} {r['ms']:>7.4f} "
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
    ap.add_argument("--groups", default="ffn,matvec,fused", help="comma-separated: ffn, matvec, fused")
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
            groups = args.groups.split(",")
            for model in MODELS if "ffn" in groups else ():
                rows += bench_ffn(model, dtype, t, args)
            for shape in MATVECS if "matvec" in groups else ():
                rows += bench_matvec(shape, dtype, t, args)
            if "fused" in groups:
                rows += bench_fused(dtype, t, args)
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
