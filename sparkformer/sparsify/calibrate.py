"""Training-free thresholds: activation magnitudes on calibration text -> per-site levels -> a :class:`SparseSpec`.

Steps (TEAL-style, arXiv 2408.14690; our choices where noted):

1. Record |x| at every site of the scope on calibration windows (a random subsample per site), so a site's
   threshold for level s (the fraction of its entries zeroed) is the s-quantile of |x|.
2. Sensitivity (``allocation="greedy"``): for each site alone and each level in ``LEVELS``, the KL divergence of the
   model's next-token distribution from the dense one, on calibration tokens. Only layers >= the site's layer are
   re-run (their inputs are cached), so the table costs about half a forward per entry.
3. Allocation: levels that reach the target fraction of the scope's weights skipped at the least summed KL (greedy
   on marginal KL per skipped weight over a 0.05 grid, KL interpolated between measured levels; convex in practice).
   ``allocation="uniform"`` gives every site the target level.
4. Re-calibration: the thresholds are recomputed from activations recorded *with the spec applied* (earlier layers'
   sparsity shifts later layers' inputs), twice, so the achieved sparsity lands on the target.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from sparkformer.ops.activations import softcap
from sparkformer.sparsity import LayerThresholds, SparseSpec, site_weights, sparse_forward

LEVELS = (0.35, 0.6, 0.85)  # where each site's KL is measured (interpolated between, 0 at level 0)
MAX_LEVEL = 0.95
STEP = 0.05
SAMPLE = 1 << 16  # |x| values kept per site for its quantiles
# "down": the down-projection input alone (neuron-level, on the exact activation: skips W_down rows only)
SCOPE_SITES = {"ffn": ("gate_up", "down"), "model": ("qkv", "o", "gate_up", "down"), "down": ("down",),
               "cats": ("gate_act",)}


def _scope_weight(W: list[dict[str, int]], scope: str) -> float:
    return float(sum(w["ffn_total"] + (w["attn_total"] if scope == "model" else 0) for w in W))


def site_weight(w: dict[str, int], site: str) -> int:
    """Weights skipped per unit level at ``site`` (CATS drops a neuron's up and down rows)."""
    return w["gate_act"] + w["down"] if site == "gate_act" else w[site]


@torch.no_grad()
def record_magnitudes(model, windows: torch.Tensor, sites: Sequence[str], spec: SparseSpec | None = None,
                      batch: int = 8, seed: int = 0) -> dict[tuple[int, str], torch.Tensor]:
    """A subsample of |x| (or |act(gate)|) per (layer, site), seen before the site's own mask; with ``spec`` the
    other sites' masks apply (the sparse model's activations)."""
    g = torch.Generator().manual_seed(seed)
    got: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []

    def keep(i, site, x):
        v = x.detach().abs().float().reshape(-1)
        got.setdefault((i, site), []).append(v[torch.randint(0, v.numel(), (min(v.numel(), SAMPLE),), generator=g)])

    for i, block in enumerate(model.layers):
        a, ffn = block.attn, block.ffn
        hooks = {"qkv": (a, "pre"), "o": (a.o_proj, "pre"), "gate_up": (ffn, "pre"),
                 "down": (getattr(ffn, "down_proj", None), "pre"), "gate_act": (getattr(ffn, "gate_proj", None), "out")}
        for site in sites:
            mod, kind = hooks[site]
            if mod is None or (site in ("gate_up", "down", "gate_act") and getattr(ffn, "kind", None) != "geglu"):
                raise ValueError(f"layer {i}: site {site} needs a dense gated FFN, this one is "
                                 f"{getattr(ffn, 'kind', type(ffn).__name__)!r}")
            if kind == "pre":
                handles.append(mod.register_forward_pre_hook(lambda _m, args, i=i, s=site: keep(i, s, args[0])))
            else:
                handles.append(mod.register_forward_hook(lambda _m, _a, out, i=i, f=ffn.act: keep(i, "gate_act",
                                                                                                  f(out))))
    try:
        ctx = sparse_forward(model, spec) if spec is not None else None
        if ctx is not None:
            ctx.__enter__()
        try:
            for s in range(0, windows.shape[0], batch):
                model(windows[s: s + batch])
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for k, vs in got.items():
        v = torch.cat(vs)
        out[k] = v[torch.randperm(v.numel(), generator=g)[:SAMPLE]].sort().values
    return out


def quantile(sorted_vals: torch.Tensor, level: float) -> float | None:
    """Threshold that zeroes a ``level`` fraction of the recorded magnitudes (None at level 0)."""
    if level <= 0:
        return None
    i = min(sorted_vals.numel() - 1, max(0, int(round(level * sorted_vals.numel())) - 1))
    return float(sorted_vals[i])


def spec_from_levels(n_layers: int, levels: dict[tuple[int, str], float],
                     mags: dict[tuple[int, str], torch.Tensor], **kw) -> SparseSpec:
    layers = [LayerThresholds() for _ in range(n_layers)]
    for (i, site), s in levels.items():
        setattr(layers[i], site, quantile(mags[(i, site)], s))
    return SparseSpec(layers, **kw)


# ---- sensitivity -------------------------------------------------------------------------------------------------
@torch.no_grad()
def _block_inputs(model, windows: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Input of every block and the dense log-probs (bf16 to keep 262k vocabularies in memory)."""
    hs: list[torch.Tensor] = []
    handles = [b.register_forward_pre_hook(lambda _m, args: hs.append(args[0].detach())) for b in model.layers]
    try:
        logits = model(windows).logits
    finally:
        for h in handles:
            h.remove()
    return hs, F.log_softmax(logits.float(), -1).to(torch.bfloat16)


@torch.no_grad()
def _logits_from(model, h: torch.Tensor, layer: int) -> torch.Tensor:
    for block in model.layers[layer:]:
        h = block(h, 0, None)
    return softcap(F.linear(model.final_norm(h), model.head_weight), model.config.final_logit_softcap)


def _kl(logp_dense: torch.Tensor, logits: torch.Tensor) -> float:
    lp = F.log_softmax(logits.float(), -1)
    p = logp_dense.float().exp()
    return float((p * (logp_dense.float() - lp)).sum(-1).mean())


@torch.no_grad()
def sensitivity(model, windows: torch.Tensor, sites: Sequence[str], mags: dict[tuple[int, str], torch.Tensor],
                levels: Sequence[float] = LEVELS, log: Callable[[str], None] | None = None
                ) -> dict[tuple[int, str], list[float]]:
    """KL from the dense model when one (layer, site) alone is sparsified at each of ``levels``."""
    n = len(model.layers)
    hs, logp = _block_inputs(model, windows)
    table: dict[tuple[int, str], list[float]] = {}
    t0 = time.time()
    for i in range(n):
        for site in sites:
            row = []
            for s in levels:
                spec = spec_from_levels(n, {(i, site): s}, mags)
                with sparse_forward(model, spec):
                    row.append(max(0.0, _kl(logp, _logits_from(model, hs[i], i))))
            table[(i, site)] = row
        if log and (i % 10 == 9 or i == n - 1):
            log(f"  sensitivity: layers 0..{i} ({time.time() - t0:.0f} s)")
    return table


def _interp(levels: Sequence[float], kls: Sequence[float], s: float) -> float:
    xs, ys = [0.0, *levels], [0.0, *kls]
    for j in range(1, len(xs)):
        if s <= xs[j]:
            w = (s - xs[j - 1]) / (xs[j] - xs[j - 1])
            return ys[j - 1] + w * (ys[j] - ys[j - 1])
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])  # beyond the last measured level: extend the last segment
    return ys[-1] + max(slope, 0.0) * (s - xs[-1])


def allocate(table: dict[tuple[int, str], list[float]], weights: dict[tuple[int, str], float], total: float,
             target: float, levels: Sequence[float] = LEVELS) -> dict[tuple[int, str], float]:
    """Per-site levels whose skipped weights reach ``target * total`` at the least summed (interpolated) KL."""
    cap = sum(weights.values()) * MAX_LEVEL
    if target * total > cap + 1e-9:
        raise ValueError(f"sparsity {target} is beyond what the scope's sites can reach ({cap / total:.3f} at level "
                         f"{MAX_LEVEL}); lower --sparsity or widen --scope")
    lv = {k: 0.0 for k in table}
    skipped = 0.0
    while skipped < target * total - 1e-9:
        best, best_cost = None, float("inf")
        for k, s in lv.items():
            if s + STEP > MAX_LEVEL + 1e-9:
                continue
            d = _interp(levels, table[k], s + STEP) - _interp(levels, table[k], s)
            cost = d / (STEP * weights[k])
            if cost < best_cost:
                best, best_cost = k, cost
        if best is None:
            break
        need = target * total - skipped
        step = min(STEP, need / weights[best])  # the last step lands on the target exactly
        lv[best] += step
        skipped += step * weights[best]
    return lv


def calibrate(model, windows: torch.Tensor, scope: str, target: float, allocation: str = "greedy",
              sens_windows: torch.Tensor | None = None, method: str = "teal", rounds: int = 2,
              table: dict | None = None, log: Callable[[str], None] | None = None) -> tuple[SparseSpec, dict]:
    """A calibrated spec for ``scope`` ("ffn", "model", or "cats": the gate-activation site) at ``target`` (fraction
    of the scope's weights not read per token). Returns (spec, info with the levels and the sensitivity table)."""
    if not 0.0 <= target < 1.0:
        raise ValueError(f"sparsity {target} must be in [0, 1)")
    if allocation not in ("greedy", "uniform"):
        raise ValueError(f"allocation={allocation!r}; allowed: greedy, uniform")
    sites = SCOPE_SITES[scope]
    weight_scope = "ffn" if scope in ("cats", "down") else scope
    n = len(model.layers)
    W = site_weights(model)
    weights = {(i, s): float(site_weight(W[i], s)) for i in range(n) for s in sites}
    # teal: the target is a fraction of the scope's weights; cats: of the neurons (the mean gate_act level)
    total = sum(weights.values()) if scope == "cats" else _scope_weight(W, weight_scope)
    kw = dict(method=method, scope=weight_scope, target=target)
    if target == 0.0:
        return SparseSpec.dense(n, **kw), {"levels": {}, "sensitivity": None}
    mags = record_magnitudes(model, windows, sites)
    if allocation == "uniform":
        share = target * total / sum(weights.values())
        lv = {k: share for k in weights}
    else:
        if table is None:
            table = sensitivity(model, sens_windows if sens_windows is not None else windows[:4], sites, mags,
                                log=log)
        lv = allocate(table, weights, total, target)
    spec = spec_from_levels(n, lv, mags, **kw)
    for _ in range(rounds):  # thresholds from the activations of the sparse model itself
        mags = record_magnitudes(model, windows, sites, spec)
        spec = spec_from_levels(n, lv, mags, **kw)
    info = {"levels": {f"{i}.{s}": round(v, 4) for (i, s), v in sorted(lv.items())},
            "sensitivity": None if table is None else {f"{i}.{s}": v for (i, s), v in sorted(table.items())},
            "sensitivity_levels": list(LEVELS), "allocation": allocation, "table": table}
    return spec, info
