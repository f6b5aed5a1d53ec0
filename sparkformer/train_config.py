"""The training run's config: ``TrainConfig`` (everything but the model), YAML/JSON files with ``key=value``
overrides (``model.key=value`` for the model section), the model spec -> ``ModelConfig``, and the LR schedule."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from sparkformer.config import (ModelConfig, PRESETS, apply_overrides, coerce_fields, get_preset, load_config_file,
                                parse_field)


@dataclass
class TrainConfig:
    """Everything about a training run except the model, which is ``model`` (a preset name, or a dict with an
    optional ``preset`` key plus ModelConfig fields). Override any field as ``key=value``, model fields as
    ``model.key=value``."""

    model: Any = field(default_factory=lambda: {"preset": "tiny-spark"})
    data_dir: str | None = None  # prepared token files; None: the default corpus (prepared on first use)
    out_dir: str = "runs/default"
    # batch
    batch_size: int = 32  # sequences per optimizer step, over all processes and micro-steps
    seq_len: int = 256
    grad_accum: int = 1  # micro-steps per optimizer step (per process micro-batch = batch_size/(grad_accum*world))
    # optimizer and schedule
    lr: float = 2e-3
    min_lr: float = 2e-4  # cosine decays to this at the last step
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices and embeddings, not on norms
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    # length
    max_steps: int = 1000
    max_tokens: int | None = None  # token budget; when set it decides the number of steps
    # evaluation, logging, checkpoints
    eval_interval: int = 200
    eval_iters: int = 8  # eval batches per val domain (fixed, evenly spaced windows)
    eval_batch_size: int | None = None  # sequences per eval batch over all processes; default batch_size/grad_accum
    log_interval: int = 10
    checkpoint_interval: int = 500
    keep_checkpoints: int = 2
    # numerics and execution
    bf16: bool = False  # bf16 autocast (weights and optimizer stay fp32)
    compile: bool = False  # torch.compile the model
    fsdp: bool = False  # FSDP2 fully_shard each block (under torchrun); else DDP when world size > 1
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    stop_after: int | None = None  # stop (with a checkpoint) after this step, as an interruption would
    overwrite: bool = False  # start afresh in an out_dir that already has checkpoints
    progress: bool = True  # tqdm bar (rank 0)

    def validate(self) -> None:
        coerce_fields(self)  # each value as its field's type (YAML 1.1 reads 3e-4 as a string); strict booleans

        def need(ok: bool, fld: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig.{fld}={getattr(self, fld)!r}: {msg}")

        for fld in ("batch_size", "seq_len", "grad_accum", "max_steps", "eval_interval", "eval_iters",
                    "log_interval", "checkpoint_interval", "keep_checkpoints"):
            need(isinstance(getattr(self, fld), int) and getattr(self, fld) >= 1, fld, "must be an integer >= 1")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.lr > 0 and 0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}] (and lr > 0)")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1", "beta1 and beta2 must be in [0, 1)")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 turns clipping off)")
        need(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be None or >= 1")
        need(self.eval_batch_size is None or self.eval_batch_size >= 1, "eval_batch_size", "must be None or >= 1")
        need(self.device in ("auto", "cpu", "cuda"), "device", "allowed: auto, cpu, cuda")
        need(self.stop_after is None or self.stop_after >= 1, "stop_after", "must be None or >= 1")
        need(self.batch_size % self.grad_accum == 0, "batch_size",
             f"must be a multiple of grad_accum={self.grad_accum} (times the number of processes)")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        if self.max_tokens is not None:
            return max(1, math.ceil(self.max_tokens / self.tokens_per_step))
        return self.max_steps

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(self.model, ModelConfig):
            d["model"] = self.model.to_dict()
        return d


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; nothing was saved for that step."""

    def __init__(self, msg: str, step: int):
        super().__init__(msg)
        self.step = step


# ---- configuration -------------------------------------------------------------------------------------------------
def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A YAML/JSON file (a ``model:`` section + training fields, top level or under ``train:``) plus overrides."""
    raw = load_config_file(path) if path else {}
    model = raw.pop("model", None)
    fields = dict(raw.pop("train", None) or {})
    fields.update(raw)
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path}: unknown training field(s) {unknown}; known: {sorted(known)} plus a model: section")
    cfg = TrainConfig(**fields)
    if model is not None:
        cfg.model = _model_spec(model)
    train_ovr, model_ovr = [], {}
    for s in overrides or []:
        if "=" not in s:
            raise ValueError(f"override {s!r} must look like key=value (model fields: model.key=value)")
        k, v = s.split("=", 1)
        k = k.strip()
        if k in ("model", "model.preset"):
            model_ovr["preset"] = v.strip()
            if k == "model":
                cfg.model = {"preset": v.strip()}
        elif k.startswith("model."):
            name = k[len("model."):]
            hints = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
            if name not in hints:
                raise ValueError(f"unknown model field {name!r}; known: preset, {', '.join(sorted(hints))}")
            model_ovr[name] = parse_field(k, v, get_type_hints(ModelConfig)[name])
        else:
            train_ovr.append(s)
    cfg = apply_overrides(cfg, train_ovr)
    if model_ovr:
        cfg.model = {**_model_spec(cfg.model), **model_ovr}
    cfg.validate()
    return cfg


def _model_spec(model: Any) -> dict[str, Any]:
    if isinstance(model, str):
        return {"preset": model}
    if isinstance(model, ModelConfig):
        return model.to_dict()
    if isinstance(model, dict):
        return dict(model)
    raise ValueError(f"model must be a preset name or a mapping of ModelConfig fields, got {type(model).__name__}")


def resolve_model_config(model: Any, vocab_size: int | None = None, seq_len: int | None = None) -> ModelConfig:
    """ModelConfig from a spec; ``vocab_size`` (the tokenizer's) is adopted unless the spec sets one, and a spec
    that sets a different one is an error naming both sizes."""
    spec = _model_spec(model)
    preset = spec.pop("preset", None)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(spec) - names)
    if unknown:
        raise ValueError(f"unknown model field(s) {unknown}; known: preset, {', '.join(sorted(names))}")
    explicit_vocab = "vocab_size" in spec
    if vocab_size is not None and not explicit_vocab:
        spec["vocab_size"] = vocab_size
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
        mc = get_preset(preset, **spec)
    else:
        mc = ModelConfig(**spec)
    if vocab_size is not None and mc.vocab_size != vocab_size:
        from sparkformer.tokenizer import check_vocab

        check_vocab(mc.vocab_size, vocab_size, where="model section vs. the data's tokenizer")
    if seq_len is not None and seq_len > mc.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={mc.max_seq_len}; lower seq_len or set "
                         f"model.max_seq_len={seq_len}")
    return mc


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr``."""
    total = cfg.total_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if total <= cfg.warmup_steps:
        return cfg.lr
    t = min(1.0, (step - cfg.warmup_steps) / max(1, total - 1 - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * t)) * (cfg.lr - cfg.min_lr)
