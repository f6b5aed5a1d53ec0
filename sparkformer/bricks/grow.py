"""Growing: add capacity as new bricks that change nothing until trained, then train only them.

Three ways, each exactly function-preserving before training (the logits are bitwise equal):

    width     each chosen FFN gets n new gated neurons: new gate/up rows (random) and new down-projection columns
              set to zero. They run as a side brick, ``y = ffn(x) + W_down_new (act(W_gate_new x) * W_up_new x)``,
              which is the same function as one FFN with the rows/columns concatenated (:func:`fold_width` writes
              that wider FFN) and keeps the old computation untouched, so equality is exact, not approximate.
    depth     LLaMA-Pro: after chosen blocks insert a copy of that block with its attention output projection and
              FFN down projection zeroed, so the new block adds exactly 0 to the residual stream.
    upcycle   sparse upcycling: an FFN becomes a mixture of E copies of itself with a top-k softmax router.
              Computed as ``y_0 + sum_e g_e (y_e - y_0)`` (= ``sum_e g_e y_e`` as the gates sum to 1) with expert 0
              the original FFN, so identical copies contribute exactly 0 whatever the (random) router says.

Training a new capability then updates only the new bricks (new neurons / new blocks / new experts + router),
with the original weights frozen; :func:`~sparkformer.bricks.grow_train.run_growth` compares the new capability's
gain and the old capabilities' retention with full fine-tuning (and a LoRA brick).

Because the old weights stay frozen, the base is still inside the grown model: :func:`bricks_detached` runs it
without its new bricks and gives the base's outputs exactly. That makes grown bricks *routable*: attach them only
for inputs that retrieval assigns to the new capability (``run_growth(..., route_texts=...)``), which full
fine-tuning cannot do without keeping a second full copy of the model.

Supported: HF Llama-family decoders (``model.model.layers[i].mlp``, ``self_attn.o_proj``) and sparkformer SparkLM
(``layers[i].ffn``, ``attn.o_proj``).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparkformer.bricks.adapter import architecture, decoder_blocks, is_sparkformer, is_sparkformer_attention
from sparkformer.bricks.neurons import find_ffn_layers

GROWTH_METHODS = ("width", "depth", "upcycle", "full", "lora")


@dataclass
class Growth:
    """What a growth step added: the parameters to train and a description."""

    kind: str
    params: list[nn.Parameter]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, last = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, last, new)


def _activation(ffn: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    for attr in ("act_fn", "act"):
        a = getattr(ffn, attr, None)
        if callable(a):
            return a
    return lambda x: F.gelu(x, approximate="tanh")


def _ffns(model: nn.Module, layers: Sequence[int] | None) -> list:
    found = find_ffn_layers(model)
    for f in found:
        if f.kind not in ("gated", "spark"):
            raise ValueError(f"{architecture(model)}: growth supports gated FFNs (Llama-family, SparkLM); layer "
                             f"{f.layer} is a {f.kind} FFN")
    if layers is None:
        return found
    bad = [i for i in layers if not 0 <= i < len(found)]
    if bad:
        raise ValueError(f"layer {bad} out of range: the model has {len(found)} layers (0..{len(found) - 1})")
    return [found[i] for i in layers]


# ---- width ----------------------------------------------------------------------------------------------------------
class WidenedFFN(nn.Module):
    """An FFN plus ``n`` new gated neurons (the grown brick) whose down-projection columns start at zero."""

    def __init__(self, old: nn.Module, d_model: int, n_new: int, init_std: float, generator: torch.Generator):
        super().__init__()
        self.old = old
        w = next(old.parameters())
        self.new_gate = nn.Linear(d_model, n_new, bias=False, dtype=w.dtype)
        self.new_up = nn.Linear(d_model, n_new, bias=False, dtype=w.dtype)
        self.new_down = nn.Linear(n_new, d_model, bias=False, dtype=w.dtype)
        with torch.no_grad():
            for lin in (self.new_gate, self.new_up):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=generator) * init_std)
            self.new_down.weight.zero_()
        self.act = _activation(old)
        self.enabled = True  # False: the grown brick is detached and this is exactly the old FFN

    @property
    def last_activity(self):  # SparkLM.sparsity_stats reads this
        return getattr(self.old, "last_activity", None)

    def new_params(self) -> list[nn.Parameter]:
        return [self.new_gate.weight, self.new_up.weight, self.new_down.weight]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.old(x)
        if not self.enabled:
            return y
        return y + self.new_down(self.act(self.new_gate(x)) * self.new_up(x))


def grow_width(model: nn.Module, n_new: int, layers: Sequence[int] | None = None, init_std: float | None = None,
               seed: int = 0) -> Growth:
    """Add ``n_new`` neurons to the FFN of each chosen layer (all by default); returns the new parameters."""
    if n_new < 1:
        raise ValueError(f"n_new={n_new} must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    params: list[nn.Parameter] = []
    grown = []
    for f in _ffns(model, layers):
        parent = f.name.rpartition(".")[0]
        if isinstance(f.module, WidenedFFN) or isinstance(model.get_submodule(parent), WidenedFFN):
            raise ValueError(f"layer {f.layer} is already widened; fold_width() it first")
        d = f.down_cols().shape[0]
        std = init_std if init_std is not None else float(f.up_rows().detach().float().std())
        new = WidenedFFN(f.module, d, n_new, std, gen).to(f.down.weight.device)
        _set_submodule(model, f.name, new)
        params += new.new_params()
        grown.append(f.layer)
    return Growth("width", params, {"layers": grown, "new_neurons_per_layer": n_new})


@torch.no_grad()
def fold_width(model: nn.Module) -> nn.Module:
    """Replace each :class:`WidenedFFN` by its original FFN class with the neurons concatenated (one wider FFN)."""
    for path, mod in list(model.named_modules()):
        if not isinstance(mod, WidenedFFN):
            continue
        old = mod.old
        if not all(isinstance(getattr(old, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(f"{path}: only a dense gated FFN (gate_proj/up_proj/down_proj) can be folded")

        def cat(lin: nn.Linear, extra: torch.Tensor, dim: int) -> nn.Linear:
            w = torch.cat([lin.weight, extra], dim=dim)
            new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=w.dtype, device=w.device)
            new.weight.copy_(w)
            if lin.bias is not None:
                new.bias.copy_(lin.bias if dim == 1 else torch.cat([lin.bias, torch.zeros(extra.shape[0])]))
            return new

        old.gate_proj = cat(old.gate_proj, mod.new_gate.weight, 0)
        old.up_proj = cat(old.up_proj, mod.new_up.weight, 0)
        old.down_proj = cat(old.down_proj, mod.new_down.weight, 1)
        if hasattr(old, "intermediate_size"):
            old.intermediate_size = old.gate_proj.weight.shape[0]
        if hasattr(old, "n_neurons"):
            old.n_neurons = old.gate_proj.weight.shape[0]
        _set_submodule(model, path, old)
    sizes = {f.n_neurons for f in find_ffn_layers(model)}
    cfg = getattr(model, "config", None)
    if len(sizes) == 1 and cfg is not None:
        for attr in ("intermediate_size", "ffn_dim"):
            if hasattr(cfg, attr):
                setattr(cfg, attr, sizes.pop())
                break
    return model


# ---- depth (LLaMA-Pro) ----------------------------------------------------------------------------------------------
GROWN_BLOCK = "_sparkformer_grown_block"  # marks an inserted block


def _zero_outputs(block: nn.Module) -> list[str]:
    """Zero the block's attention output projection and FFN down projection (weights and biases)."""
    zeroed = []
    for path, mod in block.named_modules():
        last = path.rsplit(".", 1)[-1]
        if last in ("o_proj", "down_proj") and isinstance(mod, nn.Linear):
            with torch.no_grad():
                mod.weight.zero_()
                if mod.bias is not None:
                    mod.bias.zero_()
            zeroed.append(path)
    kinds = {p.rsplit(".", 1)[-1] for p in zeroed}
    if kinds != {"o_proj", "down_proj"}:
        raise ValueError(f"depth growth needs an attention o_proj and an FFN down_proj in each block; found {zeroed}")
    return zeroed


