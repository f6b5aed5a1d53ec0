"""Training grown bricks on a new capability: the gain on it and the retention of the old ones, always-on and
routed, against full fine-tuning and a LoRA brick; and ``sparkformer bricks grow``, which runs that on a model.

    res = run_growth(model, tokenizer, "arithmetic", train_texts, heldout, cfg=GrowthConfig(steps=20))
    run_grow(GrowRun(model="smollm2-135m", out="runs/bricks/grow", new_capability="arithmetic"))
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from sparkformer.bricks.adapter import forward_logits
from sparkformer.bricks.capabilities import capability_set
from sparkformer.bricks.experiment import (ModelRun, add_command, arg, command_line, csv, load_model, log, md_table,
                                           pyplot, save_figure, start, write_results)
from sparkformer.bricks.grow import (GROWTH_METHODS, Growth, GrowthConfig, apply_growth, bricks_detached,
                                     router_load)
from sparkformer.bricks.lm import perplexity_from, sequence_nll, train_parameters
from sparkformer.bricks.lora import LoRAConfig, train_lora
from sparkformer.bricks.neurons import find_ffn_layers
from sparkformer.bricks.tokens import encode, token_windows


@torch.no_grad()
def _same_logits(a: nn.Module, b: nn.Module, ids: torch.Tensor) -> tuple[bool, float]:
    la, lb = forward_logits(a, ids), forward_logits(b, ids)
    return bool(torch.equal(la, lb)), float((la - lb).abs().max())


def run_growth(model: nn.Module, tokenizer: Any, new_capability: str, train_texts: Sequence[str],
               heldout: dict[str, list[str]], methods: Sequence[str] = GROWTH_METHODS,
               cfg: GrowthConfig | None = None, log: Callable[[str], None] | None = None,
               route_texts: dict[str, list[str]] | None = None, encoder: str = "hidden") -> dict[str, Any]:
    """For each method: copy the base, grow it, check the logits are unchanged, train only the new bricks on
    ``train_texts`` (the new capability), and measure perplexity on every held-out capability before and after.

    ``gain`` = perplexity of the new capability before / after (higher is better); ``retention`` of an old
    capability = before / after (1.0 = nothing forgotten, < 1 = forgot).

    With ``route_texts`` (capability -> texts that represent it, the new capability among them) each held-out text
    is also scored *routed*: a :class:`~sparkformer.bricks.retrieval.BrickRetriever` over those texts (``encoder``:
    the base model's hidden state or MiniLM) attaches the new bricks only to texts it assigns to the new
    capability and runs the rest with them detached (:func:`~sparkformer.bricks.grow.bricks_detached`; LoRA
    unattached). Full fine-tuning has no base left inside it, so its routed row uses a kept copy of the base: a
    second full model."""
    cfg = cfg or GrowthConfig()
    if new_capability not in heldout:
        raise ValueError(f"the new capability {new_capability!r} needs held-out texts too")
    unknown = [m for m in methods if m not in GROWTH_METHODS]
    if unknown:
        raise ValueError(f"unknown growth method {unknown}; available: {', '.join(GROWTH_METHODS)}")
    if route_texts is not None and new_capability not in route_texts:
        raise ValueError(f"route_texts must include the new capability {new_capability!r} (its training texts) "
                         f"besides the old ones; got {sorted(route_texts)}")
    log = log or (lambda s: None)
    windows = token_windows(tokenizer, train_texts, cfg.seq_len)
    held_tokens = {c: encode(tokenizer, t, cfg.seq_len) for c, t in heldout.items()}
    probe = torch.tensor([held_tokens[new_capability][0][: min(32, cfg.seq_len)]])
    base_nll = {c: sequence_nll(model, tl) for c, tl in held_tokens.items()}

    base_ppl = {c: perplexity_from(*base_nll[c]) for c in held_tokens}
    log("base: " + " ".join(f"{c}={v:.2f}" for c, v in base_ppl.items()))
    old = [c for c in heldout if c != new_capability]
    routing: dict[str, Any] | None = None
    to_new: dict[str, torch.Tensor] = {}
    if route_texts is not None:
        from sparkformer.bricks.retrieval import BrickRetriever, make_encoder

        t0 = time.time()
        retriever = BrickRetriever(make_encoder(encoder, model, tokenizer, cfg.seq_len))
        for c, texts in route_texts.items():
            retriever.add(c, texts)
        for c, texts in heldout.items():
            picks = retriever.retrieve(texts, top_k=1)
            to_new[c] = torch.tensor([p[0][0] == new_capability for p in picks])
        correct = [bool(v) == (c == new_capability) for c in heldout for v in to_new[c]]
        routing = {"encoder": encoder, "index": {c: len(t) for c, t in route_texts.items()},
                   "accuracy": sum(correct) / len(correct),
                   "attached_fraction": {c: float(v.float().mean()) for c, v in to_new.items()},
                   "seconds": time.time() - t0}
        log(f"routing ({encoder}): new-vs-old accuracy {routing['accuracy']:.3f}; attached on "
            + " ".join(f"{c}={v:.2f}" for c, v in routing["attached_fraction"].items()))

    results: dict[str, Any] = {}
    for method in methods:
        t0 = time.time()
        m = copy.deepcopy(model)
        brick = None
        if method == "lora":
            n_layers = len(find_ffn_layers(m))
            lcfg = LoRAConfig(r=cfg.lora_rank, alpha=2.0 * cfg.lora_rank, targets=("all",),
                              layers=tuple(cfg.layers(n_layers)) if cfg.from_layer else None)
            brick, tl = train_lora(m, tokenizer, [], lcfg, cfg.steps, cfg.lrs["lora"], cfg.batch_size,
                                   cfg.seq_len, cfg.seed, name=new_capability, windows=windows)
            growth = Growth("lora", list(brick.parameters()), {"r": lcfg.r, "targets": list(lcfg.names()),
                                                               "layers": lcfg.layers})
            exact, diff = True, 0.0  # a fresh LoRA brick (B = 0) is a no-op by construction
        else:
            growth = apply_growth(m, method, cfg)
            exact, diff = _same_logits(model, m, probe)
            tl = train_parameters(m, growth.params, windows, cfg.steps, cfg.lrs[method], cfg.batch_size, cfg.seed,
                                  log=log, log_every=max(1, cfg.steps // 4))
        attached_ctx = brick.attached(m) if brick is not None else contextlib.nullcontext()
        with attached_ctx:
            att = {c: sequence_nll(m, tl_) for c, tl_ in held_tokens.items()}
        after = {c: perplexity_from(*att[c]) for c in held_tokens}
        res = {
            "trainable_params": growth.n_params,
            "lr": cfg.lrs.get(method),
            "function_preserving": exact,
            "max_abs_logit_diff_before_training": diff,
            "info": growth.info,
            "perplexity_after": after,
            "gain": base_ppl[new_capability] / after[new_capability],
            "retention": {c: base_ppl[c] / after[c] for c in old},
            "mean_retention": sum(base_ppl[c] / after[c] for c in old) / max(1, len(old)),
            "train_loss_first": tl.losses[0],
            "train_loss_last": tl.losses[-1],
            "losses": tl.losses,
        }
        if method == "upcycle":
            res["router_load"] = router_load(m)
        if routing is not None:
            if method == "full":
                det, kept, det_exact = base_nll, sum(p.numel() for p in model.parameters()), True
                how = "a kept copy of the base model"
            else:
                with (bricks_detached(m) if brick is None else contextlib.nullcontext()):
                    det = {c: sequence_nll(m, tl_) for c, tl_ in held_tokens.items()}
                det_exact = all(torch.equal(det[c][0], base_nll[c][0]) for c in held_tokens)
                kept, how = growth.n_params, "the grown model with its bricks detached"
            routed = {c: perplexity_from(torch.where(to_new[c], att[c][0], det[c][0]), att[c][1]) for c in held_tokens}
            res["routed"] = {
                "perplexity": routed, "gain": base_ppl[new_capability] / routed[new_capability],
                "retention": {c: base_ppl[c] / routed[c] for c in old},
                "mean_retention": sum(base_ppl[c] / routed[c] for c in old) / max(1, len(old)),
                "detached_equals_base": det_exact, "unrouted_inputs_run_on": how, "extra_params_kept": kept}
        res["seconds"] = time.time() - t0
        results[method] = res
        log(f"{method}: exact={exact} gain x{res['gain']:.2f} mean retention {res['mean_retention']:.3f}"
            + (f"; routed x{res['routed']['gain']:.2f} / {res['routed']['mean_retention']:.3f} (detached == base: "
               f"{res['routed']['detached_equals_base']})" if routing is not None else "")
            + f" ({res['seconds']:.0f} s, {growth.n_params / 1e6:.2f} M trainable)")
        del m
    return {"new_capability": new_capability, "base_perplexity": base_ppl, "methods": results, "routing": routing,
            "config": dict(vars(cfg))}


# ---- the experiment: `sparkformer bricks grow` ----------------------------------------------------------------------
@dataclass(kw_only=True)
class GrowRun(ModelRun):
    """Settings of ``sparkformer bricks grow``; what each method grows defaults to :class:`GrowthConfig`'s."""

    new_capability: str = arg("arithmetic", "the capability the new bricks learn")
    old_capabilities: str = arg("code,docstrings,reference,drama", "capabilities whose retention is measured")
    methods: tuple[str, ...] = arg(GROWTH_METHODS, "comma list of growth methods", parse=csv)
    steps: int = arg(GrowthConfig.steps, "training steps per method")
    batch_size: int = arg(GrowthConfig.batch_size, "windows per training step")
    seq_len: int = arg(GrowthConfig.seq_len, "tokens per training window (and per held-out text)")
    train_per_capability: int = arg(24, "training texts per capability (the new one's train it; all index the "
                                        "router)")
    heldout_per_capability: int = arg(6, "held-out texts per capability")
    width_neurons: int = arg(GrowthConfig.width_neurons, "width: new neurons per grown FFN")
    depth_every: int = arg(GrowthConfig.depth_every, "depth: one block copy after every k-th block")
    upcycle_every: int = arg(GrowthConfig.upcycle_every, "upcycle: the FFN of every k-th layer")
    upcycle_experts: int = arg(GrowthConfig.upcycle_experts, "upcycle: experts per upcycled FFN")
    from_layer: int = arg(GrowthConfig.from_layer, "grow (and LoRA) only layers >= this, so training back-propagates "
                                                   "through the top only")
    route_encoder: str = arg("minilm", "also score routed growth: attach the new bricks only to inputs this retriever "
                                       "assigns to the new capability (none: always-on only)",
                             choices=("hidden", "minilm", "none"))
    lr: list[str] = arg([], "learning rate per method, METHOD=LR, e.g. --lr full=3e-5 (defaults: width 2e-3, depth "
                            "1e-3, upcycle 3e-4, full 1e-4, lora 2e-3); repeatable")

    def growth_config(self) -> GrowthConfig:
        cfg = GrowthConfig(width_neurons=self.width_neurons, depth_every=self.depth_every,
                           upcycle_every=self.upcycle_every, upcycle_experts=self.upcycle_experts,
                           from_layer=self.from_layer, steps=self.steps, batch_size=self.batch_size,
                           seq_len=self.seq_len, seed=self.seed)
        for item in self.lr:
            if "=" not in item:
                raise ValueError(f"--lr {item!r}: expected METHOD=LR, e.g. full=3e-5")
            k, v = item.split("=", 1)
            cfg.lrs[k.strip()] = float(v)
        return cfg


def run_grow(run: GrowRun, model: nn.Module | None = None, tokenizer: Any = None, capset=None,
             log: Callable[[str], None] = log) -> dict[str, Any]:
    """Python API of ``sparkformer bricks grow``: grow the base by each method, train only the new bricks on
    ``new_capability``, compare with full fine-tuning (and a LoRA brick): the new capability's gain and the old
    capabilities' retention, always-on and routed (the new bricks attached only to inputs retrieval assigns to the
    new capability, by ``route_encoder`` over every capability's training texts; 'none': always-on only)."""
    t0 = start(run)
    cfg = run.growth_config()
    caps = [run.new_capability] + [c for c in run.old_capabilities.split(",")
                                   if c.strip() and c != run.new_capability]
    m, tok, name, _ = load_model(run.model, model, tokenizer, freeze=True, log=log)  # before the slow texts
    cs = capset or capability_set(",".join(caps), (), run.train_per_capability, run.heldout_per_capability,
                                  6 * run.seq_len, run.seed)
    train, held = cs.texts("score"), cs.texts("heldout")
    encoder = None if run.route_encoder == "none" else run.route_encoder
    res = run_growth(m, tok, run.new_capability, train[run.new_capability], held, run.methods, cfg, log=log,
                     route_texts=train if encoder else None, encoder=encoder or "hidden")
    res["model"] = name
    notes = (f"New capability {run.new_capability!r}: {run.steps} steps x {run.batch_size} x {run.seq_len} tokens "
             f"on its training texts; held-out perplexity ({run.heldout_per_capability} texts per capability). gain "
             f"= ppl before / after on {run.new_capability}; retention = ppl before / after on an old capability (1 "
             f"= nothing forgotten). Grown layers: {'all' if not run.from_layer else f'>= {run.from_layer}'}; "
             f"width: +{run.width_neurons} neurons per FFN; depth: LLaMA-Pro copy after every {run.depth_every}th "
             f"block; upcycle: FFN of every {run.upcycle_every}th layer -> {run.upcycle_experts} experts, top-2 "
             f"router; full: every parameter; lora: r=8 on all projections of the same layers, attached after "
             f"training. Per-method learning rates in the table (AdamW, warmup + cosine).")
    if res.get("routing"):
        rt = res["routing"]
        notes += (f" Routed rows: a retriever ({rt['encoder']} encoder, each capability indexed by its training "
                  f"texts) attaches the new bricks only to held-out texts it assigns to {run.new_capability!r} "
                  f"(new-vs-old accuracy {rt['accuracy']:.3f}; attached on "
                  + ", ".join(f"{c} {v:.2f}" for c, v in rt["attached_fraction"].items())
                  + "); the other texts run with the bricks detached, which equals the base exactly (checked per "
                    "text). Full fine-tuning keeps no base inside it, so its routed row needs a second full copy.")
    _plot_grow(res, Path(run.out) / "grow.png")
    return write_results(run.out, res, command=command_line("grow", run), title="grow", table=grow_summary(res)[0],
                         notes=notes, started=t0)


def _plot_grow(res: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for meth, r in res["methods"].items():
        ax[0].scatter(r["mean_retention"], r["gain"], s=60)
        ax[0].annotate(meth, (r["mean_retention"], r["gain"]))
        if "routed" in r:
            ax[0].scatter(r["routed"]["mean_retention"], r["routed"]["gain"], s=60, marker="^")
            ax[0].annotate(meth + " routed", (r["routed"]["mean_retention"], r["routed"]["gain"]))
        ax[1].plot(r["losses"], label=meth)
    ax[0].set_xlabel("mean retention of old capabilities")
    ax[0].set_ylabel(f"gain on {res['new_capability']} (x)")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("train loss")
    ax[1].legend()
    save_figure(fig, path)


def grow_summary(res: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The table of a grow result (a row per method, always-on and routed), and its headline numbers."""
    new, base = res["new_capability"], res["base_perplexity"]
    old = [c for c in base if c != new]
    rows = []
    for meth, r in res["methods"].items():
        rows.append([meth, "always on", f"{r['trainable_params'] / 1e6:.2f}", "yes" if r["function_preserving"] else
                     "NO", f"{r['lr']:g}", f"{base[new]:.2f} -> {r['perplexity_after'][new]:.2f}", r["gain"]]
                    + [r["retention"][c] for c in old] + [r["mean_retention"]])
    for meth, r in res["methods"].items():
        if "routed" not in r:
            continue
        rr = r["routed"]
        label = "routed (base copy kept: +{:.1f} M)".format(rr["extra_params_kept"] / 1e6) if meth == "full" else \
            "routed" + ("" if rr["detached_equals_base"] else " (DETACHED != BASE)")
        rows.append([meth, label, f"{r['trainable_params'] / 1e6:.2f}", "yes" if r["function_preserving"] else "NO",
                     f"{r['lr']:g}", f"{base[new]:.2f} -> {rr['perplexity'][new]:.2f}", rr["gain"]]
                    + [rr["retention"][c] for c in old] + [rr["mean_retention"]])
    table = md_table(["method", "bricks", "trainable M", "exact before training", "lr", f"{new} ppl", "gain (x)"]
                     + [f"retention {c}" for c in old] + ["mean retention"], rows, fmt=".3f")
    methods = res["methods"]
    return table, {"op": "grow", "model": res["model"], **{f"{k}_gain": r["gain"] for k, r in methods.items()},
                   **{f"{k}_retention": r["mean_retention"] for k, r in methods.items()},
                   **{f"{k}_routed_gain": r["routed"]["gain"] for k, r in methods.items() if "routed" in r},
                   **{f"{k}_routed_retention": r["routed"]["mean_retention"] for k, r in methods.items()
                      if "routed" in r}}


def add_cli(subparsers) -> None:
    add_command(subparsers, "grow", GrowRun, run_grow,
                help="width / depth / upcycling growth; train the new bricks on a new capability",
                summary=grow_summary)
