"""LoRA bricks: low-rank plug-ins on chosen linear projections, trained per capability with the base frozen.

A brick holds, for every targeted ``nn.Linear`` (by module path, e.g. ``model.layers.3.self_attn.q_proj``), a pair
``A`` (r, in) and ``B`` (out, r). With ``scaling = alpha / r`` the projection computes

    y = W x + weight * scaling * B (A x)              (attached: a forward hook adds the low-rank term)
    W' = W + weight * scaling * B A                    (merged: the same change written into W)

Attaching registers forward hooks, so the base model's modules, parameter names and state dict never change; any
number of bricks can be attached at once (their terms add), or as a per-example mixture
(:class:`~sparkformer.bricks.retrieval.LoRAMixture`).

Files are the PEFT format (``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``), so ``peft.PeftModel.from_pretrained(base,
folder)`` loads them; ``sparkformer_brick.json`` beside them records what the brick was trained for and on which
base (architecture, parameter shapes, tokenizer hash) so merging can refuse incompatible bricks.

    brick, log = train_lora(model, tokenizer, texts, LoRAConfig(r=8, targets=("q_proj", "v_proj")), steps=100)
    with brick.attached(model):
        model(ids)
    brick.save("bricks/code");  brick = LoRABrick.load("bricks/code")
    brick.merge(model); brick.unmerge(model)

``sparkformer bricks lora`` (:func:`run_lora`) trains one brick per capability and measures each on its
capability's held-out text.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparkformer.bricks.adapter import architecture, forward_logits, model_fingerprint
from sparkformer.bricks.experiment import (TextRun, add_command, arg, command_line, load_model, log, md_table, pyplot,
                                           save_figure, start, write_json, write_results)
from sparkformer.bricks.lm import TrainLog, perplexity, train_parameters
from sparkformer.bricks.tokens import encode, token_windows, tokenizer_fingerprint

ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
TARGET_GROUPS = {"attn": ATTN_PROJECTIONS, "ffn": FFN_PROJECTIONS, "all": ATTN_PROJECTIONS + FFN_PROJECTIONS}
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
META_NAME = "sparkformer_brick.json"
_PEFT_PREFIX = "base_model.model."


# ---- configuration and targets -------------------------------------------------------------------------------------
@dataclass
class LoRAConfig:
    """r, alpha (scaling = alpha / r), dropout on the LoRA input, target projection names (or the groups 'attn',
    'ffn', 'all'), and optionally the layer indices to adapt (None: every layer)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj", "up_proj", "down_proj")
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
        self.validate()

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def names(self) -> tuple[str, ...]:
        out: list[str] = []
        for t in self.targets:
            for n in TARGET_GROUPS.get(t, (t,)):
                if n not in out:
                    out.append(n)
        return tuple(out)

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r={self.r!r} must be an integer >= 1")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout} must be in [0, 1)")
        if not self.targets:
            raise ValueError("LoRA needs at least one target projection (e.g. q_proj,v_proj or 'attn', 'ffn', 'all')")


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


def layer_of(path: str) -> int | None:
    m = _LAYER_RE.search(path)
    return int(m.group(1)) if m else None


def find_targets(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Linear]:
    """``{module path: nn.Linear}`` for every projection the config names (in the chosen layers)."""
    names = config.names()
    found: dict[str, nn.Linear] = {}
    seen_names: set[str] = set()
    all_linear: set[str] = set()
    for path, mod in model.named_modules():
        last = path.rsplit(".", 1)[-1]
        if isinstance(mod, nn.Linear):
            all_linear.add(last)
        if last not in names:
            continue
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"{path} is a {type(mod).__name__}, not an nn.Linear; LoRA bricks adapt nn.Linear "
                             "projections (HF Llama-family models and sparkformer SparkLM)")
        seen_names.add(last)
        if config.layers is not None and layer_of(path) not in config.layers:
            continue
        found[path] = mod
    explicit = [t for t in config.targets if t not in TARGET_GROUPS]  # a group may name projections a model lacks
    missing = [n for n in explicit if n not in seen_names]
    if not seen_names:
        missing = list(names)
    if missing:
        raise ValueError(f"{architecture(model)}: no projection named {missing}; this model's linear projections "
                         f"are {sorted(all_linear)} (or use the groups {sorted(TARGET_GROUPS)})")
    if not found:
        raise ValueError(f"no targeted projection in layers {list(config.layers or [])}; check --layers")
    return found


def _key(path: str) -> str:
    return path.replace(".", "__")