def grow_depth(model: nn.Module, after: Sequence[int] | None = None, every: int | None = None) -> Growth:
    """Insert identity copies after the blocks ``after`` (or after every ``every``-th block), LLaMA-Pro style."""
    parent, attr, blocks = decoder_blocks(model)
    n = len(blocks)
    if after is None:
        if not every or every < 1:
            raise ValueError("give the blocks to copy (after=[...]) or a spacing (every=k)")
        after = list(range(every - 1, n, every))
    after = sorted(set(int(i) for i in after))
    bad = [i for i in after if not 0 <= i < n]
    if bad:
        raise ValueError(f"block {bad} out of range: the model has {n} blocks (0..{n - 1})")
    new_list: list[nn.Module] = []
    params: list[nn.Parameter] = []
    positions = []
    for i, b in enumerate(blocks):
        new_list.append(b)
        if i in after:
            nb = copy.deepcopy(b)
            _zero_outputs(nb)
            setattr(nb, GROWN_BLOCK, True)  # bricks_detached() leaves these out
            positions.append(len(new_list))
            new_list.append(nb)
            params += list(nb.parameters())
    setattr(parent, attr, nn.ModuleList(new_list))
    _renumber(model, new_list, positions, after)
    return Growth("depth", params, {"copied_blocks": after, "new_block_indices": positions,
                                    "n_blocks": len(new_list)})


