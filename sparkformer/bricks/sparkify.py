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

``sparkformer bricks sparkify`` (:func:`run_sparkify`) fits the predictors of a model, saves them, and measures
recall and perplexity against oracle and random selection, optionally with short continued training.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sparkformer.bricks.continued_training import continued_training
from sparkformer.bricks.experiment import (DTYPES, RecordRun, add_command, arg, command_line, csv, environment,
                                           fraction_list, load_model, log, start, write_results)
from sparkformer.bricks.ffn_inputs import recorded_inputs
from sparkformer.bricks.neurons import FFNNeurons, NeuronView
from sparkformer.bricks.router_eval import (calibrate_routers, layer_recall, plot_ppl_curves, plot_recall, ppl_curve,
                                            recall_metrics, routed_loss)
from sparkformer.bricks.routing import (ACTS, LowRankPredictor, load_routers, oracle_routers, random_routers,
                                        save_routers)
from sparkformer.bricks.tokens import capability_tokens

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


# ---- the experiment: `sparkformer bricks sparkify` ------------------------------------------------------------------
@dataclass(kw_only=True)
class SparkifyRun(RecordRun):
    """Settings of ``sparkformer bricks sparkify``; the predictor's defaults are :class:`SparkifyConfig`'s."""

    rank: int = arg(SparkifyConfig.rank, "predictor rank")
    input: str = arg(SparkifyConfig.input, "lowrank: z = A x; split: z = x[:rank] (Spark's split of the input dims)",
                     choices=("lowrank", "split"))
    output: str = arg(SparkifyConfig.output, "gate_up: score |act(g) * u|; gate: the gate pre-activation",
                      choices=("gate_up", "gate"))
    fit: str = arg(SparkifyConfig.fit, "lsq: least squares on the recorded inputs; none: weights only",
                   choices=("lsq", "none"))
    train_steps: int = arg(SparkifyConfig.train_steps, "Adam steps per layer after the closed-form fit")
    fraction: float = arg(SparkifyConfig.fraction, "target fraction of active neurons")
    selection: str = arg(SparkifyConfig.method, "statistical (stat) or exact (topk) top-k on the scores",
                         choices=("stat", "topk"))
    fractions: tuple[float, ...] = arg((0.1, 0.2, 0.3, 0.5), "fractions for the perplexity curves",
                                       parse=fraction_list)
    baselines: tuple[str, ...] = arg(("oracle", "random"), "comma list of baselines: oracle, random", parse=csv)
    finetune_steps: int = arg(0, "continued training steps (0: none)")
    finetune_lr: float = arg(3e-5, "continued training learning rate")
    finetune_objective: str = arg("kd", "kd: back to the dense model's predictions; lm: next-token loss",
                                  choices=("kd", "lm"))
    finetune_train: str = arg("ffn", "train the FFNs only, or every decoder parameter", choices=("ffn", "all"))
    finetune_batch: int = arg(4, "continued training batch size (prompts)")
    finetune_save: bool = arg(False, "save the continued-trained model (save_pretrained) under OUT/finetuned")
    ablation: bool = arg(False, "recall of predictor variants on 5 layers")
    predictor: str | None = arg(None, "evaluate this saved predictor.safetensors instead of fitting one (--rank "
                                      "etc. ignored)")

    def predictor_config(self) -> SparkifyConfig:
        return SparkifyConfig(rank=self.rank, input=self.input, output=self.output, fit=self.fit,
                              train_steps=self.train_steps, fraction=self.fraction, method=self.selection,
                              seed=self.seed)


