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

__all__ = ["ACT_IDS", "HAS_PDL", "HAS_TRITON", "INTERPRET", "available", "cuda_graph_us", "launch_opts", "next_pow2",
           "pow2_pieces", "triton", "tl"]

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


def pow2_pieces(width: int) -> tuple[int, int]:
    """(a, b): a width as a power of two plus a smaller one (b = 0 if none), so a row segment is loaded as two
    exact tiles instead of one padded to the next power of two (2304 = 2048 + 256, 1280 = 1024 + 256)."""
    a = 1 << (max(1, int(width)).bit_length() - 1)
    return a, (next_pow2(width - a) if width > a else 0)


# Programmatic dependent launch (Hopper+): the next kernel launches while this one drains and waits in
# ``gdc_wait`` for its results. Inline PTX, so never under the interpreter; off unless a plan asks for it.
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_PDL = HAS_TRITON and not INTERPRET
except ImportError:  # pragma: no cover - older triton
    HAS_PDL = False
    gdc_wait = gdc_launch_dependents = None


def launch_opts(warps: int, pdl: bool) -> dict:
    """Launch keyword arguments: ``launch_pdl`` only where it exists and was asked for."""
    return dict(num_warps=warps, launch_pdl=True) if pdl and HAS_PDL else dict(num_warps=warps)


def cuda_graph_us(fn, reps: int = 20, repeats: int = 3) -> float:
    """Microseconds per replay of a CUDA graph of ``fn`` (median of ``repeats`` runs of ``reps`` replays).

    Launch shapes are picked with this, not with eager launches: eager timing adds the host's launch cost to
    every program count alike and so favours fewer, longer programs, which is the wrong choice inside a graph."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # compile + warm outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    times = []
    for _ in range(repeats):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(reps):
            g.replay()
        t1.record()
        torch.cuda.synchronize()
        times.append(t0.elapsed_time(t1) * 1e3 / reps)
    del g
    return sorted(times)[len(times) // 2]


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
    def wait_prior(PDL: tl.constexpr):
        """With programmatic dependent launch: block until the previous kernel's writes are visible."""
        if PDL:
            gdc_wait()

    @triton.jit
    def release_dependents(PDL: tl.constexpr):
        """With programmatic dependent launch: let the next kernel start launching (its gdc_wait still waits)."""
        if PDL:
            gdc_launch_dependents()

    @triton.jit
    def ticket(ptr, n_arrivals):
        """Count this program's arrival at a per-group ticket; True for the last of ``n_arrivals``, which also resets
        the ticket to 0 (so the next call, or the next graph replay, starts clean: no memset launch).

        The CTA barrier orders every thread's stores before the (acq_rel, gpu-scope) atomic, so the last arriver sees
        the others' stores. Programs never wait on each other, so this also runs under the interpreter, which runs
        programs one after another."""
        tl.debug_barrier()
        last = tl.atomic_add(ptr, 1, sem="acq_rel") == n_arrivals - 1
        if last:
            tl.store(ptr, 0)
        return last

    @triton.jit
    def act_f32(x, ACT: tl.constexpr):
        """The FFN activation: 0 = gelu_tanh, 1 = silu."""
        if ACT == 0:
            return gelu_tanh_f32(x)
        else:
            return x / (1.0 + tl.exp(-x))
