"""Measuring routers on a model: calibrating their statistical threshold, recall of the true top units on
recorded FFN inputs, perplexity with them applied (simulated sparsity: the dense model's activations are masked),
and the plots of both.

    calibrate_routers(routers, X_train, fraction=0.3)          # stat_fraction per layer hits 30% on average
    per, mean = layer_recall(view, routers, X_val, [0.1, 0.3])  # recall / output energy vs the true top-k
    dense = routed_loss(model, heldout, None, view)             # and with routers: perplexity + achieved fraction
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from sparkformer.bricks.adapter import forward_logits
from sparkformer.bricks.experiment import pyplot
from sparkformer.bricks.ffn_inputs import layer_activation
from sparkformer.bricks.neurons import FFNNeurons
from sparkformer.bricks.routing import RandomRouter, Router, _brick_reduce, route
from sparkformer.bricks.tokens import batches


# ---- calibration and recall --------------------------------------------------------------------------------------
def calibrate_stat_fraction(scores: torch.Tensor, fraction: float) -> float:
    """The ``f`` for which statistical top-k (theta = mean + std * ndtri(1 - f)) keeps ``fraction`` of all the
    entries of ``scores`` (T, n) on average: z = the (1 - fraction) quantile of the per-row standardised scores."""
    if fraction >= 1.0:
        return 1.0
    s = scores.float()
    mu = s.mean(-1, keepdim=True)
    sd = (s.square().mean(-1, keepdim=True) - mu.square()).clamp_min(1e-30).sqrt()
    ns = ((s - mu) / sd).flatten()
    k = min(ns.numel(), max(1, round((1.0 - fraction) * ns.numel())))
    z = float(ns.kthvalue(k).values)
    return float(min(1.0, max(1e-6, 0.5 * math.erfc(z / math.sqrt(2.0)))))


def _topk_mask(s: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros(s.shape, dtype=torch.bool).scatter_(-1, s.topk(k, dim=-1).indices, True)


def recall_metrics(layer: FFNNeurons, router: Router, X: torch.Tensor, fractions: Sequence[float],
                   chunk: int = 2048) -> dict[str, Any]:
    """How well ``router``'s scores find the true top units (by output magnitude; bricks: L2 norm of members) on
    recorded inputs X. Per fraction f (k = round(f * units)): ``recall`` = |pred top-k ∩ true top-k| / k and
    ``energy`` = output energy of the predicted top-k / that of the true top-k. At the router's own selection
    (stat or top-k at its fraction): achieved fraction, recall against the true top-round(fraction * units),
    energy ratio."""
    norms = layer.down_col_norms()
    U = router.n_units
    hits = {f: 0.0 for f in fractions}
    e_pred = {f: 0.0 for f in fractions}
    e_true = {f: 0.0 for f in fractions}
    own = {"kept": 0.0, "hit": 0.0, "e_sel": 0.0, "e_true": 0.0}
    k_own = max(1, round(router.fraction * U)) if router.fraction < 1 else U
    T = 0
    with torch.no_grad():
        for s0 in range(0, X.shape[0], chunk):
            x = X[s0: s0 + chunk]
            a = layer_activation(layer, x).float()
            m = a.abs() * norms
            if router.groups is not None:
                m = _brick_reduce(m, router.groups, U)
            s = router.scores(x.float(), a).float()
            e = m.square()
            for f in fractions:
                k = max(1, round(f * U))
                tm, pm = _topk_mask(m, k), _topk_mask(s, k)
                hits[f] += float((tm & pm).sum())
                e_pred[f] += float(e[pm].sum())
                e_true[f] += float(e[tm].sum())
            sel = router.select(s)
            tm = _topk_mask(m, k_own)
            own["kept"] += float(sel.sum())
            own["hit"] += float((sel & tm).sum())
            own["e_sel"] += float(e[sel].sum())
            own["e_true"] += float(e[tm].sum())
            T += x.shape[0]
    return {
        "fractions": list(fractions),
        "recall": [hits[f] / max(1, T * max(1, round(f * U))) for f in fractions],
        "energy": [e_pred[f] / max(1e-30, e_true[f]) for f in fractions],
        "selection": {"fraction_target": router.fraction, "method": router.method,
                      "stat_fraction": router.stat_fraction, "achieved": own["kept"] / max(1, T * U),
                      "recall": own["hit"] / max(1, T * k_own), "energy": own["e_sel"] / max(1e-30, own["e_true"])},
        "n_tokens": T,
    }


def calibrate_routers(routers: Sequence[Router], X: Sequence[torch.Tensor], fraction: float,
                      max_tokens: int = 4096) -> list[float]:
    """Set every router's ``fraction`` and calibrated ``stat_fraction`` (method 'stat') from recorded inputs."""
    out = []
    for r, x in zip(routers, X):
        r.fraction = fraction
        if r.method == "stat":
            step = max(1, x.shape[0] // max_tokens)  # an even spread over the recorded tokens
            with torch.no_grad():
                s = r.scores(x[::step][:max_tokens].float())
            r.stat_fraction = calibrate_stat_fraction(s, fraction)
        out.append(r.stat_fraction)
    return out


def layer_recall(view, routers: Sequence[Router], X: Sequence[torch.Tensor], fractions: Sequence[float]
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """:func:`recall_metrics` of every layer's router, and their mean over layers (``fractions``, ``recall``,
    ``energy``)."""
    per = [recall_metrics(view[i], routers[i], X[i], fractions) for i in range(len(view))]
    mean = {"fractions": list(fractions),
            "recall": [sum(p["recall"][j] for p in per) / len(per) for j in range(len(fractions))],
            "energy": [sum(p["energy"][j] for p in per) / len(per) for j in range(len(fractions))]}
    return per, mean


# ---- perplexity under routing ----------------------------------------------------------------------------------------
def routed_loss(model: torch.nn.Module, token_lists: Sequence[Sequence[int]], routers=None, view=None,
                batch_size: int = 8, **select_kw) -> dict[str, Any]:
    """Token-weighted next-token loss and perplexity with ``routers`` applied (None: dense), and the achieved
    fraction of active neurons (over real tokens, per layer and overall)."""
    for r in (routers or []):
        if isinstance(r, RandomRouter):
            r.reset()
    nll, cnt = 0.0, 0
    ctx = route(model, routers, view, **select_kw) if routers is not None else contextlib.nullcontext()
    with ctx as stats, torch.inference_mode():
        for _idx, ids, valid in batches(token_lists, batch_size):
            if stats is not None:
                stats.valid = valid
            logits = forward_logits(model, ids)[:, :-1].float()
            tgt = ids[:, 1:].masked_fill(~valid[:, 1:], -100)
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                         ignore_index=-100, reduction="sum"))
            cnt += int(valid[:, 1:].sum())
    loss = nll / max(1, cnt)
    out = {"loss": loss, "ppl": math.exp(loss), "tokens": cnt}
    if stats is not None:
        out["active"] = stats.fraction()
        out["active_per_layer"] = stats.per_layer()
    return out


