"""Pointwise functions the model and the decode paths share: the FFN activations and Gemma-2's logit soft-cap."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "gelu_tanh", "softcap"]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (Gemma's FFN activation)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu_tanh": gelu_tanh, "silu": F.silu}  # config name -> function (``ModelConfig.ffn_activation``)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma-2 logit soft-cap ``cap * tanh(x / cap)``; identity when ``cap`` is None."""
    return x if cap is None else torch.tanh(x / cap) * cap
