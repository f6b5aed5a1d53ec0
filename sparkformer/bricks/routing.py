"""One routing abstraction over FFN neurons and bricks: ``Router.scores(x) -> (..., n_units)``, ``Router.select``.

A router sees the FFN input ``x`` of one layer and decides which units run for each token: neurons, or bricks
(``groups[i]``: the brick of neuron i, a :class:`~sparkformer.bricks.partition.Partition`). The routers:

    SparkPredictorRouter   the predictor of a trained SparkLM layer: s = K1 x[:r], the model's own top-k rule
    LowRankPredictor       the sparkified neuron predictor of a pretrained gated FFN (see below), saved to disk
    BrickMLPRouter         a learned brick router (MoEfication): linear or 2-layer MLP, x -> brick scores
    OracleRouter           the true output magnitude |a_i| * ||W_down[:, i]|| (per brick: its L2 norm over members)
    RandomRouter           uniform random scores (a fresh draw per call, from a seeded generator)
Selection (``select``) turns scores into a bool mask over units, per token:

    "topk"   exactly round(fraction * n_units) units per token (sort-based, ``torch.topk``)
    "stat"   statistical top-k: keep s > mean(s) + std(s) * ndtri(1 - f); ~fraction of the units per token, no sort.
             ``stat_fraction`` is the f given to the threshold; it defaults to ``fraction`` and can be calibrated so
             that the achieved mean fraction hits ``fraction`` on recorded data (scores need not be Gaussian).

``fraction >= 1`` selects everything. :func:`route` applies one router per layer to a model by zeroing the
activation (input of the down projection) of the unselected neurons; with everything selected the output is
bit-identical to the model's. A decode engine asks :meth:`Router.decode_form` for a router it can run itself.
Fitting: :mod:`~sparkformer.bricks.brick_routers`, :mod:`~sparkformer.bricks.sparkify`; measuring: ``router_eval``.

The LowRankPredictor (scores for the lead's "predicted gated FFN" decode kernel)::

    z = A x                       A: (rank, d)          input "lowrank"
    z = x[dims]                   dims: (r,) int64      input "split" (Spark split of the input dims; no A)
    y = B z (+ bias)              B: (n, rank) output "gate"     s = y            (approximate gate pre-activation)
                                  B: (2n, rank) output "gate_up" s = |act(y[:n]) * y[n:]|
                                                (the up half of B pre-scaled by ||W_down[:, i]||: s predicts the
                                                 output magnitude of neuron i)
    keep i where s_i > theta(s, stat_fraction)      then h_i = act(W_gate[i] x) * (W_up[i] x) only for kept i,
                                                    y = W_down[:, kept] h_kept
    verify stage (optional)       of the kept i, only those with |h_i| * w_i > verify_threshold read W_down[:, i]
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparkformer.ops.stat_topk import exact_topk, stat_threshold, stat_topk

SELECT_METHODS = ("topk", "stat")
UNITS = ("neuron", "brick")
ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}
FORMAT = "sparkformer-routers"
FORMAT_VERSION = 1


def _check_fraction(fraction: float) -> float:
    f = float(fraction)
    if not f > 0.0:
        raise ValueError(f"fraction={fraction}: must be > 0 (1 keeps every unit)")
    return f


def select_units(scores: torch.Tensor, fraction: float, method: str = "topk",
                 stat_fraction: float | None = None) -> torch.Tensor:
    """Bool mask (..., n) of the selected units of each row of ``scores``; see the module docstring."""
    if method not in SELECT_METHODS:
        raise ValueError(f"selection method {method!r}; allowed: {', '.join(SELECT_METHODS)}")
    n = scores.shape[-1]
    f = _check_fraction(fraction)
    if f >= 1.0:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if method == "topk":
        k = max(1, round(f * n))
        if k >= n:
            return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        idx = scores.topk(k, dim=-1).indices
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, idx, True)
    sf = min(1.0, _check_fraction(stat_fraction if stat_fraction is not None else f))
    theta = stat_threshold(scores, sf)
    s = scores.float() if scores.dtype != torch.float64 else scores
    return s > theta


class Router(nn.Module):
    """Base class: per-token scores over ``n_units`` units of one FFN layer and a selection rule.

    ``groups`` (n_neurons,) int64 maps each neuron to its brick for a brick router (None: units are neurons)."""

    kind = "router"
    needs_activation = False  # True: scores() needs the layer's true activation (the oracle)

    def __init__(self, n_neurons: int, groups: torch.Tensor | None = None, fraction: float = 1.0,
                 method: str = "topk", stat_fraction: float | None = None):
        super().__init__()
        self.n_neurons = int(n_neurons)
        if groups is not None:
            groups = torch.as_tensor(groups, dtype=torch.long).flatten()
            if groups.numel() != self.n_neurons:
                raise ValueError(f"groups has {groups.numel()} entries, the layer has {self.n_neurons} neurons")
            n_bricks = int(groups.max()) + 1 if groups.numel() else 0
            if groups.numel() and (int(groups.min()) < 0 or torch.bincount(groups, minlength=n_bricks).eq(0).any()):
                raise ValueError("groups must number the bricks 0..E-1, each with at least one neuron")
            self.register_buffer("groups", groups, persistent=False)
        else:
            self.groups = None
        self.fraction = _check_fraction(fraction)
        if method not in SELECT_METHODS:
            raise ValueError(f"selection method {method!r}; allowed: {', '.join(SELECT_METHODS)}")
        self.method = method
        self.stat_fraction = stat_fraction

    def set_groups(self, groups: torch.Tensor | None) -> "Router":
        """Route bricks instead of neurons (or back, with None): neuron scores are pooled per brick (L2)."""
        g = None if groups is None else torch.as_tensor(groups, dtype=torch.long).flatten().clone()
        if g is not None and g.numel() != self.n_neurons:
            raise ValueError(f"groups has {g.numel()} entries, the layer has {self.n_neurons} neurons")
        if "groups" in self._buffers:
            self._buffers["groups"] = g
        else:
            self.__dict__.pop("groups", None)
            self.register_buffer("groups", g, persistent=False)
        return self

    # ---- shape --------------------------------------------------------------------------------------------------
    @property
    def unit(self) -> str:
        return "neuron" if self.groups is None else "brick"

    @property
    def n_units(self) -> int:
        return self.n_neurons if self.groups is None else int(self.groups.max()) + 1

    # ---- the interface ------------------------------------------------------------------------------------------
    def scores(self, x: torch.Tensor, activation: torch.Tensor | None = None) -> torch.Tensor:
        """(..., n_units) scores for FFN inputs x (..., d); higher = more worth running."""
        raise NotImplementedError

    def select(self, scores: torch.Tensor, fraction: float | None = None, method: str | None = None,
               stat_fraction: float | None = None) -> torch.Tensor:
        """Bool (..., n_units): the selected units (defaults: this router's fraction / method / stat_fraction)."""
        f = self.fraction if fraction is None else fraction
        sf = stat_fraction if stat_fraction is not None else (self.stat_fraction if fraction is None else None)
        return select_units(scores, f, method or self.method, sf)

    def expand(self, unit_mask: torch.Tensor) -> torch.Tensor:
        """A (..., n_units) selection as a (..., n_neurons) neuron mask."""
        if self.groups is None:
            return unit_mask
        return unit_mask.index_select(-1, self.groups.to(unit_mask.device))

    def neuron_mask(self, x: torch.Tensor, activation: torch.Tensor | None = None, **select_kw) -> torch.Tensor:
        """Bool (..., n_neurons): True where the neuron runs for this token."""
        return self.expand(self.select(self.scores(x, activation), **select_kw))

    def indices(self, mask: torch.Tensor) -> list[torch.Tensor]:
        """The selected unit indices of each row of a 2-D mask (a ragged list; for decode-style consumers)."""
        return [row.nonzero().flatten() for row in mask.reshape(-1, mask.shape[-1])]

    def decode_form(self, dtype: torch.dtype) -> tuple | None:
        """The tensors a decode engine computes this router's selection from without calling it, or None (the
        engine then calls :meth:`neuron_mask`). Only :class:`LowRankPredictor` has one."""
        return None

    # ---- persistence --------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-able description (everything but the tensors)."""
        return {"kind": self.kind, "n_neurons": self.n_neurons, "fraction": self.fraction, "method": self.method,
                "stat_fraction": self.stat_fraction}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {} if self.groups is None else {"groups": self.groups}
        return out

    @classmethod
    def from_saved(cls, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "Router":
        raise NotImplementedError(f"{cls.__name__} cannot be restored from a file")


def _brick_reduce(neuron_scores: torch.Tensor, groups: torch.Tensor, n_bricks: int) -> torch.Tensor:
    """Per-brick L2 norm of non-negative neuron scores: sqrt(sum over members of s^2)."""
    sq = neuron_scores.float().square()
    out = torch.zeros(*sq.shape[:-1], n_bricks, dtype=sq.dtype, device=sq.device)
    out.index_add_(-1, groups.to(sq.device), sq)
    return out.sqrt()


# ---- routers -----------------------------------------------------------------------------------------------------
class OracleRouter(Router):
    """The true output magnitude |a_i| * ||W_down[:, i]|| (``indicator='output'``) or |a_i| ('activation');
    a brick scores the L2 norm of its members. Needs the layer's activation, so it only runs inside :func:`route`
    (or with ``activation=`` given)."""

    kind = "oracle"
    needs_activation = True

    def __init__(self, down_col_norms: torch.Tensor, groups: torch.Tensor | None = None, indicator: str = "output",
                 **kw):
        super().__init__(down_col_norms.numel(), groups, **kw)
        if indicator not in ("output", "activation"):
            raise ValueError(f"indicator={indicator!r}; allowed: output, activation")
        self.indicator = indicator
        self.register_buffer("norms", down_col_norms.detach().float().clone(), persistent=False)

    def scores(self, x, activation=None):
        if activation is None:
            raise ValueError("the oracle router needs the layer's activation (use it through route())")
        s = activation.detach().abs().float()
        if self.indicator == "output":
            s = s * self.norms.to(s.device)
        return s if self.groups is None else _brick_reduce(s, self.groups, self.n_units)

    def config(self):
        return {**super().config(), "indicator": self.indicator}

    def tensors(self):
        return {**super().tensors(), "norms": self.norms}

    @classmethod
    def from_saved(cls, cfg, tensors):
        return cls(tensors["norms"], tensors.get("groups"), cfg.get("indicator", "output"),
                   **_sel_kw(cfg))


class RandomRouter(Router):
    """Uniform random scores: a fresh draw on each call from a generator seeded with ``seed``."""

    kind = "random"

    def __init__(self, n_neurons: int, groups: torch.Tensor | None = None, seed: int = 0, **kw):
        super().__init__(n_neurons, groups, **kw)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)

    def scores(self, x, activation=None):
        s = torch.rand(*x.shape[:-1], self.n_units, generator=self.generator)
        return s.to(x.device)

    def config(self):
        return {**super().config(), "seed": self.seed}

    @classmethod
    def from_saved(cls, cfg, tensors):
        return cls(cfg["n_neurons"], tensors.get("groups"), cfg.get("seed", 0), **_sel_kw(cfg))


class SparkPredictorRouter(Router):
    """The predictor of a trained SparkLM Spark FFN layer: s = K1 x[:r]. Its default selection is the layer's own
    (statistical or exact top-k at the layer's fraction), so ``neuron_mask`` reproduces the model's active set."""

    kind = "spark"

    def __init__(self, ffn: nn.Module, groups: torch.Tensor | None = None):
        if getattr(ffn, "kind", None) != "spark" or not hasattr(ffn, "predictor"):
            raise ValueError(f"{type(ffn).__name__} is not a Spark FFN (sparkformer.model.SparkFFN)")
        super().__init__(ffn.n_neurons, groups, fraction=ffn.fraction, method="topk" if ffn.exact else "stat")
        self.ffn = ffn

    @property
    def rank(self) -> int:
        return self.ffn.rank

    def scores(self, x, activation=None):
        s = self.ffn.predictor(x[..., : self.ffn.rank])
        return s if self.groups is None else _brick_reduce(F.relu(s), self.groups, self.n_units)

    def select(self, scores, fraction=None, method=None, stat_fraction=None):
        if self.groups is None and fraction is None and method is None and stat_fraction is None:
            # the layer's own rule: gelu_tanh(top-k(s)) != 0
            y = exact_topk(scores, self.fraction) if self.ffn.exact else stat_topk(scores, self.fraction)
            return F.gelu(y, approximate="tanh") != 0
        return super().select(scores, fraction, method, stat_fraction)

    def to_predictor(self) -> "LowRankPredictor":
        """The same scores as a saveable :class:`LowRankPredictor` (input 'split', dims 0..r-1, output 'gate')."""
        w = self.ffn.predictor.weight.detach().float().clone()
        return LowRankPredictor(B=w, dims=torch.arange(self.ffn.rank), output="gate", act="gelu_tanh",
                                fraction=self.fraction, method=self.method)


class LowRankPredictor(Router):
    """Sparkified neuron predictor: ``z = A x`` (or ``x[dims]``), ``y = B z (+ bias)``; see the module docstring."""

    kind = "lowrank"

    def __init__(self, B: torch.Tensor, A: torch.Tensor | None = None, dims: torch.Tensor | None = None,
                 output: str = "gate", act: str = "silu", bias: torch.Tensor | None = None,
                 groups: torch.Tensor | None = None, **kw):
        if output not in ("gate", "gate_up"):
            raise ValueError(f"output={output!r}; allowed: gate, gate_up")
        if (A is None) == (dims is None):
            raise ValueError("give exactly one of A (low-rank input map) and dims (Spark split of the input dims)")
        if act not in ACTS:
            raise ValueError(f"act={act!r}; allowed: {', '.join(ACTS)}")
        rows = B.shape[0]
        n = rows // 2 if output == "gate_up" else rows
        if output == "gate_up" and rows % 2:
            raise ValueError(f"output 'gate_up' needs B with 2n rows, got {rows}")
        super().__init__(n, groups, **kw)
        self.output, self.act = output, act
        self.B = nn.Parameter(B.detach().float().clone())
        if A is not None:
            if A.shape[0] != B.shape[1]:
                raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)}: A must be (rank, d), B (rows, rank)")
            self.A = nn.Parameter(A.detach().float().clone())
            self.register_buffer("dims", None)
        else:
            dims = torch.as_tensor(dims, dtype=torch.long).flatten()
            if dims.numel() != B.shape[1]:
                raise ValueError(f"dims has {dims.numel()} entries, B expects {B.shape[1]} inputs")
            self.A = None
            self.register_buffer("dims", dims)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        # optional verify stage (``set_verify``): the prediction proposes a superset, the exact output decides
        self.verify_threshold: float | None = None
        self.register_buffer("verify_weights", None)

    def set_verify(self, weights: torch.Tensor, threshold: float) -> "LowRankPredictor":
        """Keep, of the predicted neurons, those with |act(g_i) u_i| * weights_i > threshold."""
        if weights.numel() != self.n_neurons:
            raise ValueError(f"verify weights: {weights.numel()} entries for {self.n_neurons} neurons")
        self.verify_weights, self.verify_threshold = weights.detach().float().flatten().clone(), float(threshold)
        return self

    needs_activation = property(lambda self: self.verify_threshold is not None)  # verify reads the activation

    def neuron_mask(self, x, activation=None, **select_kw):
        m = super().neuron_mask(x, None, **select_kw)
        if self.verify_threshold is not None and activation is None:
            raise ValueError("this predictor verifies its selection with the exact activation; pass activation=")
        return m if self.verify_threshold is None else m & (activation.abs() * self.verify_weights
                                                              > self.verify_threshold)

    def verify_form(self) -> tuple[torch.Tensor, float] | None:
        """(weights (n,) fp32, threshold) of the verify stage, or None."""
        return None if self.verify_threshold is None else (self.verify_weights.float().contiguous(),
                                                           self.verify_threshold)

    @property
    def input(self) -> str:
        return "lowrank" if self.A is not None else "split"

    @property
    def rank(self) -> int:
        return self.B.shape[1]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """y = B z (+ bias): (..., n) or (..., 2n)."""
        x = x.to(self.B.dtype)
        z = F.linear(x, self.A) if self.A is not None else x.index_select(-1, self.dims)
        return F.linear(z, self.B, self.bias)

    def predicted_activation(self, x: torch.Tensor) -> torch.Tensor:
        """'gate_up': act(g_hat) * u_hat (the up half carries ||W_down[:, i]||); 'gate': y itself."""
        y = self.project(x)
        if self.output == "gate":
            return y
        n = self.n_neurons
        return ACTS[self.act](y[..., :n]) * y[..., n:]

    def scores(self, x, activation=None):
        s = self.predicted_activation(x)
        if self.output == "gate_up":
            s = s.abs()
        if self.groups is None:
            return s
        return _brick_reduce(s if self.output == "gate_up" else F.relu(s), self.groups, self.n_units)

    def cost(self, d_model: int) -> int:
        """Multiply-adds per token of the scores (the predictor's share of a decode step)."""
        return (self.rank * d_model if self.A is not None else 0) + self.B.numel()

    def decode_form(self, dtype: torch.dtype) -> tuple | None:
        """``(A, B, n_neurons, f, act)`` (A, B contiguous in ``dtype``) for a neuron-level 'gate_up' predictor with
        an input map A, no bias and statistical selection of a fraction below 1: the engine scores
        ``s = |act(g) * u|, [g; u] = B (A x)`` and keeps ``s > stat_threshold(s, f)``, as :func:`select_units`
        does, with f the calibrated ``stat_fraction`` (else ``fraction``). None for every other configuration."""
        if not (type(self) is LowRankPredictor and self.groups is None and self.A is not None and self.bias is None
                and self.output == "gate_up" and self.method == "stat" and self.fraction < 1.0):
            return None
        f = min(1.0, self.stat_fraction if self.stat_fraction is not None else self.fraction)
        return (self.A.detach().to(dtype).contiguous(), self.B.detach().to(dtype).contiguous(), self.n_neurons, f,
                ACTS[self.act])

    def config(self):
        return {**super().config(), "input": self.input, "output": self.output, "act": self.act, "rank": self.rank,
                "bias": self.bias is not None, "verify_threshold": self.verify_threshold}

    def tensors(self):
        t = {**super().tensors(), "B": self.B.detach()}
        if self.verify_weights is not None:
            t["verify_weights"] = self.verify_weights
        if self.A is not None:
            t["A"] = self.A.detach()
        else:
            t["dims"] = self.dims
        if self.bias is not None:
            t["bias"] = self.bias.detach()
        return t

    @classmethod
    def from_saved(cls, cfg, tensors):
        r = cls(tensors["B"], tensors.get("A"), tensors.get("dims"), cfg.get("output", "gate"),
                cfg.get("act", "silu"), tensors.get("bias"), tensors.get("groups"), **_sel_kw(cfg))
        if cfg.get("verify_threshold") is not None:
            r.set_verify(tensors["verify_weights"], cfg["verify_threshold"])
        return r


