"""Batch-1 decoding: one engine protocol, one model -> decode-layout conversion, a CPU and a CUDA engine.

    from sparkformer.decode import make_engine
    engine = make_engine(model, dtype="bf16", device="cpu", routers=None)     # model: a SparkLM
    for tok in engine.generate(ids, max_new_tokens=64, temperature=0.8, top_p=0.95): ...

| module | what it is |
|---|---|
| ``protocol`` | ``Engine`` (prefill, step, generate, decode_greedy, reset, set_position, fill_cache_random, stats, ...), ``DecodeStats``, the sampling loop |
| ``layout`` | ``model_layout`` / ``random_layout``: the one conversion to decode layout (``ModelLayout``, ``DecodeLayer``) |
| ``routed`` | routed (sparkified) FFN layers: the router protocol, attach, decode |
| ``sparse`` | thresholded (sparsified) input sites: transposed, optionally quantized rows |
| ``cpu`` | ``CpuEngine``: fused C++ kernels (``sparkformer.ops``), sparse Spark prefill |
| ``fused`` | the whole CPU decode step as one C++ call (``DecodePlan``), with the Python step as its reference |
| ``pages`` | decode weights packed onto transparent huge pages |
| ``cuda`` | ``CudaEngine``: Triton kernels, one CUDA graph per token (imported only for ``device="cuda"``) |
"""

from __future__ import annotations

import torch

from sparkformer.config import ModelConfig
from sparkformer.decode.cpu import IMPLS, CpuEngine
from sparkformer.decode.layout import DecodeLayer, ModelLayout, model_layout, quantize_layout, random_layout
from sparkformer.decode.protocol import QUANT_FORMATS, DecodeStats, Engine, generate_tokens, resolve_dtype, \
    resolve_weights, stop_on_strings
from sparkformer.ops.quant_cache import caching

DEVICE_OPTIONS = {"cpu": ("impl",), "cuda": ("graph", "track_stats")}


def check_device(device: str | torch.device) -> str:
    """The engine kind ("cpu" | "cuda") for ``device``, or a clear error (unknown device, no GPU, no triton)."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if kind not in DEVICE_OPTIONS:
        raise ValueError(f"no decode engine for device {device!r}; use cpu, cuda or cuda:N")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} needs a CUDA GPU, and none is visible; use device='cpu'")
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise ValueError("the CUDA engine needs triton: pip install 'sparkformer[gpu]'")
    return kind


def _check_options(kind: str, options: dict) -> dict:
    """Every option is passed on to the engine that uses it, or refused: nothing is silently dropped."""
    given = {k: v for k, v in options.items() if v is not None}
    wrong = sorted(set(given) - set(DEVICE_OPTIONS[kind]))
    if wrong:
        other = {k for dev, keys in DEVICE_OPTIONS.items() if dev != kind for k in keys}
        raise ValueError(f"option(s) {wrong} do not apply to the {kind} engine"
                         + (" (they are for another device's engine)" if set(wrong) <= other else "")
                         + f"; the {kind} engine takes: {', '.join(DEVICE_OPTIONS[kind])}")
    return given


def _build(layout: ModelLayout, max_len: int | None, kind: str, device, options: dict, fmt: str | None) -> Engine:
    if fmt is not None:
        if kind == "cuda":
            raise ValueError(f"{fmt} weights run on the CPU engine; the CUDA engine takes fp32 or bf16")
        with caching():  # each matrix quantized once per machine (sparkformer.ops.quant_cache)
            layout = quantize_layout(layout, fmt)
    if kind == "cuda":
        from sparkformer.decode.cuda import CudaEngine  # lazy: CPU-only installs never import triton

        return CudaEngine(layout, max_len, device=device, **options)
    return CpuEngine(layout, max_len, **options)


def make_engine(model, dtype: str | torch.dtype = torch.float32, max_len: int | None = None,
                device: str | torch.device = "cpu", routers=None, *, sparsity=None, impl: str | None = None,
                graph: bool | None = None, track_stats: bool | None = None) -> Engine:
    """The decode engine for ``model`` (a ``SparkLM``) on ``device``: ``CpuEngine`` on CPU, ``CudaEngine`` (Triton
    kernels + CUDA graphs) on CUDA, both behind the ``Engine`` protocol.

    ``routers``: per-layer routers for dense gated FFN layers (see ``sparkformer.decode.routed``), on every device.
    ``sparsity``: a ``sparkformer.sparsity.SparseSpec`` (thresholded input sites, ``sparkformer.decode.sparse``), CPU.
    ``dtype``: fp32, bf16, or block-quantized weights q8_0 / q4_0 / q4_0m (the mix: q4_0 layers, q8_0 embedding
    and LM head) (CPU; quantized once here, bf16 activations).
    Device options: ``impl`` (CPU: auto | ext | torch | reference), ``graph`` and ``track_stats`` (CUDA). An option
    the chosen engine does not take is refused, never ignored."""
    kind = check_device(device)
    options = _check_options(kind, {"impl": impl, "graph": graph, "track_stats": track_stats})
    float_dtype, fmt = resolve_weights(dtype)
    if sparsity is not None and kind == "cuda":
        raise ValueError("thresholded (sparsified) layers run on the CPU engine; use --device cpu")
    # quantized formats are quantized from fp32 weights (then the float copy is dropped), not from a bf16 rounding
    layout = model_layout(model, torch.float32 if fmt is not None else float_dtype, routers, sparsity)
    return _build(layout, max_len, kind, device, options, fmt)


def make_random_engine(cfg: ModelConfig, dtype: str | torch.dtype = torch.float32, max_len: int | None = None,
                       device: str | torch.device = "cpu", seed: int = 0, share: Engine | None = None, *,
                       impl: str | None = None, graph: bool | None = None,
                       track_stats: bool | None = None) -> Engine:
    """An engine over full-size random weights made directly in decode layout on the device (speed benchmarks).
    ``share``: reuse that engine's embedding / LM head and attention projections (same shapes)."""
    kind = check_device(device)
    options = _check_options(kind, {"impl": impl, "graph": graph, "track_stats": track_stats})
    float_dtype, fmt = resolve_weights(dtype)
    shared = None if share is None else ModelLayout(share.cfg, share.embed, share.head, share.final_norm,
                                                    share.layers, share.dtype)
    layout = random_layout(cfg, float_dtype, seed, shared, device)
    return _build(layout, max_len, kind, device, options, fmt)


__all__ = ["CpuEngine", "DecodeLayer", "DecodeStats", "Engine", "IMPLS", "ModelLayout", "QUANT_FORMATS", "check_device",
           "generate_tokens", "make_engine", "make_random_engine", "model_layout", "quantize_layout", "random_layout",
           "resolve_dtype", "resolve_weights", "stop_on_strings"]
