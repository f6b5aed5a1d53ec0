"""Quality of the block-quantized weights: perplexity per format, per matrix role and per layer, and the engine's gap.

    python -m sparkformer.bench.quant_quality --models smollm2-135m,gemma3-270m,runs/demo --out benchmarks/results

For each model (a built-in name, or a run folder / checkpoint; an absent optional one is skipped with a note):
- ``formats``: perplexity on the held-out val split of fp32 and of the weights each engine format reads
  (``decode.layout.quantized_model``: the same function as ``sparkformer eval --dtype D``, whose command each row
  carries): q8_0, q4_0 and q4_1 with llama.cpp's reference scales (``maxabs``: what ``llama-quantize --pure`` Q4_0 /
  Q4_1 compute without an imatrix) and with the scale search (our default), and the mixes of
  ``sparkformer.ops.quant.MIXES``; with bits per weight of the matrices.
- ``sensitivity`` (``--sens-tokens``): one matrix role in q4_0, every other matrix fp32 (which role costs most), and
  one group of layers in q4_0 (which layers).
- ``engine`` (first model, ``--engine-tokens``, each of ``--engine-dtype``): the quantized engine's own logits (it also
  rounds activations to int8 per token), teacher-forced with ``step``, against the weights-only model on the same
  tokens. A format the C++ extension lacks (``ops.quant.ext_supports``) runs the per-op step, its dot products in
  torch with the kernels' math.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

from sparkformer.ops.quant import BITS as QBITS
from sparkformer.ops.quant import MIXES, ROLES, format_plan

BITS = {"fp32": 32.0, **QBITS}


def role_numels(model) -> dict[str, int]:
    """Weights per matrix role of a ``SparkLM`` (the roles of ``sparkformer.ops.quant.ROLES``)."""
    n = dict.fromkeys(ROLES, 0)
    for blk in model.layers:
        a, f = blk.attn, blk.ffn
        n["qkv"] += sum(lin.weight.numel() for lin in (a.q_proj, a.k_proj, a.v_proj))
        n["o"] += a.o_proj.weight.numel()
        if f.kind == "spark":
            n["k1"] += f.predictor.weight.numel()
            n["k2v"] += f.up_proj.weight.numel() + f.down_proj.weight.numel()
        else:
            n["gate_up"] += f.gate_proj.weight.numel() + f.up_proj.weight.numel()
            n["down"] += f.down_proj.weight.numel()
    n["head"] = model.embed.weight.numel() if model.lm_head is None else model.lm_head.weight.numel()
    if model.lm_head is not None:
        n["embed"] = model.embed.weight.numel()
    return {k: v for k, v in n.items() if v}


def bits_per_weight(fmt: str, numels: dict[str, int]) -> float:
    plan = format_plan(fmt) if fmt != "fp32" else (lambda role: "fp32")
    return sum(BITS[plan(r)] * n for r, n in numels.items()) / sum(numels.values())


def _ppl(model, data, seq_len: int, tokens: int, batch: int) -> dict:
    from sparkformer.evaluate import perplexity

    t = time.perf_counter()
    r = perplexity(model, data, "val", seq_len, batch, tokens, "cpu")["all"]
    return {"ppl": r["ppl"], "tokens": r["tokens"], "seconds": round(time.perf_counter() - t, 1)}


def _load(name: str):
    from sparkformer.data import TokenData
    from sparkformer.evaluate import eval_data_dir
    from sparkformer.loading import load_model

    loaded = load_model(name)
    return loaded, TokenData(eval_data_dir(loaded))


def model_formats(name: str, model, data, seq_len: int, tokens: int, batch: int, seq_flag: str) -> list[dict]:
    """The ``formats`` rows of one model."""
    from sparkformer.decode.layout import quantized_model

    numels = role_numels(model)
    rows = []
    cases = [("fp32", None, None), ("q8_0", "q8_0", None), ("q4_0", "q4_0", "maxabs"), ("q4_0", "q4_0", "search"),
             ("q4_1", "q4_1", "maxabs"), ("q4_1", "q4_1", "search"), *((m, m, None) for m in MIXES)]
    for label, fmt, method in cases:
        t = time.perf_counter()
        m = model if fmt is None else quantized_model(model, fmt, method=method)
        q_s = time.perf_counter() - t
        r = _ppl(m, data, seq_len, tokens, batch)
        del m
        cmd = (f"sparkformer eval --model {name} --dtype {label} --device cpu --max-tokens {tokens}{seq_flag}"
               if method != "maxabs" else
               f"(quantized_model(model, '{fmt}', method='maxabs'): llama.cpp's {fmt.upper()} rule)")
        rows.append({"model": name, "dtype": label, "method": method or ("-" if fmt is None else "default"),
                     "bits_per_weight": bits_per_weight(label, numels), **r, "quantize_s": round(q_s, 1),
                     "seq_len": seq_len, "command": cmd})
        base = rows[0]["ppl"]
        rows[-1]["ppl_change_pct"] = 100 * (r["ppl"] / base - 1)
        print(f"  {name:<14} {label:<6} {rows[-1]['method']:<8} {r['ppl']:10.4f} {rows[-1]['ppl_change_pct']:+7.2f}%"
              f"  {rows[-1]['bits_per_weight']:5.2f} bpw  ({r['seconds']:.0f}s)", file=sys.stderr, flush=True)
    return rows


def sensitivity(name: str, model, data, seq_len: int, tokens: int, batch: int, groups: int) -> list[dict]:
    """q4_0 on one role (everything else fp32), then on one group of layers (all their matrices)."""
    from sparkformer.decode.layout import quantized_model

    base = _ppl(model, data, seq_len, tokens, batch)["ppl"]
    numels = role_numels(model)
    rows = [{"model": name, "what": "fp32", "ppl": base, "tokens": tokens}]
    cases = [(f"role {r}", (lambda role, layer, r=r: "q4_0" if role == r else None), numels[r]) for r in numels]
    L = len(model.layers)
    size = math.ceil(L / groups)
    for g0 in range(0, L, size):
        g1 = min(L, g0 + size)
        cases.append((f"layers {g0}-{g1 - 1}",
                      (lambda role, layer, a=g0, b=g1: "q4_0" if layer is not None and a <= layer < b else None),
                      None))
    for what, plan, n in cases:
        r = _ppl(quantized_model(model, plan), data, seq_len, tokens, batch)
        row = {"model": name, "what": what, "ppl": r["ppl"], "ppl_change_pct": 100 * (r["ppl"] / base - 1),
               "weights": n, "tokens": r["tokens"]}
        rows.append(row)
        print(f"  {name:<14} q4_0 on {what:<16} {r['ppl']:10.4f} {row['ppl_change_pct']:+7.2f}%", file=sys.stderr,
              flush=True)
    return rows


@torch.no_grad()
def engine_gap(name: str, model, data, fmt: str, tokens: int) -> dict:
    """Teacher-forced NLL over one val window of ``tokens`` tokens: the engine (``step`` per token: int8 activations,
    bf16 cache) against the weights-only quantized model and the fp32 model on the same tokens."""
    from sparkformer.decode import make_engine
    from sparkformer.decode.layout import quantized_model

    domain = data.domains("val")[0]
    ids = torch.from_numpy(data.tokens("val", domain)[: tokens + 1].astype("int64"))
    x, y = ids[:-1], ids[1:]

    def nll(logits):
        return float(F.cross_entropy(logits.float(), y, reduction="mean"))

    ref = model(x[None]).logits[0]
    wq = quantized_model(model, fmt)(x[None]).logits[0]
    from sparkformer.ops.quant import ext_supports

    eng = make_engine(model, dtype=fmt, max_len=tokens)
    plan = format_plan(fmt)
    torch_path = not all(ext_supports(plan(r)) for r in ROLES)
    if torch_path:  # the fused C++ step takes only the formats the extension has: the per-op step
        eng.fused = False
    t0 = time.perf_counter()
    got = torch.stack([eng.step(int(t)) for t in x])
    step_ms = 1000 * (time.perf_counter() - t0) / len(x)
    out = {"model": name, "dtype": fmt, "domain": domain, "tokens": int(y.numel()),
           "dot_products": "torch (kernels' math, per-op step)" if torch_path else "C++", "step_ms": round(step_ms, 1),
           "ppl_fp32": math.exp(nll(ref)), "ppl_weights_only": math.exp(nll(wq)), "ppl_engine": math.exp(nll(got)),
           "logits_rel_diff_engine_vs_weights_only": float((got - wq).norm() / wq.norm()),
           "argmax_agreement_engine_vs_weights_only": float((got.argmax(-1) == wq.argmax(-1)).float().mean())}
    out["engine_vs_weights_only_pct"] = 100 * (out["ppl_engine"] / out["ppl_weights_only"] - 1)
    print(f"  engine {fmt}: ppl fp32 {out['ppl_fp32']:.3f}, weights-only {out['ppl_weights_only']:.3f}, engine "
          f"{out['ppl_engine']:.3f} ({out['engine_vs_weights_only_pct']:+.2f}%)", file=sys.stderr, flush=True)
    return out


def _add_arguments(ap: argparse.ArgumentParser) -> None:
    from sparkformer.bench.common import OUT_HELP

    ap.add_argument("--models", default="smollm2-135m,runs/demo,gemma3-270m")
    ap.add_argument("--max-tokens", type=int, default=8000, help="val tokens per domain (as sparkformer eval)")
    ap.add_argument("--seq-len", type=int, default=256, help="window (checkpoints: their training seq_len)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--sens-tokens", type=int, default=2000, help="tokens per domain of the sensitivity runs (0: none)")
    ap.add_argument("--sens-models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--layer-groups", type=int, default=6)
    ap.add_argument("--engine-tokens", type=int, default=384, help="teacher-forced engine check (0: none)")
    ap.add_argument("--engine-dtype", default="q4_0m,q4_1m", help="comma-separated formats of the engine check")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default="quant_quality")
    ap.add_argument("--out", default=None, help=OUT_HELP)


def add_parser(sub) -> None:
    """``sparkformer bench quant-quality``."""
    p = sub.add_parser("quant-quality", help="perplexity of each block-quantized weight format (and mix) per model")
    _add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _add_arguments(ap)
    return run(ap.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from sparkformer.bench.common import env_info, write_result

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {k: v for k, v in vars(args).items() if not callable(v)}  # the CLI's func is not a setting
    res: dict = {"benchmark": "quant-quality", "env": env_info(), "args": settings, "formats": [], "sensitivity": [],
                 "skipped": [], "engine": [], "mixes": {k: {"base": v.base, "roles": dict(v.roles), "doc": v.doc}
                                                          for k, v in MIXES.items()}}
    first = True
    for name in args.models.split(","):
        try:
            loaded, data = _load(name)
        except (FileNotFoundError, ValueError) as e:
            res["skipped"].append({"model": name, "why": str(e)})
            print(f"  {name}: skipped ({e})", file=sys.stderr)
            continue
        model = loaded.model.eval()
        ckpt = loaded.kind.startswith("checkpoint")
        seq = loaded.info.get("train", {}).get("seq_len") or args.seq_len if ckpt else args.seq_len
        flag = "" if ckpt else f" --seq-len {seq}"
        with torch.no_grad():
            res["formats"] += model_formats(name, model, data, seq, args.max_tokens, args.batch_size, flag)
            if args.sens_tokens and name in args.sens_models.split(","):
                res["sensitivity"] += sensitivity(name, model, data, seq, args.sens_tokens, args.batch_size,
                                                  args.layer_groups)
            if first and args.engine_tokens:
                res["engine"] = [engine_gap(name, model, data, f, args.engine_tokens)
                                 for f in args.engine_dtype.split(",")]
        first = False
        del loaded, model
        write_result(args.name, res, args.out)  # after each model: a partial run keeps what it measured
    print(f"\n{'model':<14} {'dtype':<6} {'scales':<8} {'bpw':>5} {'ppl':>10} {'change':>8}")
    for r in res["formats"]:
        print(f"{r['model']:<14} {r['dtype']:<6} {r['method']:<8} {r['bits_per_weight']:5.2f} {r['ppl']:10.4f} "
              f"{r['ppl_change_pct']:+7.2f}%")
    if res["sensitivity"]:
        print(f"\n{'model':<14} {'q4_0 on':<16} {'weights':>10} {'ppl':>10} {'change':>8}")
        for r in res["sensitivity"]:
            print(f"{r['model']:<14} {r['what']:<16} {r.get('weights') or '':>10} {r['ppl']:10.4f} "
                  f"{r.get('ppl_change_pct', 0.0):+7.2f}%")
    path = write_result(args.name, res, args.out)
    print(f"wrote {path}", file=sys.stderr)
    print(json_line(res))
    return 0


def json_line(res: dict) -> str:
    import json

    return json.dumps({"benchmark": res["benchmark"], "formats": [{k: r[k] for k in ("model", "dtype", "method",
                       "bits_per_weight", "ppl", "ppl_change_pct")} for r in res["formats"]],
                       "engine": res["engine"], "skipped": res["skipped"]})


if __name__ == "__main__":
    sys.exit(main())
