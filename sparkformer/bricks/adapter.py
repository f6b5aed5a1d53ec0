"""What the brick tools need to know about a model's kind, asked in one place.

A model is our :class:`~sparkformer.model.SparkLM` or a Hugging Face causal LM. Everything that differs between
the two (how to call it, where its embeddings, final norm and decoder blocks are, what its architecture is called)
is answered here, by ``isinstance`` on our classes, so no other bricks module tests class names.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.nn as nn

from sparkformer.model import Attention, SparkLM, TopKFFN


def is_sparkformer(model: nn.Module) -> bool:
    """True for our SparkLM (any FFN / attention kind), False for a Hugging Face model."""
    return isinstance(model, SparkLM)


def is_topk_ffn(module: nn.Module) -> bool:
    """Our TopKFFN: a plain FFN (up/down) with top-k on its activation."""
    return isinstance(module, TopKFFN)


def is_sparkformer_attention(module: nn.Module) -> bool:
    """Our Attention, which keeps its block index in ``.layer`` (its KV-cache slot)."""
    return isinstance(module, Attention)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D (weight stored as (in, out)); by name, since transformers is an optional dependency."""
    return type(module).__name__ == "Conv1D"


def architecture(model: nn.Module) -> str:
    """A short name: the HF ``model_type`` (e.g. 'llama'), or 'sparkformer' for our SparkLM."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(mt, str):
        return mt
    return "sparkformer" if is_sparkformer(model) else type(model).__name__


def forward_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of an HF causal LM or our SparkLM. Right padding needs no attention mask: attention is causal."""
    if is_sparkformer(model):
        return model(ids).logits
    return model(input_ids=ids, use_cache=False).logits


def input_embeddings(model: nn.Module) -> nn.Module:
    """The token embedding module."""
    return model.embed if is_sparkformer(model) else model.get_input_embeddings()


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm before the LM head (its output is the final hidden state), or None when it is not found."""
    if is_sparkformer(model):
        return model.final_norm
    return getattr(getattr(model, "model", None), "norm", None)


def decoder_blocks(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute, ModuleList) of the decoder blocks."""
    if is_sparkformer(model):
        return model, "layers", model.layers
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner, "layers", inner.layers
    raise ValueError(f"{architecture(model)}: no decoder blocks at model.model.layers (HF Llama-family) and not a "
                     "sparkformer SparkLM")


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What a brick needs from its base: architecture name, shapes of every parameter, a digest of the shapes."""
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    blob = json.dumps(sorted(shapes.items()), separators=(",", ":"))
    return {"architecture": architecture(model), "shapes_sha256": hashlib.sha256(blob.encode()).hexdigest()}
