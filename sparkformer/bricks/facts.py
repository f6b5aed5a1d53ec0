"""Facts and how a model answers them: the data and the metrics of brick editing (:mod:`sparkformer.bricks.edit`).

A fact is (subject, prompt template, true object, new object), e.g. ("France", "The capital of {} is", " Paris",
" Rome"); built-in relations (capitals, official languages, authors) or a jsonl of one's own. Metrics per edited
fact: *efficacy* P(new) > P(true) on the edit prompt (mean token log-probs, CounterFact's efficacy score) and top-1
(the first predicted token is the new object's); *generalisation* the same on paraphrased prompts; *locality* the
fraction of unrelated facts (other subjects) whose top-1 prediction is unchanged.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from sparkformer.bricks.adapter import forward_logits
from sparkformer.bricks.tokens import batches, encode


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
def token_ids(tokenizer: Any, text: str) -> list[int]:
    return encode(tokenizer, [text])[0]


def subject_last_index(tokenizer: Any, template: str, subject: str, prefix: str = "") -> int:
    """Index of the subject's last token in ``prefix + template.format(subject)``."""
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no {{}} for the subject")
    head = prefix + template[: template.index("{}")] + subject
    full = token_ids(tokenizer, prefix + template.format(subject))
    h = token_ids(tokenizer, head)
    if full[: len(h)] != h:  # BPE merged across the subject's end: fall back to the longest common prefix
        n = 0
        while n < min(len(h), len(full)) and h[n] == full[n]:
            n += 1
        return max(0, n - 1)
    return len(h) - 1


def target_ids(tokenizer: Any, prompt: str, target: str) -> list[int]:
    """Token ids of ``target`` as they follow ``prompt``."""
    p, full = token_ids(tokenizer, prompt), token_ids(tokenizer, prompt + target)
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
        pi, ti = token_ids(tokenizer, p), target_ids(tokenizer, p, t)
        seqs.append(pi + ti)
        spans.append((len(pi), len(ti)))
    out = [0.0] * len(seqs)
    for idx, ids, _valid in batches(seqs, batch_size):
        logp = forward_logits(model, ids).float().log_softmax(-1)
        for r, i in enumerate(idx):
            s, n = spans[i]
            tgt = torch.tensor(seqs[i][s: s + n])
            out[i] = float(logp[r, s - 1: s - 1 + n].gather(-1, tgt[:, None]).mean())
    return out


@torch.no_grad()
def next_token(model: nn.Module, tokenizer: Any, prompts: Sequence[str], batch_size: int = 16) -> list[int]:
    """Greedy next token after each prompt."""
    seqs = [token_ids(tokenizer, p) for p in prompts]
    out = [0] * len(seqs)
    for idx, ids, valid in batches(seqs, batch_size):
        logits = forward_logits(model, ids)
        last = valid.sum(1) - 1
        pred = logits[torch.arange(len(idx)), last].argmax(-1)
        for r, i in enumerate(idx):
            out[i] = int(pred[r])
    return out


def first_target_token(tokenizer: Any, prompt: str, target: str) -> int:
    return target_ids(tokenizer, prompt, target)[0]


# ---- what a model answers ------------------------------------------------------------------------------------------
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
