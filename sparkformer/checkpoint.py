"""Checkpoint folders of a training run: find the newest complete one, load a model from it, write files atomically.

A run folder holds ``checkpoints/step-NNNNNNN`` folders (``model.safetensors``, ``config.json``, ``tokenizer.json``,
``trainer_state.pt``, ``state.json``) and ``checkpoints/latest`` naming the newest complete one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sparkformer.config import ModelConfig

CHECKPOINTS = "checkpoints"


def write_atomic(path: Path, text: str) -> None:
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
