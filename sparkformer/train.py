"""Pretraining: AdamW + warmup/cosine, accumulation, clipping, bf16, compile, DDP / FSDP2, exact resume.

    sparkformer train --config configs/tiny-spark.yaml max_steps=200 model.d_model=192
    torchrun --nproc_per_node=2 -m sparkformer.train --config configs/tiny-spark.yaml      # DDP (gloo / nccl)
    sparkformer train --config ... --resume                                                 # bit-for-bit continue

``batch_size`` is the global batch (sequences per optimizer step over all processes and micro-steps). Step ``s``
draws its windows from ``(seed, s)`` only (``data.BatchSampler``), each process materialising its share, so a
resumed run, and a run with a different number of processes, sees the same data.

A run folder holds ``metrics.jsonl`` (one JSON object per logged step / evaluation) and ``checkpoints/step-NNNNNNN``
folders: ``model.safetensors`` + ``config.json`` (model and train config) + ``tokenizer.json`` (loadable by
``sparkformer.pretrained.load_causal_lm``) + ``trainer_state.pt`` (optimizer, RNG) + ``state.json`` (step, tokens,
data position). Each is written to a temporary folder and renamed into place; ``checkpoints/latest`` names the
newest complete one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_type_hints

import numpy as np
import torch

from sparkformer.config import ModelConfig, PRESETS, _parse_value, apply_overrides, get_preset, load_config_file
from sparkformer.data import BatchSampler, TokenData, default_data_dir, eval_windows, prepare

CHECKPOINTS = "checkpoints"


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

    def _coerce_numbers(self) -> None:
        """YAML 1.1 reads ``3e-4`` as a string and ``1.0e8`` as a float: turn such values into the field's type."""
        hints = get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            v, typ = getattr(self, f.name), hints[f.name]
            kinds = set(get_args(typ)) if get_args(typ) else {typ}
            if isinstance(v, bool) or not isinstance(v, (str, float)) or not kinds & {int, float}:
                continue
            try:
                x = float(v)
            except ValueError:
                continue
            if int in kinds and x.is_integer():
                setattr(self, f.name, int(x))
            elif float in kinds:
                setattr(self, f.name, x)

    def validate(self) -> None:
        self._coerce_numbers()

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
            model_ovr[name] = _parse_value(v, get_type_hints(ModelConfig)[name])
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


