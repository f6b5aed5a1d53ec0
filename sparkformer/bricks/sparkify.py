"""Sparkify: Spark-style sparse inference for a pretrained gated-FFN model, and how much quality it keeps.

For each FFN layer a cheap neuron predictor (a :class:`~sparkformer.bricks.routing.LowRankPredictor`) scores the
neurons from the FFN input x; statistical top-k on the scores picks ~``fraction`` of them per token; only those
neurons run (exact gate, up and down for the selected rows: a "predicted gated FFN"). The predictor:

    input   lowrank  z = A x, A (rank, d)           split  z = x[:r] (the Spark split of the input dims)
    output  gate_up  B (2n, rank): g_hat = B[:n] z, u_hat = B[n:] z, score = |act(g_hat) * u_hat|, the up half
                     carrying ||W_down[:, i]|| so the score predicts the neuron's output magnitude
            gate     B (n, rank): score = g_hat (the gate pre-activation alone)
    fit     none     weights only: truncated SVD of the stacked projection W ([W_gate; diag(||W_down||) W_up] or
                     W_gate), or for split the columns W[:, :r] (Spark's K1)
            lsq      closed-form least squares on recorded FFN inputs: lowrank = the rank-r fit of W x under the
                     recorded input covariance (reduced-rank regression: SVD of W C^1/2), split = regression of
                     W x on x[:r]
    train_steps      optional Adam steps on the output-weighted activation act(g) * u * ||W_down|| (MSE)

``stat_fraction`` of each layer is calibrated on recorded inputs so that the achieved mean fraction equals the
target (the scores are far from Gaussian). The evaluation masks the dense model's activations (simulated
sparsity: accuracy numbers, not speed).

    routers, report = sparkify_model(model, X_train, SparkifyConfig(rank=128, fraction=0.3))
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from sparkformer.bricks.neurons import SUPPORTED_ARCHITECTURES, FFNNeurons, NeuronView
from sparkformer.bricks.routing import (ACTS, LowRankPredictor, RandomRouter, Router, _brick_reduce,
                                        layer_activation, route)

SPARKIFY_SUPPORTED = ("gated FFNs with gate_proj/up_proj/down_proj (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, "
                      "Gemma3 families) and sparkformer SparkLM GeGLU layers")


@dataclass
class SparkifyConfig:
    rank: int = 128
    input: str = "lowrank"  # lowrank | split
    output: str = "gate_up"  # gate_up | gate
    fit: str = "lsq"  # none | lsq
    train_steps: int = 0
    lr: float = 1e-3
    batch_tokens: int = 512
    fraction: float = 0.3  # target fraction of active neurons
    method: str = "stat"  # stat | topk
    seed: int = 0

    def validate(self, d_model: int | None = None) -> None:
        choices = {"input": ("lowrank", "split"), "output": ("gate_up", "gate"), "fit": ("none", "lsq"),
                   "method": ("stat", "topk")}
        for k, allowed in choices.items():
            if getattr(self, k) not in allowed:
                raise ValueError(f"{k}={getattr(self, k)!r}; allowed: {', '.join(allowed)}")
        if self.rank < 1 or (d_model is not None and self.rank > d_model):
            raise ValueError(f"rank={self.rank} must be in [1, d_model={d_model}]")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction={self.fraction} must be in (0, 1]")
        if self.train_steps < 0 or self.lr <= 0 or self.batch_tokens < 1:
            raise ValueError("train_steps >= 0, lr > 0, batch_tokens >= 1")


# ---- the FFN's parts ---------------------------------------------------------------------------------------------
def detect_act(layer: FFNNeurons) -> str:
    """Name (a key of ``routing.ACTS``) of the gate activation of a gated FFN layer, found by probing."""
    fn = getattr(layer.module, "act_fn", None) or getattr(layer.module, "act", None)
    if fn is None:
        raise ValueError(f"layer {layer.layer} ({layer.name}): no act_fn/act attribute; sparkify supports "
                         f"{SPARKIFY_SUPPORTED}")
    probe = torch.linspace(-6, 6, 241)
    with torch.no_grad():
        y = fn(probe)
        for name, f in ACTS.items():
            if torch.allclose(y.float(), f(probe), atol=1e-4, rtol=1e-4):
                return name
    raise ValueError(f"layer {layer.layer}: gate activation {fn} is none of {', '.join(ACTS)}")


def gated_parts(layer: FFNNeurons) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(W_gate (n, d), W_up (n, d), ||W_down[:, i]|| (n,), act name) in fp32, detached."""
    if layer.kind != "gated":
        what = "a Spark FFN (it already has a predictor: use SparkPredictorRouter)" if layer.kind == "spark" \
            else "a plain (ungated) FFN"
        raise ValueError(f"layer {layer.layer} ({layer.name}) is {what}; sparkify supports {SPARKIFY_SUPPORTED}")
    return (layer.gate_rows().detach().float(), layer.up_rows().detach().float(), layer.down_col_norms(),
            detect_act(layer))


