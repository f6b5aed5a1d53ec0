"""Language-model losses and a small trainer, shared by the brick operations.

``sequence_nll`` / ``perplexity`` measure a model on token lists (padded batches, causal attention, no mask
needed); ``train_parameters`` trains a chosen set of parameters with everything else frozen (LoRA bricks, grown
bricks, full fine-tuning all go through it).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparkformer.bricks.adapter import forward_logits
from sparkformer.bricks.tokens import batches, progress_bar


def batch_nll(model: nn.Module, ids: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a right-padded batch: (sum of next-token NLL, number of predicted tokens), float64."""
    logits = forward_logits(model, ids)[:, :-1].float()
    tgt = ids[:, 1:].masked_fill(~valid[:, 1:], -100)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none",
                           ignore_index=-100).view(tgt.shape)
    return loss.sum(1).double(), valid[:, 1:].sum(1).double()


@torch.no_grad()
def sequence_nll(model: nn.Module, token_lists: Sequence[Sequence[int]], batch_size: int = 8,
                 before_batch: Callable[[list[int]], None] | None = None, show_progress: bool = False,
                 desc: str = "loss") -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence (sum of next-token NLL, number of predicted tokens). ``before_batch(indices)`` runs before each
    forward (e.g. to set a :class:`~sparkformer.bricks.lora.LoRAMixture`'s per-example weights)."""
    nll = torch.zeros(len(token_lists), dtype=torch.float64)
    cnt = torch.zeros(len(token_lists), dtype=torch.float64)
    n_batches = math.ceil(len(token_lists) / batch_size)
    for idx, ids, valid in progress_bar(batches(token_lists, batch_size), n_batches, desc, show_progress):
        if before_batch is not None:
            before_batch(idx)
        nll[idx], cnt[idx] = batch_nll(model, ids, valid)
    return nll, cnt


def perplexity(model: nn.Module, token_lists: Sequence[Sequence[int]], batch_size: int = 8) -> float:
    """Token-weighted perplexity of the sequences."""
    return perplexity_from(*sequence_nll(model, token_lists, batch_size))


def perplexity_from(nll: torch.Tensor, cnt: torch.Tensor) -> float:
    """Token-weighted perplexity from per-sequence NLL sums and token counts (``sequence_nll``'s output)."""
    return math.exp(float(nll.sum() / cnt.sum().clamp_min(1)))


def lm_loss(model: nn.Module, ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross entropy over ``ids`` (B, T); ``valid`` (B, T) marks real tokens."""
    logits = forward_logits(model, ids)[:, :-1].float()
    tgt = ids[:, 1:]
    if valid is not None:
        tgt = tgt.masked_fill(~valid[:, 1:], -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Every parameter of ``model`` has requires_grad=False inside the block (restored after)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, r in saved:
            p.requires_grad_(r)


@dataclass
class TrainLog:
    steps: int
    lr: float
    batch_size: int
    seq_len: int
    trainable_params: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_parameters(model: nn.Module, params: Sequence[nn.Parameter], windows: torch.Tensor, steps: int,
                     lr: float, batch_size: int = 4, seed: int = 0, warmup: float = 0.1, weight_decay: float = 0.0,
                     clip: float = 1.0, log: Callable[[str], None] | None = None, log_every: int = 10,
                     loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> TrainLog:
    """AdamW on ``params`` only (linear warmup, cosine decay to 10%), random batches of ``windows`` (N, T).

    The caller decides what is trainable: every other parameter of ``model`` is frozen for the duration."""
    params = [p for p in params]
    if not params:
        raise ValueError("nothing to train: the parameter list is empty")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need steps >= 1, batch_size >= 1, lr > 0 (got {steps}, {batch_size}, {lr})")
    windows = torch.as_tensor(windows)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    n_warm = max(1, int(warmup * steps))
    tl = TrainLog(steps, lr, batch_size, windows.shape[1], sum(p.numel() for p in params))
    loss_fn = loss_fn or (lambda m, ids: lm_loss(m, ids))
    t0 = time.time()
    was_training = model.training
    model.eval()  # no dropout in the base; the trained parameters are used in train mode by their owners
    with frozen(model):
        for p in params:
            p.requires_grad_(True)
        try:
            for step in range(steps):
                f = (step + 1) / n_warm if step < n_warm else \
                    0.1 + 0.45 * (1 + math.cos(math.pi * (step - n_warm) / max(1, steps - n_warm)))
                for g in opt.param_groups:
                    g["lr"] = lr * f
                idx = torch.randint(0, windows.shape[0], (batch_size,), generator=gen)
                loss = loss_fn(model, windows[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                tl.losses.append(float(loss.detach()))
                if log and (step % log_every == 0 or step == steps - 1):
                    log(f"  step {step + 1}/{steps} loss {tl.losses[-1]:.3f} ({time.time() - t0:.0f} s)")
        finally:
            model.train(was_training)
    tl.seconds = time.time() - t0
    return tl
