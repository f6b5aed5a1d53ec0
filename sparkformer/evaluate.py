"""Perplexity per domain of any model on the val split of token files.

    sparkformer eval --model runs/tiny-spark                  # a run folder (its latest checkpoint) or a checkpoint
    sparkformer eval --model runs/tiny-spark --data DIR --max-tokens 200000 --seq-len 256
    sparkformer eval --model smollm2-135m --routers runs/routing/sparkify-r128 --max-tokens 50000

``--model`` is anything ``sparkformer.loading.load_model`` takes. A checkpoint is evaluated on the data it trained on
(or ``--data``); any other model on the default corpora prepared with its own tokenizer (cached), or ``--data``
prepared with it. Routers (``--routers`` or a sparsified folder) run in the training form (``bricks.routing.route``),
which the decode engines equal.

Every val token stream is cut into non-overlapping windows of ``seq_len + 1`` tokens (the tail shorter than a window
is left out); perplexity is ``exp(total next-token NLL / number of predicted tokens)`` per domain, and over all
domains together. For lm-evaluation-harness see docs/training.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparkformer.config import int_at_least
from sparkformer.data import TokenData, eval_windows
from sparkformer.loading import add_model_arguments


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: TokenData, split: str = "val", seq_len: int = 256,
               batch_size: int = 8, max_tokens: int | None = None, device: str | torch.device = "cpu",
               bf16: bool = False, progress: bool = False) -> dict:
    """``{"domains": {domain: {"loss", "ppl", "tokens"}}, "all": {...}}`` over ``split`` (max_tokens per domain)."""
    cfg = getattr(model, "config", None)
    if cfg is not None:
        data.check_model_vocab(cfg.vocab_size)
        if seq_len > cfg.max_seq_len:
            raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={cfg.max_seq_len}; lower --seq-len")
    model.eval().to(device)
    out: dict = {"domains": {}}
    tot_nll, tot_n = 0.0, 0
    bar = None
    if progress:  # it can run for minutes: one bar over every window of every domain
        from tqdm.auto import tqdm

        n_win = sum(len(eval_windows(data.tokens(split, d)[: None if max_tokens is None else max_tokens + 1], seq_len))
                    for d in data.domains(split))
        bar = tqdm(total=n_win, desc=f"eval {split}", unit="window", file=sys.stderr, leave=False, dynamic_ncols=True)
    for domain in data.domains(split):
        toks = data.tokens(split, domain)
        if max_tokens is not None:
            toks = toks[: max_tokens + 1]
        starts = eval_windows(toks, seq_len)
        if len(starts) == 0:
            print(f"eval: {split}/{domain} has {len(toks)} tokens, fewer than seq_len+1={seq_len + 1}; skipped",
                  file=sys.stderr)
            continue
        nll, n = 0.0, 0
        for i in range(0, len(starts), batch_size):
            chunk = starts[i: i + batch_size]
            w = np.stack([toks[s: s + seq_len + 1] for s in chunk]).astype(np.int64)
            x = torch.from_numpy(w[:, :-1]).to(device)
            y = torch.from_numpy(w[:, 1:]).to(device)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x).logits
            nll += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
            n += y.numel()
            if bar is not None:
                bar.update(len(chunk))
                bar.set_postfix(domain=domain, loss=f"{nll / n:.3f}")
        out["domains"][domain] = {"loss": nll / n, "ppl": math.exp(nll / n), "tokens": n}
        tot_nll += nll
        tot_n += n
        if bar is not None:
            bar.write(f"  {domain:<14} loss {nll / n:.4f}  ppl {math.exp(nll / n):10.3f}  ({n:,} tokens)")
    if bar is not None:
        bar.close()
    if tot_n == 0:
        raise ValueError(f"no {split} windows of seq_len={seq_len} in {data.dir}; lower --seq-len")
    out["all"] = {"loss": tot_nll / tot_n, "ppl": math.exp(tot_nll / tot_n), "tokens": tot_n}
    return out


def eval_data_dir(loaded, data_dir: str | Path | None = None, progress: bool = False) -> Path:
    """The prepared data a loaded model is evaluated on: ``data_dir``, else a checkpoint's training data, else the
    default corpora tokenized with the model's tokenizer (prepared once, cached)."""
    if data_dir is not None:
        return Path(data_dir)
    if loaded.kind.startswith("checkpoint"):
        return Path(loaded.info["data_dir"])
    if loaded.tokenizer_file is None:
        raise ValueError(f"{loaded.info.get('name', 'this model')}: no tokenizer.json beside the model to tokenize the "
                         "evaluation text; give --data with a folder prepared with this model's tokenizer "
                         "(sparkformer data prepare --tokenizer)")
    import hashlib

    from sparkformer.data import prepare
    from sparkformer.paths import cache_dir

    sha = hashlib.sha256(Path(loaded.tokenizer_file).read_bytes()).hexdigest()[:12]
    return Path(prepare(out=cache_dir("data", f"eval-{sha}"), tokenizer=loaded.tokenizer_file, quiet=not progress))


