"""MoEfication: split each FFN layer's neurons into E equal-size bricks.

Two methods (after Zhang et al. 2022, "MoEfication"):

    weights       balanced k-means on the neurons' input weight vectors (gate rows, L2-normalised; ``features``
                  picks gate, up or both concatenated)
    coactivation  neurons that fire together go together: per token a neuron is *active* when it is among the
                  ``active_fraction`` largest by output magnitude |a_i| * ||W_down[:, i]||; the co-activation
                  matrix M_ij = #tokens where both are active, normalised to cosine form M_ij / sqrt(M_ii M_jj)
                  (or ``coactivation_norm='phi'``: the correlation of the binary activities), is embedded
                  spectrally (top eigenvectors scaled by sqrt(eigenvalue), so inner products approximate it) and
                  clustered with the same balanced k-means (the paper partitions the co-activation graph with
                  METIS; this is the dependency-free stand-in)

Balanced k-means: Lloyd iterations whose assignment step fills clusters greedily: every unplaced neuron proposes
to its nearest cluster with room, each cluster accepts the nearest proposers up to its capacity n/E, repeat
until all are placed (at most E rounds). Every brick has exactly n/E neurons.

A partition is one small file (``.safetensors``): ``assign.{layer}`` (n,) int16 brick id per neuron, metadata
``{"format": "sparkformer-partition", "method", "n_bricks", "n_layers", "n_neurons" (JSON list), "meta" (JSON)}``.

    part = partition_model(model, n_bricks=16, method="weights")
    part.save("smollm2.partition.safetensors");  part = Partition.load(...)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sparkformer.bricks.adapter import forward_logits
from sparkformer.bricks.experiment import RecordRun, add_command, arg, command_line, load_model, log, start, write_json
from sparkformer.bricks.neurons import FFNNeurons, NeuronView
from sparkformer.bricks.tokens import batches, capability_tokens, progress_bar, real_tokens

METHODS = ("weights", "coactivation")
FEATURES = ("gate", "up", "gate_up")
COACTIVATION_NORMS = ("cosine", "phi")
FORMAT = "sparkformer-partition"


@dataclass
class Partition:
    """Per layer, the brick (0..E-1) of each neuron; every brick of a layer has the same size."""

    method: str
    n_bricks: int
    assign: list[torch.Tensor]  # per layer (n,) int64
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.assign = [torch.as_tensor(a, dtype=torch.long).flatten() for a in self.assign]
        self.validate()

    @property
    def n_layers(self) -> int:
        return len(self.assign)

    @property
    def n_neurons(self) -> list[int]:
        return [a.numel() for a in self.assign]

    def brick_size(self, layer: int) -> int:
        return self.assign[layer].numel() // self.n_bricks

    def validate(self) -> None:
        """Every neuron in exactly one brick, every brick the same size."""
        E = self.n_bricks
        if E < 1:
            raise ValueError(f"n_bricks={E} must be >= 1")
        for i, a in enumerate(self.assign):
            n = a.numel()
            if n % E:
                raise ValueError(f"layer {i}: {n} neurons do not split into {E} equal bricks")
            if n and (int(a.min()) < 0 or int(a.max()) >= E):
                raise ValueError(f"layer {i}: brick ids must lie in [0, {E})")
            counts = torch.bincount(a, minlength=E)
            if not bool((counts == n // E).all()):
                raise ValueError(f"layer {i}: brick sizes {counts.tolist()} are not all {n // E}")

    def groups(self, layer: int) -> torch.Tensor:
        """(E, n/E) neuron indices of each brick of ``layer`` (ascending within a brick)."""
        a = self.assign[layer]
        order = torch.argsort(a * a.numel() + torch.arange(a.numel()))  # stable: by brick, then neuron index
        return order.view(self.n_bricks, -1)

    def check_model(self, view: NeuronView) -> None:
        if self.n_neurons != view.n_neurons:
            raise ValueError(f"partition is for {self.n_layers} layers x {sorted(set(self.n_neurons))} neurons, the "
                             f"model has {len(view)} x {sorted(set(view.n_neurons))}")

    # ---- file -----------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        dtype = torch.int16 if self.n_bricks <= 32767 else torch.int32
        tensors = {f"assign.{i}": a.to(dtype).contiguous() for i, a in enumerate(self.assign)}
        save_file(tensors, str(path), metadata={"format": FORMAT, "method": self.method,
                                                 "n_bricks": str(self.n_bricks), "n_layers": str(self.n_layers),
                                                 "n_neurons": json.dumps(self.n_neurons),
                                                 "meta": json.dumps(self.meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Partition":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"partition file {path} not found")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not a sparkformer partition file")
            n = int(meta["n_layers"])
            assign = [f.get_tensor(f"assign.{i}").long() for i in range(n)]
        return cls(meta["method"], int(meta["n_bricks"]), assign, json.loads(meta.get("meta", "{}")))


# ---- balanced k-means --------------------------------------------------------------------------------------------
def balanced_assign(dist: torch.Tensor, capacity: int | Sequence[int]) -> torch.Tensor:
    """Greedy balanced assignment of n points to E clusters from a distance matrix (n, E).

    Unplaced points propose to their nearest cluster that still has room; each cluster accepts its nearest
    proposers up to its remaining capacity; repeat. Needs sum(capacity) >= n."""
    n, E = dist.shape
    cap = torch.as_tensor(capacity, dtype=torch.long).expand(E).clone() if not isinstance(capacity, int) \
        else torch.full((E,), capacity, dtype=torch.long)
    if int(cap.sum()) < n:
        raise ValueError(f"capacity {int(cap.sum())} < {n} points")
    assign = torch.full((n,), -1, dtype=torch.long)
    d = dist.double().clone()
    for _ in range(E + 1):
        free = assign < 0
        if not bool(free.any()):
            break
        d_free = d[free].masked_fill((cap <= 0)[None, :], float("inf"))
        choice = d_free.argmin(1)
        best = d_free.gather(1, choice[:, None]).squeeze(1)
        idx_free = free.nonzero().squeeze(1)
        for c in choice.unique().tolist():
            prop = (choice == c).nonzero().squeeze(1)
            take = prop[best[prop].argsort()[: int(cap[c])]]
            assign[idx_free[take]] = c
            cap[c] -= take.numel()
    if bool((assign < 0).any()):  # cannot happen with enough capacity; guard against an endless loop
        raise RuntimeError("balanced assignment did not place every point")
    return assign


def balanced_kmeans(v: torch.Tensor, n_clusters: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """(n,) cluster ids of the rows of ``v`` (n, D) into ``n_clusters`` clusters of exactly n / n_clusters rows."""
    n = v.shape[0]
    if n % n_clusters:
        raise ValueError(f"{n} neurons do not split into {n_clusters} equal bricks; pick a divisor of {n}")
    size = n // n_clusters
    v = v.double()
    if n_clusters == 1:
        return torch.zeros(n, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    # k-means++ seeding
    cent = [v[int(torch.randint(n, (1,), generator=g))]]
    d2 = ((v - cent[0]) ** 2).sum(1)
    for _ in range(n_clusters - 1):
        p = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / n)
        c = v[int(torch.multinomial(p.float(), 1, generator=g))]
        cent.append(c)
        d2 = torch.minimum(d2, ((v - c) ** 2).sum(1))
    C = torch.stack(cent)
    assign = None
    vn = (v ** 2).sum(1, keepdim=True)
    for _ in range(iters):
        dist = vn - 2 * v @ C.T + (C ** 2).sum(1)[None]
        new = balanced_assign(dist, size)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        C = torch.zeros_like(C).index_add_(0, assign, v) / size
    return assign


# ---- features ----------------------------------------------------------------------------------------------------
def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    w = w.detach().float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def weight_features(layer: FFNNeurons, features: str = "gate") -> torch.Tensor:
    """(n, D) the vectors balanced k-means clusters: L2-normalised gate rows, up rows, or both concatenated.
    A plain FFN has only its input projection; a Spark FFN's 'gate' is its predictor K1 (over x[:r])."""
    if features not in FEATURES:
        raise ValueError(f"features={features!r}; allowed: {', '.join(FEATURES)}")
    gate = layer.gate_rows()
    if gate is None or features == "up":
        return _unit_rows(layer.up_rows())
    if features == "gate":
        return _unit_rows(gate)
    return torch.cat([_unit_rows(gate), _unit_rows(layer.up_rows())], dim=1) / math.sqrt(2)


