"""Text to token ids and padded batches: the one place the brick tools tokenize.

Works with a Hugging Face tokenizer (special tokens such as Gemma's <bos> are added) and with a plain ``encode``
(a sparkformer :class:`~sparkformer.tokenizer.Tokenizer` or a ``tokenizers`` object), used as is.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Iterator, Sequence

import torch


def encode(tokenizer: Any, texts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
    """Token ids per text, cut to ``max_tokens`` (None: whole texts)."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer (a sparkformer checkpoint needs tokenizer.json beside it)")
    if hasattr(tokenizer, "batch_decode") and callable(tokenizer):  # transformers tokenizer
        ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    else:
        ids = [tokenizer.encode(t) for t in texts]
    return [list(x if max_tokens is None else x[:max_tokens]) for x in ids]


def special_ids(tokenizer: Any) -> set[int]:
    ids = getattr(tokenizer, "all_special_ids", None)
    return set(int(i) for i in ids) if ids else set()


def eos_id(tokenizer: Any) -> int | None:
    for attr in ("eos_token_id", "eos_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return None


def token_windows(tokenizer: Any, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """(N, seq_len) windows cut from the texts' tokens concatenated (separated by EOS when the tokenizer has one)."""
    sep = eos_id(tokenizer)
    stream: list[int] = []
    for ids in encode(tokenizer, texts):
        stream.extend(ids)
        if sep is not None:
            stream.append(sep)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"the texts give {len(stream)} tokens, fewer than one window of seq_len={seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def batches(token_lists: Sequence[Sequence[int]], batch_size: int
            ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(indices, ids (B, T), valid (B, T) bool), right-padded with 0; prompts are grouped by length."""
    order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        T = max(len(token_lists[i]) for i in idx)
        ids = torch.zeros(len(idx), T, dtype=torch.long)
        valid = torch.zeros(len(idx), T, dtype=torch.bool)
        for r, i in enumerate(idx):
            n = len(token_lists[i])
            ids[r, :n] = torch.tensor(token_lists[i], dtype=torch.long)
            valid[r, :n] = True
        yield idx, ids, valid


def capability_tokens(tokenizer: Any, capset: Any, max_tokens: int, val_every: int = 10) -> dict[str, Any]:
    """The prompts of a :class:`~sparkformer.bricks.capabilities.CapabilitySet` as token lists: ``train`` (scoring
    prompts but every ``val_every``-th), ``val`` (those), ``heldout`` (held-out prompts of at least 2 tokens), and
    ``skip`` (the special token ids), with the capabilities, their descriptions and token / prompt counts."""
    score = encode(tokenizer, [p.text for p in capset.score], max_tokens)
    held = encode(tokenizer, [p.text for p in capset.heldout], max_tokens)
    val = [t for i, t in enumerate(score) if i % val_every == val_every - 1]
    train = [t for i, t in enumerate(score) if i % val_every != val_every - 1]
    held = [t for t in held if len(t) >= 2]
    return {"train": train, "val": val, "heldout": held, "skip": special_ids(tokenizer),
            "capabilities": capset.capabilities, "descriptions": capset.description,
            "tokens": {"train": sum(map(len, train)), "val": sum(map(len, val)), "heldout": sum(map(len, held))},
            "prompts": {"train": len(train), "val": len(val), "heldout": len(held)}}


def real_tokens(ids: torch.Tensor, valid: torch.Tensor, skip_ids: set[int]) -> torch.Tensor:
    """``valid`` without the positions holding one of ``skip_ids`` (special tokens such as <bos>)."""
    if not skip_ids:
        return valid
    return valid & ~torch.isin(ids, torch.tensor(sorted(skip_ids)))


def progress_bar(iterable: Iterable, total: int | None, desc: str, enabled: bool) -> Iterable:
    """``iterable`` with a tqdm bar when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """sha256 of the vocabulary (token -> id, added tokens included); None without a tokenizer or when the
    tokenizer does not expose its vocabulary (then compatibility cannot be checked and is not)."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend", None)  # sparkformer Tokenizer
    if backend is not None and hasattr(backend, "get_vocab"):
        vocab = backend.get_vocab(with_added_tokens=True)
    elif hasattr(tokenizer, "get_vocab"):
        vocab = tokenizer.get_vocab()
    else:
        return None
    blob = json.dumps(sorted((str(k), int(v)) for k, v in vocab.items()), separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
