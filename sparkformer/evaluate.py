"""Perplexity per domain of a checkpoint on the val split of its token files.

    sparkformer eval --checkpoint runs/tiny-spark             # a run folder (its latest checkpoint) or a checkpoint
    sparkformer eval --checkpoint ... --data DIR --max-tokens 200000 --seq-len 256

Every val token stream is cut into non-overlapping windows of ``seq_len + 1`` tokens (the tail shorter than a window
is left out); perplexity is ``exp(total next-token NLL / number of predicted tokens)`` per domain, and over all
domains together. For lm-evaluation-harness see docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparkformer.data import TokenData, eval_windows


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
        out["domains"][domain] = {"loss": nll / n, "ppl": math.exp(nll / n), "tokens": n}
        tot_nll += nll
        tot_n += n
        if progress:
            print(f"  {domain:<14} loss {nll / n:.4f}  ppl {math.exp(nll / n):10.3f}  ({n:,} tokens)", file=sys.stderr)
    if tot_n == 0:
        raise ValueError(f"no {split} windows of seq_len={seq_len} in {data.dir}; lower --seq-len")
    out["all"] = {"loss": tot_nll / tot_n, "ppl": math.exp(tot_nll / tot_n), "tokens": tot_n}
    return out


def evaluate(checkpoint: str | Path, data_dir: str | Path | None = None, split: str = "val",
             seq_len: int | None = None, batch_size: int = 8, max_tokens: int | None = None,
             device: str = "auto", bf16: bool = False, progress: bool = False) -> dict:
    """Perplexity per domain of a checkpoint (or run folder); ``data_dir`` defaults to the one it trained on."""
    from sparkformer.checkpoint import load_checkpoint

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model, info = load_checkpoint(checkpoint, dev)
    data = TokenData(data_dir or info["data_dir"])
    if data.manifest["tokenizer_sha256"] != info.get("tokenizer_sha256"):
        raise ValueError(f"{data.dir} was tokenized with another tokenizer than the checkpoint's; give --data with "
                         f"the folder it trained on ({info.get('data_dir')})")
    seq_len = seq_len or info["train"].get("seq_len") or model.config.max_seq_len
    t = time.time()
    res = perplexity(model, data, split, seq_len, batch_size, max_tokens, dev, bf16, progress)
    res.update({"checkpoint": info["path"], "data_dir": str(data.dir), "split": split, "seq_len": seq_len,
                "seconds": time.time() - t})
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
    res = evaluate(args.checkpoint, args.data, args.split, args.seq_len, args.batch_size, args.max_tokens,
                   args.device, args.bf16, progress=True)
    print(f"{'domain':<14} {'tokens':>10} {'loss':>8} {'ppl':>10}")
    for d, r in res["domains"].items():
        print(f"{d:<14} {r['tokens']:>10,} {r['loss']:>8.4f} {r['ppl']:>10.3f}")
    print(f"{'all':<14} {res['all']['tokens']:>10,} {res['all']['loss']:>8.4f} {res['all']['ppl']:>10.3f}")
    print(json.dumps(res))
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("eval", help="perplexity per domain of a checkpoint on the val split",
                              description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (latest checkpoint)")
    p.add_argument("--data", default=None, help="prepared data folder (default: the one the checkpoint trained on)")
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the training seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="at most this many tokens per domain")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.set_defaults(func=_cmd_eval)
