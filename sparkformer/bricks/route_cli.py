"""`sparkformer bricks partition|route|sparkify`: emergent bricks, brick routers and Spark-style sparse FFNs.

    sparkformer bricks partition --model smollm2-135m --bricks 16 --method coactivation --out p.safetensors
    sparkformer bricks route     --model smollm2-135m --partition p.safetensors --out runs/route
    sparkformer bricks sparkify  --model smollm2-135m --rank 128 --fraction 0.3 --out runs/sparkify

Each command is a plain function (``run_partition``, ``run_route``, ``run_sparkify``) that takes a model object or
a name; the commands print a table and end with one JSON line. ``route`` and ``sparkify`` write ``results.json``,
PNG plots and their routers (``.safetensors`` + ``.json``) under ``--out``. Perplexities are measured with the
dense model's activations masked (simulated sparsity, not the decode kernels).

Hook: :func:`add_route_commands` (alias ``add_bricks_cli``) adds the three sub-commands to the ``bricks`` group.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


# ---- shared preparation ----------------------------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load(model: Any, tokenizer: Any, dtype: torch.dtype) -> tuple[Any, Any, str]:
    if isinstance(model, (str, Path)):
        from sparkformer.pretrained import load_causal_lm

        name = str(model)
        model, tok = load_causal_lm(name, dtype)
        return model, tokenizer if tokenizer is not None else tok, name
    model = model.to(dtype).eval()
    return model, tokenizer, type(model).__name__


def _data(tokenizer, capset=None, capabilities: str = "default", data: Sequence[str] | None = None,
          prompts_per_capability: int = 40, heldout_per_capability: int = 8, max_tokens: int = 128, seed: int = 0,
          val_every: int = 10) -> dict[str, Any]:
    """Token lists: ``train`` (scoring prompts minus every ``val_every``-th), ``val`` (those), ``heldout``."""
    from sparkformer.bricks.analysis import encode, special_ids
    from sparkformer.bricks.capabilities import build_capability_set

    if capset is None:
        caps = [] if capabilities in ("none", "") else capabilities
        capset = build_capability_set(caps, list(data or []), n_per_capability=prompts_per_capability,
                                      n_heldout=heldout_per_capability, chars=6 * max_tokens, seed=seed)
    score = encode(tokenizer, [p.text for p in capset.score], max_tokens)
    held = encode(tokenizer, [p.text for p in capset.heldout], max_tokens)
    val = [t for i, t in enumerate(score) if i % val_every == val_every - 1]
    train = [t for i, t in enumerate(score) if i % val_every != val_every - 1]
    held = [t for t in held if len(t) >= 2]
    return {"train": train, "val": val, "heldout": held, "skip": special_ids(tokenizer),
            "capabilities": capset.capabilities, "descriptions": capset.description,
            "tokens": {"train": sum(map(len, train)), "val": sum(map(len, val)), "heldout": sum(map(len, held))},
            "prompts": {"train": len(train), "val": len(val), "heldout": len(held)}}


def _record(model, view, d: dict[str, Any], batch_size: int, cache: str | Path | None = None
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Recorded FFN inputs of the train and val prompts; ``cache`` (a .safetensors path) is read when it holds the
    same token counts, else written (re-running on the same model and data then skips the forward passes)."""
    from sparkformer.bricks.routing import record_ffn_inputs

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


def _environment(dtype: torch.dtype) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "dtype": str(dtype).replace("torch.", "")}


def _fractions(s: str | Sequence[float]) -> list[float]:
    if not isinstance(s, str):
        return [float(x) for x in s]
    try:
        fr = sorted({float(x) for x in s.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"fractions {s!r}: expected a comma list of numbers in (0, 1]") from None
    if not fr or any(not 0 < f <= 1 for f in fr):
        raise ValueError(f"fractions {s!r}: every fraction must be in (0, 1]")
    return fr


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=_json_default))


