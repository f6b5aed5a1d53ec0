"""Updating a brick: ROME-style rank-one edits of an FFN down projection (Meng et al. 2022, "Locating and Editing
Factual Associations in GPT"), a plain fine-tuning baseline, and the efficacy / generalisation / locality metrics.

A fact is (subject, prompt template, true object, new object), e.g. ("France", "The capital of {} is", " Paris",
" Rome"). The FFN of layer l maps a *key* k (its activation = the input of the down projection) to a *value*
W k (its output). ROME:

1. layer    ``default_layer(n_layers) = int(0.2 * n_layers)`` (ROME edits GPT-2 XL at 17/48 and LLaMA-family models
            at about 5/32, i.e. early-middle layers), or the peak of causal tracing (:func:`trace_layers`: corrupt
            the subject's token embeddings with noise, restore the clean FFN output at the subject's last token
            in a window of layers, measure how much of P(true object) comes back; windows that contain the first
            FFN are not candidates, since restoring it restores the corrupted token embedding itself).
2. key      k* = the activation at the subject's last token, averaged over the prompt with a few text prefixes.
3. stats    C = E[k k^T] over corpus tokens at that layer (second moment), computed once and cached under
            ``sparkformer.paths.cache_dir("rome", ...)``. ROME takes it from Wikipedia; our installable corpora
            (code, docs, Shakespeare) have no encyclopedic sentences, so by default the corpus also gets the facts'
            prompt templates filled with *other* entities (:func:`relation_context_texts`; never an evaluated
            subject). Without them, keys in "The capital of X" contexts look rare, C^-1 amplifies that shared
            context, and an edit also moves other facts phrased the same way (method ``rome-corpus`` measures it).
4. value    v* = v0 + delta: delta is added to the FFN output at the subject's last token and optimised (Adam) so
            the model outputs the new object after every prefixed prompt, with a KL term keeping "{subject} is a"
            unchanged, weight decay and a norm clamp on delta.
5. update   W' = W + (v* - W k*) (C^-1 k*)^T / ((C^-1 k*)^T k*): the smallest change (in the C metric) with
            W' k* = v*. It is rank one.

Metrics per edited fact: *efficacy* P(new) > P(true) on the edit prompt (mean token log-probs, CounterFact's
efficacy score) and top-1 (the first predicted token is the new object's); *generalisation* the same on paraphrased
prompts; *locality* the fraction of unrelated facts (other subjects) whose top-1 prediction is unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import json
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

from sparkformer.bricks.lora import encode_texts, forward_logits, frozen, padded_batches
from sparkformer.bricks.neurons import find_ffn_layers


# ---- facts ----------------------------------------------------------------------------------------------------------
@dataclass
class Fact:
    subject: str
    prompt: str  # a template with one {} for the subject
    target_true: str  # with its leading space, e.g. " Paris"
    target_new: str
    paraphrases: list[str] = field(default_factory=list)  # more templates with {}
    relation: str = ""

    def text(self, template: str | None = None) -> str:
        return (template or self.prompt).format(self.subject)

    def paraphrase_prompts(self) -> list[str]:
        return [p.format(self.subject) for p in self.paraphrases]


RELATIONS: dict[str, dict[str, Any]] = {
    "capital": {
        "prompt": "The capital of {} is",
        "paraphrases": ["The capital city of {} is", "{}'s capital city is"],
        "pairs": [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
                  ("Japan", "Tokyo"), ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"),
                  ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Poland", "Warsaw"),
                  ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
                  ("Denmark", "Copenhagen"), ("Hungary", "Budapest"), ("Turkey", "Ankara"), ("Canada", "Ottawa"),
                  ("Australia", "Canberra"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Thailand", "Bangkok"),
                  ("South Korea", "Seoul"), ("Cuba", "Havana"), ("Belgium", "Brussels"),
                  ("the Netherlands", "Amsterdam"), ("the Czech Republic", "Prague"), ("Iran", "Tehran"),
                  ("Iraq", "Baghdad"), ("Chile", "Santiago"), ("Colombia", "Bogota"), ("Venezuela", "Caracas"),
                  ("the Philippines", "Manila"), ("Indonesia", "Jakarta"), ("Vietnam", "Hanoi"),
                  ("Romania", "Bucharest"), ("Switzerland", "Bern"), ("Brazil", "Brasilia"), ("Nigeria", "Abuja"),
                  ("Pakistan", "Islamabad"), ("Lebanon", "Beirut"), ("Syria", "Damascus"),
                  ("Afghanistan", "Kabul"), ("Morocco", "Rabat"), ("Scotland", "Edinburgh"), ("Wales", "Cardiff"),
                  ("Iceland", "Reykjavik"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
                  ("England", "London"), ("the United States", "Washington")],
    },
    "language": {
        "prompt": "The official language of {} is",
        "paraphrases": ["The main language spoken in {} is", "Most people in {} speak"],
        "pairs": [("France", "French"), ("Germany", "German"), ("Italy", "Italian"), ("Spain", "Spanish"),
                  ("Japan", "Japanese"), ("Russia", "Russian"), ("China", "Chinese"), ("Portugal", "Portuguese"),
                  ("Greece", "Greek"), ("Poland", "Polish"), ("Sweden", "Swedish"), ("Turkey", "Turkish"),
                  ("Brazil", "Portuguese"), ("Mexico", "Spanish"), ("Egypt", "Arabic"), ("the Netherlands", "Dutch"),
                  ("Finland", "Finnish"), ("Hungary", "Hungarian"), ("Norway", "Norwegian"), ("Denmark", "Danish"),
                  ("Iran", "Persian"), ("Thailand", "Thai"), ("Vietnam", "Vietnamese"), ("South Korea", "Korean"),
                  ("Israel", "Hebrew"), ("Ukraine", "Ukrainian"), ("Romania", "Romanian"),
                  ("Indonesia", "Indonesian"), ("Argentina", "Spanish")],
    },
    "author": {
        "prompt": "{} was written by",
        "paraphrases": ["The author of {} is", "{} is a book by"],
        "pairs": [("Pride and Prejudice", "Jane Austen"), ("The Divine Comedy", "Dante Alighieri"),
                  ("On the Origin of Species", "Charles Darwin"), ("The Hobbit", "J.R.R. Tolkien"),
                  ("Hamlet", "William Shakespeare"), ("War and Peace", "Leo Tolstoy"), ("The Odyssey", "Homer"),
                  ("Moby-Dick", "Herman Melville"), ("Oliver Twist", "Charles Dickens"),
                  ("Frankenstein", "Mary Shelley"), ("Dracula", "Bram Stoker"), ("Animal Farm", "George Orwell")],
    },
}


def builtin_facts(relations: Sequence[str] | None = None) -> list[Fact]:
    """Candidate facts (capitals, official languages, authors) with a counterfactual new object each: the object of
    a later fact of the same relation whose first word differs."""
    out = []
    for rel in relations or list(RELATIONS):
        if rel not in RELATIONS:
            raise ValueError(f"unknown relation {rel!r}; built-in: {', '.join(RELATIONS)}")
        spec = RELATIONS[rel]
        pairs = spec["pairs"]
        for i, (s, o) in enumerate(pairs):
            for step in range(1, len(pairs)):
                new = pairs[(i + 7 * step) % len(pairs)][1]
                if new.split()[0] != o.split()[0]:
                    break
            out.append(Fact(s, spec["prompt"], " " + o, " " + new, list(spec["paraphrases"]), rel))
    return out


def load_facts(path: str | Path) -> list[Fact]:
    """Facts from a jsonl file: one object per line with subject, prompt ({} for the subject), target_true,
    target_new, and optionally paraphrases (templates) and relation."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        d = json.loads(line)
        missing = [k for k in ("subject", "prompt", "target_true", "target_new") if k not in d]
        if missing:
            raise ValueError(f"{path}:{n}: fact is missing {missing}")
        if "{}" not in d["prompt"]:
            raise ValueError(f"{path}:{n}: prompt {d['prompt']!r} needs a {{}} where the subject goes")
        out.append(Fact(d["subject"], d["prompt"], d["target_true"], d["target_new"], d.get("paraphrases", []),
                        d.get("relation", "")))
    return out