def coactivation_counts(model: torch.nn.Module, view: NeuronView, token_lists: Sequence[Sequence[int]],
                        active_fraction: float = 0.2, batch_size: int = 8, skip_ids: set[int] = frozenset(),
                        progress: bool = False) -> tuple[list[torch.Tensor], int]:
    """Per layer (n, n) float64 co-activation counts over the real tokens of ``token_lists``, and the token count.
    Active = among the ``active_fraction`` largest output magnitudes of the token (per layer)."""
    if not 0.0 < active_fraction < 1.0:
        raise ValueError(f"active_fraction={active_fraction} must be in (0, 1)")
    counts = [torch.zeros(n, n, dtype=torch.float64) for n in view.n_neurons]
    state: dict[str, torch.Tensor] = {}

    def on_activation(i: int, a: torch.Tensor) -> None:
        m = view.output_magnitude(i, a)[state["valid"]]  # (tokens, n)
        k = max(1, round(active_fraction * m.shape[-1]))
        idx = m.topk(k, dim=-1).indices
        b = torch.zeros_like(m).scatter_(-1, idx, 1.0)
        counts[i] += (b.T @ b).double()

    n_tokens = 0
    with torch.inference_mode(), view.hook(on_activation):
        for _idx, ids, valid in progress_bar(batches(token_lists, batch_size), None, "co-activation", progress):
            valid = real_tokens(ids, valid, skip_ids)
            state["valid"] = valid
            forward_logits(model, ids)
            n_tokens += int(valid.sum())
    return counts, n_tokens


