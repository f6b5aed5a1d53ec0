"""Activation thresholds of a model: which inputs of which matrices are skipped per token, and what that saves.

A :class:`SparseSpec` holds, per layer, magnitude thresholds at five *sites* (``None``: the site stays dense):

    qkv       input of q/k/v (the normed residual)     entries with |x_j| <= t are zero: column j of W_qkv is not read
    o         input of the o-projection                 (TEAL: training-free input sparsity of every matrix)
    gate_up   input of gate and up (the normed residual)
    down      input of the down-projection (act(g) * u)  skips rows of W_down^T (whole neurons)
    gate_act  |act(gate)| of each neuron                 CATS: neurons with |act(g_i)| <= t skip their up and down rows

:func:`sparse_forward` applies a spec to a :class:`~sparkformer.model.SparkLM` forward (the training form: masks,
no speed), and a :class:`SparsityMeter` records the achieved fraction of zeros per site, from which
:func:`achieved_sparsity` gives the fraction of weights not read per token (FFN and model-wide, decoder matrices
only: embeddings and LM head are read in full, as in TEAL). The decode engines read the same spec and skip the
weights for real (``sparkformer.decode``); ``sparkformer sparsify`` calibrates specs.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import torch

SITES = ("qkv", "o", "gate_up", "down", "gate_act")
FFN_SITES = ("gate_up", "down", "gate_act")
SPEC_FILE = "sparsity.json"
FORMAT = "sparkformer-sparsity/1"


@dataclass
class LayerThresholds:
    qkv: float | None = None
    o: float | None = None
    gate_up: float | None = None
    down: float | None = None
    gate_act: float | None = None

    def active(self) -> dict[str, float]:
        return {s: getattr(self, s) for s in SITES if getattr(self, s) is not None}


@dataclass
class SparseSpec:
    """Per-layer thresholds plus how they were made (``method``, ``scope``, ``target``, free-form ``meta``)."""

    layers: list[LayerThresholds]
    method: str = "threshold"
    scope: str = "ffn"  # ffn | model
    target: float = 0.0  # the asked sparsity (fraction of the scope's weights not read per token)
    meta: dict[str, Any] = field(default_factory=dict)

    def validate(self, n_layers: int | None = None) -> "SparseSpec":
        if n_layers is not None and len(self.layers) != n_layers:
            raise ValueError(f"sparsity spec for {len(self.layers)} layers, the model has {n_layers}; was it made "
                             f"for another model (it names {self.meta.get('model', '?')!r})?")
        for i, lt in enumerate(self.layers):
            for s, t in lt.active().items():
                if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
                    raise ValueError(f"layer {i} site {s}: threshold {t!r} must be a finite number >= 0")
            if lt.gate_up is not None and lt.gate_act is not None:
                raise ValueError(f"layer {i}: gate_up (input) and gate_act (CATS) thresholds together are not "
                                 "supported; use one of them")
        if self.scope not in ("ffn", "model"):  # what the target counts: FFN weights, or every decoder matrix's
            raise ValueError(f"scope={self.scope!r}; allowed: ffn, model")
        return self

    @classmethod
    def dense(cls, n_layers: int, **kw) -> "SparseSpec":
        return cls([LayerThresholds() for _ in range(n_layers)], **kw)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "method": self.method, "scope": self.scope, "target": self.target,
                "layers": [asdict(lt) for lt in self.layers], "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "sparsity spec") -> "SparseSpec":
        if d.get("format") != FORMAT:
            raise ValueError(f"{where}: format {d.get('format')!r}, expected {FORMAT!r}")
        names = {f.name for f in fields(LayerThresholds)}
        layers = []
        for i, row in enumerate(d.get("layers", [])):
            bad = set(row) - names
            if bad:
                raise ValueError(f"{where}: layer {i} has unknown sites {sorted(bad)}; known: {', '.join(SITES)}")
            layers.append(LayerThresholds(**row))
        return cls(layers, d.get("method", "threshold"), d.get("scope", "ffn"), float(d.get("target", 0.0)),
                   dict(d.get("meta", {}))).validate()

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/sparsity.json`` atomically (temp file + rename)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / SPEC_FILE
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".sparsity.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SparseSpec":
        p = Path(path)
        p = p / SPEC_FILE if p.is_dir() else p
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from None
        return cls.from_dict(d, str(p))


# ---- weights read per site ----------------------------------------------------------------------------------------
def site_weights(model) -> list[dict[str, int]]:
    """Per layer: the weights a fully zero input of each site lets the engine skip (gate_act: the up and down rows;
    its down share is counted at ``down``, whose measured zeros include the neurons CATS drops)."""
    cfg = model.config
    out = []
    for i, block in enumerate(model.layers):
        a = block.attn
        qkv = cfg.d_model * (a.n_heads + 2 * a.n_kv) * a.hd
        o = a.n_heads * a.hd * cfg.d_model
        ffn = block.ffn
        if getattr(ffn, "kind", None) == "geglu":
            m = ffn.n_neurons
            out.append({"qkv": qkv, "o": o, "gate_up": 2 * cfg.d_model * m, "down": m * cfg.d_model,
                        "gate_act": m * cfg.d_model, "ffn_total": 3 * cfg.d_model * m, "attn_total": qkv + o})
        else:
            n = sum(p.numel() for p in ffn.parameters())
            out.append({"qkv": qkv, "o": o, "gate_up": 0, "down": 0, "gate_act": 0, "ffn_total": n,
                        "attn_total": qkv + o})
    return out


class SparsityMeter:
    """Zeros counted per (layer, site) over the forwards it watches."""

    def __init__(self) -> None:
        self.zeros: dict[tuple[int, str], float] = {}
        self.count: dict[tuple[int, str], float] = {}

    def add(self, layer: int, site: str, zero_mask: torch.Tensor) -> None:
        key = (layer, site)
        self.zeros[key] = self.zeros.get(key, 0.0) + float(zero_mask.sum())
        self.count[key] = self.count.get(key, 0.0) + zero_mask.numel()

    def fraction(self, layer: int, site: str) -> float:
        c = self.count.get((layer, site), 0.0)
        return self.zeros.get((layer, site), 0.0) / c if c else 0.0

    def per_layer(self, n_layers: int) -> list[dict[str, float]]:
        return [{s: self.fraction(i, s) for s in SITES} for i in range(n_layers)]


def achieved_sparsity(model, meter: SparsityMeter) -> dict[str, float]:
    """Fraction of weights not read per token: ``ffn`` (FFN matrices), ``attn`` (q/k/v/o) and ``model`` (all decoder
    matrices), from the zeros the meter saw."""
    W = site_weights(model)
    skip_ffn = skip_attn = tot_ffn = tot_attn = 0.0
    for i, w in enumerate(W):
        z = {s: meter.fraction(i, s) for s in SITES}
        skip_attn += z["qkv"] * w["qkv"] + z["o"] * w["o"]
        skip_ffn += z["gate_up"] * w["gate_up"] + z["down"] * w["down"] + z["gate_act"] * w["gate_act"]
        tot_ffn += w["ffn_total"]
        tot_attn += w["attn_total"]
    return {"ffn": skip_ffn / tot_ffn, "attn": skip_attn / tot_attn,
            "model": (skip_ffn + skip_attn) / (tot_ffn + tot_attn)}


# ---- the training form ----------------------------------------------------------------------------------------
def _keep(x: torch.Tensor, t: float) -> torch.Tensor:
    return x.abs() > t


@contextmanager
def sparse_forward(model, spec: SparseSpec, meter: SparsityMeter | None = None) -> Iterator[SparsityMeter | None]:
    """Apply ``spec``'s thresholds to ``model``'s forward inside the block (masks; numbers, not speed)."""
    spec.validate(len(model.layers))
    handles = []

    def record(i, site, keep):
        if meter is not None:
            meter.add(i, site, ~keep)

    def input_hook(i, site, t, arg_index=0):
        def hook(_mod, args):
            x = args[arg_index]
            keep = _keep(x, t)
            record(i, site, keep)
            return (*args[:arg_index], x * keep, *args[arg_index + 1:])
        return hook

    def gate_hook(i, t, act):
        def hook(_mod, _args, out):
            keep = _keep(act(out), t)
            record(i, "gate_act", keep)
            return out * keep
        return hook

    try:
        for i, (block, lt) in enumerate(zip(model.layers, spec.layers)):
            a, ffn = block.attn, block.ffn
            if lt.qkv is not None:
                handles.append(a.register_forward_pre_hook(input_hook(i, "qkv", lt.qkv)))
            if lt.o is not None:
                handles.append(a.o_proj.register_forward_pre_hook(input_hook(i, "o", lt.o)))
            ffn_sites = lt.gate_up is not None or lt.down is not None or lt.gate_act is not None
            if ffn_sites and getattr(ffn, "kind", None) != "geglu":
                raise ValueError(f"layer {i}: FFN thresholds apply to dense gated FFN layers, this one is "
                                 f"{getattr(ffn, 'kind', type(ffn).__name__)!r}")
            if lt.gate_up is not None:
                handles.append(ffn.register_forward_pre_hook(input_hook(i, "gate_up", lt.gate_up)))
            if lt.gate_act is not None:
                handles.append(ffn.gate_proj.register_forward_hook(gate_hook(i, lt.gate_act, ffn.act)))
            if lt.down is not None or lt.gate_act is not None:  # down's zeros are counted with CATS too
                handles.append(ffn.down_proj.register_forward_pre_hook(
                    input_hook(i, "down", lt.down if lt.down is not None else 0.0)))
        yield meter
    finally:
        for h in handles:
            h.remove()