# entities that are no subject of the built-in facts: their relation sentences feed the statistics, never the metrics
HELDOUT_ENTITIES = (
    "Kazakhstan", "Mongolia", "Nepal", "Uruguay", "Paraguay", "Bolivia", "Ecuador", "Jamaica", "Ghana", "Senegal",
    "Tunisia", "Algeria", "Libya", "Sudan", "Uganda", "Tanzania", "Zambia", "Angola", "Latvia", "Lithuania", "Estonia",
    "Slovakia", "Slovenia", "Albania", "Cyprus", "Malta", "Jordan", "Qatar", "Kuwait", "Oman", "Yemen", "Bangladesh",
    "Sri Lanka", "Myanmar", "Cambodia", "Laos", "Malaysia", "Singapore", "New Zealand", "Fiji", "Panama", "Honduras",
    "Guatemala", "Nicaragua", "Haiti", "Armenia", "Belarus", "Moldova", "Luxembourg", "Madagascar",
    "Great Expectations", "Little Women", "The Trial", "Middlemarch", "Don Juan", "The Aeneid", "Walden", "Beowulf",
)


def relation_context_texts(facts: Sequence[Fact], entities: Sequence[str] = HELDOUT_ENTITIES, n_sentences: int = 400,
                           seed: int = 0) -> list[str]:
    """Sentences that put the facts' prompt templates (and paraphrases) around entities that are *not* subjects of
    any fact, grouped 20 to a text. Added to the corpus of the second-moment statistics they play the part of
    ROME's Wikipedia: keys in "The capital of X"-like contexts are common there, so the rank-one update stays
    specific to the edited subject instead of moving every fact phrased the same way."""
    subjects = {f.subject for f in facts}
    ents = [e for e in entities if e not in subjects]
    templates = sorted({t for f in facts for t in [f.prompt, *f.paraphrases]})
    if not ents or not templates:
        return []
    rng = random.Random(seed)
    sents = [rng.choice(templates).format(rng.choice(ents)) for _ in range(n_sentences)]
    return [" ".join(sents[i: i + 20]) for i in range(0, len(sents), 20)]