class BrickMLPRouter(Router):
    """A learned brick router (MoEfication): ``W2 relu(W1 x + b1) + b2`` (``hidden > 0``) or ``W x + b``."""

    kind = "brick-mlp"

    def __init__(self, d_model: int, groups: torch.Tensor, hidden: int = 0, **kw):
        if groups is None:
            raise ValueError("a brick router needs groups (the partition of the layer's neurons)")
        super().__init__(torch.as_tensor(groups).numel(), groups, **kw)
        self.d_model, self.hidden = int(d_model), int(hidden)
        E = self.n_units
        if self.hidden > 0:
            self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, E))
        else:
            self.net = nn.Sequential(nn.Linear(d_model, E))

    def scores(self, x, activation=None):
        p = next(self.net.parameters())
        return self.net(x.to(p.dtype))

    def set_groups(self, groups):
        raise ValueError("a brick router's output size is fixed by its partition; train a new one for another")

    def config(self):
        return {**super().config(), "d_model": self.d_model, "hidden": self.hidden}

    def tensors(self):
        return {**super().tensors(), **{f"net.{k}": v.detach() for k, v in self.net.state_dict().items()}}

    @classmethod
    def from_saved(cls, cfg, tensors):
        r = cls(cfg["d_model"], tensors["groups"], cfg.get("hidden", 0), **_sel_kw(cfg))
        r.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        return r


