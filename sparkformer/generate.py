"""`sparkformer generate`: stream text from a checkpoint through the decode engine.

    sparkformer generate --checkpoint runs/demo --prompt "ROMEO:" --max-new-tokens 100 --temperature 0.8 --top-p 0.95

Prints the continuation as it is produced, then one JSON line with speed and the achieved sparsity.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from sparkformer.engine import DecodeEngine, make_engine, stop_on_strings


def generate_text(checkpoint: str, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
                  top_p: float = 0.95, dtype: str = "fp32", stop: list[str] | None = None, seed: int = 0,
                  impl: str = "auto", stream=None, device: str = "cpu") -> dict:
    """Generate from a checkpoint folder (model.safetensors + config.json + tokenizer.json). Python API of the CLI."""
    from sparkformer.tokenizer import load_tokenizer
    from sparkformer.checkpoint import load_checkpoint, resolve_checkpoint

    model, info = load_checkpoint(checkpoint)
    tok = load_tokenizer(resolve_checkpoint(checkpoint) / "tokenizer.json")
    ids = tok.encode(prompt) or [tok.eos_id]
    max_len = min(model.config.max_seq_len, len(ids) + max_new_tokens)
    if len(ids) >= model.config.max_seq_len:
        raise ValueError(f"prompt is {len(ids)} tokens; the model's context is {model.config.max_seq_len}")
    max_new_tokens = max_len - len(ids)
    if device == "cpu":
        engine = DecodeEngine.from_model(model.eval(), dtype=dtype, max_len=max_len, impl=impl)
    else:
        engine = make_engine(model.eval(), dtype, max_len, device)
    del model
    gen = torch.Generator().manual_seed(seed)
    stop_fn = stop_on_strings(tok.decode, stop) if stop else None
    out: list[int] = []
    shown = ""
    t0 = time.perf_counter()
    t_first = None
    for t in engine.generate(ids, max_new_tokens, temperature, top_p, tok.eos_id, gen, stop_fn):
        if t_first is None:
            t_first = time.perf_counter()
        out.append(t)
        if stream is not None:
            text = tok.decode(out)
            stream.write(text[len(shown):])
            stream.flush()
            shown = text
    t1 = time.perf_counter()
    text = tok.decode(out)
    if stop:
        for s in stop:
            if s in text:
                text = text[: text.index(s)]
    n = len(out)
    return {
        "prompt_tokens": len(ids), "new_tokens": n, "text": text,
        "prefill_s": (t_first or t1) - t0,
        "decode_tokens_per_s": (n - 1) / (t1 - t_first) if n > 1 and t_first else None,
        "sparsity": (engine.stats_summary() if hasattr(engine, "stats_summary")
                     else engine.stats.summary(engine.cfg.spark_ffn_dim)),
        "dtype": dtype,
    }


def _cli(args: argparse.Namespace) -> int:
    if args.stream:
        sys.stdout.write(args.prompt)
    res = generate_text(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.dtype,
                        args.stop, args.seed, args.impl, sys.stdout if args.stream else None, args.device)
    if not args.stream:
        print(args.prompt + res["text"])
    print()
    print(json.dumps(res))
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint with the decode engine (streaming)")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (latest checkpoint)")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impl", default="auto", choices=["auto", "ext", "torch", "reference"])
    p.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N for the Triton engine (needs triton)")
    p.add_argument("--no-stream", dest="stream", action="store_false")
    p.set_defaults(func=_cli)