# ---- processes -----------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we created the process group (and destroy it at the end)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto") -> Dist:
    """Rank/world from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); NCCL on GPUs,
    gloo on CPU. Without those variables: one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = world > 1 and not torch.distributed.is_initialized()
    if owns:
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local, dev, owns)


def _all_reduce(t: torch.Tensor, dist: Dist, op=None) -> torch.Tensor:
    if dist.enabled:
        torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t


# ---- checkpoints ---------------------------------------------------------------------------------------------------
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder (``checkpoints/latest``, else the highest ``step-*``)."""
    ck = Path(out_dir) / CHECKPOINTS
    ptr = ck / "latest"
    if ptr.exists():
        cand = ck / ptr.read_text().strip()
        if (cand / "state.json").exists():
            return cand
    steps = sorted(p for p in ck.glob("step-*") if (p / "state.json").exists() and "." not in p.name)
    return steps[-1] if steps else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint)."""
    path = Path(path).expanduser()
    if (path / "model.safetensors").exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder (model.safetensors) nor a run folder with "
                                f"{CHECKPOINTS}/step-*; train first or give the checkpoint folder")
    return latest


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """``(model, info)``: the SparkLM of a checkpoint (or run folder) and its config.json contents."""
    from safetensors.torch import load_file

    from sparkformer.model import SparkLM

    path = resolve_checkpoint(path)
    info = json.loads((path / "config.json").read_text())
    info["path"] = str(path)
    model = SparkLM(ModelConfig.from_dict(info["model"]))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.to(device), info


# ---- the trainer ---------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        cfg.validate()
        self.cfg = cfg
        self.dist = init_distributed(cfg.device)
        try:
            self._setup(resume)
        except BaseException:
            _close_group(self.dist)
            raise

    def _setup(self, resume: bool) -> None:
        cfg, d = self.cfg, self.dist
        if cfg.batch_size % (cfg.grad_accum * d.world):
            raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of grad_accum*processes = "
                             f"{cfg.grad_accum}*{d.world}; change batch_size or grad_accum")
        self.micro = cfg.batch_size // (cfg.grad_accum * d.world)
        self.out = Path(cfg.out_dir).expanduser()

        # data (rank 0 prepares the default corpus if needed; the others wait)
        if cfg.data_dir is None:
            if d.main:
                prepare(quiet=not cfg.progress)
            self._barrier()
            self.data_dir = default_data_dir()
        else:
            self.data_dir = Path(cfg.data_dir).expanduser()
        self.data = TokenData(self.data_dir)
        self.model_cfg = resolve_model_config(cfg.model, self.data.vocab_size, cfg.seq_len)
        self.sampler = BatchSampler(self.data, cfg.seq_len, cfg.batch_size, cfg.seed)

        # resume or fresh start
        self.resume_from = latest_checkpoint(self.out) if resume else None
        if resume and self.resume_from is None and d.main:
            print(f"--resume: no checkpoint in {self.out}, starting from step 0", file=sys.stderr)
        if not resume and latest_checkpoint(self.out) is not None and not cfg.overwrite:
            raise ValueError(f"{self.out} already has checkpoints; pass --resume to continue that run, "
                             "overwrite=true to start afresh there, or choose another out_dir")
        if self.resume_from is not None:
            self._check_compatible(json.loads((self.resume_from / "config.json").read_text()))

        # model and optimizer
        from sparkformer.model import SparkLM

        torch.manual_seed(cfg.seed)
        self.raw_model = SparkLM(self.model_cfg).to(d.device)
        model: torch.nn.Module = self.raw_model
        if cfg.fsdp:
            if not d.enabled:
                raise ValueError("fsdp=true needs several processes: launch with torchrun --nproc_per_node=N")
            from torch.distributed.fsdp import fully_shard

            for block in model.layers:
                fully_shard(block)
            fully_shard(model)
        if cfg.compile:
            model = torch.compile(model)
        if d.enabled and not cfg.fsdp:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        self.model = model
        decay = [p for p in self.raw_model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.raw_model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
            fused=(d.device.type == "cuda" and not cfg.fsdp) or None)
        self.step = 0
        self.tokens = 0
        self.last_good: Path | None = None
        self._stop_signal: int | None = None
        if self.resume_from is not None:
            self._load(self.resume_from)

    # -- helpers --
    def _barrier(self) -> None:
        if self.dist.enabled:
            torch.distributed.barrier()

    def _autocast(self):
        if not self.cfg.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)

    def _check_compatible(self, saved: dict) -> None:
        saved_model = ModelConfig.from_dict(saved["model"]).to_dict()  # fields added since then get defaults
        if saved_model != self.model_cfg.to_dict():
            diff = {k: (saved_model.get(k), v) for k, v in self.model_cfg.to_dict().items() if saved_model.get(k) != v}
            raise ValueError(f"--resume: the model config differs from the checkpoint's (field: (saved, now)) "
                             f"{diff}; use the same model section or another out_dir")
        for k in ("seed", "batch_size", "seq_len"):
            if saved["train"].get(k) != getattr(self.cfg, k):
                raise ValueError(f"--resume: {k}={getattr(self.cfg, k)} but the checkpoint was trained with "
                                 f"{k}={saved['train'].get(k)}; keep it the same to continue the same data order")
        if saved.get("tokenizer_sha256") != self.data.manifest["tokenizer_sha256"]:
            raise ValueError("--resume: the data's tokenizer differs from the one the checkpoint was trained with; "
                             f"use data_dir={saved['train'].get('data_dir')!r} or another out_dir")

    def _state_dicts(self) -> tuple[dict, dict]:
        """Full (unsharded) model and optimizer state dicts keyed by parameter name, on CPU (collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(self.raw_model, self.optimizer, options=opts)

    def save(self) -> Path:
        """Write a checkpoint of the current step atomically; returns its folder (all ranks take part)."""
        from safetensors.torch import save_file

        model_sd, optim_sd = self._state_dicts()
        final = self.out / CHECKPOINTS / f"step-{self.step:07d}"
        if self.dist.main:
            tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in model_sd.items()}, str(tmp / "model.safetensors"))
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save({"optimizer": optim_sd, "rng": rng}, tmp / "trainer_state.pt")
            (tmp / "config.json").write_text(json.dumps({
                "model": self.model_cfg.to_dict(), "train": self.cfg.to_dict(),
                "data_dir": str(self.data_dir), "tokenizer_sha256": self.data.manifest["tokenizer_sha256"],
            }, indent=2) + "\n")
            shutil.copyfile(self.data.dir / self.data.manifest["tokenizer"], tmp / "tokenizer.json")
            # data position: batches are a function of (seed, step), so the step is the whole position
            (tmp / "state.json").write_text(json.dumps({
                "step": self.step, "tokens": self.tokens, "seed": self.cfg.seed, "world_size": self.dist.world,
                "data_position": {"seed": self.cfg.seed, "next_step": self.step},
                "time": time.time()}, indent=2) + "\n")
            old = None
            if final.exists():  # same step written twice: move the old one aside, never delete it first
                old = final.with_name(final.name + f".old{os.getpid()}")
                os.replace(final, old)
            os.replace(tmp, final)
            _write_atomic(final.parent / "latest", final.name + "\n")
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            keep = sorted(p for p in final.parent.glob("step-*") if "." not in p.name)
            for p in keep[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(p, ignore_errors=True)
        self._barrier()
        self.last_good = final
        return final

    def _load(self, path: Path) -> None:
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        model_sd = load_file(str(path / "model.safetensors"))
        extra = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
        set_state_dict(self.raw_model, self.optimizer, model_state_dict=model_sd,
                       optim_state_dict=extra["optimizer"], options=StateDictOptions(full_state_dict=True))
        torch.set_rng_state(extra["rng"]["torch"])
        if "cuda" in extra["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(extra["rng"]["cuda"])
        state = json.loads((path / "state.json").read_text())
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.last_good = path

    # -- one optimizer step --
    def forward_backward(self, step: int) -> torch.Tensor:
        """Accumulate gradients of the global batch of ``step`` (this process's rows); returns the mean loss over
        the global batch (all-reduced)."""
        cfg, d = self.cfg, self.dist
        total = torch.zeros((), device=d.device)
        for m in range(cfg.grad_accum):
            start = (m * d.world + d.rank) * self.micro
            x, y = self.sampler.batch(step, rows=slice(start, start + self.micro))
            x = torch.from_numpy(x).to(d.device, non_blocking=True)
            y = torch.from_numpy(y).to(d.device, non_blocking=True)
            last = m == cfg.grad_accum - 1
            if cfg.fsdp:
                self.model.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext()
            elif d.enabled and not last:
                sync = self.model.no_sync()
            else:
                sync = contextlib.nullcontext()
            with sync:
                with self._autocast():
                    loss = self.model(x, targets=y).loss / cfg.grad_accum
                loss.backward()
            total += loss.detach()
        return _all_reduce(total, d) / d.world

    def grad_norm(self) -> torch.Tensor:
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        # max_norm=inf measures without changing the gradients
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean next-token loss per val domain on fixed, evenly spaced windows (same windows every time)."""
        cfg, d = self.cfg, self.dist
        global_bs = cfg.eval_batch_size or cfg.batch_size // cfg.grad_accum
        bs = math.ceil(global_bs / d.world)  # this process's share of each eval batch
        self.model.eval()
        out = {}
        for domain in self.data.domains("val"):
            toks = self.data.tokens("val", domain)
            starts = eval_windows(toks, cfg.seq_len, count=cfg.eval_iters * global_bs)  # same for any world size
            if len(starts) == 0:
                continue
            sums = torch.zeros(2, dtype=torch.float64, device=d.device)
            mine = starts[d.rank:: d.world]
            n_batches = math.ceil(len(starts) / (d.world * bs))  # equal on all ranks (FSDP needs that)
            for b in range(n_batches):
                chunk = mine[b * bs: (b + 1) * bs]
                weight = 1.0 if len(chunk) else 0.0
                if len(chunk) == 0:
                    chunk = starts[:1]
                x = torch.from_numpy(np.stack([toks[s: s + cfg.seq_len] for s in chunk]).astype(np.int64))
                y = torch.from_numpy(np.stack([toks[s + 1: s + cfg.seq_len + 1] for s in chunk]).astype(np.int64))
                with self._autocast():
                    loss = self.model(x.to(d.device), targets=y.to(d.device)).loss.double()
                sums[0] += weight * loss * y.numel()
                sums[1] += weight * y.numel()
            _all_reduce(sums, d)
            out[domain] = float(sums[0] / sums[1])
        self.model.train()
        return out

    def _replica_diff(self) -> float | None:
        """Max over parameters of |sum on rank r - sum on rank 0| (DDP replicas must stay identical)."""
        if not self.dist.enabled or self.cfg.fsdp:
            return None
        sums = torch.stack([p.detach().double().sum() for p in self.raw_model.parameters()])
        gathered = [torch.empty_like(sums) for _ in range(self.dist.world)]
        torch.distributed.all_gather(gathered, sums)
        return float(max((g - gathered[0]).abs().max() for g in gathered))

    # -- the loop --
    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self._stop_signal = signum
        if self.dist.main:
            print(f"\nreceived {signal.Signals(signum).name}: finishing step {self.step + 1}, then saving a "
                  "checkpoint (Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def _metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def _log(self, rec: dict) -> None:
        if self.dist.main:
            with self._metrics_path().open("a") as fh:
                fh.write(json.dumps(rec) + "\n")

    def run(self) -> dict:
        cfg, d = self.cfg, self.dist
        total = cfg.total_steps
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            mp = self._metrics_path()
            if self.resume_from is None:
                mp.unlink(missing_ok=True)
            elif mp.exists():  # drop what was logged after the checkpoint (the resumed run logs it again)
                keep = [ln for ln in mp.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= self.step]
                _write_atomic(mp, "".join(ln + "\n" for ln in keep))
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        bar = None
        if d.main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        result: dict[str, Any] = {"out_dir": str(self.out), "interrupted": False}
        val: dict[str, float] = {}
        loss_v = float("nan")
        t_run, tok_run = time.time(), 0
        try:
            if d.main and self.step == 0:
                n_params = self.raw_model.num_parameters()
                print(f"model {self.model_cfg.ffn}/{self.model_cfg.attention}: {n_params / 1e6:.2f} M params; "
                      f"{total} steps x {cfg.tokens_per_step} tokens; {d.world} process(es) on {d.device}; "
                      f"micro-batch {self.micro} x {cfg.grad_accum} accumulation", file=sys.stderr)
            self.model.train()
            while self.step < total:
                t0 = time.time()
                step = self.step
                lr = lr_at(cfg, step)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                loss = self.forward_backward(step)
                norm = self.grad_norm()
                loss_v, norm_v = float(loss), float(norm)
                if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
                    what = f"loss={loss_v}" if not math.isfinite(loss_v) else f"gradient norm={norm_v}"
                    raise TrainingDiverged(
                        f"{what} at step {step + 1} (lr={lr:.3g}); stopped without saving this step. Last good "
                        f"checkpoint: {self.last_good or 'none yet'}. Try a lower lr, a longer warmup, or grad_clip.",
                        step + 1)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.tokens += cfg.tokens_per_step
                if d.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.time() - t0
                tok_run += cfg.tokens_per_step
                tps = cfg.tokens_per_step / max(dt, 1e-9)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_v:.4f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}")
                last = self.step == total
                if self.step % cfg.log_interval == 0 or last or self.step == 1:
                    rec = {"kind": "train", "step": self.step, "loss": loss_v, "lr": lr, "grad_norm": norm_v,
                           "tokens": self.tokens, "tokens_per_s": tps, "elapsed_s": time.time() - t_run}
                    rec.update(self.raw_model.sparsity_stats())
                    diff = self._replica_diff()
                    if diff is not None:
                        rec["replica_param_diff"] = diff
                    self._log(rec)
                if self.step % cfg.eval_interval == 0 or last:
                    val = self.evaluate()
                    if val:
                        rec = {"kind": "eval", "step": self.step, "val_loss": val,
                               "val_ppl": {k: math.exp(min(v, 50.0)) for k, v in val.items()},
                               "val_loss_mean": sum(val.values()) / len(val)}
                        self._log(rec)
                        if bar is not None:
                            bar.write(f"step {self.step}: val loss " +
                                      ", ".join(f"{k} {v:.3f}" for k, v in val.items()))
                stop = self._stop_signal is not None or (cfg.stop_after is not None and self.step >= cfg.stop_after)
                if d.enabled:
                    stop = bool(_all_reduce(torch.tensor(float(stop), device=d.device), d).item() > 0)
                if self.step % cfg.checkpoint_interval == 0 or last or stop:
                    self.save()
                if stop and not last:
                    result["interrupted"] = True
                    if d.main:
                        why = (signal.Signals(self._stop_signal).name if self._stop_signal is not None
                               else f"stop_after={cfg.stop_after}")
                        print(f"stopped at step {self.step} ({why}); checkpoint {self.last_good}; continue with "
                              "--resume", file=sys.stderr)
                    break
        finally:
            if bar is not None:
                bar.close()
            for sig, h in handlers.items():
                signal.signal(sig, h)
        elapsed = time.time() - t_run
        result.update({"step": self.step, "tokens": self.tokens, "train_loss": loss_v, "val_loss": val,
                       "tokens_per_s": tok_run / max(elapsed, 1e-9), "checkpoint": str(self.last_good),
                       "model_config": self.model_cfg.to_dict()})
        return result

    def close(self) -> None:
        _close_group(self.dist)


def _close_group(dist: Dist) -> None:
    if dist.owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train (or resume) a run; returns final metrics: step, tokens, train_loss, val_loss per domain, tokens_per_s,
    checkpoint (folder of the last checkpoint), out_dir, interrupted. Raises ``TrainingDiverged`` on NaN/inf."""
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.run()
    finally:
        trainer.close()


# ---- command line --------------------------------------------------------------------------------------------------
def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML/JSON: a model: section plus TrainConfig fields")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="TrainConfig fields (lr=1e-3 max_steps=500) and model fields (model.d_model=192, "
                        "model=small-spark)")


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_train_config(args.config, args.overrides)
    try:
        res = train(cfg, resume=args.resume)
    except TrainingDiverged as e:
        print(f"sparkformer train: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: res[k] for k in ("step", "tokens", "train_loss", "val_loss", "tokens_per_s",
                                              "checkpoint", "interrupted")}))
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("train", help="pretrain a model on prepared token files (torchrun for several processes)",
                              description=__doc__.splitlines()[0])
    _add_arguments(p)
    p.set_defaults(func=_cmd_train)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparkformer.train", description=__doc__.splitlines()[0])
    _add_arguments(p)
    args = p.parse_args(argv)
    try:
        return _cmd_train(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"sparkformer train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
