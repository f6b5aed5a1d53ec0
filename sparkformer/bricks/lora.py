"""LoRA bricks: low-rank plug-ins on chosen linear projections, trained per capability with the base frozen.

A brick holds, for every targeted ``nn.Linear`` (by module path, e.g. ``model.layers.3.self_attn.q_proj``), a pair
``A`` (r, in) and ``B`` (out, r). With ``scaling = alpha / r`` the projection computes

    y = W x + weight * scaling * B (A x)              (attached: a forward hook adds the low-rank term)
    W' = W + weight * scaling * B A                    (merged: the same change written into W)

Attaching registers forward hooks, so the base model's modules, parameter names and state dict never change; any
number of bricks can be attached at once (their terms add), or as a per-example mixture (:class:`LoRAMixture`).

Files are the PEFT format (``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``), so ``peft.PeftModel.from_pretrained(base,
folder)`` loads them; ``sparkformer_brick.json`` beside them records what the brick was trained for and on which
base (architecture, parameter shapes, tokenizer hash) so merging can refuse incompatible bricks.

    brick, log = train_lora(model, tokenizer, texts, LoRAConfig(r=8, targets=("q_proj", "v_proj")), steps=100)
    with brick.attached(model):
        model(ids)
    brick.save("bricks/code");  brick = LoRABrick.load("bricks/code")
    brick.merge(model); brick.unmerge(model)

This module also holds the small token / loss / training helpers the other brick operations share.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparkformer.bricks.analysis import batches as padded_batches
from sparkformer.bricks.analysis import batch_nll, forward_logits
from sparkformer.bricks.neurons import architecture

ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
TARGET_GROUPS = {"attn": ATTN_PROJECTIONS, "ffn": FFN_PROJECTIONS, "all": ATTN_PROJECTIONS + FFN_PROJECTIONS}
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
META_NAME = "sparkformer_brick.json"
_PEFT_PREFIX = "base_model.model."


# ---- shared helpers: tokens, losses, fingerprints ------------------------------------------------------------------
def encode_texts(tokenizer: Any, texts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
    """Token ids per text (HF tokenizers add their special tokens; a plain ``encode`` is used as is)."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer (a sparkformer checkpoint needs tokenizer.json beside it)")
    if hasattr(tokenizer, "batch_decode") and callable(tokenizer):
        ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    else:
        ids = [tokenizer.encode(t) for t in texts]
    return [list(x if max_tokens is None else x[:max_tokens]) for x in ids]


