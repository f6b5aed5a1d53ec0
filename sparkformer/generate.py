"""`sparkformer generate`: stream text from any model through a decode engine.

    sparkformer generate --model runs/demo --prompt "ROMEO:" --max-new-tokens 100 --temperature 0.8 --top-p 0.95
    sparkformer generate --model smollm2-135m --routers runs/routing/sparkify-r128 --dtype bf16 --prompt "The"

``--model`` is anything ``sparkformer.loading.load_model`` takes (a built-in name, a HF folder, a GGUF file, a
sparkformer checkpoint or run folder, a sparsified folder). Prints the continuation as it is produced, then one JSON
line with speed and the achieved sparsity. Every option is checked, the model loaded and the engine built before
the prompt is echoed, so an error is one line of its own. What is streamed is exactly the reported ``text``: text
that could still turn into a stop string is held back until it cannot, and the stop string is never shown.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import sys
import time

import torch

from sparkformer.config import int_at_least, number_in
from sparkformer.decode import IMPLS, check_device, make_engine, stop_on_strings
from sparkformer.loading import add_model_arguments, describe, load_model


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, stop: list[str] | None) -> None:
    """Refuse sampling settings that would silently misbehave (each error names the option and the value)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r}: must be a finite number >= 0 (0 is greedy)")
    if not (isinstance(top_p, numbers.Real) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p={top_p!r}: must be in (0, 1]")
    for st in stop or []:
        if not isinstance(st, str) or not st:
            raise ValueError(f"stop={st!r}: a stop string must be non-empty text (an empty one would stop at once)")


def _visible(text: str, stop: list[str] | None, final: bool) -> str:
    """The part of ``text`` that is sure to be in the answer: cut at the first stop string; until the end, without
    a tail that could still grow into a stop string, or an incomplete UTF-8 character."""
    cuts = [text.index(st) for st in stop or [] if st in text]
    if cuts:
        return text[: min(cuts)]
    if final:
        return text
    hold = max((len(st) for st in stop or []), default=1) - 1
    return text[: len(text) - hold].rstrip("\ufffd")


def generate_text(model: str, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
                  top_p: float = 0.95, dtype: str = "fp32", stop: list[str] | None = None, seed: int = 0,
                  impl: str | None = None, stream=None, device: str = "cpu", routers: str | None = None,
                  echo_prompt: bool = False) -> dict:
    """Generate from ``model`` (see ``load_model``) with its tokenizer. Python API of the CLI.

    ``stream``: a text file that gets the continuation as it is produced (the prompt first with ``echo_prompt``),
    exactly the returned ``text``. ``stopped`` says why generation ended: eos, stop, max_new_tokens, or
    context_full (the model's context ended it before max_new_tokens)."""
    check_sampling(max_new_tokens, temperature, top_p, stop)
    check_device(device)  # before the (possibly slow) load
    loaded = load_model(model, routers=routers)
    tok = loaded.tokenizer
    if tok is None:
        raise ValueError(f"{model}: no tokenizer.json with an end-of-text token beside the model; generate needs one")
    ids = tok.encode(prompt)
    bos = getattr(tok, "bos_id", None)
    ids = ([bos] if bos is not None else []) + ids or [tok.eos_id]
    ctx = loaded.model.config.max_seq_len
    if len(ids) >= ctx:
        raise ValueError(f"the prompt is {len(ids)} tokens and the model's context is {ctx}: shorten it to at most "
                         f"{ctx - 1} tokens")
    n_new = min(max_new_tokens, ctx - len(ids))
    engine = make_engine(loaded.model.eval(), dtype, len(ids) + n_new, device, loaded.routers,
                         sparsity=loaded.sparsity, impl=impl)
    about = describe(loaded)
    loaded.model = None  # the engine holds its own copy of the weights
    gen = torch.Generator().manual_seed(seed)
    stop_fn = stop_on_strings(tok.decode, stop) if stop else None
    out: list[int] = []
    shown = ""
    if stream is not None and echo_prompt:
        stream.write(prompt)
        stream.flush()
    t0 = time.perf_counter()
    t_first = None
    for t in engine.generate(ids, n_new, temperature, top_p, tok.eos_id, gen, stop_fn):
        if t_first is None:
            t_first = time.perf_counter()
        out.append(t)
        if stream is not None:
            shown = _show(stream, shown, _visible(tok.decode(out), stop, final=False))
    t1 = time.perf_counter()
    text = _visible(tok.decode(out), stop, final=True)
    if stream is not None:
        _show(stream, shown, text)
    n = len(out)
    stopped = ("eos" if out and out[-1] == tok.eos_id else "stop" if stop_fn and stop_fn(out)
               else "context_full" if n_new < max_new_tokens and n == n_new else "max_new_tokens")
    return {
        "model": about, "prompt_tokens": len(ids), "new_tokens": n, "text": text, "stopped": stopped,
        "prefill_s": (t_first or t1) - t0,
        "decode_tokens_per_s": (n - 1) / (t1 - t_first) if n > 1 and t_first else None,
        "sparsity": engine.stats.summary(), "dtype": dtype, "device": device,
    }


def _show(stream, shown: str, visible: str) -> str:
    """Write what ``visible`` adds to ``shown``; returns what is shown now."""
    if len(visible) > len(shown) and visible.startswith(shown):
        stream.write(visible[len(shown):])
        stream.flush()
        return visible
    return shown


def _cli(args: argparse.Namespace) -> int:
    res = generate_text(args.model, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.dtype,
                        args.stop, args.seed, args.impl, sys.stdout if args.stream else None, args.device,
                        args.routers, echo_prompt=True)
    if not args.stream:
        print(args.prompt + res["text"])
    print()
    if res["stopped"] == "context_full":
        print(f"generate: stopped after {res['new_tokens']} of --max-new-tokens {args.max_new_tokens}: the model's "
              f"context ({res['prompt_tokens'] + res['new_tokens']} tokens) is full", file=sys.stderr)
    print(json.dumps(res))
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a model with the decode engine (streaming)")
    add_model_arguments(p)
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=100)
    p.add_argument("--temperature", type=number_in(0.0), default=0.8, help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-p", type=number_in(0.0, 1.0, lo_open=True), default=0.95,
                   help="nucleus sampling mass, in (0, 1] (default: %(default)s)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impl", default=None, choices=list(IMPLS), help="CPU kernels (default auto)")
    p.add_argument("--no-stream", dest="stream", action="store_false")
    p.set_defaults(func=_cli)