# ---- tokens ---------------------------------------------------------------------------------------------------------
def _ids(tokenizer: Any, text: str) -> list[int]:
    return encode_texts(tokenizer, [text])[0]


def subject_last_index(tokenizer: Any, template: str, subject: str, prefix: str = "") -> int:
    """Index of the subject's last token in ``prefix + template.format(subject)``."""
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no {{}} for the subject")
    head = prefix + template[: template.index("{}")] + subject
    full = _ids(tokenizer, prefix + template.format(subject))
    h = _ids(tokenizer, head)
    if full[: len(h)] != h:  # BPE merged across the subject's end: fall back to the longest common prefix
        n = 0
        while n < min(len(h), len(full)) and h[n] == full[n]:
            n += 1
        return max(0, n - 1)
    return len(h) - 1


def target_ids(tokenizer: Any, prompt: str, target: str) -> list[int]:
    """Token ids of ``target`` as they follow ``prompt``."""
    p, full = _ids(tokenizer, prompt), _ids(tokenizer, prompt + target)
    if full[: len(p)] == p and len(full) > len(p):
        return full[len(p):]
    if hasattr(tokenizer, "batch_decode") and callable(tokenizer):
        return tokenizer(target, add_special_tokens=False)["input_ids"]
    return tokenizer.encode(target)


@torch.no_grad()
def target_logprobs(model: nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str],
                    batch_size: int = 16) -> list[float]:
    """Mean per-token log-probability of each target after its prompt."""
    seqs, spans = [], []
    for p, t in zip(prompts, targets):
        pi, ti = _ids(tokenizer, p), target_ids(tokenizer, p, t)
        seqs.append(pi + ti)
        spans.append((len(pi), len(ti)))
    out = [0.0] * len(seqs)
    for idx, ids, _valid in padded_batches(seqs, batch_size):
        logp = forward_logits(model, ids).float().log_softmax(-1)
        for r, i in enumerate(idx):
            s, n = spans[i]
            tgt = torch.tensor(seqs[i][s: s + n])
            out[i] = float(logp[r, s - 1: s - 1 + n].gather(-1, tgt[:, None]).mean())
    return out