def evaluate(model: str | Path, data_dir: str | Path | None = None, split: str = "val",
             seq_len: int | None = None, batch_size: int = 8, max_tokens: int | None = None,
             device: str = "auto", bf16: bool = False, progress: bool = False, routers: str | Path | None = None,
             weights: str | None = None) -> dict:
    """Perplexity per domain of ``model`` (see ``sparkformer.loading.load_model``); ``data_dir`` defaults to the
    data a checkpoint trained on, or for other models to the default corpora tokenized with the model's tokenizer.
    ``weights``: a block-quantized format (q8_0, q4_0) or mix (q4_0m): the model runs with the weights the quantized
    decode engine reads (``decode.layout.quantized_model``; weights only: the engine also rounds activations)."""
    from sparkformer.loading import describe, load_model

    for name, v in (("seq_len", seq_len), ("max_tokens", max_tokens), ("batch_size", batch_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name}={v!r}: must be an integer >= 1")
    from sparkformer.decode import QUANT_FORMATS

    if weights is not None and weights not in QUANT_FORMATS:
        raise ValueError(f"weights={weights!r}: a quantized format is one of {', '.join(QUANT_FORMATS)}")
    if weights is not None and routers is not None:
        raise ValueError(f"routed (sparkified) FFN layers do not run in {weights} yet; drop --routers or the format")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    loaded = load_model(model, routers=routers)
    if weights is not None:
        from sparkformer.decode.layout import quantized_model

        loaded.model = quantized_model(loaded.model, weights)
    info = loaded.info
    data_dir = eval_data_dir(loaded, data_dir, progress)
    data = TokenData(data_dir)
    if "tokenizer_sha256" in info and data.manifest["tokenizer_sha256"] != info.get("tokenizer_sha256"):
        raise ValueError(f"{data.dir} was tokenized with another tokenizer than the checkpoint's; give --data with "
                         f"the folder it trained on ({info.get('data_dir')})")
    seq_len = seq_len or info.get("train", {}).get("seq_len") or min(512, loaded.model.config.max_seq_len)
    t = time.time()
    with contextlib.ExitStack() as stack:  # routers and thresholds run in the training form (masks)
        if loaded.routers is not None:
            from sparkformer.bricks.routing import route

            stack.enter_context(route(loaded.model, loaded.routers))
        meter = None
        if loaded.sparsity is not None:
            from sparkformer.sparsity import SparsityMeter, achieved_sparsity, sparse_forward

            meter = stack.enter_context(sparse_forward(loaded.model, loaded.sparsity, SparsityMeter()))
        res = perplexity(loaded.model, data, split, seq_len, batch_size, max_tokens, dev, bf16, progress)
    if meter is not None:
        res["achieved_sparsity"] = achieved_sparsity(loaded.model, meter)
    res.update({"model": describe(loaded), "data_dir": str(data.dir), "split": split, "seq_len": seq_len,
                "weights": weights or ("bf16 autocast" if bf16 else "fp32"), "seconds": time.time() - t})
    if "path" in info:
        res["checkpoint"] = info["path"]
    return res


def hf_model_and_tokenizer(checkpoint: str | Path):
    """``(SparkForCausalLM, PreTrainedTokenizerFast)`` of a checkpoint, for HF tools such as lm-evaluation-harness
    (``HFLM(pretrained=model, tokenizer=tokenizer)``); needs transformers."""
    from transformers import PreTrainedTokenizerFast

    from sparkformer.hf import to_hf
    from sparkformer.checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    model, _ = load_checkpoint(path)
    from sparkformer.tokenizer import load_tokenizer

    eos = load_tokenizer(path / "tokenizer.json").eos_token
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), eos_token=eos, pad_token=eos)
    hf = to_hf(model).eval()
    hf.config.eos_token_id = hf.config.pad_token_id = tok.eos_token_id
    return hf, tok


def _cmd_eval(args: argparse.Namespace) -> int:
    res = evaluate(args.model, args.data, args.split, args.seq_len, args.batch_size, args.max_tokens,
                   args.device, args.bf16 or args.dtype == "bf16", progress=True, routers=args.routers,
                   weights=args.dtype if args.dtype not in ("fp32", "bf16") else None)
    print(f"{'domain':<14} {'tokens':>10} {'loss':>8} {'ppl':>10}")
    for d, r in res["domains"].items():
        print(f"{d:<14} {r['tokens']:>10,} {r['loss']:>8.4f} {r['ppl']:>10.3f}")
    print(f"{'all':<14} {res['all']['tokens']:>10,} {res['all']['loss']:>8.4f} {res['all']['ppl']:>10.3f}")
    print(json.dumps(res))
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("eval", help="perplexity per domain of a model on the val split",
                              description=__doc__.splitlines()[0])
    from sparkformer.decode.protocol import QUANT_FORMATS

    add_model_arguments(p, ("fp32", "bf16", *QUANT_FORMATS), device="auto")
    p.add_argument("--data", default=None, help="prepared data folder (default: the one the checkpoint trained on)")
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--seq-len", type=int_at_least(1), default=None,
                   help="window length (default: the training seq_len)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8)
    p.add_argument("--max-tokens", type=int_at_least(1), default=None, help="at most this many tokens per domain")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (the same as --dtype bf16)")
    p.set_defaults(func=_cmd_eval)
