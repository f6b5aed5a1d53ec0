"""Byte-level BPE tokenizer (HF ``tokenizers``): train one on a corpus, or load an existing tokenizer.json / HF dir.

    >>> tok = train_bpe(texts, vocab_size=8192)
    >>> tok.save(data_dir / "tokenizer.json")
    >>> tok = load_tokenizer(data_dir / "tokenizer.json")   # or an HF tokenizer folder
    >>> tok.decode(tok.encode("To be, or not to be")) == "To be, or not to be"
    True
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

from sparkformer.config import read_json

EOS_TOKEN = "<|endoftext|>"
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>")


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("the data pipeline needs HF tokenizers: pip install 'sparkformer[data]'") from None
    return tokenizers


class Tokenizer:
    """A thin wrapper: ``encode`` / ``decode`` / ``vocab_size`` / ``eos_id`` / ``sha256`` over ``tokenizers.Tokenizer``."""

    def __init__(self, backend, eos_token: str | None = None):
        self.backend = backend
        vocab = backend.get_vocab(with_added_tokens=True)
        if eos_token is None:
            eos_token = next((t for t in _EOS_CANDIDATES if t in vocab), None)
        if eos_token is None or eos_token not in vocab:
            raise ValueError(f"tokenizer has no end-of-text token (looked for {eos_token or list(_EOS_CANDIDATES)}); "
                             "documents are separated by one, so add it as a special token")
        self.eos_token = eos_token
        self.eos_id = int(vocab[eos_token])
        # the token the tokenizer's own post-processor puts first (Gemma's <bos>): models trained with it expect it
        # at the start of a text; None when it adds nothing (GPT-2 style BPEs, SmolLM2)
        plain, full = (backend.encode("a", add_special_tokens=s).ids for s in (False, True))
        self.bos_id = int(full[0]) if len(full) == len(plain) + 1 and full[1:] == plain else None

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_str(self) -> str:
        return self.backend.to_str()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_str().encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_str(), encoding="utf-8")
        tmp.replace(path)
        return path

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}:{self.eos_id})"


def check_vocab_size(vocab_size: int) -> None:
    """A byte-level BPE needs at least 257 entries (256 bytes + ``<|endoftext|>``)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 257 <= vocab_size <= 2**32 - 1:
        raise ValueError(f"vocab_size={vocab_size!r}: a byte-level BPE needs an integer >= 257 (256 bytes + "
                         "<|endoftext|>)")


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenizer, all 256 bytes in the alphabet, ``<|endoftext|>`` = id 0).

    A small corpus may end with fewer than ``vocab_size`` entries (no more pairs to merge); ``vocab_size`` of the
    result is what counts.
    """
    check_vocab_size(vocab_size)
    tk = _tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tk.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer, length=length)
    return Tokenizer(backend, EOS_TOKEN)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A ``tokenizer.json`` file, or a folder with one (an HF tokenizer folder; its ``tokenizer_config.json``
    names the EOS token). Folders without ``tokenizer.json`` (slow tokenizers) are converted via transformers."""
    tk = _tokenizers()
    path = Path(path).expanduser()
    eos = None
    if path.is_dir():
        cfg = path / "tokenizer_config.json"
        if cfg.exists():
            e = read_json(cfg).get("eos_token")
            eos = e.get("content") if isinstance(e, dict) else e
        if (path / "tokenizer.json").exists():
            return Tokenizer(_from_file(tk, path / "tokenizer.json"), eos)
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ValueError(f"{path} has no tokenizer.json; converting a slow HF tokenizer needs transformers") from None
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True, trust_remote_code=False)
        if not getattr(hf, "is_fast", False):
            raise ValueError(f"{path}: could not get a fast tokenizer (tokenizer.json) out of this folder")
        return Tokenizer(hf.backend_tokenizer, eos or hf.eos_token)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {path} does not exist (give a tokenizer.json or an HF tokenizer folder)")
    return Tokenizer(_from_file(tk, path), eos)


def _from_file(tk, path: Path):
    try:
        return tk.Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a valid tokenizer.json ({why})") from None


def check_vocab(model_vocab_size: int, tokenizer_vocab_size: int, where: str = "") -> None:
    """Model and tokenizer must agree on the vocabulary size (token ids index the embedding table)."""
    if model_vocab_size != tokenizer_vocab_size:
        raise ValueError(
            f"vocabulary mismatch{' (' + where + ')' if where else ''}: the model has vocab_size={model_vocab_size} "
            f"but the tokenizer has {tokenizer_vocab_size} tokens; set model.vocab_size={tokenizer_vocab_size} (or leave "
            "it out to take the tokenizer's), or prepare the data with a matching --vocab-size / --tokenizer")
