"""Rotary position embeddings (rotate-half, as HF Gemma): the tables and their application."""

from __future__ import annotations

import torch

__all__ = ["apply_rope", "rope_tables"]


def rope_tables(dim: int, pos0: int, length: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (length, dim) for positions pos0 .. pos0+length-1 of one rotary space of ``dim`` dims."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    t = torch.arange(pos0, pos0 + length, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (as HF Gemma) of x (..., T, dim) with tables (T, dim)."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)