# ---- the brick -------------------------------------------------------------------------------------------------------
class LoRABrick(nn.Module):
    """Low-rank deltas for a set of linear projections of one base model (see the module docstring)."""

    def __init__(self, config: LoRAConfig, shapes: dict[str, tuple[int, int]], name: str = "brick",
                 meta: dict[str, Any] | None = None):
        super().__init__()
        self.config = config
        self.name = name
        self.meta: dict[str, Any] = dict(meta or {})
        self.shapes = {p: (int(s[0]), int(s[1])) for p, s in shapes.items()}
        self.lora_A = nn.ParameterDict({_key(p): nn.Parameter(torch.zeros(config.r, i)) for p, (o, i) in
                                        self.shapes.items()})
        self.lora_B = nn.ParameterDict({_key(p): nn.Parameter(torch.zeros(o, config.r)) for p, (o, i) in
                                        self.shapes.items()})
        self._hooks: dict[int, list] = {}  # id(model) -> hook handles
        self._merged: dict[int, float] = {}  # id(model) -> merged weight
        self.weight = 1.0  # the weight used by attach() hooks; change it at run time to scale the brick

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def for_model(cls, model: nn.Module, config: LoRAConfig | None = None, name: str = "brick", seed: int = 0,
                  tokenizer: Any = None) -> "LoRABrick":
        """A fresh brick for ``model``: A ~ kaiming-uniform (as PEFT), B = 0, so it starts as a no-op."""
        config = config or LoRAConfig()
        targets = find_targets(model, config)
        brick = cls(config, {p: tuple(m.weight.shape) for p, m in targets.items()}, name,
                    {**model_fingerprint(model), "tokenizer_sha256": tokenizer_fingerprint(tokenizer)})
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in brick.paths:
                a = brick.lora_A[_key(p)]
                bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)) as nn.Linear / PEFT
                a.copy_(torch.rand(a.shape, generator=gen) * 2 * bound - bound)
        dtype = next(iter(targets.values())).weight.dtype
        return brick.to(dtype)

    @property
    def paths(self) -> list[str]:
        return list(self.shapes)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def A(self, path: str) -> torch.Tensor:
        return self.lora_A[_key(path)]

    def B(self, path: str) -> torch.Tensor:
        return self.lora_B[_key(path)]

    def delta(self, path: str) -> torch.Tensor:
        """The dense (out, in) change ``scaling * B @ A`` of one projection's weight."""
        return self.config.scaling * (self.B(path) @ self.A(path))

    def deltas(self) -> dict[str, torch.Tensor]:
        """``{'<module path>.weight': dense delta}`` (detached), keyed like the base model's state dict."""
        with torch.no_grad():
            return {p + ".weight": self.delta(p).detach() for p in self.paths}

    def check_base(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The targeted modules of ``model``; raises ValueError when the brick does not fit this model."""
        mods = dict(model.named_modules())
        out: dict[str, nn.Linear] = {}
        arch = architecture(model)
        if self.meta.get("architecture") not in (None, arch):
            raise ValueError(f"brick {self.name!r} was trained on a {self.meta['architecture']!r} model; this model "
                             f"is {arch!r}")
        for p, shape in self.shapes.items():
            m = mods.get(p)
            if m is None:
                raise ValueError(f"brick {self.name!r} targets {p!r}, which this {arch} model does not have")
            if not isinstance(m, nn.Linear):
                raise ValueError(f"brick {self.name!r}: {p} is a {type(m).__name__}, not an nn.Linear")
            if tuple(m.weight.shape) != shape:
                raise ValueError(f"brick {self.name!r}: {p} has weight shape {tuple(m.weight.shape)} in this model, "
                                 f"the brick was made for {shape}")
            out[p] = m
        return out

    # ---- run time: attach / detach ---------------------------------------------------------------------------
    def _lora_out(self, path: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.A(path), self.B(path)
        if self.config.dropout and self.training:
            x = F.dropout(x, self.config.dropout, training=True)
        return F.linear(F.linear(x.to(a.dtype), a), b) * self.config.scaling

    def attach(self, model: nn.Module, weight: float | None = None) -> "LoRABrick":
        """Add the brick's term to ``model``'s projections from now on (``weight`` scales it; default 1)."""
        if id(model) in self._hooks:
            raise ValueError(f"brick {self.name!r} is already attached to this model")
        if id(model) in self._merged:
            raise ValueError(f"brick {self.name!r} is merged into this model; unmerge it before attaching")
        if weight is not None:
            self.weight = float(weight)
        mods = self.check_base(model)
        handles = []

        def make(path: str):
            def hook(_mod, args, out):
                return out + (self.weight * self._lora_out(path, args[0])).to(out.dtype)

            return hook

        for p, m in mods.items():
            handles.append(m.register_forward_hook(make(p)))
        self._hooks[id(model)] = handles
        return self

    def detach(self, model: nn.Module) -> None:
        """Remove the brick's hooks from ``model``."""
        for h in self._hooks.pop(id(model), []):
            h.remove()

    def is_attached(self, model: nn.Module) -> bool:
        return id(model) in self._hooks

    @contextlib.contextmanager
    def attached(self, model: nn.Module, weight: float | None = None) -> Iterator["LoRABrick"]:
        old = self.weight
        self.attach(model, weight)
        try:
            yield self
        finally:
            self.detach(model)
            self.weight = old

    # ---- merge into the base / unmerge -----------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, model: nn.Module, weight: float = 1.0) -> None:
        """Write ``weight * scaling * B A`` into each targeted weight (the brick must not be attached)."""
        if id(model) in self._hooks:
            raise ValueError(f"brick {self.name!r} is attached to this model; detach it before merging (else it "
                             "would count twice)")
        if id(model) in self._merged:
            raise ValueError(f"brick {self.name!r} is already merged into this model")
        for p, m in self.check_base(model).items():
            m.weight.add_((weight * self.delta(p)).to(m.weight.dtype))
        self._merged[id(model)] = float(weight)

    @torch.no_grad()
    def unmerge(self, model: nn.Module) -> None:
        """Subtract what :meth:`merge` added (equal up to floating-point rounding)."""
        if id(model) not in self._merged:
            raise ValueError(f"brick {self.name!r} is not merged into this model")
        weight = self._merged.pop(id(model))
        for p, m in self.check_base(model).items():
            m.weight.sub_((weight * self.delta(p)).to(m.weight.dtype))

    # ---- PEFT-format files -----------------------------------------------------------------------------------
    def peft_config(self, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        names = sorted({p.rsplit(".", 1)[-1] for p in self.paths})
        all_layers = self.config.layers is None
        return {
            "peft_type": "LORA",
            "task_type": self.meta.get("task_type", "CAUSAL_LM" if self.meta.get("architecture") != "sparkformer"
                                       else None),
            "base_model_name_or_path": base_model_name_or_path or self.meta.get("base_model"),
            "r": self.config.r,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            # short names when every layer is adapted; exact module paths otherwise (PEFT matches a path exactly
            # or by its '.'-suffix, so these select the same modules)
            "target_modules": names if all_layers else sorted(self.paths),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": None,
        }

    def state_dict_peft(self) -> dict[str, torch.Tensor]:
        out = {}
        for p in self.paths:
            out[f"{_PEFT_PREFIX}{p}.lora_A.weight"] = self.A(p).detach().contiguous().cpu()
            out[f"{_PEFT_PREFIX}{p}.lora_B.weight"] = self.B(p).detach().contiguous().cpu()
        return out

    def save(self, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
        """Write ``adapter_config.json``, ``adapter_model.safetensors`` (PEFT) and ``sparkformer_brick.json``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict_peft(), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        (folder / CONFIG_NAME).write_text(json.dumps(self.peft_config(base_model_name_or_path), indent=2))
        meta = {"name": self.name, "config": asdict(self.config), **self.meta}
        (folder / META_NAME).write_text(json.dumps(meta, indent=1, default=str))
        return folder

    @classmethod
    def load(cls, folder: str | Path, name: str | None = None) -> "LoRABrick":
        """A brick from a PEFT LoRA folder (ours or one peft saved: plain LoRA, no DoRA / rsLoRA / rank patterns)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not cfg_path.is_file() or not w_path.is_file():
            raise FileNotFoundError(f"{folder}: not a LoRA brick folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        pc = json.loads(cfg_path.read_text())
        if pc.get("peft_type") != "LORA":
            raise ValueError(f"{folder}: peft_type {pc.get('peft_type')!r} is not LORA")
        for flag in ("use_dora", "use_rslora"):
            if pc.get(flag):
                raise ValueError(f"{folder}: {flag}=true is not supported by sparkformer LoRA bricks")
        if pc.get("rank_pattern") or pc.get("alpha_pattern"):
            raise ValueError(f"{folder}: per-module rank_pattern / alpha_pattern is not supported")
        if pc.get("fan_in_fan_out"):
            raise ValueError(f"{folder}: fan_in_fan_out (GPT-2 Conv1D) is not supported; bricks adapt nn.Linear")
        sd = load_file(str(w_path))
        pat = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
        a: dict[str, torch.Tensor] = {}
        b: dict[str, torch.Tensor] = {}
        for k, v in sd.items():
            m = pat.match(k)
            if not m:
                raise ValueError(f"{folder}: unexpected tensor {k!r} in {WEIGHTS_NAME} (only lora_A / lora_B)")
            (a if m.group(2) == "A" else b)[m.group(1)] = v
        if set(a) != set(b) or not a:
            raise ValueError(f"{folder}: lora_A and lora_B do not pair up ({len(a)} A, {len(b)} B)")
        r = int(pc.get("r") or next(iter(a.values())).shape[0])
        meta: dict[str, Any] = {}
        if (folder / META_NAME).is_file():
            meta = json.loads((folder / META_NAME).read_text())
        saved_cfg = meta.pop("config", {}) or {}
        saved_name = meta.pop("name", None)
        layers = saved_cfg.get("layers")
        config = LoRAConfig(r=r, alpha=float(pc.get("lora_alpha", r)), dropout=float(pc.get("lora_dropout") or 0.0),
                            targets=tuple(saved_cfg.get("targets") or sorted({p.rsplit(".", 1)[-1] for p in a})),
                            layers=tuple(layers) if layers is not None else None)
        for p, t in a.items():
            if t.shape[0] != r or b[p].shape[1] != r:
                raise ValueError(f"{folder}: {p} has rank {t.shape[0]}/{b[p].shape[1]}, the config says r={r}")
        brick = cls(config, {p: (b[p].shape[0], a[p].shape[1]) for p in a}, name or saved_name or folder.name, meta)
        with torch.no_grad():
            for p in a:
                brick.lora_A[_key(p)] = nn.Parameter(a[p].clone())
                brick.lora_B[_key(p)] = nn.Parameter(b[p].clone())
        return brick


# ---- training --------------------------------------------------------------------------------------------------------
def train_lora(model: nn.Module, tokenizer: Any, texts: Sequence[str], config: LoRAConfig | None = None,
               steps: int = 100, lr: float = 1e-3, batch_size: int = 4, seq_len: int = 128, seed: int = 0,
               name: str = "brick", log: Callable[[str], None] | None = None,
               windows: torch.Tensor | None = None) -> tuple[LoRABrick, TrainLog]:
    """Train a fresh LoRA brick on ``texts`` with every base parameter frozen; returns (brick, training log)."""
    brick = LoRABrick.for_model(model, config, name=name, seed=seed, tokenizer=tokenizer)
    if windows is None:
        windows = token_windows(tokenizer, texts, seq_len)
    brick.train()
    with brick.attached(model):
        tl = train_parameters(model, list(brick.parameters()), windows, steps, lr, batch_size, seed, log=log)
    brick.eval()
    brick.meta["train"] = {"windows": int(windows.shape[0]), **{k: v for k, v in tl.to_dict().items()
                                                                if k != "losses"},
                           "first_loss": tl.losses[0], "last_loss": tl.losses[-1]}
    return brick, tl


def load_lora_run(path: str | Path) -> tuple[dict[str, LoRABrick], dict[str, list[str]], dict[str, list[str]]]:
    """(bricks, training texts, held-out texts) per capability of a ``sparkformer bricks lora`` output folder (or
    of its ``bricks/`` folder); the texts come from its ``texts.json``."""
    p = Path(path)
    root, bdir = (p, p / "bricks") if (p / "bricks").is_dir() else (p.parent, p)
    f = root / "texts.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: pass the --out folder of `sparkformer bricks lora` (it holds "
                                "bricks/ and texts.json with each brick's training and held-out texts)")
    d = json.loads(f.read_text())
    return load_bricks(bdir), d["train"], d["heldout"]


def load_bricks(folder: str | Path, names: Iterable[str] | None = None) -> dict[str, LoRABrick]:
    """Every brick under ``folder`` (one sub-folder each), or the named ones; a brick folder itself gives one."""
    folder = Path(folder)
    if (folder / CONFIG_NAME).is_file():
        b = LoRABrick.load(folder)
        return {b.name: b}
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such brick folder")
    subs = sorted(p for p in folder.iterdir() if (p / CONFIG_NAME).is_file())
    if names is not None:
        wanted = list(names)
        have = {p.name: p for p in subs}
        missing = [n for n in wanted if n not in have]
        if missing:
            raise FileNotFoundError(f"{folder}: no brick {missing}; found {sorted(have)}")
        subs = [have[n] for n in wanted]
    if not subs:
        raise FileNotFoundError(f"{folder}: no LoRA brick folders (with {CONFIG_NAME}) inside")
    out = {}
    for p in subs:
        b = LoRABrick.load(p, name=p.name)
        out[b.name] = b
    return out


# ---- the experiment: `sparkformer bricks lora` ----------------------------------------------------------------------
def parse_layers(spec: str | None) -> tuple[int, ...] | None:
    """'15-29' or '3,5,7' or None / '' / 'all' (every layer)."""
    if spec in (None, "", "all"):
        return None
    out: list[int] = []
    try:
        for part in str(spec).split(","):
            if "-" in part:
                a, b = part.split("-")
                out += list(range(int(a), int(b) + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise ValueError(f"--layers {spec!r}: expected e.g. '15-29' or '3,5,7'") from None
    return tuple(out)


@dataclass(kw_only=True)
class LoraRun(TextRun):
    """Settings of ``sparkformer bricks lora``; the brick's defaults are :class:`LoRAConfig`'s."""

    targets: tuple[str, ...] = arg(LoRAConfig.targets, "projections to adapt: names (q_proj,v_proj,...) or the "
                                                       "groups attn, ffn, all")
    layers: tuple[int, ...] | None = arg(LoRAConfig.layers, "layers to adapt, e.g. '15-29' (default: all)",
                                         parse=parse_layers)
    rank: int = arg(LoRAConfig.r, "LoRA rank r")
    alpha: float = arg(LoRAConfig.alpha, "LoRA alpha (scaling = alpha / r)")
    steps: int = arg(30, "training steps per brick")
    lr: float = arg(1e-3, "AdamW learning rate")
    batch_size: int = arg(2, "windows per training step")
    seq_len: int = arg(128, "tokens per training window (and per held-out text)")
    train_per_capability: int = arg(24, "training texts per capability")
    heldout_per_capability: int = arg(8, "held-out texts per capability")


def run_lora(run: LoraRun, model: nn.Module | None = None, tokenizer: Any = None, capset=None,
             log: Callable[[str], None] = log) -> dict[str, Any]:
    """Python API of ``sparkformer bricks lora``: train one LoRA brick per capability (base frozen), save each in
    PEFT format under ``run.out/bricks/<capability>`` (their texts in ``texts.json``), and measure held-out
    perplexity of each capability without and with its brick."""
    t0 = start(run)
    out = Path(run.out)
    cfg = LoRAConfig(r=run.rank, alpha=run.alpha, targets=run.targets, layers=run.layers)
    m, tok, name, description = load_model(run.model, model, tokenizer, freeze=True, log=log)
    cs = capset or run.capability_set(run.train_per_capability, run.heldout_per_capability, 6 * run.seq_len)
    train, held = cs.texts("score"), cs.texts("heldout")
    write_json(out / "texts.json", {"train": train, "heldout": held, "seed": run.seed}, indent=0)
    caps = list(train)
    res: dict[str, Any] = {"model": name, "model_note": description or name,
                           "config": {**vars(cfg), "steps": run.steps, "lr": run.lr, "batch_size": run.batch_size,
                                      "seq_len": run.seq_len, "threads": torch.get_num_threads()},
                           "capabilities": {}}
    curves, bricks = {}, {}
    for cap in caps:
        t = time.time()
        windows = token_windows(tok, train[cap], run.seq_len)
        log(f"[{cap}] {windows.shape[0]} windows of {run.seq_len} tokens, {run.steps} steps")
        brick, tl = train_lora(m, tok, [], cfg, run.steps, run.lr, run.batch_size, run.seq_len, run.seed, name=cap,
                               log=log, windows=windows)
        brick.meta.update({"capability": cap, "base_model": name, "description": cs.description.get(cap, "")})
        brick.save(out / "bricks" / cap, base_model_name_or_path=name)
        bricks[cap] = brick
        curves[cap] = tl.losses
        held_tokens = encode(tok, held[cap], run.seq_len)
        base_ppl = perplexity(m, held_tokens)
        with brick.attached(m):
            brick_ppl = perplexity(m, held_tokens)
        k = max(1, min(5, len(tl.losses) // 2))
        res["capabilities"][cap] = {"train_windows": int(windows.shape[0]), "trainable_params": tl.trainable_params,
                                    "train_seconds": tl.seconds, "first_loss": sum(tl.losses[:k]) / k,
                                    "last_loss": sum(tl.losses[-k:]) / k, "losses": tl.losses,
                                    "ppl_base": base_ppl, "ppl_brick": brick_ppl}
        log(f"[{cap}] ppl {base_ppl:.2f} -> {brick_ppl:.2f} ({time.time() - t:.0f} s)")
    res.update(_check_formats(m, out, bricks[caps[0]], encode(tok, held[caps[0]][:1], 64)[0]))
    n_par = next(iter(res["capabilities"].values()))["trainable_params"]
    notes = (f"LoRA r={run.rank}, alpha={run.alpha}, targets {','.join(cfg.names())}"
             f"{'' if run.layers is None else ', layers ' + str(list(run.layers))}; {n_par / 1e6:.2f} M trainable "
             f"parameters per brick; {run.steps} steps x {run.batch_size} x {run.seq_len} tokens, AdamW lr {run.lr}. "
             f"Merged vs attached: max |logit diff| {res['merged_vs_attached_max_abs_diff']:.2e}; peft.PeftModel vs "
             f"ours: {res['peft_vs_ours_max_abs_diff']}.")
    _plot_lora(res, curves, out / "lora.png")
    return write_results(out, res, command=command_line("lora", run), title="lora", table=lora_summary(res)[0],
                         notes=notes, started=t0)


def _check_formats(m: nn.Module, folder: Path, brick: LoRABrick, ids: list[int]) -> dict[str, float | None]:
    """Max |logit difference| of the merged vs the attached brick, and of peft loading its saved folder vs ours."""
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        with brick.attached(m):
            att = forward_logits(m, ids_t)
        brick.merge(m)
        mer = forward_logits(m, ids_t)
        brick.unmerge(m)
    out: dict[str, float | None] = {"merged_vs_attached_max_abs_diff": float((att - mer).abs().max())}
    try:
        import peft

        pm = peft.PeftModel.from_pretrained(copy.deepcopy(m), str(folder / "bricks" / brick.name)).eval()
        with torch.no_grad():
            pl = forward_logits(pm.get_base_model(), ids_t)  # peft injected its layers in place; works for SparkLM
        out["peft_vs_ours_max_abs_diff"] = float((pl - att).abs().max())
    except ImportError:
        out["peft_vs_ours_max_abs_diff"] = None
    return out


def _plot_lora(res: dict[str, Any], curves: dict[str, list[float]], path: Path) -> None:
    caps = list(res["capabilities"])
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for c, ls in curves.items():
        ax[0].plot(ls, label=c)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("train loss")
    ax[0].legend()
    x = range(len(caps))
    ax[1].bar([i - 0.2 for i in x], [res["capabilities"][c]["ppl_base"] for c in caps], 0.4, label="base")
    ax[1].bar([i + 0.2 for i in x], [res["capabilities"][c]["ppl_brick"] for c in caps], 0.4, label="+ own brick")
    ax[1].set_xticks(list(x), caps, rotation=20)
    ax[1].set_ylabel("held-out perplexity")
    ax[1].legend()
    save_figure(fig, path)


def lora_summary(res: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The table of a lora result (per capability: training, perplexity without / with its brick), and its
    headline numbers."""
    rows = [[c, r["train_windows"], f"{r['first_loss']:.2f} -> {r['last_loss']:.2f}", r["ppl_base"], r["ppl_brick"],
             f"{100 * (r['ppl_brick'] / r['ppl_base'] - 1):+.1f}%", f"{r['train_seconds']:.0f}"]
            for c, r in res["capabilities"].items()]
    table = md_table(["capability", "train windows", "train loss (first / last 5 steps)", "held-out ppl base",
                      "ppl with brick", "change", "train s"], rows)
    caps = res["capabilities"].values()
    return table, {"op": "lora", "model": res["model"],
                   "mean_ppl_change_pct": sum(100 * (r["ppl_brick"] / r["ppl_base"] - 1) for r in caps) / len(caps),
                   "merged_vs_attached_max_abs_diff": res["merged_vs_attached_max_abs_diff"]}


def add_cli(subparsers) -> None:
    add_command(subparsers, "lora", LoraRun, run_lora,
                help="train one LoRA brick per capability (base frozen), save in PEFT format",
                summary=lora_summary)
