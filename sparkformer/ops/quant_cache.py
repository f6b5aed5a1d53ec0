"""On-disk cache of quantized matrices: an engine build quantizes each weight matrix once per machine, not once per run.

A quantized matrix is stored under ``sparkformer.paths.cache_dir("quant")`` by a key over what determines it: the
format, the quantizer's version tag, the float matrix's dtype, shape and bytes (so a different model, a changed
checkpoint or a new quantizer never hits a stale entry). Hashing reads the float weights once (~1 GB/s), which is
far cheaper than the error-minimising quantizers (seconds per large matrix). Entries are written atomically (temp
file + rename); an unreadable entry is quantized again and overwritten.

It serves ``ops.quant.quantize`` while ``caching()`` is active (the engine build, ``decode.make_engine``): tools that
quantize once and throw the result away (the quality benchmark's sensitivity sweeps) do not fill the disk.
``SPARKFORMER_QUANT_CACHE=0`` turns the cache off; entries can be deleted at any time (``rm -r <cache>/quant``).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from sparkformer.paths import cache_dir


_ACTIVE = contextvars.ContextVar("sparkformer_quant_cache", default=False)


def enabled() -> bool:
    return os.environ.get("SPARKFORMER_QUANT_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def active() -> bool:
    """Whether ``quantize`` should go through the cache now (inside ``caching()``, and the cache not turned off)."""
    return _ACTIVE.get() and enabled()


@contextlib.contextmanager
def caching():
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def matrix_key(w: torch.Tensor, fmt: str, version: str) -> str:
    """The cache key of quantizing ``w`` to ``fmt`` with quantizer ``version``."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{fmt}|{version}|{w.dtype}|{tuple(w.shape)}".encode())
    data = w.detach().contiguous().cpu()
    h.update(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
    return h.hexdigest()


def cached_rows(w: torch.Tensor, fmt: str, version: str, quantize: Callable[[], torch.Tensor],
                folder: Path | None = None) -> torch.Tensor:
    """The quantized rows (uint8) of ``w`` in ``fmt``: from the cache, or ``quantize()`` then stored."""
    if not enabled():
        return quantize()
    folder = folder or cache_dir("quant", fmt)
    path = folder / f"{matrix_key(w, fmt, version)}.safetensors"
    if path.exists():
        try:
            rows = load_file(path)["rows"]
            if rows.dtype == torch.uint8 and rows.shape[0] == w.shape[0]:
                return rows
        except Exception:  # noqa: BLE001 -- any damaged entry (truncated, foreign bytes) is rebuilt below
            pass
    rows = quantize()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        save_file({"rows": rows.contiguous()}, tmp)
        os.replace(tmp, path)
    except OSError:  # a full or read-only cache costs speed, never the build
        tmp.unlink(missing_ok=True)
    return rows
