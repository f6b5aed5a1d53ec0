"""A uniform view of each layer's FFN neurons, for every supported architecture.

FFN neuron i of a layer = row i of the gate and up (input) projections + column i of the down projection. Its
*activation* is the i-th input of the down projection (``act(gate x) * up x`` for a gated FFN, ``act(fc1 x)`` for
a plain one, ``gelu_tanh(stat_topk(K1 x1)) * K2 x2`` for a Spark FFN). Its *output magnitude* is
``|a_i| * ||W_down[:, i]||``.

Both recording and masking are forward pre-hooks on the down projection, so they see and change exactly the
activation, whatever the architecture computes before it::

    view = NeuronView(model)
    with view.record() as rec:                 # rec.activations[layer] -> list of (B, T, n) tensors
        model(ids)
    with view.mask({3: torch.tensor([5, 7])}): # zero neurons 5 and 7 of layer 3 on every token
        model(ids)
    with view.mask(lambda layer, a: a.abs() < 0.1):  # or a per-token rule: True = zero this neuron here
        model(ids)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Union

import torch
import torch.nn as nn

from sparkformer.bricks.adapter import architecture, is_conv1d, is_topk_ffn

SUPPORTED_ARCHITECTURES = (
    "gated FFNs (gate_proj/up_proj/down_proj): Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3 families; "
    "plain FFNs: GPT-2 (c_fc/c_proj), GPT-NeoX/Pythia and Falcon (dense_h_to_4h/dense_4h_to_h), OPT and Phi "
    "(fc1/fc2); sparkformer SparkLM (GeGLU, Spark and top-k FFN). Mixture-of-experts FFNs are not supported"
)

# (kind, input-projection names, down-projection name), tried in this order on each module.
_PATTERNS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("spark", ("predictor", "up_proj"), "down_proj"),
    ("gated", ("gate_proj", "up_proj"), "down_proj"),
    ("plain", ("c_fc",), "c_proj"),
    ("plain", ("dense_h_to_4h",), "dense_4h_to_h"),
    ("plain", ("fc1",), "fc2"),
    ("plain", ("up_proj",), "down_proj"),  # e.g. our TopKFFN (act(top-k(up x)), no gate)
)
_SKIP_PARTS = ("vision", "visual", "image", "audio", "speech")


def _weight_out_in(mod: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features); GPT-2's Conv1D stores it transposed."""
    w = mod.weight
    return w.t() if is_conv1d(mod) else w


@dataclass
class FFNNeurons:
    """One layer's FFN neurons. ``gate`` is None for a plain FFN; for a Spark FFN it is the predictor K1."""

    layer: int
    name: str
    kind: str  # "gated" | "plain" | "spark" | "topk" (our TopKFFN: a plain FFN with top-k on its activation)
    module: nn.Module
    down: nn.Module
    up: nn.Module
    gate: nn.Module | None = None

    @property
    def n_neurons(self) -> int:
        return self.down_cols().shape[1]

    def gate_rows(self) -> torch.Tensor | None:
        """(n_neurons, d_in) rows of the gate projection (Spark: the predictor K1 over x[:r])."""
        return None if self.gate is None else _weight_out_in(self.gate)

    def up_rows(self) -> torch.Tensor:
        """(n_neurons, d_in) rows of the up projection (plain FFN: the input projection)."""
        return _weight_out_in(self.up)

    def down_cols(self) -> torch.Tensor:
        """(d_model, n_neurons): column i is neuron i's write-out direction."""
        return _weight_out_in(self.down)

    def down_col_norms(self) -> torch.Tensor:
        """(n_neurons,) ``||W_down[:, i]||``, fp32, detached: the factor from |activation| to output magnitude."""
        return self.down_cols().detach().float().norm(dim=0)


def find_ffn_layers(model: nn.Module) -> list[FFNNeurons]:
    """All FFN layers of ``model`` in forward order; raises ValueError naming the supported architectures."""
    found: list[tuple[str, str, nn.Module, tuple[nn.Module, ...], nn.Module]] = []
    for name, mod in model.named_modules():
        if any(p in name for p in _SKIP_PARTS):
            continue
        for kind, ins, down in _PATTERNS:
            children = [getattr(mod, n, None) for n in (*ins, down)]
            if all(isinstance(c, nn.Module) and hasattr(c, "weight") for c in children):
                found.append((name, kind, mod, tuple(children[:-1]), children[-1]))
                break
    if any("expert" in n for n, *_ in found):
        raise ValueError(f"{type(model).__name__}: mixture-of-experts FFNs are not supported; supported: "
                         f"{SUPPORTED_ARCHITECTURES}")
    if any(k != "plain" for _, k, *_ in found):  # a gated/Spark language model: ignore plain MLPs of side towers
        found = [f for f in found if f[1] != "plain"]
    if not found:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(f"{type(model).__name__}{f' (model_type {mt!r})' if mt else ''}: no FFN layers found; "
                         f"supported: {SUPPORTED_ARCHITECTURES}")
    layers = []
    for i, (name, kind, mod, ins, down) in enumerate(found):
        gate, up = (ins[0], ins[1]) if len(ins) == 2 else (None, ins[0])
        if is_topk_ffn(mod):
            kind = "topk"
        layers.append(FFNNeurons(i, name, kind, mod, down, up, gate))
    n_expected = _num_hidden_layers(model)
    if n_expected is not None and n_expected != len(layers):
        raise ValueError(f"{type(model).__name__}: found {len(layers)} FFN layers but the config has {n_expected} "
                         f"layers; supported: {SUPPORTED_ARCHITECTURES}")
    return layers