def check_sparkify_supported(view: NeuronView) -> None:
    for layer in view:
        gated_parts(layer)


# ---- fitting one layer ---------------------------------------------------------------------------------------------
def _stacked(Wg, Wu, dn, output: str) -> torch.Tensor:
    return torch.cat([Wg, Wu * dn[:, None]]) if output == "gate_up" else Wg


def fit_predictor(layer: FFNNeurons, X: torch.Tensor | None, cfg: SparkifyConfig) -> tuple[LowRankPredictor, dict]:
    """One layer's predictor from its weights and (for ``fit='lsq'`` / ``train_steps``) recorded inputs X (T, d)."""
    Wg, Wu, dn, act = gated_parts(layer)
    n, d = Wg.shape
    cfg.validate(d)
    W = _stacked(Wg, Wu, dn, cfg.output).double()
    r = cfg.rank
    info: dict[str, Any] = {}
    need_data = cfg.fit == "lsq" or cfg.train_steps > 0
    if need_data and (X is None or X.shape[0] < 2):
        raise ValueError("fit='lsq' and train_steps need recorded FFN inputs")
    if need_data:  # second moment of the inputs (fp32 matmul, fp64 afterwards)
        Xf = X.float()
        C = (Xf.T @ Xf).double() / Xf.shape[0]
    sel = dict(fraction=cfg.fraction, method=cfg.method)
    if cfg.input == "split":
        if r >= d:
            raise ValueError(f"split rank r={r} must be < d_model={d}")
        dims = torch.arange(r)
        if cfg.fit == "none":
            B = W[:, :r]  # Spark's K1: the first r input dims of each projection row
        else:  # least squares of W x on x[:r]: B = W C[:, :r] C[:r, :r]^-1
            Crr = C[:r, :r] + 1e-6 * C.diagonal()[:r].mean() * torch.eye(r, dtype=C.dtype)
            B = torch.linalg.solve(Crr, (W @ C[:, :r]).T).T
        pred = LowRankPredictor(B=B.float(), dims=dims, output=cfg.output, act=act, **sel)
    else:
        if cfg.fit == "none":
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            A, B = Vh[:r], U[:, :r] * S[:r]
        else:  # best rank-r approximation of W x in the mean-square sense over the recorded x
            evals, evecs = torch.linalg.eigh(C)
            half = evecs * evals.clamp_min(0).sqrt()  # C = half @ half.T
            U, S, _ = torch.linalg.svd(W @ half, full_matrices=False)
            B = U[:, :r]
            A = B.T @ W
            info["explained"] = float(S[:r].square().sum() / S.square().sum().clamp_min(1e-30))
        pred = LowRankPredictor(B=B.float(), A=A.float(), output=cfg.output, act=act, **sel)
    if cfg.train_steps > 0:
        info.update(_train_predictor(pred, X, Wg, Wu, dn, act, cfg))
    return pred.eval(), info


def _train_predictor(pred: LowRankPredictor, X, Wg, Wu, dn, act, cfg: SparkifyConfig) -> dict[str, float]:
    """Adam on the MSE of the predicted output-weighted activation (gate_up) or gate pre-activation (gate)."""
    g = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in pred.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.train_steps)
    f = ACTS[act]

    def target(x):
        gate = x @ Wg.T
        return f(gate) * (x @ Wu.T) * dn if pred.output == "gate_up" else gate

    with torch.no_grad():
        probe = X[torch.randint(0, X.shape[0], (min(4096, X.shape[0]),), generator=g)].float()
        scale = float(target(probe).square().mean().clamp_min(1e-30))
    first = last = float("nan")
    for step in range(cfg.train_steps):
        x = X[torch.randint(0, X.shape[0], (min(cfg.batch_tokens, X.shape[0]),), generator=g)].float()
        with torch.no_grad():
            t = target(x)
        loss = (pred.predicted_activation(x) - t).square().mean() / scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        last = float(loss.detach())
        first = last if step == 0 else first
    return {"train_loss_first": first, "train_loss_last": last}


