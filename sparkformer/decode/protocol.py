"""The one engine protocol: what every decode engine (CPU, CUDA) offers, with the same names on every device.

    engine.prefill(ids) -> logits          the prompt from the current position; the last position's logits (fp32)
    engine.step(token) -> logits           one token at the current position
    engine.generate(prompt, n, ...)        streaming sampling loop over prefill + step (``generate_tokens``)
    engine.decode_greedy(n)                n greedy steps (each argmax feeds the next), for speed measurements
    engine.reset() / set_position(pos)     forget the sequence / move (positions below ``pos`` count as filled)
    engine.fill_cache_random(ctx, seed)    random K/V up to ``ctx`` and move there (costs what a real cache costs)
    engine.stats -> DecodeStats            achieved sparsity since the last reset; ``stats.summary()`` for reports
    engine.timers / component_times()      per-component seconds (attn_proj, attention, ffn, lm_head)
    engine.synchronize()                   wait for the device (no-op on CPU)

``Engine`` holds the parts that do not depend on the device; ``sparkformer.decode.cpu`` and
``sparkformer.decode.cuda`` implement the rest over the same decode layout (``sparkformer.decode.layout``).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from sparkformer.config import ModelConfig
from sparkformer.model import sample_next
from sparkformer.ops.quant import WEIGHT_FORMATS

ENGINE_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
COMPONENTS = ("attn_proj", "attention", "ffn", "lm_head")


# block-quantized weights (sparkformer.ops.quant), bf16 activations and cache: q8_0, q4_0, q4_1 (every matrix in the
# one format, as llama-quantize --pure) and the mixes q4_0m / q4_1m (4-bit layers, q8_0 embedding / LM head;
# ops.quant.MIXES)
QUANT_FORMATS = WEIGHT_FORMATS


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """An engine float dtype from its name (fp32, bf16) or a torch dtype; anything else is refused with the choices."""
    if isinstance(dtype, torch.dtype):
        if dtype not in ENGINE_DTYPES.values():
            raise ValueError(f"unsupported engine dtype {dtype}; supported: float32, bfloat16")
        return dtype
    if dtype not in ENGINE_DTYPES:
        raise ValueError(f"unsupported engine dtype {dtype!r}; supported: {', '.join(ENGINE_DTYPES)}, "
                         f"{', '.join(QUANT_FORMATS)}")
    return ENGINE_DTYPES[dtype]


def resolve_weights(dtype: str | torch.dtype) -> tuple[torch.dtype, str | None]:
    """(float dtype of activations and cache, quantized weight format or None) of an engine ``dtype``: fp32, bf16,
    or a quantized format (q8_0, q4_0, q4_1, the mixes q4_0m / q4_1m: bf16 activations and cache)."""
    if isinstance(dtype, str) and dtype in QUANT_FORMATS:
        return torch.bfloat16, dtype
    return resolve_dtype(dtype), None


def check_max_len(cfg: ModelConfig, max_len: int | None) -> int:
    """The sequence length an engine is built for: ``cfg.max_seq_len`` by default, never more (refused, not shrunk)."""
    max_len = cfg.max_seq_len if max_len is None else int(max_len)
    if max_len < 1:
        raise ValueError(f"max_len={max_len}: must be at least 1")
    if max_len > cfg.max_seq_len:
        raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}; lower max_len or "
                         "build the model with a larger max_seq_len")
    return max_len


@dataclass
class DecodeStats:
    """Achieved sparsity over the decoded tokens (not the targets), the same on every device."""

    tokens: int = 0
    ffn_neurons: int = 0  # neurons run, summed over sparse FFN layers (Spark and routed) and tokens
    ffn_width: int = 0  # those layers' widths, summed the same way (activity = ffn_neurons / ffn_width)
    ffn_layers: int = 0  # sparse-FFN (layer, token) pairs
    keys_kept: int = 0  # summed over heads, Spark attention layers and tokens
    key_rows: int = 0
    cap_fired: int = 0
    prefill_ffn_neurons: int = 0  # sparse Spark FFN prefill: summed over layers and prompt tokens
    prefill_ffn_rows: int = 0  # (layer, prompt token) pairs behind prefill_ffn_neurons
    ffn_gate_up_neurons: int = 0  # routed FFN: neurons whose gate/up rows were read (>= ffn_neurons with verify)
    sparse_weights_read: float = 0.0  # thresholded matrices (sparkformer.sparsity): weights read, summed over tokens
    sparse_weights: int = 0  # those matrices' weights, summed the same way

    def summary(self) -> dict:
        out = {"tokens": self.tokens}
        if self.prefill_ffn_rows:
            out["prefill_ffn_neurons_per_layer"] = self.prefill_ffn_neurons / self.prefill_ffn_rows
        if self.ffn_layers:
            out["ffn_neurons_per_layer"] = self.ffn_neurons / self.ffn_layers
            out["ffn_activity"] = self.ffn_neurons / max(1, self.ffn_width)
            if self.ffn_gate_up_neurons:
                out["ffn_gate_up_activity"] = self.ffn_gate_up_neurons / max(1, self.ffn_width)
        if self.sparse_weights:
            out["thresholded_weights_read"] = self.sparse_weights_read / self.sparse_weights
        if self.key_rows:
            out["keys_per_query"] = self.keys_kept / self.key_rows
            out["cap_fired_fraction"] = self.cap_fired / self.key_rows
        return out


class Engine(ABC):
    """Batch-1 prefill + decode over decode-layout weights and a static KV cache (see the module docstring)."""

    device_type = "cpu"
    cfg: ModelConfig
    dtype: torch.dtype
    max_len: int
    pos: int
    timers: dict[str, float] | None

    # ---- what each device implements ------------------------------------------------------------------------------
    @abstractmethod
    def step(self, token: int | torch.Tensor) -> torch.Tensor:
        """Feed one token at the current position; return the next-token logits (vocab,) in fp32."""

    @abstractmethod
    def prefill(self, ids: torch.Tensor | list[int]) -> torch.Tensor:
        """Run the prompt from the current position, fill the cache; return the last position's logits (fp32)."""

    @abstractmethod
    def fill_cache_random(self, context: int, seed: int = 0) -> None:
        """Random K/V at positions [0, context) and move there (costs the same as a real cache of that length)."""

    @property
    @abstractmethod
    def stats(self) -> DecodeStats:
        """Achieved sparsity since the last ``reset`` (on CUDA this syncs)."""

    @abstractmethod
    def _reset_stats(self) -> None: ...

    # ---- shared -----------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the sequence and the statistics (the cache is overwritten, not reallocated)."""
        self.set_position(0)
        self._reset_stats()

    def set_position(self, pos: int) -> None:
        """Move to ``pos`` (the next token is written there); positions below it are taken as filled."""
        if not 0 <= int(pos) <= self.max_len:
            raise ValueError(f"position {pos} is outside the cache [0, {self.max_len}]")
        self.pos = int(pos)

    def synchronize(self) -> None:
        """Wait for the device (a no-op on CPU): timings must call it before reading a clock."""

    def _check_room(self, n: int) -> None:
        if n < 1:
            raise ValueError("empty prompt")
        if self.pos + n > self.max_len:
            raise ValueError(f"{n} token(s) at position {self.pos} exceed the cache size {self.max_len}; build the "
                             "engine with a larger max_len or reset()")

    @torch.no_grad()
    def decode_greedy(self, n: int) -> None:
        """``n`` greedy steps from the current position, each feeding its argmax to the next."""
        tok = 1
        for _ in range(n):
            tok = int(self.step(tok).argmax())

    def component_times(self, context: int, tokens: int) -> dict[str, float]:
        """Seconds per token of each component over ``tokens`` steps from ``context`` (engines that time components
        inside a step fill ``timers``; the CUDA engine times each component as its own graph instead)."""
        self.set_position(context)
        self.timers = {}
        self.decode_greedy(tokens)
        out = {k: v / tokens for k, v in self.timers.items()}
        self.timers = None
        return out

    def bench_extras(self) -> dict:
        """Device-specific facts a benchmark records beside its timings (launch shapes, kernel checks)."""
        return {}

    def generate(self, prompt: torch.Tensor | list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 stop: Callable[[list[int]], bool] | None = None) -> Iterator[int]:
        """Yield new token ids one at a time (streaming). ``stop(tokens_so_far)`` ends early (e.g. stop strings)."""
        return generate_tokens(self, prompt, max_new_tokens, temperature, top_p, eos_token_id, generator, stop)

    def _tick(self, name: str, t0: float) -> float:
        t1 = time.perf_counter()
        self.timers[name] = self.timers.get(name, 0.0) + t1 - t0
        return t1