def _renumber(model: nn.Module, blocks: list[nn.Module], positions: list[int], after: list[int]) -> None:
    """Fix per-layer indices (KV-cache slots) and the config's layer count after inserting blocks."""
    for i, b in enumerate(blocks):
        for mod in b.modules():
            if hasattr(mod, "layer_idx") and isinstance(mod.layer_idx, int):
                mod.layer_idx = i
            if is_sparkformer_attention(mod):
                mod.layer = i
    cfg = getattr(model, "config", None)
    if cfg is None:
        return
    if is_sparkformer(model):
        cfg = copy.deepcopy(cfg)
        old_n = cfg.n_layers
        for name in ("ffn", "attention"):
            v = getattr(cfg, name)
            if isinstance(v, (list, tuple)):
                src = list(range(old_n))
                order = []
                for i in src:
                    order.append(i)
                    if i in after:
                        order.append(i)
                setattr(cfg, name, [v[i] for i in order])
        cfg.n_layers = len(blocks)
        model.config = cfg  # no validate(): local/global parity follows each block's own attention now
        return
    if hasattr(cfg, "num_hidden_layers"):
        old_types = getattr(cfg, "layer_types", None)
        cfg.num_hidden_layers = len(blocks)
        if isinstance(old_types, list) and len(old_types) + len(positions) == len(blocks):
            order = []
            for i, t in enumerate(old_types):
                order.append(t)
                if i in after:
                    order.append(t)
            cfg.layer_types = order