def eos_id(tokenizer: Any) -> int | None:
    for attr in ("eos_token_id", "eos_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return None


def token_windows(tokenizer: Any, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """(N, seq_len) windows cut from the texts' tokens concatenated (separated by EOS when the tokenizer has one)."""
    sep = eos_id(tokenizer)
    stream: list[int] = []
    for ids in encode_texts(tokenizer, texts):
        stream.extend(ids)
        if sep is not None:
            stream.append(sep)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"the texts give {len(stream)} tokens, fewer than one window of seq_len={seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def lm_loss(model: nn.Module, ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross entropy over ``ids`` (B, T); ``valid`` (B, T) marks real tokens."""
    logits = forward_logits(model, ids)[:, :-1].float()
    tgt = ids[:, 1:]
    if valid is not None:
        tgt = tgt.masked_fill(~valid[:, 1:], -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)


@torch.no_grad()
def sequence_nll(model: nn.Module, token_lists: Sequence[Sequence[int]], batch_size: int = 8,
                 before_batch: Callable[[list[int]], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence (sum of next-token NLL, number of predicted tokens). ``before_batch(indices)`` runs before each
    forward (e.g. to set a :class:`LoRAMixture`'s per-example weights)."""
    nll = torch.zeros(len(token_lists), dtype=torch.float64)
    cnt = torch.zeros(len(token_lists), dtype=torch.float64)
    for idx, ids, valid in padded_batches(token_lists, batch_size):
        if before_batch is not None:
            before_batch(idx)
        nll[idx], cnt[idx] = batch_nll(model, ids, valid)
    return nll, cnt


def perplexity(model: nn.Module, token_lists: Sequence[Sequence[int]], batch_size: int = 8) -> float:
    """Token-weighted perplexity of the sequences."""
    return perplexity_from(*sequence_nll(model, token_lists, batch_size))


def perplexity_from(nll: torch.Tensor, cnt: torch.Tensor) -> float:
    """Token-weighted perplexity from per-sequence NLL sums and token counts (``sequence_nll``'s output)."""
    return math.exp(float(nll.sum() / cnt.sum().clamp_min(1)))


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """sha256 of the vocabulary (token -> id, added tokens included); None without a tokenizer or when the
    tokenizer does not expose its vocabulary (then compatibility cannot be checked and is not)."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend", None)  # sparkformer Tokenizer
    if backend is not None and hasattr(backend, "get_vocab"):
        vocab = backend.get_vocab(with_added_tokens=True)
    elif hasattr(tokenizer, "get_vocab"):
        vocab = tokenizer.get_vocab()
    else:
        return None
    blob = json.dumps(sorted((str(k), int(v)) for k, v in vocab.items()), separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What a brick needs from its base: architecture name, shapes of every parameter, a digest of the shapes."""
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    blob = json.dumps(sorted(shapes.items()), separators=(",", ":"))
    return {"architecture": architecture(model), "shapes_sha256": hashlib.sha256(blob.encode()).hexdigest()}


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Every parameter of ``model`` has requires_grad=False inside the block (restored after)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, r in saved:
            p.requires_grad_(r)


@dataclass
class TrainLog:
    steps: int
    lr: float
    batch_size: int
    seq_len: int
    trainable_params: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_parameters(model: nn.Module, params: Sequence[nn.Parameter], windows: torch.Tensor, steps: int,
                     lr: float, batch_size: int = 4, seed: int = 0, warmup: float = 0.1, weight_decay: float = 0.0,
                     clip: float = 1.0, log: Callable[[str], None] | None = None, log_every: int = 10,
                     loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> TrainLog:
    """AdamW on ``params`` only (linear warmup, cosine decay to 10%), random batches of ``windows`` (N, T).

    The caller decides what is trainable: every other parameter of ``model`` is frozen for the duration."""
    params = [p for p in params]
    if not params:
        raise ValueError("nothing to train: the parameter list is empty")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need steps >= 1, batch_size >= 1, lr > 0 (got {steps}, {batch_size}, {lr})")
    windows = torch.as_tensor(windows)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    n_warm = max(1, int(warmup * steps))
    tl = TrainLog(steps, lr, batch_size, windows.shape[1], sum(p.numel() for p in params))
    loss_fn = loss_fn or (lambda m, ids: lm_loss(m, ids))
    t0 = time.time()
    was_training = model.training
    model.eval()  # no dropout in the base; the trained parameters are used in train mode by their owners
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for step in range(steps):
            f = (step + 1) / n_warm if step < n_warm else \
                0.1 + 0.45 * (1 + math.cos(math.pi * (step - n_warm) / max(1, steps - n_warm)))
            for g in opt.param_groups:
                g["lr"] = lr * f
            idx = torch.randint(0, windows.shape[0], (batch_size,), generator=gen)
            loss = loss_fn(model, windows[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            tl.losses.append(float(loss.detach()))
            if log and (step % log_every == 0 or step == steps - 1):
                log(f"  step {step + 1}/{steps} loss {tl.losses[-1]:.3f} ({time.time() - t0:.0f} s)")
    finally:
        for p, r in saved:
            p.requires_grad_(r)
        model.train(was_training)
    tl.seconds = time.time() - t0
    return tl


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


# ---- several bricks at once, with per-example weights ---------------------------------------------------------------
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
