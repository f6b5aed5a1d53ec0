"""Learned brick routers (MoEfication): per layer, a small network from the FFN input to each brick's share of
the output energy; and ``sparkformer bricks route``, which compares them with oracle and random routing.

    router, log = fit_brick_router(view[3], X[3], partition.assign[3], hidden=0, steps=300)
    run_route(RouteRun(model="smollm2-135m", out="runs/route", n_bricks=32))
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from sparkformer.bricks.experiment import (DTYPES, RecordRun, add_command, arg, command_line, csv, environment,
                                           fraction_list, load_model, log, start, write_results)
from sparkformer.bricks.ffn_inputs import layer_activation, recorded_inputs
from sparkformer.bricks.neurons import NeuronView
from sparkformer.bricks.partition import Partition, Partitioning
from sparkformer.bricks.router_eval import layer_recall, plot_ppl_curves, plot_recall, ppl_curve, routed_loss
from sparkformer.bricks.routing import (BrickMLPRouter, _brick_reduce, load_routers, oracle_routers, random_routers,
                                        save_routers)
from sparkformer.bricks.tokens import capability_tokens


def fit_brick_router(layer, X: torch.Tensor, groups: torch.Tensor, hidden: int = 0, steps: int = 300,
                     lr: float = 3e-3, batch_tokens: int = 1024, seed: int = 0, chunk: int = 4096,
                     **select_kw) -> tuple[BrickMLPRouter, dict[str, float]]:
    """Train a brick router on recorded FFN inputs X (tokens, d): target = each brick's share of the output
    energy (sum of squared output magnitudes of its neurons), loss = soft cross-entropy of the router's logits
    against that share. Returns (router, {"loss_first", "loss_last"})."""
    groups = torch.as_tensor(groups, dtype=torch.long)
    norms = layer.down_col_norms()
    E = int(groups.max()) + 1
    targets = []
    for s in range(0, X.shape[0], chunk):  # brick energy shares, computed once
        a = layer_activation(layer, X[s: s + chunk]).float()
        e = _brick_reduce(a.abs() * norms, groups, E).square()
        targets.append(e / e.sum(-1, keepdim=True).clamp_min(1e-30))
    T = torch.cat(targets)
    Xf = X.float()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    router = BrickMLPRouter(X.shape[1], groups, hidden, **select_kw)  # seeded init
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    first = last = float("nan")
    for step in range(steps):
        idx = torch.randint(0, Xf.shape[0], (min(batch_tokens, Xf.shape[0]),), generator=g)
        logp = F.log_softmax(router.scores(Xf[idx]), dim=-1)
        loss = -(T[idx] * logp).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step == 0:
            first = float(loss.detach())
        last = float(loss.detach())
    return router.eval(), {"loss_first": first, "loss_last": last}


# ---- the experiment: `sparkformer bricks route` ---------------------------------------------------------------------
@dataclass(kw_only=True)
class RouteRun(Partitioning, RecordRun):
    """Settings of ``sparkformer bricks route``; the partition settings apply when no ``partition`` file is given."""

    partition: str | None = arg(None, "partition file (default: compute one, see --n-bricks / --method)")
    hidden: int = arg(0, "router hidden width (0 = linear router)")
    steps: int = arg(300, "Adam steps per layer")
    lr: float = arg(3e-3, "Adam learning rate")
    fractions: tuple[float, ...] = arg((0.125, 0.25, 0.5), "fractions of active bricks to evaluate",
                                       parse=fraction_list)
    predictor: str | None = arg(None, "a sparkify predictor.safetensors: also route bricks by its neuron scores "
                                      "(L2 per brick)")
    baselines: tuple[str, ...] = arg(("oracle", "random"), "comma list of baselines: oracle, random", parse=csv)


def run_route(run: RouteRun, model: torch.nn.Module | None = None, tokenizer: Any = None, capset=None,
              log: Callable[[str], None] = log) -> dict[str, Any]:
    """Python API of ``sparkformer bricks route``: train a brick router per layer on recorded FFN inputs (target:
    each brick's share of the output energy), then measure recall and perplexity with the top bricks per token,
    against oracle and random routing. Writes ``results.json``, the routers (``brick_routers.safetensors`` +
    ``.json``), the partition when computed, and ``route_ppl.png`` / ``route_recall.png`` under ``run.out``."""
    t0 = start(run)
    out = Path(run.out)
    fractions = list(fraction_list(run.fractions))
    model, tokenizer, name, _ = load_model(run.model, model, tokenizer, run.dtype, log=log)
    view = NeuronView(model)
    d = capability_tokens(tokenizer, capset or run.prompts(), run.max_tokens)
    timings: dict[str, float] = {}
    t = time.time()
    if run.partition is not None:
        part = Partition.load(run.partition)
        part.check_model(view)
    else:
        part = run.make_partition(model, view, d["train"], d["skip"], run.batch_size, run.seed, {"model": name})
        part.save(out / "partition.safetensors")
    timings["partition"] = time.time() - t
    t = time.time()
    Xtr, Xva = recorded_inputs(model, view, d, run.batch_size, run.record_cache, log)
    timings["record"] = time.time() - t
    t = time.time()
    routers, fit_log = [], []
    for i, layer in enumerate(view):
        r, lg = fit_brick_router(layer, Xtr[i], part.assign[i], run.hidden, run.steps, run.lr, seed=run.seed + i,
                                 fraction=fractions[0], method="topk")
        routers.append(r)
        fit_log.append(lg)
    timings["fit"] = time.time() - t
    save_routers(out / "brick_routers", routers, {"model": name, "partition": part.method,
                                                 "n_bricks": part.n_bricks, "hidden": run.hidden,
                                                 "steps": run.steps})
    log(f"brick routers fitted ({timings['fit']:.0f} s)")
    methods: dict[str, list] = {"router": routers}
    if "oracle" in run.baselines:
        methods["oracle"] = oracle_routers(view, part, method="topk")
    if "random" in run.baselines:
        methods["random"] = random_routers(view, part, seed=run.seed, method="topk")
    if run.predictor is not None:
        preds, _ = load_routers(run.predictor)
        for i, p in enumerate(preds):
            p.set_groups(part.assign[i])
            p.method = "topk"
        methods["predictor-bricks"] = preds
    t = time.time()  # recall of the top bricks on validation tokens (random: chance; oracle: 1 by definition)
    recall: dict[str, Any] = {}
    for mname, rs in methods.items():
        if mname not in ("random", "oracle"):
            per, mean = layer_recall(view, rs, Xva, fractions)
            recall[mname] = {**mean, "recall_per_layer": [p["recall"] for p in per]}
    timings["recall"] = time.time() - t
    t = time.time()
    dense = routed_loss(model, d["heldout"], None, view, run.batch_size)
    log(f"dense: ppl {dense['ppl']:.3f} on {dense['tokens']} held-out tokens ({time.time() - t:.0f} s)")
    curves = {}
    for mname, rs in methods.items():
        for r in rs:
            r.method = "topk"
        curves[mname] = ppl_curve(model, d["heldout"], rs, fractions, view, None, run.batch_size, dense["loss"],
                                  log, mname)
    timings["curves"] = time.time() - t
    timings["total"] = time.time() - t0
    res = {"command": command_line("route", run), "model": name, "environment": environment(DTYPES[run.dtype]),
           "data": {k: d[k] for k in ("capabilities", "descriptions", "tokens", "prompts")},
           "partition": {"method": part.method, "n_bricks": part.n_bricks, "brick_size": part.brick_size(0),
                         "file": str(run.partition) if run.partition else str(out / "partition.safetensors"),
                         **part.meta},
           "router": {"hidden": run.hidden, "steps": run.steps, "lr": run.lr, "selection": "topk", "fit": fit_log,
                      "params_per_layer": sum(p.numel() for p in routers[0].parameters())},
           "dense": dense, "recall": recall, "curves": curves, "timings_s": timings}
    write_results(out, res, command=res["command"])
    plot_ppl_curves(curves, dense["ppl"], out / "route_ppl.png",
                    f"{name}: brick granularity ({part.n_bricks} bricks/layer, {part.method} partition)")
    if recall:
        j = min(range(len(fractions)), key=lambda k: abs(fractions[k] - 0.25))
        plot_recall({m: [row[j] for row in v["recall_per_layer"]] for m, v in recall.items()},
                    out / "route_recall.png", f"{name}: recall of the true top-{fractions[j]:.0%} bricks per layer",
                    "recall")
    return res


def route_summary(res: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The perplexity table of a route result, and its headline numbers."""
    dense, part = res["dense"]["ppl"], res["partition"]
    fractions = [p["fraction"] for p in next(iter(res["curves"].values()))]
    lines = [f"\n{res['model']}: {part['n_bricks']} bricks/layer ({part['method']}), dense ppl {dense:.3f}",
             f"{'method':>18s} " + " ".join(f"{f:>14.3f}" for f in fractions)]
    lines += [f"{m:>18s} " + " ".join(f"{p['ppl']:8.3f} {p['ppl_change_pct']:+5.0f}%" for p in pts)
              for m, pts in res["curves"].items()]
    return "\n".join(lines), {
        "model": res["model"], "dense_ppl": dense, "partition": part["method"], "n_bricks": part["n_bricks"],
        "ppl_change_pct": {m: {str(p["fraction"]): p["ppl_change_pct"] for p in pts}
                           for m, pts in res["curves"].items()},
        "recall": {m: dict(zip(map(str, v["fractions"]), v["recall"])) for m, v in res["recall"].items()},
        "seconds": res["timings_s"]["total"]}


def add_cli(subparsers) -> None:
    add_command(subparsers, "route", RouteRun, run_route,
                help="learned brick routers vs oracle and random: recall, perplexity vs bricks",
                summary=route_summary)