def coactivation_features(counts: torch.Tensor, n_tokens: int, dims: int = 64, norm: str = "cosine"
                          ) -> torch.Tensor:
    """(n, dims) spectral embedding of a co-activation count matrix, rows L2-normalised.

    ``norm='cosine'``: M_ij / sqrt(M_ii M_jj). ``'phi'``: the correlation of the binary activities (co-activation
    beyond what the two rates predict). On SmolLM2 the cosine form gave the better bricks (docs/bricks-routing.md)."""
    if norm not in COACTIVATION_NORMS:
        raise ValueError(f"norm={norm!r}; allowed: {', '.join(COACTIVATION_NORMS)}")
    c = counts.double()
    if norm == "cosine":
        diag = c.diagonal().clamp_min(1.0)
        s = c / torch.sqrt(diag[:, None] * diag[None, :])
    else:
        c = c / max(1, n_tokens)
        p = c.diagonal().clamp(1e-9, 1 - 1e-9)
        sd = torch.sqrt(p * (1 - p))
        s = (c - p[:, None] * p[None, :]) / (sd[:, None] * sd[None, :])
    evals, evecs = torch.linalg.eigh(s)
    q = min(dims, s.shape[0])
    emb = evecs[:, -q:] * evals[-q:].clamp_min(0).sqrt()
    return emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)


def partition_model(model: torch.nn.Module, n_bricks: int, method: str = "weights", *,
                    token_lists: Sequence[Sequence[int]] | None = None, features: str = "gate",
                    active_fraction: float = 0.2, embed_dims: int = 64, coactivation_norm: str = "cosine",
                    iters: int = 25, seed: int = 0,
                    batch_size: int = 8, skip_ids: set[int] = frozenset(), view: NeuronView | None = None,
                    progress: bool = False, meta: dict[str, Any] | None = None) -> Partition:
    """Partition every FFN layer of ``model`` into ``n_bricks`` equal bricks (see the module docstring).
    ``coactivation`` needs ``token_lists`` (token ids of corpus text)."""
    if method not in METHODS:
        raise ValueError(f"partition method {method!r}; allowed: {', '.join(METHODS)}")
    view = view if view is not None else NeuronView(model)
    bad = [n for n in view.n_neurons if n % n_bricks]
    if n_bricks < 1 or bad:
        raise ValueError(f"n_bricks={n_bricks} must divide every layer's neuron count {sorted(set(view.n_neurons))}")
    info: dict[str, Any] = {"architecture": view.arch, "seed": seed, **(meta or {})}
    if method == "weights":
        feats = [weight_features(layer, features) for layer in view]
        info["features"] = features
    else:
        if not token_lists:
            raise ValueError("the co-activation partition needs corpus text (token_lists)")
        counts, n_tok = coactivation_counts(model, view, token_lists, active_fraction, batch_size, skip_ids,
                                            progress)
        feats = [coactivation_features(c, n_tok, embed_dims, coactivation_norm) for c in counts]
        info.update(active_fraction=active_fraction, embed_dims=embed_dims, n_tokens=n_tok,
                    coactivation_norm=coactivation_norm)
    assign = [balanced_kmeans(f, n_bricks, iters, seed + i) for i, f in enumerate(feats)]
    return Partition(method, n_bricks, assign, info)


