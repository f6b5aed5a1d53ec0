"""Merging bricks: several deltas (LoRA bricks or full fine-tuned weights minus the base) -> one delta.

Every method works on *task vectors* ``delta_i = theta_i - theta_base`` per parameter tensor, with one weight per
input, behind one interface (a registry, as mergekit):

    linear            sum_i w_i delta_i / sum_i w_i                       model soup / weighted average
    task_arithmetic   scale * sum_i w_i delta_i                           negative w_i subtracts (unlearning)
    ties              trim each delta to its top-`density` magnitudes, elect a sign per entry from
                      sum_i w_i trimmed_i, average the entries that agree with it:
                      scale * sum_i [agree_i] w_i t_i / sum_i [agree_i] |w_i|
    dare              drop each entry with probability `drop`, rescale the rest by 1/(1-drop), then combine with
                      task arithmetic (``combine='ties'``: TIES sign election without trimming, i.e. DARE-TIES)

``merge_deltas`` applies a method to ``{name: tensor}`` dicts; ``merge_bricks`` to LoRA bricks (their dense deltas
``scaling * B A``, merged exactly, per parameter so memory stays at one merged copy); ``model_delta`` turns a full
fine-tuned model into a delta. The result is a :class:`DeltaBrick` that can be applied to the base (and removed,
restoring the exact old weights), saved as safetensors, or factored back into a PEFT LoRA brick by SVD.

Compatibility is checked first and refused with a message: the same architecture, the same parameter shapes, the
same tokenizer (sha256 of the vocabulary) for every input.

``sparkformer bricks merge`` (:func:`run_merge`) merges the bricks of ``sparkformer bricks lora`` by each method and
compares held-out perplexity on every capability.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from sparkformer.bricks.adapter import architecture, model_fingerprint
from sparkformer.bricks.experiment import (ModelRun, add_command, arg, command_line, csv, load_model, log, md_table,
                                           pyplot, save_figure, start, write_results)
from sparkformer.bricks.lm import perplexity_from, sequence_nll
from sparkformer.bricks.lora import LoRABrick, LoRAConfig, load_lora_run
from sparkformer.bricks.tokens import encode, tokenizer_fingerprint


class IncompatibleBricks(ValueError):
    """Inputs that cannot be merged (or applied) together; the message says which property differs."""


# ---- the registry -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., torch.Tensor]  # (deltas: list[Tensor], weights: list[float], **params) -> Tensor
    defaults: dict[str, Any]
    description: str


MERGE_METHODS: dict[str, MergeMethod] = {}


def register_merge(name: str, description: str, **defaults: Any):
    """Decorator: add ``fn(deltas, weights, *, key, **params) -> merged delta`` to the registry."""

    def deco(fn):
        MERGE_METHODS[name] = MergeMethod(name, fn, dict(defaults), description)
        return fn

    return deco


def get_method(name: str) -> MergeMethod:
    if name not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {name!r}; available: {', '.join(MERGE_METHODS)}")
    return MERGE_METHODS[name]


def method_params(name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The method's defaults updated with ``params``; unknown parameter names are refused."""
    m = get_method(name)
    params = dict(params or {})
    unknown = sorted(set(params) - set(m.defaults))
    if unknown:
        raise ValueError(f"merge method {name!r} has no parameter {unknown}; its parameters: "
                         f"{', '.join(f'{k}={v}' for k, v in m.defaults.items()) or 'none'}")
    return {**m.defaults, **params}


def _stack(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.stack([x.float() for x in deltas])
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32).view(-1, *([1] * (d.dim() - 1)))
    return d, w


@register_merge("linear", "weighted average sum w_i d_i / sum w_i (model soup)", normalize=True)
def _linear(deltas, weights, *, key="", normalize=True):
    d, w = _stack(deltas, weights)
    total = float(sum(weights))
    out = (w * d).sum(0)
    if normalize and total != 0:
        out = out / total
    return out