# ---- sparse upcycling ------------------------------------------------------------------------------------------------
class UpcycledMoE(nn.Module):
    """A mixture of ``n_experts`` copies of an FFN with a top-k softmax router; expert 0 is the original FFN."""

    def __init__(self, ffn: nn.Module, d_model: int, n_experts: int = 4, top_k: int = 2, router_std: float = 0.02,
                 generator: torch.Generator | None = None):
        super().__init__()
        if n_experts < 2 or not 1 <= top_k <= n_experts:
            raise ValueError(f"need n_experts >= 2 and 1 <= top_k <= n_experts (got {n_experts}, {top_k})")
        self.experts = nn.ModuleList([ffn] + [copy.deepcopy(ffn) for _ in range(n_experts - 1)])
        w = next(ffn.parameters())
        self.router = nn.Linear(d_model, n_experts, bias=False, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            self.router.weight.copy_(torch.randn(self.router.weight.shape, generator=generator) * router_std)
        self.top_k = top_k
        self.last_load: torch.Tensor | None = None  # fraction of tokens routed to each expert in the last forward
        self.enabled = True  # False: only expert 0, the original FFN, runs

    @property
    def last_activity(self):
        return getattr(self.experts[0], "last_activity", None)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """(..., E) routing weights: softmax over the top-k router logits, zero elsewhere."""
        logits = self.router(x).float()
        val, idx = logits.topk(self.top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, idx, torch.softmax(val, dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.experts[0](x)
        g = self.gates(x)
        self.last_load = (g > 0).float().reshape(-1, g.shape[-1]).mean(0).detach()
        y0 = self.experts[0](x)
        out = y0
        for e in range(1, len(self.experts)):
            ge = g[..., e]
            if not bool((ge > 0).any()):
                continue
            # sum_e g_e y_e == y_0 + sum_{e>0} g_e (y_e - y_0) because the gates sum to 1
            out = out + ge.unsqueeze(-1).to(y0.dtype) * (self.experts[e](x) - y0)
        return out


def upcycle(model: nn.Module, n_experts: int = 4, top_k: int = 2, layers: Sequence[int] | None = None,
            router_std: float = 0.02, seed: int = 0) -> Growth:
    """Turn the FFN of each chosen layer into an :class:`UpcycledMoE`; new = experts 1.. and the router."""
    gen = torch.Generator().manual_seed(seed)
    params: list[nn.Parameter] = []
    grown = []
    for f in _ffns(model, layers):
        d = f.down_cols().shape[0]
        moe = UpcycledMoE(f.module, d, n_experts, top_k, router_std, gen)
        _set_submodule(model, f.name, moe)
        params += list(moe.router.parameters())
        for e in moe.experts[1:]:
            params += list(e.parameters())
        grown.append(f.layer)
    return Growth("upcycle", params, {"layers": grown, "n_experts": n_experts, "top_k": top_k})


def router_load(model: nn.Module) -> list[list[float]]:
    """Per upcycled layer, the fraction of tokens sent to each expert in the last forward."""
    return [m.last_load.tolist() for m in model.modules() if isinstance(m, UpcycledMoE) and m.last_load is not None]


# ---- detaching grown bricks ------------------------------------------------------------------------------------------
def grown_bricks(model: nn.Module) -> dict[str, int]:
    """How many grown bricks of each kind the model holds (widened FFNs, inserted blocks, upcycled FFNs)."""
    mods = list(model.modules())
    return {"width": sum(isinstance(m, WidenedFFN) for m in mods),
            "depth": sum(bool(getattr(m, GROWN_BLOCK, False)) for m in mods),
            "upcycle": sum(isinstance(m, UpcycledMoE) for m in mods)}


@contextlib.contextmanager
def bricks_detached(model: nn.Module):
    """Run ``model`` without its grown bricks: widened FFNs skip their new neurons, upcycled FFNs run expert 0 only,
    inserted blocks are left out of the block list. With the old weights frozen during training this is exactly the
    base model (tested bitwise), so a grown brick can be attached per input instead of always."""
    if not any(grown_bricks(model).values()):
        raise ValueError("the model has no grown bricks to detach (grow_width / grow_depth / upcycle add them)")
    toggled = [m for m in model.modules() if isinstance(m, (WidenedFFN, UpcycledMoE))]
    for m in toggled:
        m.enabled = False
    parent = attr = blocks = None
    try:
        parent, attr, blocks = decoder_blocks(model)
    except ValueError:
        pass
    if blocks is not None and any(getattr(b, GROWN_BLOCK, False) for b in blocks):
        # HF decoders loop over layers[:num_hidden_layers] (larger is fine); SparkLM loops over all of them
        setattr(parent, attr, nn.ModuleList([b for b in blocks if not getattr(b, GROWN_BLOCK, False)]))
    try:
        yield model
    finally:
        for m in toggled:
            m.enabled = True
        if blocks is not None:
            setattr(parent, attr, blocks)


# ---- growing by a method's name --------------------------------------------------------------------------------------
@dataclass
class GrowthConfig:
    """What each method grows. ``from_layer`` restricts every method (and the LoRA comparison) to layers >= it, so
    training back-propagates through the top of the model only (cheaper; full fine-tuning still trains all)."""

    width_neurons: int = 256  # new neurons per grown FFN
    depth_every: int = 6  # LLaMA-Pro: one copy after every k-th block (blocks k-1, 2k-1, ...)
    upcycle_experts: int = 4
    upcycle_top_k: int = 2
    upcycle_every: int = 6  # upcycle the FFN of every k-th layer (k-1, 2k-1, ...)
    from_layer: int = 0
    lora_rank: int = 8
    lrs: dict[str, float] = field(default_factory=lambda: {"width": 2e-3, "depth": 1e-3, "upcycle": 3e-4,
                                                            "full": 1e-4, "lora": 2e-3})
    steps: int = 20
    batch_size: int = 4
    seq_len: int = 128
    seed: int = 0

    def layers(self, n_layers: int, every: int | None = None) -> list[int]:
        if every is None:
            return list(range(self.from_layer, n_layers))
        return [i for i in range(every - 1, n_layers, every) if i >= self.from_layer]


def apply_growth(model: nn.Module, method: str, cfg: GrowthConfig) -> Growth:
    """Grow ``model`` in place by ``method`` (width | depth | upcycle | full = every parameter trainable)."""
    n_layers = len(find_ffn_layers(model))
    if method in ("width", "depth", "upcycle"):
        every = {"width": None, "depth": cfg.depth_every, "upcycle": cfg.upcycle_every}[method]
        layers = cfg.layers(n_layers, every)
        if not layers:
            raise ValueError(f"{method}: no layer to grow (from_layer={cfg.from_layer}, {n_layers} layers)")
    if method == "width":
        return grow_width(model, cfg.width_neurons, layers, seed=cfg.seed)
    if method == "depth":
        return grow_depth(model, after=layers)
    if method == "upcycle":
        return upcycle(model, cfg.upcycle_experts, cfg.upcycle_top_k, layers, seed=cfg.seed)
    if method == "full":
        return Growth("full", [p for p in model.parameters()], {"note": "every parameter trainable"})
    raise ValueError(f"unknown growth method {method!r}; available: {', '.join(GROWTH_METHODS)}")
