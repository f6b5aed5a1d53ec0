"""Recorded FFN inputs: what each FFN layer sees on real text, the data routers and predictors are fitted on.

    X = record_ffn_inputs(model, view, token_lists)   # per layer (tokens, d), the same token order in every layer
    a = layer_activation(view[3], X[3])               # that layer's activation (input of its down projection)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from sparkformer.bricks.adapter import forward_logits
from sparkformer.bricks.tokens import batches, progress_bar, real_tokens


class _Stop(Exception):
    pass


def layer_activation(layer, x: torch.Tensor) -> torch.Tensor:
    """The activation (input of the down projection) of FFN ``layer`` for inputs x (..., d), for any architecture
    :class:`~sparkformer.bricks.neurons.NeuronView` reads: runs the FFN module and stops at its down projection."""
    got: dict[str, torch.Tensor] = {}

    def pre(_mod, args):
        got["a"] = args[0]
        raise _Stop

    h = layer.down.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            p = next(layer.module.parameters())
            layer.module(x.to(p.dtype))
    except _Stop:
        pass
    finally:
        h.remove()
    if "a" not in got:
        raise RuntimeError(f"FFN layer {layer.layer} ({layer.name}) did not reach its down projection")
    return got["a"]


def record_ffn_inputs(model: nn.Module, view, token_lists: Sequence[Sequence[int]], batch_size: int = 8,
                      skip_ids: set[int] = frozenset(), dtype: torch.dtype = torch.bfloat16,
                      progress: bool = False) -> list[torch.Tensor]:
    """Per FFN layer, the inputs x (tokens, d) the FFN sees on the real tokens of ``token_lists`` (dense model),
    stored as ``dtype``; tokens come in batch order (prompts grouped by length), the same order for every layer."""
    out: list[list[torch.Tensor]] = [[] for _ in range(len(view))]
    parts: list[dict[int, torch.Tensor]] = []
    state: dict[str, torch.Tensor] = {}

    def make(i: int):
        def pre(_mod, args):
            state.setdefault("cur", {})[i] = args[0].detach()[state["valid"]].to(dtype)
        return pre

    handles = [layer.module.register_forward_pre_hook(make(layer.layer)) for layer in view]
    try:
        with torch.inference_mode():
            for idx, ids, valid in progress_bar(batches(token_lists, batch_size), None, "record", progress):
                state["valid"] = real_tokens(ids, valid, skip_ids)
                state["cur"] = {}
                forward_logits(model, ids)
                parts.append(state["cur"])
    finally:
        for h in handles:
            h.remove()
    for p in parts:
        for i, x in p.items():
            out[i].append(x)
    return [torch.cat(o) if o else torch.zeros(0, 0, dtype=dtype) for o in out]


def recorded_inputs(model: nn.Module, view, d: dict[str, Any], batch_size: int, cache: str | Path | None = None,
                    log: Callable[[str], None] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Recorded FFN inputs of the ``train`` and ``val`` token lists of ``d`` (:func:`~sparkformer.bricks.tokens.
    capability_tokens`); ``cache`` (a .safetensors path) is read when it holds the same token counts, else written
    (re-running on the same model and data then skips the forward passes)."""
    t = time.time()
    Xtr, Xva = _recorded(model, view, d, batch_size, cache)
    if log:
        log(f"recorded FFN inputs: {Xtr[0].shape[0]} train + {Xva[0].shape[0]} val tokens x {len(Xtr)} layers "
            f"({time.time() - t:.0f} s)")
    return Xtr, Xva


def _recorded(model: nn.Module, view, d: dict[str, Any], batch_size: int, cache: str | Path | None
              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    n_tr = sum(1 for tl in d["train"] for t in tl if t not in d["skip"])
    n_va = sum(1 for tl in d["val"] for t in tl if t not in d["skip"])
    if cache is not None and Path(cache).is_file():
        from safetensors.torch import load_file

        flat = load_file(str(cache))
        L = len(view)
        if all(f"train.{i}" in flat for i in range(L)) and flat["train.0"].shape[0] == n_tr \
                and flat["val.0"].shape[0] == n_va:
            return [flat[f"train.{i}"] for i in range(L)], [flat[f"val.{i}"] for i in range(L)]
    Xtr = record_ffn_inputs(model, view, d["train"], batch_size, d["skip"])
    Xva = record_ffn_inputs(model, view, d["val"], batch_size, d["skip"])
    if cache is not None:
        from safetensors.torch import save_file

        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        save_file({**{f"train.{i}": x.contiguous() for i, x in enumerate(Xtr)},
                   **{f"val.{i}": x.contiguous() for i, x in enumerate(Xva)}}, str(cache))
    return Xtr, Xva