@register_merge("task_arithmetic", "scale * sum w_i d_i; a negative weight subtracts a task", scale=1.0)
def _task_arithmetic(deltas, weights, *, key="", scale=1.0):
    d, w = _stack(deltas, weights)
    return scale * (w * d).sum(0)


def trim_top(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``round(density * n)`` entries of largest magnitude, zero the rest."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density} must be in (0, 1]")
    if density >= 1.0:
        return delta
    flat = delta.flatten()
    k = max(1, int(round(density * flat.numel())))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return (flat * keep).view_as(delta)


def ties_combine(trimmed: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Sign election + disjoint weighted mean over stacked (n, ...) trimmed deltas."""
    u = w * trimmed
    elected = torch.sign(u.sum(0))
    agree = (torch.sign(u) == elected) & (u != 0)
    num = (u * agree).sum(0)
    den = (w.abs() * agree).sum(0)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))


@register_merge("ties", "trim to top density, elect signs, disjoint mean (TIES-Merging)", density=0.5, scale=1.0)
def _ties(deltas, weights, *, key="", density=0.5, scale=1.0):
    d, w = _stack(deltas, weights)
    t = torch.stack([trim_top(x, density) for x in d])
    return scale * ties_combine(t, w)


def _seed_for(seed: int, key: str, i: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}/{i}".encode()).digest()[:8], "little") & (2**63 - 1)


def dare_drop(delta: torch.Tensor, drop: float, seed: int) -> torch.Tensor:
    """Drop entries with probability ``drop`` and rescale the survivors by 1/(1-drop) (DARE)."""
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop={drop} must be in [0, 1)")
    if drop == 0.0:
        return delta
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(delta.shape, generator=g) >= drop
    return delta * keep.to(delta.dtype) / (1.0 - drop)


@register_merge("dare", "random drop + rescale, then task arithmetic (combine='ties': DARE-TIES)",
                drop=0.5, scale=1.0, combine="task_arithmetic", seed=0)
def _dare(deltas, weights, *, key="", drop=0.5, scale=1.0, combine="task_arithmetic", seed=0):
    if combine not in ("task_arithmetic", "ties"):
        raise ValueError(f"dare combine={combine!r}; allowed: task_arithmetic, ties")
    d, w = _stack(deltas, weights)
    dd = torch.stack([dare_drop(x, drop, _seed_for(seed, key, i)) for i, x in enumerate(d)])
    if combine == "ties":
        return scale * ties_combine(dd, w)
    return scale * (w * dd).sum(0)


def merge_tensors(method: str, deltas: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
                  key: str = "", **params: Any) -> torch.Tensor:
    """Merge one parameter's deltas (same shape) with a registered method."""
    if not deltas:
        raise ValueError("nothing to merge: no deltas")
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    if len(weights) != len(deltas):
        raise ValueError(f"{len(weights)} weights for {len(deltas)} inputs; give one weight per input")
    shapes = {tuple(x.shape) for x in deltas}
    if len(shapes) > 1:
        raise IncompatibleBricks(f"{key or 'tensor'}: shapes differ across inputs {sorted(shapes)}")
    p = method_params(method, params)
    return get_method(method).fn(list(deltas), weights, key=key, **p)


def merge_deltas(deltas: Sequence[dict[str, torch.Tensor]], weights: Sequence[float] | None = None,
                 method: str = "linear", **params: Any) -> dict[str, torch.Tensor]:
    """Merge ``{parameter name: delta}`` dicts; a name missing from some inputs counts as a zero delta there."""
    get_method(method)
    method_params(method, params)
    keys: list[str] = []
    for d in deltas:
        keys += [k for k in d if k not in keys]
    out = {}
    for k in keys:
        ref = next(d[k] for d in deltas if k in d)
        out[k] = merge_tensors(method, [d[k] if k in d else torch.zeros_like(ref) for d in deltas], weights, key=k,
                               **params)
    return out


# ---- compatibility ---------------------------------------------------------------------------------------------------
def check_compatible(metas: Sequence[dict[str, Any]], names: Sequence[str] | None = None,
                     shapes: Sequence[dict[str, tuple]] | None = None) -> None:
    """Refuse inputs from different architectures, parameter layouts or tokenizers (None = unknown: not checked)."""
    names = list(names or [f"input {i}" for i in range(len(metas))])

    def same(field_: str, what: str, hint: str) -> None:
        vals = {(m.get(field_)) for m in metas if m.get(field_) is not None}
        if len(vals) > 1:
            detail = ", ".join(f"{n}: {str(m.get(field_))[:16]}" for n, m in zip(names, metas))
            raise IncompatibleBricks(f"cannot merge: {what} differ ({detail}); {hint}")

    same("architecture", "architectures", "bricks only merge across the same base architecture")
    same("shapes_sha256", "base parameter shapes", "the bricks were made for differently sized models")
    same("tokenizer_sha256", "tokenizers", "bricks trained with different vocabularies cannot share a base")
    if shapes:
        seen: dict[str, tuple[tuple, str]] = {}
        for n, sh in zip(names, shapes):
            for k, s in sh.items():
                if k in seen and tuple(seen[k][0]) != tuple(s):
                    raise IncompatibleBricks(f"cannot merge: {k} has shape {tuple(seen[k][0])} in {seen[k][1]} but "
                                             f"{tuple(s)} in {n}")
                seen.setdefault(k, (tuple(s), n))


def check_tokenizers(*tokenizers: Any, names: Sequence[str] | None = None) -> None:
    check_compatible([{"tokenizer_sha256": tokenizer_fingerprint(t)} for t in tokenizers], names)


# ---- the merged result -----------------------------------------------------------------------------------------------
@dataclass
class DeltaBrick:
    """Dense parameter changes ``{state-dict name: delta}`` plus metadata (what was merged, how, on which base)."""

    deltas: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    _saved: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.deltas.values())

    def _targets(self, model: nn.Module) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        arch = architecture(model)
        if self.meta.get("architecture") not in (None, arch):
            raise IncompatibleBricks(f"this delta is for a {self.meta['architecture']!r} model, not {arch!r}")
        out = {}
        for k, d in self.deltas.items():
            if k not in params:
                raise IncompatibleBricks(f"the model has no parameter {k!r} (the delta was made for another model)")
            if tuple(params[k].shape) != tuple(d.shape):
                raise IncompatibleBricks(f"{k}: the model's shape {tuple(params[k].shape)} != delta {tuple(d.shape)}")
            out[k] = params[k]
        return out

    @torch.no_grad()
    def apply(self, model: nn.Module, weight: float = 1.0) -> None:
        """Add ``weight * delta`` to the model's parameters (the old values are kept for :meth:`remove`)."""
        if id(model) in self._saved:
            raise ValueError("this delta is already applied to the model; remove() it first")
        targets = self._targets(model)
        self._saved[id(model)] = {k: p.detach().clone() for k, p in targets.items()}
        for k, p in targets.items():
            p.add_((weight * self.deltas[k]).to(p.dtype))

    @torch.no_grad()
    def remove(self, model: nn.Module) -> None:
        """Restore the exact parameter values from before :meth:`apply`."""
        saved = self._saved.pop(id(model), None)
        if saved is None:
            raise ValueError("this delta is not applied to the model")
        params = dict(model.named_parameters())
        for k, v in saved.items():
            params[k].copy_(v)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.deltas.items()}, str(path),
                  metadata={"sparkformer_delta": json.dumps(self.meta, default=str)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "DeltaBrick":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("sparkformer_delta", "{}"))
            deltas = {k: f.get_tensor(k) for k in f.keys()}
        return cls(deltas, meta)

    def to_lora(self, rank: int, alpha: float | None = None, name: str = "merged") -> tuple[LoRABrick, float]:
        """A LoRA brick approximating the 2-D ``*.weight`` deltas by truncated SVD; also the relative Frobenius
        error of the approximation (0 when ``rank`` covers the deltas' rank)."""
        if rank < 1:
            raise ValueError(f"rank={rank} must be >= 1")
        items = {k[: -len(".weight")]: d for k, d in self.deltas.items() if k.endswith(".weight") and d.dim() == 2}
        if not items:
            raise ValueError("no 2-D weight deltas to factor into a LoRA brick")
        alpha = float(alpha if alpha is not None else rank)
        cfg = LoRAConfig(r=rank, alpha=alpha, targets=tuple(sorted({p.rsplit(".", 1)[-1] for p in items})))
        brick = LoRABrick(cfg, {p: tuple(d.shape) for p, d in items.items()}, name, dict(self.meta))
        err2 = tot2 = 0.0
        with torch.no_grad():
            for p, d in items.items():
                U, S, Vh = torch.linalg.svd(d.float(), full_matrices=False)
                k = min(rank, S.numel())
                A = torch.zeros(rank, d.shape[1])
                B = torch.zeros(d.shape[0], rank)
                root = S[:k].sqrt()
                A[:k] = root[:, None] * Vh[:k]
                B[:, :k] = U[:, :k] * root[None, :] / cfg.scaling
                brick.A(p).copy_(A)
                brick.B(p).copy_(B)
                err2 += float((S[k:] ** 2).sum())
                tot2 += float((S ** 2).sum())
        return brick, math.sqrt(err2 / tot2) if tot2 > 0 else 0.0