def _num_hidden_layers(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for c in (getattr(cfg, "text_config", None), cfg):
        for attr in ("num_hidden_layers", "n_layer", "n_layers"):
            v = getattr(c, attr, None)
            if isinstance(v, int):
                return v
    return None


ActivationFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]
MaskSpec = Union[Mapping[int, torch.Tensor], Callable[[int, torch.Tensor], torch.Tensor]]


@dataclass
class Recording:
    """Activations captured by :meth:`NeuronView.record`: ``activations[layer]`` is a list, one (B, T, n) tensor per
    forward (or whatever ``reduce`` returned)."""

    activations: dict[int, list] = field(default_factory=dict)

    def cat(self, layer: int, dim: int = 0) -> torch.Tensor:
        return torch.cat(self.activations[layer], dim=dim)


class NeuronView:
    """FFN neurons of every layer of ``model`` with hooks to read and zero their activations."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = find_ffn_layers(model)
        self.arch = architecture(model)
        self._norms: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[FFNNeurons]:
        return iter(self.layers)

    def __getitem__(self, i: int) -> FFNNeurons:
        return self.layers[i]

    @property
    def n_neurons(self) -> list[int]:
        return [layer.n_neurons for layer in self.layers]

    @property
    def kinds(self) -> list[str]:
        return [layer.kind for layer in self.layers]

    def down_col_norms(self) -> list[torch.Tensor]:
        """Per layer (n_neurons,) down-projection column norms (cached; call :meth:`refresh` after editing weights)."""
        if self._norms is None:
            self._norms = [layer.down_col_norms() for layer in self.layers]
        return self._norms

    def refresh(self) -> None:
        self._norms = None

    def output_magnitude(self, layer: int, activation: torch.Tensor) -> torch.Tensor:
        """``|a_i| * ||W_down[:, i]||`` for an activation (..., n) of ``layer``."""
        norms = self.down_col_norms()[layer].to(activation.device)
        return activation.detach().abs().float() * norms

    # ---- hooks -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def hook(self, fn: ActivationFn, layers: list[int] | None = None) -> Iterator[None]:
        """Call ``fn(layer, activation)`` before each down projection; a returned tensor replaces the activation."""
        handles = []

        def make(i: int):
            def pre_hook(_mod, args):
                out = fn(i, args[0])
                if out is not None:
                    return (out, *args[1:])
                return None

            return pre_hook

        try:
            for layer in self.layers:
                if layers is None or layer.layer in layers:
                    handles.append(layer.down.register_forward_pre_hook(make(layer.layer)))
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def record(self, layers: list[int] | None = None,
               reduce: Callable[[int, torch.Tensor], object] | None = None) -> Iterator[Recording]:
        """Record each layer's activation (detached) on every forward; ``reduce(layer, a)`` stores a summary instead."""
        rec = Recording()

        def fn(i: int, a: torch.Tensor) -> None:
            a = a.detach()
            rec.activations.setdefault(i, []).append(a if reduce is None else reduce(i, a))

        with self.hook(fn, layers):
            yield rec

    @contextlib.contextmanager
    def mask(self, spec: MaskSpec) -> Iterator[None]:
        """Zero chosen neurons. ``spec`` is ``{layer: neuron indices (or a bool mask over neurons)}`` applied to
        every token, or ``fn(layer, activation) -> bool tensor`` (True = zero) for a per-token choice."""
        if callable(spec):
            def fn(i: int, a: torch.Tensor) -> torch.Tensor | None:
                m = spec(i, a)
                return None if m is None else a.masked_fill(m, 0)

            with self.hook(fn):
                yield
            return
        keep: dict[int, torch.Tensor] = {}
        for i, idx in spec.items():
            n = self.layers[i].n_neurons
            idx = torch.as_tensor(idx)
            k = torch.ones(n, dtype=torch.bool)
            if idx.dtype == torch.bool:
                if idx.numel() != n:
                    raise ValueError(f"layer {i}: bool neuron mask has {idx.numel()} entries, the layer has {n}")
                k &= ~idx
            else:
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                    raise ValueError(f"layer {i}: neuron index out of range [0, {n})")
                k[idx.long()] = False
            keep[i] = k

        def fn_static(i: int, a: torch.Tensor) -> torch.Tensor | None:
            k = keep.get(i)
            return None if k is None else a * k.to(device=a.device, dtype=a.dtype)

        with self.hook(fn_static, list(keep)):
            yield