def generate_tokens(engine: Engine, prompt: torch.Tensor | list[int], max_new_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, eos_token_id: int | None = None, generator: torch.Generator | None = None,
                    stop: Callable[[list[int]], bool] | None = None) -> Iterator[int]:
    """The sampling loop of every engine: prefill, then sample / step until ``max_new_tokens``, EOS or ``stop``."""
    prompt = torch.as_tensor(prompt, dtype=torch.long).flatten()
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
    if engine.pos + prompt.numel() + max_new_tokens > engine.max_len:
        raise ValueError(f"prompt ({prompt.numel()}) + max_new_tokens ({max_new_tokens}) exceeds the cache size "
                         f"{engine.max_len - engine.pos}")
    return _generate_loop(engine, prompt, max_new_tokens, temperature, top_p, eos_token_id, generator, stop)


def _generate_loop(engine, prompt, max_new_tokens, temperature, top_p, eos_token_id, generator, stop):
    logits = engine.prefill(prompt)
    out: list[int] = []
    for i in range(max_new_tokens):
        if generator is not None and generator.device != logits.device:  # a CPU generator with GPU logits
            logits = logits.cpu()
        tok = int(sample_next(logits[None], temperature, top_p, generator)[0])  # the one host sync per token
        out.append(tok)
        yield tok
        if (eos_token_id is not None and tok == eos_token_id) or (stop is not None and stop(out)):
            return
        if i + 1 < max_new_tokens:
            logits = engine.step(tok)


def stop_on_strings(decode: Callable[[list[int]], str], stops: list[str]) -> Callable[[list[int]], bool]:
    """A ``stop`` callback for ``generate`` that fires when the decoded text contains any of ``stops``."""
    return lambda toks: any(s in decode(toks) for s in stops)