def _brick_meta(b: LoRABrick) -> dict[str, Any]:
    return {k: b.meta.get(k) for k in ("architecture", "shapes_sha256", "tokenizer_sha256")}


def merge_bricks(bricks: Sequence[LoRABrick], weights: Sequence[float] | None = None, method: str = "linear",
                 **params: Any) -> DeltaBrick:
    """Merge LoRA bricks through their exact dense deltas; refuses bricks from different bases."""
    if not bricks:
        raise ValueError("nothing to merge: no bricks")
    names = [b.name for b in bricks]
    check_compatible([_brick_meta(b) for b in bricks], names,
                     shapes=[{p + ".weight": s for p, s in b.shapes.items()} for b in bricks])
    weights = [1.0] * len(bricks) if weights is None else list(weights)
    if len(weights) != len(bricks):
        raise ValueError(f"{len(weights)} weights for {len(bricks)} bricks; give one weight per brick")
    p = method_params(method, params)
    keys: list[str] = []
    for b in bricks:
        keys += [k for k in b.paths if k not in keys]
    out = {}
    with torch.no_grad():
        for path in keys:
            shape = next(b.shapes[path] for b in bricks if path in b.shapes)
            ds = [b.delta(path).float() if path in b.shapes else torch.zeros(shape) for b in bricks]
            out[path + ".weight"] = get_method(method).fn(ds, weights, key=path + ".weight", **p)
    meta = {**_brick_meta(bricks[0]), "method": method, "params": p, "inputs": names, "weights": weights}
    return DeltaBrick(out, meta)