def _ablation(view, Xtr, Xva, cfg: SparkifyConfig, log, layers: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Recall at the target fraction (exact top-k on the scores) for predictor variants, on a few layers."""
    L = len(view)
    layers = list(layers) if layers is not None else sorted({0, L // 4, L // 2, 3 * L // 4, L - 1})
    variants = [("gate, svd (weights only)", dict(output="gate", fit="none")),
                ("gate, lsq", dict(output="gate", fit="lsq")),
                ("gate_up, svd (weights only)", dict(output="gate_up", fit="none")),
                ("gate_up, lsq", dict(output="gate_up", fit="lsq")),
                ("gate_up, lsq, rank/2", dict(output="gate_up", fit="lsq", rank=max(1, cfg.rank // 2))),
                ("gate_up, lsq, rank*2", dict(output="gate_up", fit="lsq",
                                              rank=min(cfg.rank * 2, Xtr[0].shape[1]))),
                ("gate_up, lsq + 200 Adam steps", dict(output="gate_up", fit="lsq", train_steps=200)),
                ("split x[:rank] K1 = W[:, :rank]", dict(input="split", output="gate", fit="none")),
                ("split x[:rank] gate_up, lsq", dict(input="split", output="gate_up", fit="lsq"))]
    rows = []
    t = time.time()
    for label, kw in variants:
        c = replace(cfg, **kw)
        c.method = "topk"
        rec, en = [], []
        for i in layers:
            p, _ = fit_predictor(view[i], Xtr[i], c)
            m = recall_metrics(view[i], p, Xva[i], [cfg.fraction])
            rec.append(m["recall"][0])
            en.append(m["energy"][0])
        rows.append({"variant": label, "rank": c.rank, "layers": layers, "recall": sum(rec) / len(rec),
                     "energy": sum(en) / len(en), "recall_per_layer": rec,
                     "predictor_macs": (c.rank * Xtr[0].shape[1] if c.input == "lowrank" else 0)
                     + c.rank * view[0].n_neurons * (2 if c.output == "gate_up" else 1)})
        log(f"  ablation {label:34s} rank {c.rank:4d}: recall {rows[-1]['recall']:.3f} energy "
            f"{rows[-1]['energy']:.3f} ({time.time() - t:.0f} s)")
    return rows


def run_sparkify(run: SparkifyRun, model: torch.nn.Module | None = None, tokenizer: Any = None, capset=None,
                 log: Callable[[str], None] = log) -> dict[str, Any]:
    """Python API of ``sparkformer bricks sparkify``: fit a low-rank neuron predictor per layer (truncated SVD /
    Spark split, least squares on recorded FFN inputs), calibrate statistical top-k, measure recall and perplexity
    vs active fraction (predictor, oracle, random); optional short continued training. Writes
    ``predictor.safetensors`` + ``predictor.json`` (see :mod:`sparkformer.bricks.routing` for the tensors),
    ``results.json`` and plots under ``run.out``."""
    t0 = start(run)
    out = Path(run.out)
    cfg = run.predictor_config()
    dt = DTYPES[run.dtype]
    model, tokenizer, name, _ = load_model(run.model, model, tokenizer, run.dtype, log=log)
    view = NeuronView(model)
    check_sparkify_supported(view)
    cfg.validate(None if run.predictor is not None else view[0].up_rows().shape[1])
    fractions = sorted(set(fraction_list(run.fractions)) | {cfg.fraction})
    d = capability_tokens(tokenizer, capset or run.prompts(), run.max_tokens)
    timings: dict[str, float] = {}
    t = time.time()
    Xtr, Xva = recorded_inputs(model, view, d, run.batch_size, run.record_cache, log)
    timings["record"] = time.time() - t
    t = time.time()
    if run.predictor is not None:  # re-evaluate a saved predictor (its fraction/stat_fraction are re-calibrated)
        preds, _ = load_routers(run.predictor)
        if len(preds) != len(view) or any(p.n_neurons != layer.n_neurons for p, layer in zip(preds, view)):
            raise ValueError(f"{run.predictor}: does not match the model's FFN layers")
        cfg = replace(cfg, rank=preds[0].rank, input=preds[0].input, output=preds[0].output,
                      method=preds[0].method)
        calibrate_routers(preds, Xtr, cfg.fraction)
        infos = [{"loaded": str(run.predictor)} for _ in preds]
    else:
        preds, infos = sparkify_model(model, Xtr, cfg, view, log)
    timings["fit"] = time.time() - t
    dm = view[0].up_rows().shape[1]
    n = view[0].n_neurons
    dense_macs = 3 * dm * n
    pred_macs = preds[0].cost(dm)
    meta = {"model": name, "architecture": view.arch, "act": preds[0].act, "d_model": dm, "n_neurons": n,
            "n_layers": len(view), "config": asdict(cfg),
            "score": ("s = |act(g) * u|, [g; u] = B (A x)" if cfg.output == "gate_up" else "s = B (A x)")
            if cfg.input == "lowrank" else
            ("s = |act(g) * u|, [g; u] = B x[dims]" if cfg.output == "gate_up" else "s = B x[dims]"),
            "select": {"method": cfg.method, "target_fraction": cfg.fraction,
                       "stat_fraction_per_layer": [p.stat_fraction for p in preds]},
            "ffn": "predicted gated FFN: for kept i, h_i = act(W_gate[i] x) * (W_up[i] x); y = W_down[:, kept] h",
            "macs_per_token": {"predictor": pred_macs, "dense_ffn": dense_macs,
                               "sparse_ffn_at_target": pred_macs + round(cfg.fraction * dense_macs)}}
    save_routers(out / "predictor", preds, meta)
    log(f"predictors fitted and saved ({timings['fit']:.0f} s); predictor {pred_macs} MACs/token/layer = "
        f"{100 * pred_macs / dense_macs:.1f}% of the dense FFN")
    t = time.time()  # recall on validation tokens
    per, mean = layer_recall(view, preds, Xva, fractions)
    sel = [p["selection"] for p in per]
    recall = {**mean, "at_target": {k: sum(s[k] for s in sel) / len(sel) for k in ("achieved", "recall", "energy")},
              "per_layer": per}
    timings["recall"] = time.time() - t
    log(f"recall of the true top-{cfg.fraction:.0%} neurons (val tokens): {recall['at_target']['recall']:.3f} at "
        f"achieved {recall['at_target']['achieved']:.3f} (stat top-k), energy {recall['at_target']['energy']:.3f}")
    abl = _ablation(view, Xtr, Xva, cfg, log) if run.ablation else None
    t = time.time()  # perplexity curves
    dense = routed_loss(model, d["heldout"], None, view, run.batch_size)
    log(f"dense: ppl {dense['ppl']:.3f} on {dense['tokens']} held-out tokens ({time.time() - t:.0f} s)")
    curves: dict[str, list] = {}
    curves["predictor"] = ppl_curve(model, d["heldout"], preds, fractions, view, Xtr, run.batch_size, dense["loss"],
                                    log, "predictor")
    calibrate_routers(preds, Xtr, cfg.fraction)  # back to the target
    if "oracle" in run.baselines:
        curves["oracle"] = ppl_curve(model, d["heldout"], oracle_routers(view, method="topk"), fractions, view, None,
                                     run.batch_size, dense["loss"], log, "oracle")
    if "random" in run.baselines:
        curves["random"] = ppl_curve(model, d["heldout"], random_routers(view, seed=run.seed, method="topk"),
                                     fractions, view, None, run.batch_size, dense["loss"], log, "random")
    timings["curves"] = time.time() - t
    at = next(p for p in curves["predictor"] if p["fraction"] == cfg.fraction)
    finetune = _finetune(run, model, tokenizer, preds, d, at, dense, dt, out, log) if run.finetune_steps > 0 else None
    timings["total"] = time.time() - t0
    summary = {"model": name, "dense_ppl": dense["ppl"], "target_fraction": cfg.fraction,
               "achieved_fraction": at["active"], "ppl": at["ppl"], "ppl_change_pct": at["ppl_change_pct"],
               "recall": recall["at_target"]["recall"], "energy": recall["at_target"]["energy"],
               "oracle_ppl_change_pct": next((p["ppl_change_pct"] for p in curves.get("oracle", [])
                                              if p["fraction"] == cfg.fraction), None),
               "predictor_macs_pct_of_dense_ffn": 100 * pred_macs / dense_macs}
    if finetune:
        summary["after_training_ppl_change_pct"] = finetune["after"]["ppl_change_pct"]
        summary["gap_recovered"] = finetune["gap_recovered"]
    res = {"command": command_line("sparkify", run), "model": name, "environment": environment(dt),
           "config": asdict(cfg), "data": {k: d[k] for k in ("capabilities", "descriptions", "tokens", "prompts")},
           "predictor": meta, "fit": infos, "recall": recall, "ablation": abl, "dense": dense, "curves": curves,
           "finetune": finetune, "summary": summary, "timings_s": timings}
    write_results(out, res, command=res["command"])
    extra = {}
    if finetune:
        extra[f"predictor + {run.finetune_steps} steps {run.finetune_objective}"] = finetune["after"]
    plot_ppl_curves(curves, dense["ppl"], out / "sparkify_ppl.png",
                    f"{name}: neuron granularity (predictor rank {cfg.rank}, {cfg.input}/{cfg.output}, "
                    f"{cfg.method} top-k)", extra, (cfg.fraction, 5.0))
    plot_recall({"recall (stat top-k at target)": [s["recall"] for s in sel],
                 "output energy kept / oracle's": [s["energy"] for s in sel]}, out / "sparkify_recall.png",
                f"{name}: predictor vs true top-{cfg.fraction:.0%} neurons per layer (val tokens)", "fraction")
    return res


def _finetune(run: SparkifyRun, model, tokenizer, preds, d, at, dense, dt, out: Path, log) -> dict[str, Any]:
    """Continued training with the predictors applied; perplexity before / after (and the model saved)."""
    t = time.time()
    trained, ft = continued_training(model, preds, d["train"], run.finetune_steps, run.finetune_lr,
                                     run.finetune_objective, run.finetune_batch, run.finetune_train,
                                     torch.bfloat16 if dt == torch.bfloat16 else None, run.seed, log)
    after = routed_loss(trained, d["heldout"], preds, NeuronView(trained), run.batch_size)
    dense_after = routed_loss(trained, d["heldout"], None, NeuronView(trained), run.batch_size)
    if run.finetune_save:
        if not hasattr(trained, "save_pretrained"):
            raise ValueError(f"--finetune-save: {type(trained).__name__} has no save_pretrained")
        trained.save_pretrained(out / "finetuned")
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(out / "finetuned")
    gap_before, gap_after = at["loss"] - dense["loss"], after["loss"] - dense["loss"]
    finetune = {**{k: v for k, v in ft.items() if k != "losses"}, "loss_curve": ft["losses"],
                "before": {"ppl": at["ppl"], "active": at["active"], "ppl_change_pct": at["ppl_change_pct"]},
                "after": {"ppl": after["ppl"], "active": after["active"],
                          "ppl_change_pct": 100 * (math.exp(gap_after) - 1)},
                "dense_model_after_training_ppl": dense_after["ppl"],
                "gap_recovered": 1 - gap_after / gap_before if gap_before > 0 else None,
                "seconds_total": time.time() - t}
    log(f"continued training ({run.finetune_objective}, {run.finetune_steps} steps, {ft['tokens']} tokens, "
        f"{ft['seconds']:.0f} s): ppl {at['ppl']:.3f} -> {after['ppl']:.3f} at {after['active']:.3f} active "
        f"({finetune['after']['ppl_change_pct']:+.1f}% vs dense; gap recovered "
        f"{100 * (finetune['gap_recovered'] or 0):.0f}%)")
    return finetune


def sparkify_summary(res: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The perplexity table of a sparkify result, and its headline numbers."""
    s, cfg = res["summary"], res["config"]
    lines = [f"\n{s['model']}: dense ppl {s['dense_ppl']:.3f}; predictor rank {cfg['rank']} "
             f"({s['predictor_macs_pct_of_dense_ffn']:.1f}% of a dense FFN's MACs)",
             f"{'method':>10s} {'target':>7s} {'achieved':>9s} {'ppl':>8s} {'change':>8s}"]
    lines += [f"{m:>10s} {p['fraction']:7.2f} {p['active']:9.3f} {p['ppl']:8.3f} {p['ppl_change_pct']:+7.1f}%"
              for m, pts in res["curves"].items() for p in pts]
    if res["finetune"]:
        f = res["finetune"]["after"]
        lines.append(f"{'+train':>10s} {cfg['fraction']:7.2f} {f['active']:9.3f} {f['ppl']:8.3f} "
                     f"{f['ppl_change_pct']:+7.1f}%")
    return "\n".join(lines), {**s, "seconds": res["timings_s"]["total"]}


def add_cli(subparsers) -> None:
    add_command(subparsers, "sparkify", SparkifyRun, run_sparkify,
                help="Spark-style sparse inference for a gated-FFN model: predictor + stat top-k",
                summary=sparkify_summary)