# ---- plots ----------------------------------------------------------------------------------------------------------
def plot_ppl_curves(curves: dict[str, list[dict]], dense_ppl: float, path: Path, title: str,
                    extra: dict[str, dict] | None = None, target: tuple[float, float] = (0.3, 5.0)) -> None:
    """Perplexity change vs achieved active fraction, one line per method (log-scale y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


# ---- partition ------------------------------------------------------------------------------------------------------
def run_partition(model: Any, out: str | Path, n_bricks: int = 16, method: str = "weights", tokenizer: Any = None,
                  capset=None, capabilities: str = "default", data: Sequence[str] | None = None,
                  prompts_per_capability: int = 40, max_tokens: int = 128, batch_size: int = 8,
                  features: str = "gate", active_fraction: float = 0.2, coactivation_norm: str = "cosine",
                  seed: int = 0, dtype: str = "float32", log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Python API of ``sparkformer bricks partition``: writes the partition file and ``<file>.json`` (summary)."""
    from sparkformer.bricks.neurons import NeuronView
    from sparkformer.bricks.partition import coactivation_counts, coactivation_score, partition_model, Partition

    t0 = time.time()
    dt = DTYPES[dtype]
    model, tokenizer, name = _load(model, tokenizer, dt)
    view = NeuronView(model)
    toks, info = None, {}
    if method == "coactivation":
        d = _data(tokenizer, capset, capabilities, data, prompts_per_capability, 1, max_tokens, seed)
        toks = d["train"] + d["val"]
        info = {"tokens": sum(map(len, toks)), "capabilities": d["capabilities"]}
    part = partition_model(model, n_bricks, method, token_lists=toks, features=features,
                           active_fraction=active_fraction, coactivation_norm=coactivation_norm, seed=seed,
                           batch_size=batch_size,
                           skip_ids=set() if toks is None else d["skip"], view=view,
                           meta={"model": name, **info})
    path = part.save(out)
    summary: dict[str, Any] = {"model": name, "method": method, "n_bricks": n_bricks, "file": str(path),
                               "bytes": path.stat().st_size, "n_layers": part.n_layers,
                               "brick_size": part.brick_size(0), "seconds": time.time() - t0, **part.meta}
    if method == "coactivation":  # how much co-activation stays inside bricks, against a random partition
        counts, _ = coactivation_counts(model, view, toks[: max(1, len(toks) // 4)], active_fraction, batch_size,
                                        d["skip"])
        g = torch.Generator().manual_seed(seed)
        rnd = Partition("random", n_bricks, [torch.randperm(n, generator=g) % n_bricks for n in view.n_neurons])
        summary["in_brick_coactivation"] = sum(coactivation_score(part, counts)) / part.n_layers
        summary["in_brick_coactivation_random"] = sum(coactivation_score(rnd, counts)) / part.n_layers
    _write_json(path.with_suffix(".json"), summary)
    log(f"partition: {part.n_layers} layers x {n_bricks} bricks of {part.brick_size(0)} neurons ({method}) -> "
        f"{path} ({summary['bytes']} bytes, {summary['seconds']:.0f} s)")
    return summary


# ---- route (brick granularity) --------------------------------------------------------------------------------------
def run_route(model: Any, out: str | Path, partition: str | Path | None = None, n_bricks: int = 16,
              method: str = "weights", tokenizer: Any = None, capset=None, capabilities: str = "default",
              data: Sequence[str] | None = None, prompts_per_capability: int = 40, heldout_per_capability: int = 8,
              max_tokens: int = 128, batch_size: int = 8, hidden: int = 0, steps: int = 300, lr: float = 3e-3,
              fractions: Sequence[float] = (0.125, 0.25, 0.5), selection: str = "topk",
              predictor: str | Path | None = None, baselines: Sequence[str] = ("oracle", "random"),
              seed: int = 0, dtype: str = "float32", log: Callable[[str], None] = _log,
              command: str | None = None, record_cache: str | Path | None = None) -> dict[str, Any]:
    """Python API of ``sparkformer bricks route``: brick routers per layer, recall and perplexity vs active bricks."""
    from sparkformer.bricks.neurons import NeuronView
    from sparkformer.bricks.partition import Partition, partition_model
    from sparkformer.bricks.routing import (fit_brick_router, load_routers, oracle_routers, random_routers,
                                            save_routers)
    from sparkformer.bricks.sparkify import ppl_curve, recall_metrics, routed_loss

    t0 = time.time()
    out = Path(out)
    dt = DTYPES[dtype]
    model, tokenizer, name = _load(model, tokenizer, dt)
    view = NeuronView(model)
    d = _data(tokenizer, capset, capabilities, data, prompts_per_capability, heldout_per_capability, max_tokens, seed)
    timings: dict[str, float] = {}
    t = time.time()
    if partition is not None:
        part = Partition.load(partition)
        part.check_model(view)
    else:
        part = partition_model(model, n_bricks, method, token_lists=d["train"], seed=seed, batch_size=batch_size,
                               skip_ids=d["skip"], view=view, meta={"model": name})
        part.save(out / "partition.safetensors")
    timings["partition"] = time.time() - t
    t = time.time()
    Xtr, Xva = _record(model, view, d, batch_size, record_cache)
    timings["record"] = time.time() - t
    log(f"recorded FFN inputs: {Xtr[0].shape[0]} train + {Xva[0].shape[0]} val tokens x {len(Xtr)} layers "
        f"({timings['record']:.0f} s)")
    t = time.time()
    routers, fit_log = [], []
    for i, layer in enumerate(view):
        r, lg = fit_brick_router(layer, Xtr[i], part.assign[i], hidden, steps, lr, seed=seed + i,
                                 fraction=fractions[0], method=selection)
        routers.append(r)
        fit_log.append(lg)
    timings["fit"] = time.time() - t
    save_routers(out / "brick_routers", routers, {"model": name, "partition": part.method, "n_bricks": part.n_bricks,
                                                 "hidden": hidden, "steps": steps})
    log(f"brick routers fitted ({timings['fit']:.0f} s)")
    methods: dict[str, list] = {"router": routers}
    if "oracle" in baselines:
        methods["oracle"] = oracle_routers(view, part, method="topk")
    if "random" in baselines:
        methods["random"] = random_routers(view, part, seed=seed, method="topk")
    if predictor is not None:
        preds, _ = load_routers(predictor)
        for i, p in enumerate(preds):
            p.set_groups(part.assign[i])
            p.method = "topk"
        methods["predictor-bricks"] = preds
    # recall of the top bricks on validation tokens
    t = time.time()
    recall: dict[str, Any] = {}
    for mname, rs in methods.items():
        if mname in ("random", "oracle"):  # random: chance; oracle: 1 by definition
            continue
        per = [recall_metrics(view[i], rs[i], Xva[i], fractions) for i in range(len(view))]
        recall[mname] = {"fractions": list(fractions),
                         "recall": [sum(p["recall"][j] for p in per) / len(per) for j in range(len(fractions))],
                         "energy": [sum(p["energy"][j] for p in per) / len(per) for j in range(len(fractions))],
                         "recall_per_layer": [p["recall"] for p in per]}
    timings["recall"] = time.time() - t
    t = time.time()
    dense = routed_loss(model, d["heldout"], None, view, batch_size)
    log(f"dense: ppl {dense['ppl']:.3f} on {dense['tokens']} held-out tokens ({time.time() - t:.0f} s)")
    curves = {}
    for mname, rs in methods.items():
        for r in rs:
            r.method = "topk"
        curves[mname] = ppl_curve(model, d["heldout"], rs, fractions, view, None, batch_size, dense["loss"], log,
                                  mname)
    timings["curves"] = time.time() - t
    timings["total"] = time.time() - t0
    res = {"command": command, "model": name, "environment": _environment(dt),
           "data": {k: d[k] for k in ("capabilities", "descriptions", "tokens", "prompts")},
           "partition": {"method": part.method, "n_bricks": part.n_bricks, "brick_size": part.brick_size(0),
                         "file": str(partition) if partition else str(out / "partition.safetensors"), **part.meta},
           "router": {"hidden": hidden, "steps": steps, "lr": lr, "selection": "topk", "fit": fit_log,
                      "params_per_layer": sum(p.numel() for p in routers[0].parameters())},
           "dense": dense, "recall": recall, "curves": curves, "timings_s": timings}
    _write_json(out / "results.json", res)
    plot_ppl_curves(curves, dense["ppl"], out / "route_ppl.png",
                    f"{name}: brick granularity ({part.n_bricks} bricks/layer, {part.method} partition)")
    if recall:
        j = min(range(len(fractions)), key=lambda k: abs(fractions[k] - 0.25))
        plot_recall({m: [row[j] for row in v["recall_per_layer"]] for m, v in recall.items()},
                    out / "route_recall.png", f"{name}: recall of the true top-{fractions[j]:.0%} bricks per layer",
                    "recall")
    return res


# ---- sparkify (neuron granularity) ----------------------------------------------------------------------------------
def run_sparkify(model: Any, out: str | Path, cfg=None, tokenizer: Any = None, capset=None,
                 capabilities: str = "default", data: Sequence[str] | None = None, prompts_per_capability: int = 40,
                 heldout_per_capability: int = 8, max_tokens: int = 128, batch_size: int = 8,
                 fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.5), baselines: Sequence[str] = ("oracle", "random"),
                 finetune_steps: int = 0, finetune_lr: float = 3e-5, finetune_objective: str = "kd",
                 finetune_train: str = "ffn", finetune_batch: int = 4, ablation: bool = False, seed: int = 0,
                 dtype: str = "float32", log: Callable[[str], None] = _log, command: str | None = None,
                 record_cache: str | Path | None = None, predictor: str | Path | None = None,
                 finetune_save: bool = False) -> dict[str, Any]:
    """Python API of ``sparkformer bricks sparkify``: predictors, recall, perplexity vs active fraction, optional
    continued training. Writes ``predictor.safetensors`` + ``predictor.json`` (see :mod:`sparkformer.bricks.routing`
    for the tensors), ``results.json`` and plots under ``out``."""
    from sparkformer.bricks.neurons import NeuronView
    from sparkformer.bricks.routing import load_routers, oracle_routers, random_routers, save_routers
    from sparkformer.bricks.sparkify import (SparkifyConfig, calibrate_routers, check_sparkify_supported,
                                             continued_training, fit_predictor, ppl_curve, recall_metrics,
                                             routed_loss, sparkify_model)

    t0 = time.time()
    out = Path(out)
    cfg = cfg or SparkifyConfig()
    dt = DTYPES[dtype]
    model, tokenizer, name = _load(model, tokenizer, dt)
    view = NeuronView(model)
    check_sparkify_supported(view)
    cfg.validate(None if predictor is not None else view[0].up_rows().shape[1])
    fractions = sorted(set(_fractions(fractions)) | {cfg.fraction})
    d = _data(tokenizer, capset, capabilities, data, prompts_per_capability, heldout_per_capability, max_tokens, seed)
    timings: dict[str, float] = {}
    t = time.time()
    Xtr, Xva = _record(model, view, d, batch_size, record_cache)
    timings["record"] = time.time() - t
    log(f"recorded FFN inputs: {Xtr[0].shape[0]} train + {Xva[0].shape[0]} val tokens x {len(Xtr)} layers "
        f"({timings['record']:.0f} s)")
    t = time.time()
    if predictor is not None:  # re-evaluate a saved predictor (its fraction/stat_fraction are re-calibrated)
        preds, _ = load_routers(predictor)
        if len(preds) != len(view) or any(p.n_neurons != layer.n_neurons for p, layer in zip(preds, view)):
            raise ValueError(f"{predictor}: does not match the model's FFN layers")
        from dataclasses import replace

        cfg = replace(cfg, rank=preds[0].rank, input=preds[0].input, output=preds[0].output,
                      method=preds[0].method)
        calibrate_routers(preds, Xtr, cfg.fraction)
        infos = [{"loaded": str(predictor)} for _ in preds]
    else:
        preds, infos = sparkify_model(model, Xtr, cfg, view, log)
    timings["fit"] = time.time() - t
    dm = view[0].up_rows().shape[1]
    n = view[0].n_neurons
    dense_macs = 3 * dm * n
    pred_macs = preds[0].cost(dm)
    meta = {"model": name, "architecture": view.arch, "act": preds[0].act, "d_model": dm, "n_neurons": n,
            "n_layers": len(view), "config": _cfg_dict(cfg),
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
    # recall on validation tokens
    t = time.time()
    per = [recall_metrics(view[i], preds[i], Xva[i], fractions) for i in range(len(view))]
    sel = [p["selection"] for p in per]
    recall = {"fractions": fractions,
              "recall": [sum(p["recall"][j] for p in per) / len(per) for j in range(len(fractions))],
              "energy": [sum(p["energy"][j] for p in per) / len(per) for j in range(len(fractions))],
              "at_target": {k: sum(s[k] for s in sel) / len(sel) for k in ("achieved", "recall", "energy")},
              "per_layer": per}
    timings["recall"] = time.time() - t
    log(f"recall of the true top-{cfg.fraction:.0%} neurons (val tokens): {recall['at_target']['recall']:.3f} at "
        f"achieved {recall['at_target']['achieved']:.3f} (stat top-k), energy {recall['at_target']['energy']:.3f}")
    abl = _ablation(view, Xtr, Xva, cfg, log) if ablation else None
    # perplexity curves
    t = time.time()
    dense = routed_loss(model, d["heldout"], None, view, batch_size)
    log(f"dense: ppl {dense['ppl']:.3f} on {dense['tokens']} held-out tokens ({time.time() - t:.0f} s)")
    curves: dict[str, list] = {}
    curves["predictor"] = ppl_curve(model, d["heldout"], preds, fractions, view, Xtr, batch_size, dense["loss"], log,
                                    "predictor")
    calibrate_routers(preds, Xtr, cfg.fraction)  # back to the target
    if "oracle" in baselines:
        curves["oracle"] = ppl_curve(model, d["heldout"], oracle_routers(view, method="topk"), fractions, view, None,
                                     batch_size, dense["loss"], log, "oracle")
    if "random" in baselines:
        curves["random"] = ppl_curve(model, d["heldout"], random_routers(view, seed=seed, method="topk"), fractions,
                                     view, None, batch_size, dense["loss"], log, "random")
    timings["curves"] = time.time() - t
    at = next(p for p in curves["predictor"] if p["fraction"] == cfg.fraction)
    finetune = None
    if finetune_steps > 0:
        t = time.time()
        trained, ft = continued_training(model, preds, d["train"], finetune_steps, finetune_lr, finetune_objective,
                                         finetune_batch, finetune_train,
                                         torch.bfloat16 if dt == torch.bfloat16 else None, seed, log)
        after = routed_loss(trained, d["heldout"], preds, NeuronView(trained), batch_size)
        dense_after = routed_loss(trained, d["heldout"], None, NeuronView(trained), batch_size)
        if finetune_save:
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
        log(f"continued training ({finetune_objective}, {finetune_steps} steps, {ft['tokens']} tokens, "
            f"{ft['seconds']:.0f} s): ppl {at['ppl']:.3f} -> {after['ppl']:.3f} at {after['active']:.3f} active "
            f"({finetune['after']['ppl_change_pct']:+.1f}% vs dense; gap recovered "
            f"{100 * (finetune['gap_recovered'] or 0):.0f}%)")
        del trained
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
    res = {"command": command, "model": name, "environment": _environment(dt), "config": _cfg_dict(cfg),
           "data": {k: d[k] for k in ("capabilities", "descriptions", "tokens", "prompts")},
           "predictor": meta, "fit": infos, "recall": recall, "ablation": abl, "dense": dense, "curves": curves,
           "finetune": finetune, "summary": summary, "timings_s": timings}
    _write_json(out / "results.json", res)
    extra = {}
    if finetune:
        extra[f"predictor + {finetune_steps} steps {finetune_objective}"] = finetune["after"]
    plot_ppl_curves(curves, dense["ppl"], out / "sparkify_ppl.png",
                    f"{name}: neuron granularity (predictor rank {cfg.rank}, {cfg.input}/{cfg.output}, "
                    f"{cfg.method} top-k)", extra, (cfg.fraction, 5.0))
    plot_recall({"recall (stat top-k at target)": [s["recall"] for s in sel],
                 "output energy kept / oracle's": [s["energy"] for s in sel]}, out / "sparkify_recall.png",
                f"{name}: predictor vs true top-{cfg.fraction:.0%} neurons per layer (val tokens)", "fraction")
    return res


def _cfg_dict(cfg) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)


def _ablation(view, Xtr, Xva, cfg, log, layers: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Recall at the target fraction (exact top-k on the scores) for predictor variants, on a few layers."""
    from dataclasses import replace

    from sparkformer.bricks.sparkify import fit_predictor, recall_metrics

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


# ---- CLI ------------------------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, heldout: bool = True) -> None:
    p.add_argument("--model", required=True,
                   help="built-in name (smollm2-135m, gemma3-270m), HF folder, .gguf file or sparkformer checkpoint")
    p.add_argument("--capabilities", default="default",
                   help="comma list of built-in capabilities, 'default', 'all' or 'none' (only --data)")
    p.add_argument("--data", action="append", default=[], help="extra capability data (jsonl text+capability)")
    p.add_argument("--prompts-per-capability", type=int, default=40,
                   help="corpus prompts per capability for recording (every 10th is kept for validation)")
    if heldout:
        p.add_argument("--heldout-per-capability", type=int, default=8,
                       help="held-out prompts per capability for perplexity")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per prompt (at most)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype for every forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    if heldout:
        p.add_argument("--record-cache", default=None,
                       help="a .safetensors file for the recorded FFN inputs: read if it matches, else written")


def _canonical(args: argparse.Namespace, command: str, parser: argparse.ArgumentParser) -> str:
    parts = ["sparkformer", "bricks", command]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "threads"):
            continue
        v = getattr(args, action.dest, None)
        if v is None or v == action.default or v == []:
            continue
        flag = action.option_strings[-1]
        if isinstance(v, bool):
            parts.append(flag)
        elif isinstance(v, list):
            for x in v:
                parts += [flag, str(x)]
        else:
            parts += [flag, str(v)]
    return " ".join(shlex.quote(p) for p in parts)


def add_route_commands(sub) -> None:
    """Add ``partition``, ``route`` and ``sparkify`` to the ``sparkformer bricks`` sub-parsers."""
    p = sub.add_parser("partition", help="split each FFN layer's neurons into equal bricks (MoEfication) -> file",
                       description="Balanced k-means on neuron weight vectors, or co-activation clustering on corpus "
                                   "text; writes a small .safetensors partition (+ .json summary).")
    _common(p, heldout=False)
    p.add_argument("--bricks", type=int, default=16, help="bricks per layer (must divide the neuron count)")
    p.add_argument("--method", default="weights", choices=["weights", "coactivation"])
    p.add_argument("--features", default="gate", choices=["gate", "up", "gate_up"],
                   help="weights method: which rows to cluster")
    p.add_argument("--active-fraction", type=float, default=0.2,
                   help="coactivation method: a neuron is active on a token when in this top fraction")
    p.add_argument("--coactivation-norm", default="cosine", choices=["cosine", "phi"],
                   help="coactivation method: cosine-normalised counts or the phi correlation of activities")
    p.add_argument("--out", required=True, help="partition file (.safetensors)")
    p.set_defaults(func=lambda a: _cmd_partition(a, p))

    r = sub.add_parser("route", help="learned brick routers vs oracle and random: recall, perplexity vs bricks",
                       description="Train a router per layer on recorded FFN inputs (target: each brick's share of "
                                   "the output energy), then measure perplexity with the top bricks per token.")
    _common(r)
    r.add_argument("--partition", default=None, help="partition file (default: compute one, see --bricks/--method)")
    r.add_argument("--bricks", type=int, default=16)
    r.add_argument("--method", default="weights", choices=["weights", "coactivation"])
    r.add_argument("--hidden", type=int, default=0, help="router hidden width (0 = linear router)")
    r.add_argument("--steps", type=int, default=300, help="Adam steps per layer")
    r.add_argument("--lr", type=float, default=3e-3)
    r.add_argument("--fractions", default="0.125,0.25,0.5", help="fractions of active bricks to evaluate")
    r.add_argument("--predictor", default=None,
                   help="a sparkify predictor.safetensors: also route bricks by its neuron scores (L2 per brick)")
    r.add_argument("--baselines", default="oracle,random")
    r.add_argument("--out", required=True, help="output folder")
    r.set_defaults(func=lambda a: _cmd_route(a, r))

    s = sub.add_parser("sparkify", help="Spark-style sparse inference for a gated-FFN model: predictor + stat top-k",
                       description="Fit a low-rank neuron predictor per layer (truncated SVD / Spark split, least "
                                   "squares on recorded pre-activations), calibrate statistical top-k, report "
                                   "recall and perplexity vs active fraction (oracle, predictor, random); optional "
                                   "short continued training.")
    _common(s)
    s.add_argument("--rank", type=int, default=128)
    s.add_argument("--input", default="lowrank", choices=["lowrank", "split"])
    s.add_argument("--output", default="gate_up", choices=["gate_up", "gate"])
    s.add_argument("--fit", default="lsq", choices=["lsq", "none"])
    s.add_argument("--train-steps", type=int, default=0, help="Adam steps per layer after the closed-form fit")
    s.add_argument("--fraction", type=float, default=0.3, help="target fraction of active neurons")
    s.add_argument("--selection", default="stat", choices=["stat", "topk"])
    s.add_argument("--fractions", default="0.1,0.2,0.3,0.5", help="fractions for the perplexity curves")
    s.add_argument("--baselines", default="oracle,random")
    s.add_argument("--finetune-steps", type=int, default=0, help="continued training steps (0: none)")
    s.add_argument("--finetune-lr", type=float, default=3e-5)
    s.add_argument("--finetune-objective", default="kd", choices=["kd", "lm"])
    s.add_argument("--finetune-train", default="ffn", choices=["ffn", "all"])
    s.add_argument("--finetune-batch", type=int, default=4)
    s.add_argument("--finetune-save", action="store_true",
                   help="save the continued-trained model (save_pretrained) under OUT/finetuned")
    s.add_argument("--ablation", action="store_true", help="recall of predictor variants on 5 layers")
    s.add_argument("--predictor", default=None,
                   help="evaluate this saved predictor.safetensors instead of fitting one (--rank etc. ignored)")
    s.add_argument("--out", required=True, help="output folder")
    s.set_defaults(func=lambda a: _cmd_sparkify(a, s))


add_bricks_cli = add_route_commands  # the name sparkformer.bricks.cli.BRICKS_COMMAND_MODULES expects


def _threads(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def _cmd_partition(args, parser) -> int:
    _threads(args)
    res = run_partition(args.model, args.out, args.bricks, args.method, capabilities=args.capabilities,
                        data=args.data, prompts_per_capability=args.prompts_per_capability,
                        max_tokens=args.max_tokens, batch_size=args.batch_size, features=args.features,
                        active_fraction=args.active_fraction, coactivation_norm=args.coactivation_norm,
                        seed=args.seed, dtype=args.dtype)
    res["command"] = _canonical(args, "partition", parser)
    print(json.dumps(res, default=_json_default))
    return 0


def _cmd_route(args, parser) -> int:
    _threads(args)
    cmd = _canonical(args, "route", parser)
    res = run_route(args.model, args.out, args.partition, args.bricks, args.method, capabilities=args.capabilities,
                    data=args.data, prompts_per_capability=args.prompts_per_capability,
                    heldout_per_capability=args.heldout_per_capability, max_tokens=args.max_tokens,
                    batch_size=args.batch_size, hidden=args.hidden, steps=args.steps, lr=args.lr,
                    fractions=_fractions(args.fractions), predictor=args.predictor,
                    baselines=[b for b in args.baselines.split(",") if b], seed=args.seed, dtype=args.dtype,
                    command=cmd, record_cache=args.record_cache)
    dense = res["dense"]["ppl"]
    print(f"\n{res['model']}: {res['partition']['n_bricks']} bricks/layer ({res['partition']['method']}), "
          f"dense ppl {dense:.3f}")
    print(f"{'method':>18s} " + " ".join(f"{f:>14.3f}" for f in _fractions(args.fractions)))
    for m, pts in res["curves"].items():
        print(f"{m:>18s} " + " ".join(f"{p['ppl']:8.3f} {p['ppl_change_pct']:+5.0f}%" for p in pts))
    print(json.dumps({"model": res["model"], "dense_ppl": dense, "partition": res["partition"]["method"],
                      "n_bricks": res["partition"]["n_bricks"],
                      "ppl_change_pct": {m: {str(p["fraction"]): p["ppl_change_pct"] for p in pts}
                                         for m, pts in res["curves"].items()},
                      "recall": {m: dict(zip(map(str, v["fractions"]), v["recall"]))
                                 for m, v in res["recall"].items()},
                      "seconds": res["timings_s"]["total"]}))
    return 0


def _cmd_sparkify(args, parser) -> int:
    from sparkformer.bricks.sparkify import SparkifyConfig

    _threads(args)
    cmd = _canonical(args, "sparkify", parser)
    cfg = SparkifyConfig(rank=args.rank, input=args.input, output=args.output, fit=args.fit,
                         train_steps=args.train_steps, fraction=args.fraction, method=args.selection, seed=args.seed)
    res = run_sparkify(args.model, args.out, cfg, capabilities=args.capabilities, data=args.data,
                       prompts_per_capability=args.prompts_per_capability,
                       heldout_per_capability=args.heldout_per_capability, max_tokens=args.max_tokens,
                       batch_size=args.batch_size, fractions=_fractions(args.fractions),
                       baselines=[b for b in args.baselines.split(",") if b], finetune_steps=args.finetune_steps,
                       finetune_lr=args.finetune_lr, finetune_objective=args.finetune_objective,
                       finetune_train=args.finetune_train, finetune_batch=args.finetune_batch,
                       ablation=args.ablation, seed=args.seed, dtype=args.dtype, command=cmd,
                       record_cache=args.record_cache, predictor=args.predictor, finetune_save=args.finetune_save)
    s = res["summary"]
    print(f"\n{s['model']}: dense ppl {s['dense_ppl']:.3f}; predictor rank {cfg.rank} "
          f"({s['predictor_macs_pct_of_dense_ffn']:.1f}% of a dense FFN's MACs)")
    print(f"{'method':>10s} {'target':>7s} {'achieved':>9s} {'ppl':>8s} {'change':>8s}")
    for m, pts in res["curves"].items():
        for p in pts:
            print(f"{m:>10s} {p['fraction']:7.2f} {p['active']:9.3f} {p['ppl']:8.3f} {p['ppl_change_pct']:+7.1f}%")
    if res["finetune"]:
        f = res["finetune"]
        print(f"{'+train':>10s} {cfg.fraction:7.2f} {f['after']['active']:9.3f} {f['after']['ppl']:8.3f} "
              f"{f['after']['ppl_change_pct']:+7.1f}%")
    print(json.dumps({**s, "seconds": res["timings_s"]["total"]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m sparkformer.bricks.route_cli <command> ...``: the same as ``sparkformer bricks <command> ...``."""
    from sparkformer.bricks.cli import main as bricks_main

    return bricks_main(argv)


if __name__ == "__main__":
    sys.exit(main())
