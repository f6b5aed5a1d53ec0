"""Causal tracing of FFN layers (Meng et al. 2022): where a model recalls a fact, the layer ROME edits.

Corrupt the subject's token embeddings with noise, restore the clean FFN output at the subject's last token in a
window of layers, and measure how much of P(true object) comes back; windows that contain the first FFN are not
candidates, since restoring it restores the corrupted token embedding itself.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from sparkformer.bricks.adapter import forward_logits, input_embeddings
from sparkformer.bricks.facts import Fact, first_target_token, subject_last_index, token_ids
from sparkformer.bricks.neurons import find_ffn_layers


@torch.no_grad()
def trace_layers(model: nn.Module, tokenizer: Any, facts: Sequence[Fact], noise: float = 3.0, samples: int = 4,
                 window: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Causal tracing of the FFN: per layer, the average indirect effect on P(true object's first token) of
    restoring the clean FFN outputs at the subject's last token (in a window of layers centred there) while the
    subject's token embeddings are corrupted with Gaussian noise of ``noise`` x the embeddings' std."""
    layers = find_ffn_layers(model)
    L = len(layers)
    window = window or max(1, L // 6)
    emb = input_embeddings(model)
    std = float(emb.weight.detach().float().std())
    gen = torch.Generator().manual_seed(seed)
    effects = torch.zeros(L)
    used = 0
    for fact in facts:
        text = fact.text()
        ids = torch.tensor([token_ids(tokenizer, text)])
        last = subject_last_index(tokenizer, fact.prompt, fact.subject)
        head = fact.prompt[: fact.prompt.index("{}")].rstrip()
        first = len(token_ids(tokenizer, head)) if head else 0
        first = min(first, last)
        tgt = first_target_token(tokenizer, text, fact.target_true)
        clean: dict[int, torch.Tensor] = {}
        hs = [ly.down.register_forward_hook(lambda _m, _a, o, i=ly.layer: clean.__setitem__(i, o[0, last].clone()))
              for ly in layers]
        try:
            p_clean = float(forward_logits(model, ids)[0, -1].float().softmax(-1)[tgt])
        finally:
            for h in hs:
                h.remove()
        batch = ids.repeat(samples, 1)
        noise_t = torch.randn(samples, last - first + 1, emb.weight.shape[1], generator=gen) * noise * std

        def corrupt(_m, _a, out):
            out = out.clone()
            out[:, first: last + 1] = out[:, first: last + 1] + noise_t.to(out.dtype)
            return out

        he = emb.register_forward_hook(corrupt)
        try:
            p_low = float(forward_logits(model, batch)[:, -1].float().softmax(-1)[:, tgt].mean())
            for centre in range(L):
                lo, hi = max(0, centre - window // 2), min(L, centre - window // 2 + window)
                hr = []
                for ly in layers[lo:hi]:
                    def restore(_m, _a, out, i=ly.layer):
                        out = out.clone()
                        out[:, last] = clean[i].to(out.dtype)
                        return out

                    hr.append(ly.down.register_forward_hook(restore))
                try:
                    p = float(forward_logits(model, batch)[:, -1].float().softmax(-1)[:, tgt].mean())
                finally:
                    for h in hr:
                        h.remove()
                effects[centre] += p - p_low
        finally:
            he.remove()
        used += 1
        _ = p_clean
    effects /= max(1, used)
    # a window that contains layer 0 restores the first FFN, which acts as part of the (corrupted) token embedding
    start = window - window // 2 if L > window else 0
    best = start + int(effects[start:].argmax())
    return {"indirect_effect": effects.tolist(), "best_layer": best, "window": window,
            "noise": noise, "samples": samples, "n_facts": used}