@torch.no_grad()
def next_token(model: nn.Module, tokenizer: Any, prompts: Sequence[str], batch_size: int = 16) -> list[int]:
    """Greedy next token after each prompt."""
    seqs = [_ids(tokenizer, p) for p in prompts]
    out = [0] * len(seqs)
    for idx, ids, valid in padded_batches(seqs, batch_size):
        logits = forward_logits(model, ids)
        last = valid.sum(1) - 1
        pred = logits[torch.arange(len(idx)), last].argmax(-1)
        for r, i in enumerate(idx):
            out[i] = int(pred[r])
    return out


def first_target_token(tokenizer: Any, prompt: str, target: str) -> int:
    return target_ids(tokenizer, prompt, target)[0]


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
        return torch.load(cache, map_location="cpu")
    from sparkformer.bricks.lora import token_windows

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
            ids = torch.tensor([_ids(self.tokenizer, prefix + fact.text())])
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
            pi, ti = _ids(tok, p), target_ids(tok, p, fact.target_new)
            rows.append(pi + ti[:-1] if len(ti) > 1 else pi)
            spans.append((len(pi), ti))
            subj.append(subject_last_index(tok, fact.prompt, fact.subject, prefix))
        kl_text = cfg.kl_prompt.format(fact.subject)
        kl_ids = _ids(tok, kl_text)
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
        pi, ti = _ids(tokenizer, p), target_ids(tokenizer, p, fact.target_new)
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


# ---- causal tracing --------------------------------------------------------------------------------------------------
def _embedding(model: nn.Module) -> nn.Module:
    if type(model).__name__ == "SparkLM":
        return model.embed
    return model.get_input_embeddings()