# ---- calibration and metrics ---------------------------------------------------------------------------------------
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


def sparkify_model(model: torch.nn.Module, X: Sequence[torch.Tensor] | None, cfg: SparkifyConfig,
                   view: NeuronView | None = None, log: Callable[[str], None] | None = None,
                   ) -> tuple[list[LowRankPredictor], list[dict]]:
    """A calibrated predictor per FFN layer (see :func:`fit_predictor`). ``X``: recorded inputs per layer."""
    view = view if view is not None else NeuronView(model)
    check_sparkify_supported(view)
    routers, infos = [], []
    t0 = time.time()
    for layer in view:
        x = None if X is None else X[layer.layer]
        pred, info = fit_predictor(layer, x, cfg)
        if x is not None and cfg.method == "stat":
            info["stat_fraction"] = calibrate_routers([pred], [x], cfg.fraction)[0]
        routers.append(pred)
        infos.append(info)
        if log and (layer.layer % 10 == 9 or layer.layer == len(view) - 1):
            log(f"  predictors fitted for layers 0..{layer.layer} ({time.time() - t0:.0f} s)")
    return routers, infos


# ---- perplexity under routing ----------------------------------------------------------------------------------------
def routed_loss(model: torch.nn.Module, token_lists: Sequence[Sequence[int]], routers=None, view=None,
                batch_size: int = 8, **select_kw) -> dict[str, Any]:
    """Token-weighted next-token loss and perplexity with ``routers`` applied (None: dense), and the achieved
    fraction of active neurons (over real tokens, per layer and overall)."""
    from sparkformer.bricks.analysis import batches, forward_logits

    for r in (routers or []):
        if isinstance(r, RandomRouter):
            r.reset()
    nll, cnt = 0.0, 0
    ctx = route(model, routers, view, **select_kw) if routers is not None else None
    stats = ctx.__enter__() if ctx is not None else None
    try:
        with torch.inference_mode():
            for _idx, ids, valid in batches(token_lists, batch_size):
                if stats is not None:
                    stats.valid = valid
                logits = forward_logits(model, ids)[:, :-1].float()
                tgt = ids[:, 1:].masked_fill(~valid[:, 1:], -100)
                nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                             ignore_index=-100, reduction="sum"))
                cnt += int(valid[:, 1:].sum())
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
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


# ---- continued training ---------------------------------------------------------------------------------------------
def continued_training(model: torch.nn.Module, routers: Sequence[Router | None], token_lists: Sequence[Sequence[int]],
                       steps: int = 50, lr: float = 3e-5, objective: str = "kd", batch_size: int = 4,
                       train: str = "ffn", autocast_dtype: torch.dtype | None = torch.bfloat16, seed: int = 0,
                       log: Callable[[str], None] | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train a copy of ``model`` (fp32 master weights, matmuls under ``autocast_dtype``) with the routers applied.

    ``objective``: 'lm' (next-token cross-entropy on the text) or 'kd' (KL from the original dense model's next-token
    distribution: it only pulls the sparse model back to the dense one, so the recovered gap is not mixed with
    adaptation to the training text). ``train``: 'ffn' (gate/up/down of every FFN) or 'all' (every decoder
    parameter; embeddings stay frozen). Returns (trained model in the original dtype, log)."""
    from sparkformer.bricks.analysis import batches, forward_logits

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
    with route(student, routers, sview) as stats:
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


def config_dict(cfg: SparkifyConfig) -> dict[str, Any]:
    return asdict(cfg)


__all__ = ["SparkifyConfig", "SPARKIFY_SUPPORTED", "SUPPORTED_ARCHITECTURES", "fit_predictor", "sparkify_model",
           "calibrate_stat_fraction", "calibrate_routers", "recall_metrics", "routed_loss", "ppl_curve",
           "continued_training", "gated_parts", "detect_act"]
