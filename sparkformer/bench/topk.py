"""Benchmark: statistical top-k vs exact ``torch.topk`` masking, forward + backward, and a training step.

    sparkformer bench topk [--rows 4096] [--repeats 5] [--threads 2]

Shapes: the Spark FFN predictor output of a 4096-token batch at Gemma-2 2B width (4096 x 13824, 8% kept) and
attention-shaped scores (heads x queries x keys with a causal mask, k=256 kept). Then one training step
(forward + backward + AdamW) of the `small` preset: dense, Spark (statistical top-k) and Spark with exact top-k.
Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse

import torch

from sparkformer.bench.common import OUT_HELP, env_info, finish, summary, time_interleaved
from sparkformer.ops import exact_topk, exact_topk_inf, stat_topk, stat_topk_inf


def _fwd_bwd(fn, x: torch.Tensor, *args):
    def run():
        x.grad = None
        y = fn(x, *args)
        y = torch.where(torch.isfinite(y), y, torch.zeros((), dtype=y.dtype))
        y.sum().backward()

    return run


def bench_ops(rows: int, width: int, fraction: float, heads: int, seq: int, k_attn: int, repeats: int) -> dict:
    x = torch.randn(rows, width, requires_grad=True)
    ffn = time_interleaved({"stat": _fwd_bwd(stat_topk, x, fraction), "exact": _fwd_bwd(exact_topk, x, fraction)},
                           repeats=repeats)
    s = torch.randn(heads, seq, seq, requires_grad=True)
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()
    attn = time_interleaved({"stat": _fwd_bwd(stat_topk_inf, s, k_attn, mask),
                             "exact": _fwd_bwd(exact_topk_inf, s, k_attn, mask)}, repeats=repeats)
    with torch.no_grad():
        kept_ffn = (stat_topk(x, fraction) != 0).sum(-1).float().mean().item()
        kept_attn = torch.isfinite(stat_topk_inf(s, k_attn, mask)).sum(-1)[:, k_attn:].float().mean().item()
    return {
        "ffn_shape": [rows, width], "ffn_fraction": fraction, "ffn_kept_mean": kept_ffn,
        "ffn_stat_s": summary(ffn["stat"]), "ffn_exact_s": summary(ffn["exact"]),
        "attn_shape": [heads, seq, seq], "attn_k": k_attn, "attn_kept_mean_full_rows": kept_attn,
        "attn_stat_s": summary(attn["stat"]), "attn_exact_s": summary(attn["exact"]),
    }


def bench_train_step(preset: str, batch: int, seq: int, repeats: int) -> dict:
    from sparkformer.config import get_preset
    from sparkformer.model import SparkLM

    variants = {
        "dense": get_preset(preset + "-dense", max_seq_len=seq),
        "spark": get_preset(preset + "-spark", max_seq_len=seq),
        "spark_exact_topk": get_preset(preset + "-spark", max_seq_len=seq, topk_method="exact"),
    }
    fns, params = {}, {}
    for name, cfg in variants.items():
        torch.manual_seed(0)
        model = SparkLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        data = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
        params[name] = model.num_parameters()

        def step(model=model, opt=opt, data=data):
            opt.zero_grad(set_to_none=True)
            model(data[:, :-1], targets=data[:, 1:]).loss.backward()
            opt.step()

        fns[name] = step
    times = time_interleaved(fns, repeats=repeats)
    return {"preset": preset, "batch": batch, "seq": seq, "params": params,
            **{f"step_{k}_s": summary(v) for k, v in times.items()}}


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = bench_ops(args.rows, args.width, args.fraction, args.heads, args.seq, args.k_attn, args.repeats)
    step = bench_train_step(args.preset, args.batch, args.train_seq, args.repeats)
    med = lambda d: d["median"]  # noqa: E731
    res = {
        "benchmark": "topk",
        "env": env_info("float32"),
        **ops, **step,
        "stat_vs_exact_speedup": med(ops["ffn_exact_s"]) / med(ops["ffn_stat_s"]),
        "attn_stat_vs_exact_speedup": med(ops["attn_exact_s"]) / med(ops["attn_stat_s"]),
        "train_step_spark_vs_dense": med(step["step_spark_s"]) / med(step["step_dense_s"]),
        "train_step_exact_vs_stat": med(step["step_spark_exact_topk_s"]) / med(step["step_spark_s"]),
    }
    return res


def print_table(res: dict) -> None:
    def row(label, d):
        print(f"{label:44s} {d['median'] * 1e3:10.1f} {d['min'] * 1e3:10.1f} {d['max'] * 1e3:10.1f}")

    e = res["env"]
    print(f"{e['cpu']}, {e['threads']} threads, torch {e['torch']}, fp32")
    print(f"{'forward+backward (ms)':44s} {'median':>10s} {'min':>10s} {'max':>10s}")
    r, w = res["ffn_shape"]
    row(f"FFN {r}x{w} statistical top-k", res["ffn_stat_s"])
    row(f"FFN {r}x{w} exact torch.topk", res["ffn_exact_s"])
    h, q, k = res["attn_shape"]
    row(f"attn {h}x{q}x{k} causal, statistical", res["attn_stat_s"])
    row(f"attn {h}x{q}x{k} causal, exact", res["attn_exact_s"])
    print(f"training step, {res['preset']} batch {res['batch']} x {res['seq']} (ms)")
    for v in ("dense", "spark", "spark_exact_topk"):
        row(f"  {v}", res[f"step_{v}_s"])
    print(f"statistical vs exact top-k: FFN {res['stat_vs_exact_speedup']:.2f}x, "
          f"attention {res['attn_stat_vs_exact_speedup']:.2f}x; kept {res['ffn_kept_mean']:.0f}/{w} "
          f"(target {res['ffn_fraction'] * w:.0f}), attention {res['attn_kept_mean_full_rows']:.1f}/{res['attn_k']}")
    print(f"train step: spark/dense {res['train_step_spark_vs_dense']:.2f}x, "
          f"exact/statistical {res['train_step_exact_vs_stat']:.2f}x")


def _cli(args: argparse.Namespace) -> int:
    res = run(args)
    return finish(res, lambda: print_table(res), "topk", args)


def add_parser(sub) -> None:
    p = sub.add_parser("topk", help="statistical vs exact top-k, forward+backward, and a training step")
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--width", type=int, default=13824)
    p.add_argument("--fraction", type=float, default=0.08)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024, help="queries = keys of the attention-shaped input")
    p.add_argument("--k-attn", type=int, default=256)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train-seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help=OUT_HELP)
    p.add_argument("--no-save", action="store_true")
    p.set_defaults(func=_cli)
