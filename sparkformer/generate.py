"""`sparkformer generate`: stream text from any model through a decode engine.

    sparkformer generate --model runs/demo --prompt "ROMEO:" --max-new-tokens 100 --temperature 0.8 --top-p 0.95
    sparkformer generate --model smollm2-135m --routers runs/routing/sparkify-r128 --dtype bf16 --prompt "The"

``--model`` is anything ``sparkformer.loading.load_model`` takes (a built-in name, a HF folder, a GGUF file, a
sparkformer checkpoint or run folder, a sparsified folder). Prints the continuation as it is produced, then one JSON
line with speed and the achieved sparsity.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from sparkformer.decode import IMPLS, make_engine, stop_on_strings
from sparkformer.loading import add_model_arguments, describe, load_model


def generate_text(model: str, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
                  top_p: float = 0.95, dtype: str = "fp32", stop: list[str] | None = None, seed: int = 0,
                  impl: str | None = None, stream=None, device: str = "cpu", routers: str | None = None) -> dict:
    """Generate from ``model`` (see ``load_model``) with its tokenizer. Python API of the CLI."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 is greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    loaded = load_model(model, routers=routers)
    tok = loaded.tokenizer
    if tok is None:
        raise ValueError(f"{model}: no tokenizer.json with an end-of-text token beside the model; generate needs one")
    ids = tok.encode(prompt) or [tok.eos_id]
    ctx = loaded.model.config.max_seq_len
    if len(ids) >= ctx:
        raise ValueError(f"prompt is {len(ids)} tokens; the model's context is {ctx}")
    n_new = min(max_new_tokens, ctx - len(ids))
    engine = make_engine(loaded.model.eval(), dtype, len(ids) + n_new, device, loaded.routers,
                         impl=impl)
    about = describe(loaded)
    loaded.model = None  # the engine holds its own copy of the weights
    gen = torch.Generator().manual_seed(seed)
    stop_fn = stop_on_strings(tok.decode, stop) if stop else None
    out: list[int] = []
    shown = ""
    t0 = time.perf_counter()
    t_first = None
    for t in engine.generate(ids, n_new, temperature, top_p, tok.eos_id, gen, stop_fn):
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
    for s in stop or []:
        if s and s in text:
            text = text[: text.index(s)]
    n = len(out)
    stopped = ("eos" if out and out[-1] == tok.eos_id else "stop" if stop_fn and stop_fn(out)
               else "context_full" if n_new < max_new_tokens and n == n_new else "max_new_tokens")
    return {
        "model": about, "prompt_tokens": len(ids), "new_tokens": n, "text": text, "stopped": stopped,
        "prefill_s": (t_first or t1) - t0,
        "decode_tokens_per_s": (n - 1) / (t1 - t_first) if n > 1 and t_first else None,
        "sparsity": engine.stats.summary(), "dtype": dtype, "device": device,
    }


def _cli(args: argparse.Namespace) -> int:
    if args.stream:
        sys.stdout.write(args.prompt)
    res = generate_text(args.model, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.dtype,
                        args.stop, args.seed, args.impl, sys.stdout if args.stream else None, args.device,
                        args.routers)
    if not args.stream:
        print(args.prompt + res["text"])
    print()
    if res["stopped"] == "context_full":
        print(f"generate: stopped after {res['new_tokens']} tokens: the model's context is full", file=sys.stderr)
    print(json.dumps(res))
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a model with the decode engine (streaming)")
    add_model_arguments(p)
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impl", default=None, choices=list(IMPLS), help="CPU kernels (default auto)")
    p.add_argument("--no-stream", dest="stream", action="store_false")
    p.set_defaults(func=_cli)