def model_delta(base: nn.Module, finetuned: nn.Module, base_tokenizer: Any = None, finetuned_tokenizer: Any = None,
                name: str = "finetuned", atol: float = 0.0) -> DeltaBrick:
    """``finetuned - base`` for every parameter that changed by more than ``atol``; refuses models of another
    architecture or parameter layout, or another tokenizer (when both tokenizers are given)."""
    fa, fb = model_fingerprint(base), model_fingerprint(finetuned)
    if fa["architecture"] != fb["architecture"]:
        raise IncompatibleBricks(f"cannot take a delta: base is {fa['architecture']!r}, {name} is "
                                 f"{fb['architecture']!r}")
    pa, pb = dict(base.named_parameters()), dict(finetuned.named_parameters())
    if set(pa) != set(pb):
        only = sorted(set(pa) ^ set(pb))[:4]
        raise IncompatibleBricks(f"cannot take a delta: parameter names differ between base and {name} (e.g. {only})")
    for k in pa:
        if pa[k].shape != pb[k].shape:
            raise IncompatibleBricks(f"cannot take a delta: {k} is {tuple(pa[k].shape)} in the base, "
                                     f"{tuple(pb[k].shape)} in {name}")
    if base_tokenizer is not None and finetuned_tokenizer is not None:
        check_tokenizers(base_tokenizer, finetuned_tokenizer, names=["base", name])
    out = {}
    with torch.no_grad():
        for k in pa:
            d = pb[k].detach().float() - pa[k].detach().float()
            if float(d.abs().max()) > atol:
                out[k] = d
    return DeltaBrick(out, {**fa, "tokenizer_sha256": tokenizer_fingerprint(finetuned_tokenizer), "inputs": [name]})