def ppl_curve(model, token_lists, routers: Sequence[Router], fractions: Sequence[float], view=None,
              calib: Sequence[torch.Tensor] | None = None, batch_size: int = 8, dense_loss: float | None = None,
              log: Callable[[str], None] | None = None, name: str = "") -> list[dict[str, Any]]:
    """Perplexity at each target fraction (routers re-calibrated per fraction when they use 'stat')."""
    pts = []
    for f in fractions:
        t = time.time()
        if calib is not None:
            calibrate_routers(routers, calib, f)
        else:
            for r in routers:
                r.fraction, r.stat_fraction = f, None
        res = routed_loss(model, token_lists, routers, view, batch_size)
        res["fraction"] = f
        res["seconds"] = time.time() - t
        if dense_loss is not None:
            res["ppl_change_pct"] = 100.0 * (math.exp(res["loss"] - dense_loss) - 1.0)
        pts.append(res)
        if log:
            gap = f" ({res['ppl_change_pct']:+.1f}%)" if dense_loss is not None else ""
            log(f"  {name:>10s} target {f:.2f} achieved {res['active']:.3f}: ppl {res['ppl']:.3f}{gap} "
                f"[{res['seconds']:.0f} s]")
    return pts


# ---- plots ---------------------------------------------------------------------------------------------------------
def plot_ppl_curves(curves: dict[str, list[dict]], dense_ppl: float, path: Path, title: str,
                    extra: dict[str, dict] | None = None, target: tuple[float, float] = (0.3, 5.0)) -> None:
    """Perplexity change vs achieved active fraction, one line per method (log-scale y)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    markers = {"oracle": "o", "random": "s", "predictor": "^", "router": "D", "predictor-bricks": "v"}
    for name, pts in curves.items():
        xs = [p.get("active", p["fraction"]) for p in pts]
        ys = [max(0.01, p["ppl"] / dense_ppl * 100 - 100) for p in pts]
        ls = "--" if "(weights)" in name else "-"  # two partitions on one plot: the weights one dashed
        ax.plot(xs, ys, ls, marker=markers.get(name.split(" ")[0], "o"), ms=4, label=name)
    for name, p in (extra or {}).items():
        ax.plot([p["active"]], [max(0.01, p["ppl"] / dense_ppl * 100 - 100)], "*", ms=12, label=name)
    ax.axhline(target[1], color="r", ls=":", lw=1)
    ax.axvline(target[0], color="r", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("achieved fraction of active FFN neurons (mean over tokens and layers)")
    ax.set_ylabel(f"perplexity increase over dense (%), dense = {dense_ppl:.3f}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_recall(per_layer: dict[str, list[float]], path: Path, title: str, ylabel: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for name, ys in per_layer.items():
        ax.plot(range(len(ys)), ys, "-o", ms=3, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