@torch.no_grad()
def trace_layers(model: nn.Module, tokenizer: Any, facts: Sequence[Fact], noise: float = 3.0, samples: int = 4,
                 window: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Causal tracing of the FFN: per layer, the average indirect effect on P(true object's first token) of
    restoring the clean FFN outputs at the subject's last token (in a window of layers centred there) while the
    subject's token embeddings are corrupted with Gaussian noise of ``noise`` x the embeddings' std."""
    layers = find_ffn_layers(model)
    L = len(layers)
    window = window or max(1, L // 6)
    emb = _embedding(model)
    std = float(emb.weight.detach().float().std())
    gen = torch.Generator().manual_seed(seed)
    effects = torch.zeros(L)
    used = 0
    for fact in facts:
        text = fact.text()
        ids = torch.tensor([_ids(tokenizer, text)])
        last = subject_last_index(tokenizer, fact.prompt, fact.subject)
        first = len(_ids(tokenizer, fact.prompt[: fact.prompt.index("{}")].rstrip())) if fact.prompt.index("{}") else 0
        first = min(first, last)
        tgt = first_target_token(tokenizer, text, fact.target_true)
        clean: dict[int, torch.Tensor] = {}
        hs = [ly.down.register_forward_hook(lambda _m, _a, o, i=ly.layer: clean.__setitem__(i, o[0, last].clone()))
              for ly in layers]
        try:
            p_clean = float(forward_logits(model, ids)[0, -1].float().softmax(-1)[tgt])
        finally:
            for h in hs:
                h.remove()
        batch = ids.repeat(samples, 1)
        noise_t = torch.randn(samples, last - first + 1, emb.weight.shape[1], generator=gen) * noise * std

        def corrupt(_m, _a, out):
            out = out.clone()
            out[:, first: last + 1] = out[:, first: last + 1] + noise_t.to(out.dtype)
            return out

        he = emb.register_forward_hook(corrupt)
        try:
            p_low = float(forward_logits(model, batch)[:, -1].float().softmax(-1)[:, tgt].mean())
            for centre in range(L):
                lo, hi = max(0, centre - window // 2), min(L, centre - window // 2 + window)
                hr = []
                for ly in layers[lo:hi]:
                    def restore(_m, _a, out, i=ly.layer):
                        out = out.clone()
                        out[:, last] = clean[i].to(out.dtype)
                        return out

                    hr.append(ly.down.register_forward_hook(restore))
                try:
                    p = float(forward_logits(model, batch)[:, -1].float().softmax(-1)[:, tgt].mean())
                finally:
                    for h in hr:
                        h.remove()
                effects[centre] += p - p_low
        finally:
            he.remove()
        used += 1
        _ = p_clean
    effects /= max(1, used)
    # a window that contains layer 0 restores the first FFN, which acts as part of the (corrupted) token embedding
    start = window - window // 2 if L > window else 0
    best = start + int(effects[start:].argmax())
    return {"indirect_effect": effects.tolist(), "best_layer": best, "window": window,
            "noise": noise, "samples": samples, "n_facts": used}


# ---- evaluation ------------------------------------------------------------------------------------------------------
def correct_facts(model: nn.Module, tokenizer: Any, facts: Sequence[Fact]) -> list[bool]:
    """Whether the model's greedy next token after each fact's prompt is the true object's first token."""
    preds = next_token(model, tokenizer, [f.text() for f in facts])
    return [p == first_target_token(tokenizer, f.text(), f.target_true) for p, f in zip(preds, facts)]


def edit_metrics(model: nn.Module, tokenizer: Any, edited: Sequence[Fact], locality: Sequence[Fact],
                 locality_before: Sequence[int]) -> dict[str, float]:
    """Efficacy, paraphrase generalisation (score: P(new) > P(true); top-1: first token is the new object's) over
    the edited facts; over unrelated facts, locality (top-1 unchanged) and locality score (CounterFact's
    neighbourhood score: P(true) > P(any new object))."""
    prompts, trues, news, kind = [], [], [], []
    for f in edited:
        for p, k in [(f.text(), "edit")] + [(pp, "para") for pp in f.paraphrase_prompts()]:
            prompts.append(p)
            trues.append(f.target_true)
            news.append(f.target_new)
            kind.append(k)
    lp_true = target_logprobs(model, tokenizer, prompts, trues)
    lp_new = target_logprobs(model, tokenizer, prompts, news)
    top = next_token(model, tokenizer, prompts)
    score = [float(n > t) for n, t in zip(lp_new, lp_true)]
    top1 = [float(tp == first_target_token(tokenizer, p, n)) for tp, p, n in zip(top, prompts, news)]

    def mean(vals: list[float], k: str) -> float:
        sel = [v for v, kk in zip(vals, kind) if kk == k]
        return sum(sel) / len(sel) if sel else float("nan")

    loc_after = next_token(model, tokenizer, [f.text() for f in locality]) if locality else []
    unchanged = [float(a == b) for a, b in zip(loc_after, locality_before)]
    # neighbourhood score (CounterFact): an unrelated fact still prefers its true object to every new object
    news_set = sorted({f.target_new for f in edited})
    ns = []
    if locality:
        lp_t = target_logprobs(model, tokenizer, [f.text() for f in locality], [f.target_true for f in locality])
        best_new = [-math.inf] * len(locality)
        for n in news_set:
            lp_n = target_logprobs(model, tokenizer, [f.text() for f in locality], [n] * len(locality))
            best_new = [max(a, b) for a, b in zip(best_new, lp_n)]
        ns = [float(t > b) for t, b in zip(lp_t, best_new)]
    return {
        "efficacy": mean(score, "edit"),
        "efficacy_top1": mean(top1, "edit"),
        "paraphrase": mean(score, "para"),
        "paraphrase_top1": mean(top1, "para"),
        "locality": sum(unchanged) / len(unchanged) if unchanged else float("nan"),
        "locality_score": sum(ns) / len(ns) if ns else float("nan"),
        "n_edited": len(edited),
        "n_locality": len(locality),
    }


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
