"""Continued training of a model with routers applied: recover what sparse FFNs lose.

    trained, log = continued_training(model, routers, token_lists, steps=50, objective="kd")
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from sparkformer.bricks.adapter import forward_logits
from sparkformer.bricks.neurons import NeuronView
from sparkformer.bricks.routing import Router, route
from sparkformer.bricks.tokens import batches
from sparkformer.sparsity import sparse_forward


def continued_training(model: torch.nn.Module, routers: Sequence[Router | None], token_lists: Sequence[Sequence[int]],
                       steps: int = 50, lr: float = 3e-5, objective: str = "kd", batch_size: int = 4,
                       train: str = "ffn", autocast_dtype: torch.dtype | None = torch.bfloat16, seed: int = 0,
                       log: Callable[[str], None] | None = None, spec=None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train a copy of ``model`` (fp32 master weights, matmuls under ``autocast_dtype``) with the routers applied.

    ``objective``: 'lm' (next-token cross-entropy on the text) or 'kd' (KL from the original dense model's next-token
    distribution: it only pulls the sparse model back to the dense one, so the recovered gap is not mixed with
    adaptation to the training text). ``train``: 'ffn' (gate/up/down of every FFN) or 'all' (every decoder
    parameter; embeddings stay frozen). ``spec``: a ``sparkformer.sparsity.SparseSpec`` whose thresholds apply to the
    student too (SparkLM). Returns (trained model in the original dtype, log)."""
    if objective not in ("lm", "kd"):
        raise ValueError(f"objective={objective!r}; allowed: lm, kd")
    if train not in ("ffn", "all"):
        raise ValueError(f"train={train!r}; allowed: ffn, all")
    dtype = next(model.parameters()).dtype
    student = copy.deepcopy(model).float().train()
    sview = NeuronView(student)
    for p in student.parameters():
        p.requires_grad_(False)
    if train == "ffn":
        params = [p for layer in sview for mod in (layer.gate, layer.up, layer.down) if mod is not None
                  for p in mod.parameters()]
    else:
        emb = {id(p) for m in student.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
        params = [p for p in student.parameters() if id(p) not in emb]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * 0.5 *
                                              (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(token_lists), generator=g).tolist()
    losses = []
    n_tokens = 0
    t0 = time.time()
    use_ac = autocast_dtype is not None
    with route(student, routers, sview) as stats, \
            (sparse_forward(student, spec) if spec is not None else contextlib.nullcontext()):
        step = 0
        while step < steps:
            for _idx, ids, valid in batches([token_lists[i] for i in order], batch_size):
                if step >= steps:
                    break
                stats.valid = valid
                if objective == "kd":
                    with torch.inference_mode():
                        t_logp = F.log_softmax(forward_logits(model, ids)[:, :-1].float(), -1)
                    t_logp = t_logp.clone()
                with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=use_ac):
                    logits = forward_logits(student, ids)[:, :-1].float()
                m = valid[:, 1:]
                if objective == "lm":
                    tgt = ids[:, 1:].masked_fill(~m, -100)
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
                else:
                    logp = F.log_softmax(logits, -1)
                    kl = (t_logp.exp() * (t_logp - logp)).sum(-1)
                    loss = kl[m].mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                n_tokens += int(valid.sum())
                step += 1
                if log and (step % 10 == 0 or step == steps):
                    recent = losses[-10:]
                    log(f"  continued training step {step}/{steps}: {objective} loss "
                        f"{sum(recent) / len(recent):.4f} ({time.time() - t0:.0f} s)")
            order = torch.randperm(len(token_lists), generator=g).tolist()
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    info = {"steps": steps, "lr": lr, "objective": objective, "train": train, "batch_size": batch_size,
            "tokens": n_tokens,
            "loss_first": losses[0] if losses else None, "loss_last": sum(losses[-5:]) / max(1, len(losses[-5:])),
            "losses": losses, "seconds": time.time() - t0,
            "autocast": str(autocast_dtype).replace("torch.", "") if use_ac else None}
    return student.to(dtype), info
