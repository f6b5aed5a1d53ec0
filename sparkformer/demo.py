"""`sparkformer demo` (what `make demo` runs): the main job end to end on the embedded defaults.

Today: the FLOPs/bytes accounting for the Gemma-2 2B shape, then a small Spark model and its dense twin on the same
tokens, with the achieved sparsity of every layer, and a generation through the KV cache. (It grows into
prepare -> train -> eval -> generate as the training pipeline lands.)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sparkformer.config import get_preset
from sparkformer.flops import compare, format_table
from sparkformer.model import SparkLM


def run_demo(preset: str = "tiny", seq: int = 256) -> dict:
    res = compare(get_preset("gemma2-2b"), 4096, "bf16")
    print(format_table(res))
    print()
    out = {"gemma2_2b_flops_ratio": res["flops_ratio"], "gemma2_2b_ideal_decode_speedup": res["ideal_decode_speedup"]}
    torch.manual_seed(0)
    ids = torch.randint(0, get_preset(preset).vocab_size, (4, seq))
    for kind in ("dense", "spark"):
        cfg = get_preset(f"{preset}-{kind}")
        model = SparkLM(cfg).eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            loss = model(ids[:, :-1], targets=ids[:, 1:]).loss.item()
        dt = time.perf_counter() - t0
        stats = model.sparsity_stats()
        print(f"{preset}-{kind}: {model.num_parameters():,} params, loss {loss:.3f} (random init), forward {dt * 1e3:.0f} ms")
        if kind == "spark":
            print("  FFN neurons active per layer: " + ", ".join(f"{a:.3f}" for a in stats["ffn_activity"]))
            print("  keys kept per query per layer: " + ", ".join(f"{k:.1f}" for k in stats["keys_per_query"]))
            gen = model.generate(ids[:1, :8], max_new_tokens=16)
            print(f"  greedy continuation (token ids): {gen[0, 8:].tolist()}")
            out.update(ffn_activity=stats["ffn_activity"], keys_per_query=stats["keys_per_query"])
        out[f"{kind}_params"] = model.num_parameters()
    return out


def _cli(args: argparse.Namespace) -> int:
    print(json.dumps(run_demo(args.preset)))
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("demo", help="the main job end to end on the embedded defaults (what `make demo` runs)")
    p.add_argument("--preset", default="tiny")
    p.set_defaults(func=_cli)
