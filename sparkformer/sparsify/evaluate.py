"""Held-out perplexity per domain of a model with a sparsity spec and/or FFN routers applied, and the sparsity it
achieved there (the training form: masks, so the numbers are exact and the speed is not measured here)."""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F

from sparkformer.sparsity import SparseSpec, SparsityMeter, achieved_sparsity, sparse_forward


@torch.no_grad()
def heldout_eval(model, windows: dict[str, torch.Tensor], spec: SparseSpec | None = None, routers=None,
                 batch: int | None = None) -> dict[str, Any]:
    """Next-token loss over every window position but the first, per domain and overall (token-weighted).
    ``batch``: windows per forward (default: as many as keep the fp32 logits under ~1 GB; 262k vocabularies)."""
    if batch is None:
        T = next(iter(windows.values())).shape[1]
        batch = max(1, min(8, int(1e9 // (4 * T * model.config.vocab_size))))
    meter = SparsityMeter()
    per: dict[str, float] = {}
    tot_loss, tot_n = 0.0, 0
    kept = total = 0.0
    with ExitStack() as stack:
        if spec is not None:
            stack.enter_context(sparse_forward(model, spec, meter))
        stats = None
        if routers is not None:
            from sparkformer.bricks.routing import route

            stats = stack.enter_context(route(model, routers))
        for dom, w in windows.items():
            loss_d, n_d = 0.0, 0
            for s in range(0, w.shape[0], batch):
                x = w[s: s + batch]
                logits = model(x[:, :-1]).logits.float()
                loss_d += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="sum"))
                n_d += x[:, 1:].numel()
            per[dom] = math.exp(loss_d / n_d)
            tot_loss += loss_d
            tot_n += n_d
        if stats is not None:
            kept, total = sum(stats.kept), sum(stats.total)
    out = {"loss": tot_loss / tot_n, "ppl": math.exp(tot_loss / tot_n), "tokens": tot_n, "per_domain": per}
    if spec is not None:
        out["achieved"] = achieved_sparsity(model, meter)
        out["site_zeros"] = meter.per_layer(len(model.layers))
    if routers is not None:
        out["neurons_kept"] = kept / total if total else None
    return out