def coactivation_score(part: Partition, counts: Sequence[torch.Tensor]) -> list[float]:
    """Per layer, the share of co-activation mass (off-diagonal) that falls inside bricks (1/E for random)."""
    out = []
    for a, c in zip(part.assign, counts):
        same = a[:, None] == a[None, :]
        off = ~torch.eye(a.numel(), dtype=torch.bool)
        tot = float(c[off].sum())
        out.append(float(c[same & off].sum()) / tot if tot > 0 else float("nan"))
    return out


# ---- the experiment: `sparkformer bricks partition` -----------------------------------------------------------------
@dataclass(kw_only=True)
class Partitioning:
    """How to split each FFN layer into bricks (``partition`` makes a file of it; ``route`` computes one when it
    is given none)."""

    n_bricks: int = arg(16, "bricks per layer (must divide the neuron count)")
    method: str = arg("weights", "balanced k-means on the neurons' weights, or clustering of their co-activation "
                                 "on the capability prompts", choices=METHODS)
    features: str = arg("gate", "weights method: which rows to cluster", choices=FEATURES)
    active_fraction: float = arg(0.2, "coactivation method: a neuron is active on a token when in this top fraction")
    coactivation_norm: str = arg("cosine", "coactivation method: cosine-normalised counts or the phi correlation "
                                           "of activities", choices=COACTIVATION_NORMS)

    def make_partition(self, model: torch.nn.Module, view: NeuronView, token_lists, skip_ids: set[int], batch_size: int,
                  seed: int, meta: dict[str, Any]) -> Partition:
        return partition_model(model, self.n_bricks, self.method, token_lists=token_lists, features=self.features,
                               active_fraction=self.active_fraction, coactivation_norm=self.coactivation_norm,
                               seed=seed, batch_size=batch_size, skip_ids=skip_ids, view=view, meta=meta)


@dataclass(kw_only=True)
class PartitionRun(Partitioning, RecordRun):
    """Settings of ``sparkformer bricks partition``."""

    out: str = arg(help="partition file (.safetensors); a summary goes beside it (.json)", required=True)
    heldout_per_capability: int = arg(1, cli=False)  # no held-out prompts needed
    record_cache: str | None = arg(None, cli=False)


def run_partition(run: PartitionRun, model: torch.nn.Module | None = None, tokenizer: Any = None, capset=None,
                  log: Callable[[str], None] = log) -> dict[str, Any]:
    """Python API of ``sparkformer bricks partition``: balanced k-means on neuron weight vectors, or co-activation
    clustering on the capability prompts; writes the small .safetensors partition and ``<file>.json`` (the summary
    returned, plus the command that reproduces it)."""
    t0 = start(run)
    model, tokenizer, name, _ = load_model(run.model, model, tokenizer, run.dtype, log=log)
    view = NeuronView(model)
    toks, skip, info = None, set(), {}
    if run.method == "coactivation":
        d = capability_tokens(tokenizer, capset or run.prompts(), run.max_tokens)
        toks, skip = d["train"] + d["val"], d["skip"]
        info = {"tokens": sum(map(len, toks)), "capabilities": d["capabilities"]}
    part = run.make_partition(model, view, toks, skip, run.batch_size, run.seed, {"model": name, **info})
    path = part.save(run.out)
    summary: dict[str, Any] = {"model": name, "method": run.method, "n_bricks": run.n_bricks, "file": str(path),
                               "bytes": path.stat().st_size, "n_layers": part.n_layers,
                               "brick_size": part.brick_size(0), "seconds": time.time() - t0, **part.meta}
    if run.method == "coactivation":  # how much co-activation stays inside bricks, against a random partition
        counts, _ = coactivation_counts(model, view, toks[: max(1, len(toks) // 4)], run.active_fraction,
                                        run.batch_size, skip)
        g = torch.Generator().manual_seed(run.seed)
        rnd = Partition("random", run.n_bricks, [torch.randperm(n, generator=g) % run.n_bricks
                                                 for n in view.n_neurons])
        summary["in_brick_coactivation"] = sum(coactivation_score(part, counts)) / part.n_layers
        summary["in_brick_coactivation_random"] = sum(coactivation_score(rnd, counts)) / part.n_layers
    write_json(path.with_suffix(".json"), summary)
    log(f"partition: {part.n_layers} layers x {run.n_bricks} bricks of {part.brick_size(0)} neurons ({run.method}) "
        f"-> {path} ({summary['bytes']} bytes, {summary['seconds']:.0f} s)")
    return {**summary, "command": command_line("partition", run)}


def add_cli(subparsers) -> None:
    add_command(subparsers, "partition", PartitionRun, run_partition,
                help="split each FFN layer's neurons into equal bricks (MoEfication) -> file",
                summary=lambda res: ("", res))