ROUTER_KINDS: dict[str, type[Router]] = {c.kind: c for c in (OracleRouter, RandomRouter, LowRankPredictor,
                                                              BrickMLPRouter)}


def _sel_kw(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"fraction": cfg.get("fraction", 1.0), "method": cfg.get("method", "topk"),
            "stat_fraction": cfg.get("stat_fraction")}


# ---- save / load -------------------------------------------------------------------------------------------------
def save_routers(path: str | Path, routers: Sequence[Router], meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``path`` (.safetensors: ``layers.{i}.{name}`` tensors) and the JSON beside it (same stem, .json):
    ``{"format", "version", "n_layers", "layers": [router config per layer], "meta": {...}}``."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, r in enumerate(routers):
        for k, v in r.tensors().items():
            tensors[f"layers.{i}.{k}"] = v.detach().cpu().clone().contiguous()  # no shared storage
    save_file(tensors, str(path), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
    doc = {"format": FORMAT, "version": FORMAT_VERSION, "tensors": path.name, "n_layers": len(routers),
           "layers": [r.config() for r in routers], "meta": dict(meta or {})}
    path.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    return path


def load_routers(path: str | Path) -> tuple[list[Router], dict[str, Any]]:
    """(routers per layer, meta) from :func:`save_routers` output (either the .safetensors or the .json path)."""
    from safetensors.torch import load_file

    path = Path(path)
    js, st = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if not js.is_file() or not st.is_file():
        raise FileNotFoundError(f"{path}: need both {js.name} and {st.name}")
    doc = json.loads(js.read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{js}: not a sparkformer router file (format {doc.get('format')!r})")
    flat = load_file(str(st))
    routers: list[Router] = []
    for i, cfg in enumerate(doc["layers"]):
        kind = cfg.get("kind")
        if kind not in ROUTER_KINDS:
            raise ValueError(f"{js}: layer {i} has router kind {kind!r}; loadable: {', '.join(ROUTER_KINDS)}")
        pre = f"layers.{i}."
        tensors = {k[len(pre):]: v for k, v in flat.items() if k.startswith(pre)}
        routers.append(ROUTER_KINDS[kind].from_saved(cfg, tensors).eval())
    return routers, doc.get("meta", {})


# ---- applying routers to a model ---------------------------------------------------------------------------------
@dataclass
class RoutingStats:
    """Selected-neuron counts per layer over the tokens routed (``valid`` tokens only when a mask was given)."""

    kept: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    valid: torch.Tensor | None = None  # (B, T) bool of the batch being run; set it before each forward

    def fraction(self, layer: int | None = None) -> float:
        if layer is not None:
            return self.kept[layer] / max(1.0, self.total[layer])
        return sum(self.kept) / max(1.0, sum(self.total))

    def per_layer(self) -> list[float]:
        return [self.fraction(i) for i in range(len(self.kept))]


@contextlib.contextmanager
def route(model: nn.Module, routers: Mapping[int, Router] | Sequence[Router | None], view=None,
          valid: torch.Tensor | None = None, **select_kw) -> Iterator[RoutingStats]:
    """Run ``model`` with each layer's FFN restricted to the neurons its router selects per token.

    ``routers``: a list (one per FFN layer, None = dense) or ``{layer: router}``. A forward pre-hook on the FFN
    module keeps its input x; a pre-hook on the down projection zeroes the activation of the unselected neurons.
    ``valid`` (B, T) bool (or ``stats.valid``, set before each forward) limits the counts to real tokens.
    ``select_kw`` (fraction=, method=, stat_fraction=) override every router's selection.
    """
    from sparkformer.bricks.neurons import NeuronView

    view = view if view is not None else NeuronView(model)
    items = dict(routers) if isinstance(routers, Mapping) else {i: r for i, r in enumerate(routers)}
    for i, r in items.items():
        if r is not None and (i < 0 or i >= len(view)):
            raise ValueError(f"router for layer {i}, the model has {len(view)} FFN layers")
        if r is not None and r.n_neurons != view[i].n_neurons:
            raise ValueError(f"layer {i}: router covers {r.n_neurons} neurons, the layer has {view[i].n_neurons}")
    stats = RoutingStats([0.0] * len(view), [0.0] * len(view), valid)
    inputs: dict[int, torch.Tensor] = {}
    handles = []

    def make_in(i: int):
        def pre(_mod, args):
            inputs[i] = args[0]
        return pre

    def make_down(i: int, router: Router):
        def pre(_mod, args):
            a = args[0]
            x = inputs.pop(i)
            with torch.no_grad():
                keep = router.neuron_mask(x, a if router.needs_activation else None, **select_kw)
            v = stats.valid
            if v is not None and v.shape == keep.shape[:-1]:
                stats.kept[i] += float(keep[v].sum())
                stats.total[i] += float(v.sum()) * keep.shape[-1]
            else:
                stats.kept[i] += float(keep.sum())
                stats.total[i] += float(keep.numel())
            if bool(keep.all()):
                return None
            return (torch.where(keep.to(a.device), a, torch.zeros((), dtype=a.dtype, device=a.device)), *args[1:])
        return pre

    try:
        for i, r in items.items():
            if r is None:
                continue
            layer = view[i]
            handles.append(layer.module.register_forward_pre_hook(make_in(i)))
            handles.append(layer.down.register_forward_pre_hook(make_down(i, r)))
        yield stats
    finally:
        for h in handles:
            h.remove()


# ---- constructors from a model -----------------------------------------------------------------------------------
def spark_routers(model: nn.Module) -> list[SparkPredictorRouter | None]:
    """The predictor of every Spark FFN layer of a SparkLM (None for its dense layers)."""
    from sparkformer.bricks.neurons import NeuronView

    view = NeuronView(model)
    if "spark" not in view.kinds:
        raise ValueError(f"{type(model).__name__} has no Spark FFN layer; the Spark predictor router needs a "
                         "sparkformer SparkLM with ffn='spark'")
    return [SparkPredictorRouter(layer.module) if layer.kind == "spark" else None for layer in view]


def oracle_routers(view, partition=None, indicator: str = "output", **kw) -> list[OracleRouter]:
    norms = view.down_col_norms()
    return [OracleRouter(norms[i], None if partition is None else partition.assign[i], indicator, **kw)
            for i in range(len(view))]


def random_routers(view, partition=None, seed: int = 0, **kw) -> list[RandomRouter]:
    return [RandomRouter(view[i].n_neurons, None if partition is None else partition.assign[i], seed + i, **kw)
            for i in range(len(view))]