def merge_models(base: nn.Module, finetuned: Sequence[nn.Module], weights: Sequence[float] | None = None,
                 method: str = "linear", tokenizers: Sequence[Any] | None = None, base_tokenizer: Any = None,
                 names: Sequence[str] | None = None, **params: Any) -> DeltaBrick:
    """Merge full fine-tuned models of ``base`` through their deltas."""
    names = list(names or [f"model{i}" for i in range(len(finetuned))])
    toks = list(tokenizers) if tokenizers is not None else [None] * len(finetuned)
    deltas = [model_delta(base, m, base_tokenizer, t, n) for m, t, n in zip(finetuned, toks, names)]
    check_compatible([d.meta for d in deltas], names)
    merged = merge_deltas([d.deltas for d in deltas], weights, method, **params)
    return DeltaBrick(merged, {**deltas[0].meta, "method": method, "params": method_params(method, params),
                               "inputs": names, "weights": list(weights or [1.0] * len(finetuned))})


# ---- the experiment: `sparkformer bricks merge` ---------------------------------------------------------------------
def weight_list(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in csv(s))


@dataclass(kw_only=True)
class MergeRun(ModelRun):
    """Settings of ``sparkformer bricks merge``."""

    bricks_dir: str = arg(help="the --out folder of `sparkformer bricks lora`", required=True)
    methods: tuple[str, ...] = arg(("linear", "task_arithmetic", "ties", "dare"), "comma list of registered merge "
                                                                                 "methods", parse=csv)
    weights: tuple[float, ...] | None = arg(None, "comma list, one weight per brick (default: all 1)",
                                            parse=weight_list)
    scale: float = arg(0.5, "lambda of task_arithmetic and dare")
    density: float = arg(0.5, "TIES: fraction of each delta kept")
    drop: float = arg(0.5, "DARE: drop probability")
    negate: str | None = arg(None, "also evaluate base minus this brick (unlearning by subtraction)")
    save: bool = arg(False, "save each merge as a PEFT LoRA (SVD, rank 8 x bricks)")
    seq_len: int = arg(128, "tokens per held-out text (at most)")


