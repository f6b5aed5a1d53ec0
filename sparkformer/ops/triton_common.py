"""Shared pieces of the Triton decode kernels: the import guard and small device functions.

Triton is optional (``pip install sparkformer[gpu]``). With ``TRITON_INTERPRET=1`` set before this module is
imported, every kernel runs on CPU tensors through Triton's interpreter, which is how the tests check them on
machines without a GPU. The interpreter has no bf16 scalar constants, so kernels upcast loads to fp32 first.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["ACT_IDS", "HAS_TRITON", "INTERPRET", "available", "next_pow2", "triton", "tl"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ACT_IDS = {"gelu_tanh": 0, "silu": 1}  # FFN activations the kernels implement


def _patch_interpreter_index() -> None:
    """Triton's interpreter turns a scalar into a Python int with ``int(array_of_shape_(1,))``, which numpy >= 2.4
    refuses (so ``range(0, n, BLOCK)`` over a runtime ``n`` fails); re-set that hook to take the one element."""
    try:
        from triton.runtime import interpreter as _interp
    except ImportError:  # pragma: no cover
        return
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_sparkformer", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._sparkformer = True
    _interp._patch_lang_tensor = patched


if HAS_TRITON and INTERPRET:
    _patch_interpreter_index()


def available(device: str | None = None) -> bool:
    """True when the Triton kernels can run on tensors of ``device`` ("cuda", or "cpu" under the interpreter)."""
    if not HAS_TRITON:
        return False
    if device is None or str(device).startswith("cuda"):
        import torch

        return torch.cuda.is_available() or (device is None and INTERPRET)
    return INTERPRET


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


if HAS_TRITON:

    @triton.jit
    def tanh_f32(x):
        # tl has no tanh: 1 - 2 / (exp(2x) + 1) is exact enough in fp32 and saturates cleanly at +-1
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def gelu_tanh_f32(x):
        # F.gelu(x, approximate="tanh")
        return 0.5 * x * (1.0 + tanh_f32(0.7978845608028654 * (x + 0.044715 * x * x * x)))

    @triton.jit
    def softplus_f32(x):
        # max(x, 0) + log1p(exp(-|x|)); log1p(u) = log(1 + u) * u / ((1 + u) - 1) keeps small u exact
        u = tl.exp(-tl.abs(x))
        w = 1.0 + u
        l1p = tl.where(w == 1.0, u, tl.log(w) * u / (w - 1.0))
        return tl.maximum(x, 0.0) + l1p

    @triton.jit
    def act_f32(x, ACT: tl.constexpr):
        """The FFN activation: 0 = gelu_tanh, 1 = silu."""
        if ACT == 0:
            return gelu_tanh_f32(x)
        else:
            return x / (1.0 + tl.exp(-x))
