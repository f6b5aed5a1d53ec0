"""Benchmark: the perplexity / speed frontier of ``sparkformer sparsify`` on a pretrained model.

    sparkformer bench sparsify --model smollm2-135m --out benchmarks/results      # -> sparsify_smollm2-135m.json

For every point (method, scope, asked sparsity): calibrate on the calibration split, measure held-out perplexity per
domain (every default domain, disjoint source documents) and the achieved sparsity there, then time batch-1 decode of
the sparse model on our CPU engine against the dense engine in the same run (interleaved medians, real text as the
prompt, ``--context`` tokens of it in the cache). ``ideal_speedup`` is the ratio of bytes read per token (weights
touched + KV cache, the sparse engine's achieved read fraction). The oracle (true top-k neurons, which needs the dense
FFN) gives a quality bound only. Each point records ``training_free`` / ``continued_training``.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from typing import Any

import torch

from sparkformer.bench.common import OUT_HELP, env_info, finish
from sparkformer.bench.routed import bytes_per_token, prompt_ids, time_decode

# (method, scope, asked sparsity): teal's is a fraction of the scope's weights, cats / predictor / oracle's of FFN
# neurons
# predictor points may end in :v<factor> (the verify stage: propose factor x the kept neurons)
DEFAULT_POINTS = ("teal:ffn:0.3,teal:ffn:0.5,teal:model:0.3,teal:model:0.4,teal:down:0.2,"
                  "cats:ffn:0.3,cats:ffn:0.5,predictor:ffn:0.5,predictor:ffn:0.7,predictor:ffn:0.7:v1.5,"
                  "predictor:ffn:0.7:v2,oracle:ffn:0.5,oracle:ffn:0.7")


def parse_points(spec: str) -> list[tuple[str, str, float, float]]:
    """(method, scope, sparsity, verify) per comma-separated item method:scope:sparsity[:v<factor>]."""
    out = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        ok = len(parts) in (3, 4) and parts[0] in ("teal", "cats", "predictor", "oracle") and (
            len(parts) == 3 or (parts[0] == "predictor" and parts[3].startswith("v")))
        if not ok:
            raise ValueError(f"--points item {item!r}: give method:scope:sparsity[:v<factor>], method one of teal, "
                             "cats, predictor, oracle (e.g. teal:ffn:0.5, predictor:ffn:0.7:v1.5)")
        out.append((parts[0], parts[1], float(parts[2]), float(parts[3][1:]) if len(parts) == 4 else 1.0))
    return out


def _speed(model, dense_engine, spec, routers, dtype: str, ids: list[int], context: int, tokens: int,
           repeats: int) -> dict[str, Any]:
    from sparkformer.decode import make_engine

    eng = make_engine(model, dtype, context + tokens + 1, "cpu", routers, sparsity=spec)
    eng.prefill(ids[:context])
    feed = ids[context: context + tokens]
    engines = {"dense": dense_engine, "sparse": eng}
    times: dict[str, list[float]] = {k: [] for k in engines}
    with torch.no_grad():
        for e in engines.values():
            time_decode(e, context, feed[:2])
        eng.reset()  # statistics of the timed steps only
        for _ in range(repeats):
            for k, e in engines.items():
                times[k].append(time_decode(e, context, feed))
    act = eng.stats.summary().get("ffn_activity")
    db = bytes_per_token(dense_engine, context, None)
    sb = bytes_per_token(eng, context, act)
    dm, sm = statistics.median(times["dense"]), statistics.median(times["sparse"])
    out = {"dense_ms_per_token": dm * 1e3, "sparse_ms_per_token": sm * 1e3, "speedup": dm / sm,
           "ideal_speedup": db / sb, "measured_over_ideal": (dm / sm) / (db / sb), "engine_stats": eng.stats.summary()}
    del eng
    gc.collect()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sparkformer.decode import make_engine
    from sparkformer.loading import describe, load_model
    from sparkformer.sparsify import methods as M
    from sparkformer.sparsify.command import SparsifySettings, apply_method, summarize
    from sparkformer.sparsify.data import domain_windows
    from sparkformer.sparsify.evaluate import heldout_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    points = parse_points(args.points)
    t0 = time.time()
    loaded = load_model(args.model)
    model = loaded.model.float().eval()
    M.check_supported(model)
    dw = domain_windows(loaded.tokenizer, args.capabilities, args.seq_len, args.calib_windows, args.heldout_windows)
    calib = dw.all("calibration")
    dense = heldout_eval(model, dw.heldout)
    print(f"dense: held-out ppl {dense['ppl']:.3f} on {dense['tokens']} tokens, {len(dw.heldout)} domains",
          flush=True)
    ids = prompt_ids(loaded.tokenizer, args.context + args.tokens)
    dense_engine = make_engine(model, args.dtype, args.context + args.tokens + 1, "cpu")
    dense_engine.prefill(ids[: args.context])
    tables: dict[str, Any] = {}  # sensitivity tables, one per (method, scope): reused across sparsities
    X = None  # recorded FFN inputs for the predictor
    res_points = []
    for method, scope, target, verify in points:
        t = time.time()
        if method == "oracle":
            sp = M.oracle(model, target)
        else:
            if method == "predictor" and X is None:
                X = M.record_inputs(model, calib)
            s = SparsifySettings(model=args.model, out="", method=method, sparsity=target,
                                 scope=scope if method == "teal" else "ffn", allocation=args.allocation,
                                 rank=args.rank, verify=verify).validate()
            key = f"{method}:{scope}"
            sp = apply_method(model, s, calib, table=tables.get(key), X=X, log=lambda m: print(m, flush=True))
            if sp.info.get("table") is not None:
                tables[key] = sp.info["table"]
        ev = heldout_eval(model, dw.heldout, sp.spec, sp.routers)
        summ = summarize(SparsifySettings(model=args.model, out="", method="predictor" if method == "oracle"
                                          else method, sparsity=target, scope=scope), dense, ev)
        point = {"method": method, "scope": scope, "target": target, "verify": verify, "sparsity": summ["sparsity"],
                 "weights_skipped": summ["weights_skipped"], "ppl": ev["ppl"], "ppl_increase": summ["ppl_increase"],
                 "per_domain_increase": summ["per_domain_increase"], "training_free": method in ("teal", "cats"),
                 "continued_training": False, "speedup": None, "ideal_speedup": None}
        if method == "oracle":
            point["reference_only"] = True
        else:
            point.update(_speed(model, dense_engine, sp.spec, sp.routers, args.dtype, ids, args.context, args.tokens,
                                args.repeats))
            es = point["engine_stats"]
            if "ffn_gate_up_activity" in es:  # routers: gate/up rows of the proposed set, down rows of the kept
                point["weights_skipped"] = 1.0 - (2 * es["ffn_gate_up_activity"] + es["ffn_activity"]) / 3
        point["seconds"] = time.time() - t
        res_points.append(point)
        sp_s = f"{point['speedup']:.2f}x (ideal {point['ideal_speedup']:.2f}x)" if point["speedup"] else "-"
        print(f"{method:9s} {scope:5s} v{verify:g} asked {target:.2f} achieved {point['sparsity']:.3f} ppl {ev['ppl']:.3f} "
              f"({100 * point['ppl_increase']:+.2f}%) decode {sp_s} [{point['seconds']:.0f} s]", flush=True)
    name = args.model if "/" not in args.model else args.model.rstrip("/").split("/")[-1]
    return {"benchmark": "sparsify-frontier", "model": name, "loaded": describe(loaded), "dtype": args.dtype,
            "context": args.context, "tokens": args.tokens, "repeats": args.repeats,
            "heldout": {"tokens": dense["tokens"], "domains": list(dw.heldout), "seq_len": args.seq_len},
            "calibration_tokens": dw.tokens("calibration"), "dense_ppl": dense["ppl"],
            "dense_per_domain": dense["per_domain"], "points": res_points, "env": env_info(args.dtype),
            "command": command_line(args), "seconds": time.time() - t0,
            "note": "packaged GGUF weights (4-6-bit, dequantized on load): figures differ slightly from the original "
                    "checkpoints"}


def command_line(args) -> str:
    parts = [f"sparkformer bench sparsify --model {args.model}"]
    for k in ("points", "dtype", "context", "tokens", "repeats", "allocation", "rank", "seq_len", "calib_windows",
              "heldout_windows", "threads", "out"):
        v = getattr(args, k, None)
        if v is not None:
            parts.append(f"--{k.replace('_', '-')} {v}")
    return " ".join(parts)


def print_table(res: dict[str, Any]) -> None:
    print(f"\n{res['model']}: dense held-out ppl {res['dense_ppl']:.3f}, decode {res['dtype']} ctx {res['context']}")
    print(f"{'method':9s} {'scope':5s} {'asked':>6s} {'sparsity':>8s} {'ppl':>8s} {'change':>8s} {'speedup':>8s} "
          f"{'ideal':>6s} {'meas/ideal':>10s}")
    for p in res["points"]:
        sp = f"{p['speedup']:8.2f} {p['ideal_speedup']:6.2f} {p['measured_over_ideal']:10.2f}" if p["speedup"] \
            else f"{'-':>8s} {'-':>6s} {'-':>10s}"
        print(f"{p['method']:9s} {p['scope']:5s} {p['target']:6.2f} {p['sparsity']:8.3f} {p['ppl']:8.3f} "
              f"{100 * p['ppl_increase']:+7.2f}% {sp}")


def plot(res: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    groups: dict[str, list] = {}
    for p in res["points"]:
        v = f", verify {p['verify']:g}x" if p.get("verify", 1.0) > 1 else ""
        groups.setdefault(f"{p['method']} ({p['scope']}{v})", []).append(p)
    for label, ps in groups.items():
        ps = sorted(ps, key=lambda p: p["sparsity"])
        ax[0].plot([p["sparsity"] for p in ps], [100 * p["ppl_increase"] for p in ps], "o-", label=label)
        sp = [p for p in ps if p["speedup"]]
        if sp:
            ax[1].plot([p["ppl_increase"] * 100 for p in sp], [p["speedup"] for p in sp], "o-", label=label)
    ax[0].set_xlabel("achieved sparsity (teal: weights skipped; others: neurons)")
    ax[0].set_ylabel("held-out perplexity change (%)")
    ax[0].set_yscale("symlog", linthresh=10)
    ax[1].set_xlabel("held-out perplexity change (%)")
    ax[1].set_ylabel(f"decode speed-up vs dense ({res['dtype']}, ctx {res['context']})")
    ax[1].set_xscale("symlog", linthresh=10)
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"{res['model']}: sparsify frontier (held-out text of {len(res['heldout']['domains'])} domains)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cli(args: argparse.Namespace) -> int:
    from pathlib import Path

    res = run(args)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(res, args.plot)
    return finish(res, lambda: print_table(res), args.name or f"sparsify_{res['model']}", args)


def add_parser(sub) -> None:
    p = sub.add_parser("sparsify", help="perplexity / decode-speed frontier of sparkformer sparsify's methods")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--points", default=DEFAULT_POINTS, help="comma list of method:scope:sparsity")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--context", type=int, default=512, help="prompt tokens in the cache before the timed decode")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--allocation", default="greedy", choices=("greedy", "uniform"))
    p.add_argument("--rank", type=int, default=128, help="predictor rank")
    p.add_argument("--capabilities", default="default")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--heldout-windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--plot", default=None, help="write the frontier plot here (PNG)")
    p.add_argument("--name", default=None, help="result file name (default sparsify_<model>)")
    p.add_argument("--out", default=None, help=OUT_HELP)
    p.add_argument("--no-save", action="store_true")
    p.set_defaults(func=_cli)
