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
data position) + ``checksums.json``. Each is written to a temporary folder and renamed into place;
``checkpoints/latest`` names the newest complete one (``sparkformer.checkpoint``). ``--resume`` continues from the
newest *intact* one (a damaged newer one is named in a warning and skipped), so a process killed at any moment loses
at most the steps since its last checkpoint, and the resumed run ends bit-identical to an uninterrupted one. One
training process at a time holds a run folder (``checkpoint.RunLock``): a second is refused, naming the first's pid.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparkformer.config import ModelConfig, read_json
from sparkformer.checkpoint import (CHECKPOINTS, CheckpointDamaged, RunLock, RunLocked, clean_partial,
                                    commit_checkpoint, intact_checkpoint, latest_checkpoint, load_safetensors,
                                    load_trainer_state, remove_tree, write_atomic)
from sparkformer.data import BatchSampler, TokenData, default_data_dir, eval_windows, prepare
from sparkformer.distributed import Dist, all_reduce, init_distributed
from sparkformer.train_config import TrainConfig, TrainingDiverged, load_train_config, lr_at, resolve_model_config

# ---- the trainer ---------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        cfg.validate()
        self.cfg = cfg
        self.dist = init_distributed(cfg.device)
        self.lock: RunLock | None = None
        self.out = Path(cfg.out_dir).expanduser()
        created = not self.out.exists()
        try:
            self._take_lock()
            self._setup(resume)
        except BaseException:
            self._release_lock()
            if created and self.dist.main and self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()  # a refused run leaves nothing behind
            _close_group(self.dist)
            raise

    def _take_lock(self) -> None:
        """Rank 0 locks the run folder; every rank fails when it cannot."""
        err = None
        if self.dist.main:
            try:
                self.lock = RunLock(self.out).acquire()
            except RunLocked as e:
                err = e
        if self.dist.enabled:
            failed = all_reduce(torch.tensor(float(err is not None), device=self.dist.device), self.dist).item() > 0
            if failed and err is None:
                raise RunLocked(f"{self.out} is in use by another training process (rank 0 says which)")
        if err is not None:
            raise err

    def _release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _setup(self, resume: bool) -> None:
        cfg, d = self.cfg, self.dist
        if cfg.batch_size % (cfg.grad_accum * d.world):
            raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of grad_accum*processes = "
                             f"{cfg.grad_accum}*{d.world}; change batch_size or grad_accum")
        self.micro = cfg.batch_size // (cfg.grad_accum * d.world)

        # data (rank 0 prepares the default corpus if needed; the others wait)
        if cfg.data_dir is None:
            if d.main:
                prepare(quiet=not cfg.progress)
            self._barrier()
            self.data_dir = default_data_dir()
        else:
            self.data_dir = Path(cfg.data_dir).expanduser()
        self.data = TokenData(self.data_dir)
        if d.main and not self.data.domains("val"):
            print(f"warning: {self.data_dir} has no validation tokens; val_loss stays empty (prepare the data with "
                  "--val-fraction > 0 and more than one document per domain)", file=sys.stderr)
        self.model_cfg = resolve_model_config(cfg.model, self.data.vocab_size, cfg.seq_len)
        self.sampler = BatchSampler(self.data, cfg.seq_len, cfg.batch_size, cfg.seed)

        # resume or fresh start (under the lock: what killed writers left half-done goes first)
        if d.main:
            clean_partial(self.out)
        self._barrier()
        self.resume_from = None
        if resume:
            try:
                self.resume_from = intact_checkpoint(self.out, warn=print_main if d.main else None)
            except CheckpointDamaged as e:
                raise CheckpointDamaged(f"--resume: {e}; start afresh with overwrite=true or choose another "
                                        "out_dir") from None
        if resume and self.resume_from is None and d.main:
            print(f"--resume: no checkpoint in {self.out}, starting from step 0", file=sys.stderr)
        if not resume and latest_checkpoint(self.out) is not None:
            if not cfg.overwrite:
                raise ValueError(f"{self.out} already has checkpoints; pass --resume to continue that run, "
                                 "overwrite=true to start afresh there, or choose another out_dir")
            if d.main:  # afresh: the old run's checkpoints go, so the two runs never mix
                for p in sorted((self.out / CHECKPOINTS).glob("step-*")):
                    remove_tree(p)
                (self.out / CHECKPOINTS / "latest").unlink(missing_ok=True)
            self._barrier()
        if self.resume_from is not None:
            self._check_compatible(read_json(self.resume_from / "config.json"))

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
            tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")  # sealed and renamed by commit_checkpoint
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
            commit_checkpoint(tmp, final, self.cfg.keep_checkpoints)
        self._barrier()
        self.last_good = final
        return final

    def _load(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        model_sd = load_safetensors(path / "model.safetensors")
        extra = load_trainer_state(path / "trainer_state.pt")
        set_state_dict(self.raw_model, self.optimizer, model_state_dict=model_sd,
                       optim_state_dict=extra["optimizer"], options=StateDictOptions(full_state_dict=True))
        torch.set_rng_state(extra["rng"]["torch"])
        if "cuda" in extra["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(extra["rng"]["cuda"])
        state = read_json(path / "state.json")
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.last_good = path
        if self.dist.main:
            print(f"--resume: continuing from step {self.step} ({path})", file=sys.stderr)

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
        return all_reduce(total, d) / d.world

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
            all_reduce(sums, d)
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
                write_atomic(mp, "".join(ln + "\n" for ln in _records_up_to(mp, self.step)))
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
        result: dict[str, Any] = {"out_dir": str(self.out), "interrupted": False,
                                  "resumed_from": self.step if self.resume_from is not None else None}
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
                    stop = bool(all_reduce(torch.tensor(float(stop), device=d.device), d).item() > 0)
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
        self._release_lock()
        _close_group(self.dist)


def print_main(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _records_up_to(path: Path, step: int) -> list[str]:
    """The lines of metrics.jsonl up to ``step``; a line cut short by a killed process is dropped."""
    keep = []
    for ln in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep.append(ln)
    return keep


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
                                              "checkpoint", "interrupted", "resumed_from")}))
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