def run_merge(run: MergeRun, model: nn.Module | None = None, tokenizer: Any = None,
              log: Callable[[str], None] = log) -> dict[str, Any]:
    """Python API of ``sparkformer bricks merge``: perplexity on every capability of the base, each single brick,
    each merge of all bricks, and (``negate``) the base minus one brick (task-arithmetic subtraction)."""
    t0 = start(run)
    for meth in run.methods:
        get_method(meth)
    bs, _, held = load_lora_run(run.bricks_dir)
    names = list(bs)
    if run.negate is not None and run.negate not in bs:
        raise ValueError(f"--negate {run.negate!r}: no such brick; bricks: {', '.join(names)}")
    w = list(run.weights) if run.weights else [1.0] * len(names)
    if len(w) != len(names):
        raise ValueError(f"--weights has {len(w)} values for {len(names)} bricks ({', '.join(names)})")
    m, tok, name, _ = load_model(run.model, model, tokenizer, freeze=True, log=log)
    out = Path(run.out)
    caps = [c for c in held if c in bs] or list(held)
    tokens = {c: encode(tok, held[c], run.seq_len) for c in caps}

    def ppl_row() -> dict[str, float]:
        row = {c: perplexity_from(*sequence_nll(m, tokens[c])) for c in caps}
        row["mean"] = sum(row[c] for c in caps) / len(caps)
        return row

    t = time.time()
    table_rows: dict[str, dict[str, float]] = {"base": ppl_row()}
    log(f"base: {table_rows['base']['mean']:.2f} ({time.time() - t:.0f} s)")
    for n, b in bs.items():
        with b.attached(m):
            table_rows[f"brick {n}"] = ppl_row()
        log(f"brick {n}: " + " ".join(f"{c}={table_rows[f'brick {n}'][c]:.2f}" for c in caps))
    params = {"linear": {}, "task_arithmetic": {"scale": run.scale}, "ties": {"density": run.density, "scale": 1.0},
              "dare": {"drop": run.drop, "scale": run.scale, "seed": run.seed}}
    info = {}
    for meth in run.methods:
        tm = time.time()
        merged = merge_bricks([bs[n] for n in names], w, meth, **params.get(meth, {}))
        merged.apply(m)
        try:
            table_rows[f"merged {meth}"] = ppl_row()
        finally:
            merged.remove(m)
        info[meth] = {"params": merged.meta["params"], "seconds": time.time() - tm}
        if run.save:
            lora, err = merged.to_lora(rank=8 * len(names))
            lora.meta["base_model"] = name
            lora.save(out / "merged" / meth, base_model_name_or_path=name)
            info[meth]["saved_lora_rank"] = 8 * len(names)
            info[meth]["saved_lora_rel_error"] = err
        log(f"merged {meth}: mean {table_rows[f'merged {meth}']['mean']:.2f} ({time.time() - tm:.0f} s)")
    if run.negate:
        neg = merge_bricks([bs[run.negate]], [-1.0], "task_arithmetic")
        neg.apply(m)
        try:
            table_rows[f"base - {run.negate}"] = ppl_row()
        finally:
            neg.remove(m)
    best_single = {c: min(table_rows[f"brick {n}"][c] for n in names) for c in caps}
    res = {"model": name, "bricks": names, "weights": w, "methods": info, "perplexity": table_rows,
           "best_single_brick": best_single, "seconds": time.time() - t}
    notes = (f"Merging {len(names)} LoRA bricks ({', '.join(names)}) with weights {w} through their exact dense "
             f"deltas; task_arithmetic and dare use scale {run.scale}, ties density {run.density}, dare drop "
             f"{run.drop}. Rows 'brick X' attach one brick. Held-out perplexity, lower is better.")
    _plot_merge(table_rows, caps, out / "merge.png")
    return write_results(out, res, command=command_line("merge", run), title="merge", table=merge_summary(res)[0],
                         notes=notes, started=t0)


def _plot_merge(table_rows: dict[str, dict[str, float]], caps: list[str], path: Path) -> None:
    plt = pyplot()
    keys, base = list(table_rows), table_rows["base"]
    mat = torch.tensor([[table_rows[k][c] / base[c] for c in caps] for k in keys])
    fig, ax = plt.subplots(figsize=(1.4 * len(caps) + 3, 0.45 * len(keys) + 1.5))
    ax.imshow(mat.numpy(), cmap="RdYlGn_r", vmin=0.5, vmax=1.5)
    ax.set_xticks(range(len(caps)), caps, rotation=20)
    ax.set_yticks(range(len(keys)), keys)
    for a in range(len(keys)):
        for b in range(len(caps)):
            ax.text(b, a, f"{float(mat[a, b]):.2f}", ha="center", va="center", fontsize=8)
    ax.set_title("held-out perplexity / base")
    save_figure(fig, path)


def merge_summary(res: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The perplexity table of a merge result (rows: base, bricks, merges; columns: capabilities), and its
    headline numbers."""
    caps = list(res["best_single_brick"])
    rows = [[k] + [v[c] for c in caps] + [v["mean"]] for k, v in res["perplexity"].items()]
    return md_table(["model"] + caps + ["mean"], rows), {
        "op": "merge", "model": res["model"], "mean_ppl": {k: v["mean"] for k, v in res["perplexity"].items()}}


def add_cli(subparsers) -> None:
    add_command(subparsers, "merge", MergeRun, run_merge,
                help="merge LoRA bricks (linear, task arithmetic, TIES, DARE); perplexity table",
                summary=merge_summary)
