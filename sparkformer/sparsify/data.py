"""Calibration and held-out token windows per domain, from the capability prompt sets (real text, no hub).

Calibration uses the *scoring* pool of :mod:`sparkformer.bricks.capabilities`, evaluation the *held-out* pool
(disjoint source documents), every default domain alike: code, docstrings, reference prose, drama, arithmetic.
Each domain's prompts are concatenated (EOS between them) and cut into ``(N, seq_len)`` windows, so batches need no
padding and every position is a real token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DomainWindows:
    calibration: dict[str, torch.Tensor]  # domain -> (N, T) token ids
    heldout: dict[str, torch.Tensor]

    def tokens(self, split: str) -> int:
        return sum(int(w.numel()) for w in getattr(self, split).values())

    def all(self, split: str) -> torch.Tensor:
        return torch.cat(list(getattr(self, split).values()))


def _windows(tokenizer: Any, texts: list[str], seq_len: int, max_windows: int) -> torch.Tensor:
    """Windows of the concatenated texts; a tokenizer that starts texts with a BOS token (Gemma) gets it in front of
    every window, as the model saw in training (its first position is not scored)."""
    from sparkformer.bricks.tokens import token_windows

    bos = getattr(tokenizer, "bos_id", None)
    if bos is None:
        return token_windows(tokenizer, texts, seq_len)[:max_windows]
    w = token_windows(tokenizer, texts, seq_len - 1)[:max_windows]
    return torch.cat([torch.full((w.shape[0], 1), bos, dtype=w.dtype), w], 1)


def domain_windows(tokenizer: Any, capabilities: str = "default", seq_len: int = 128, calib_windows: int = 4,
                   heldout_windows: int = 8, seed: int = 0) -> DomainWindows:
    """``calib_windows`` / ``heldout_windows`` windows of ``seq_len`` tokens per domain."""
    from sparkformer.bricks.capabilities import capability_set

    if seq_len < 8 or calib_windows < 1 or heldout_windows < 1:
        raise ValueError("seq_len >= 8, calib_windows >= 1 and heldout_windows >= 1")
    # ~4 characters per token; twice what is needed so short prompts still fill the windows
    chars = 6 * seq_len
    n_cal = 2 * calib_windows * seq_len * 4 // chars + 2
    n_held = 2 * heldout_windows * seq_len * 4 // chars + 2
    cs = capability_set(capabilities, (), n_cal, n_held, chars, seed)
    cal, held = {}, {}
    for cap in cs.capabilities:
        cal[cap] = _windows(tokenizer, [p.text for p in cs.score if p.capability == cap], seq_len, calib_windows)
        held[cap] = _windows(tokenizer, [p.text for p in cs.heldout if p.capability == cap], seq_len,
                             heldout_windows)
    return DomainWindows(cal, held)
