"""Compile the decode kernels for a GPU without one: the device run must not be the first compiler to see them.

The interpreter (TRITON_INTERPRET=1) runs kernels as numpy code, so it accepts things the compiler rejects (a
re-assigned constexpr in an unrolled loop, mismatched types across the branches of a runtime ``if``). This module
runs the real launch code of the plans and glue functions on ``meta`` tensors (no memory, any size) with the
launches recorded instead of executed, then compiles each distinct launch with ``triton.compile`` for a target
such as sm_90, through ptxas (shipped with triton's CUDA backend): every kernel at the exact constexprs the
engine would use at the gemma2-2b shape.

    python -m sparkformer.ops.triton_aot            # (not under TRITON_INTERPRET) compiles all, prints one line each

Integer arguments are compiled unspecialised (the device also specialises multiples of 16 and 1s): a check that
everything compiles, not the exact binary the device will run.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import torch

from sparkformer.ops.triton_common import INTERPRET, triton

__all__ = ["compile_recorded", "decode_launches", "record_launches"]

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int32: "*i32",
        torch.int64: "*i64", torch.int8: "*i8", torch.uint8: "*u8", torch.bool: "*i1"}
_OPTIONS = ("num_warps", "num_stages", "launch_pdl", "num_ctas")


@contextlib.contextmanager
def record_launches():
    """Within the block, ``kernel[grid](...)`` appends (kernel, bound arguments, options) to the yielded list and
    launches nothing."""
    from triton.runtime.jit import JITFunction

    if INTERPRET:
        raise RuntimeError("recording needs compiled (not interpreted) kernels: unset TRITON_INTERPRET")
    seen: list = []
    orig = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        opts = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTIONS}
        bound = dict(zip(self.arg_names, args))
        bound.update(kwargs)
        seen.append((self, bound, opts))

    JITFunction.run = run
    try:
        yield seen
    finally:
        JITFunction.run = orig


def _arg_type(v):
    if isinstance(v, torch.Tensor):
        return _PTR[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -(2**31) <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    return None


def _resources(cubin: bytes | None) -> dict:
    """Registers per thread and stack/local bytes (spills) of a cubin, by cuobjdump when it is at hand."""
    import os
    import re
    import shutil
    import subprocess
    import tempfile

    try:
        import triton.backends.nvidia as nv

        tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    except ImportError:  # pragma: no cover
        tool = None
    tool = tool if tool and os.path.exists(tool) else shutil.which("cuobjdump")
    if not cubin or not tool:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    return {"regs": int(m[1]), "stack": int(m[2]), "local": int(m[3])} if m else {}


def compile_recorded(launches: list, arch: int = 90) -> list[dict]:
    """Compile each distinct recorded launch for CUDA sm_<arch>; one result dict per kernel variant."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    done, out = set(), []
    for fn, bound, opts in launches:
        sig, const = {}, {}
        for name in fn.arg_names:
            v = bound[name]
            t = None if fn.arg_names.index(name) in fn.constexprs else _arg_type(v)
            if t is None:
                sig[name], const[name] = "constexpr", v
            else:
                sig[name] = t
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, repr(v)) for k, v in const.items())),
               tuple(sorted(opts.items())))
        if key in done:
            continue
        done.add(key)
        rec = {"kernel": fn.__name__, "constexprs": {k: v for k, v in const.items() if v is not None}, **opts}
        t0 = time.perf_counter()
        try:
            k = triton.compile(ASTSource(fn, sig, const), target=target, options=opts)
            rec.update(ok=True, shared_bytes=getattr(k.metadata, "shared", None), **_resources(k.asm.get("cubin")))
        except Exception as e:  # noqa: BLE001 - report every failure, then keep compiling the rest
            rec.update(ok=False, error=f"{type(e).__name__}: {e}"[-2000:])
        rec["s"] = round(time.perf_counter() - t0, 2)
        out.append(rec)
    return out


def decode_launches(preset: str = "gemma2-2b", context: int = 4096) -> list:
    """The launches of every decode kernel variant at a preset's shape (meta tensors, nothing runs)."""
    from sparkformer.config import get_preset
    from sparkformer.ops.triton_decode import (DenseAttnPlan, embed_norm, geglu_act, res_norm_gemv, residual_norm,
                                               rope_cache)
    from sparkformer.ops.triton_spark_attn import SparkAttnPlan
    from sparkformer.ops.triton_spark_ffn import SparkFFNPlan

    cfg = get_preset(preset)
    meta, bf, f32 = torch.device("meta"), torch.bfloat16, torch.float32
    d, n, r, m = cfg.d_model, cfg.spark_ffn_dim, cfg.spark_ffn_rank, cfg.ffn_dim
    H, KV, hd, ra, k = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.spark_attn_rank, cfg.spark_attn_topk
    L = -(-(context + 64) // 64) * 64
    e = lambda *s, dt=bf: torch.empty(*s, dtype=dt, device=meta)  # noqa: E731
    k1, k2, v = e(n, r), e(n, d - r), e(n, d)
    ln = e(1, dt=torch.int32)
    kp, krv = e(KV, L // 64, ra, 64), e(KV, L, 2 * hd - ra)
    with record_launches() as seen:
        for kw in [*SparkFFNPlan.CANDIDATES, dict(pdl=True), dict(batch=4), dict(batch=4, atomic=False),
                   dict(batch=8, block_c=64)]:
            plan = SparkFFNPlan.for_weights(k1, k2, v, cfg.spark_ffn_fraction, **kw)
            plan.pdl = kw.get("pdl", False)  # __post_init__ turns PDL off off-CUDA; the compile wants it on
            plan.run(e(kw.get("batch", 1), d), k1, k2, v)
        for kw in [dict(), dict(cap_mode=1), dict(cap_mode=2), dict(chunk=1024), dict(pdl=True)]:
            plan = SparkAttnPlan(H, KV, hd, ra, hd, L, k, meta, **kw)
            plan.pdl = kw.get("pdl", False)
            plan.run(e(H, hd, dt=f32), kp, krv[..., : hd - ra], krv[..., hd - ra:], ln, cfg.attn_scale, None,
                     cfg.attn_logit_softcap, out=e(H, hd))
        DenseAttnPlan(H, KV, hd, hd, meta).run(e(H, hd, dt=f32), e(KV, L, hd), e(KV, L, hd), ln, cfg.attn_scale,
                                               cfg.sliding_window, cfg.attn_logit_softcap, e(H, hd))
        h, w = e(d, dt=f32), e(d, dt=f32)
        embed_norm(e(1, dt=torch.int64), e(cfg.vocab_size, d), 1.0, h, w, e(d), ln, ln, 1e-6)
        residual_norm(e(d), h, w, w, e(d), 1e-6)
        res_norm_gemv(e(d), h, e(d, dt=f32), w, w, e((H + 2 * KV) * hd, d), e((H + 2 * KV) * hd), 1e-6)
        rope_tab = (e(L, ra, dt=f32), e(L, ra, dt=f32))
        rope_cache(e((H + 2 * KV) * hd), ln, e(H, hd, dt=f32), rope_tab, (e(L, hd - ra, dt=f32),) * 2,
                   ("spark", kp, krv[..., : hd - ra], krv[..., hd - ra:]), H, KV, hd, ra)
        rope_cache(e((H + 2 * KV) * hd), ln, e(H, hd, dt=f32), (e(L, hd, dt=f32),) * 2, None,
                   ("dense", e(KV, L, hd), e(KV, L, hd)), H, KV, hd, hd)
        geglu_act(e(2 * m), e(m), cfg.ffn_activation)
    return seen


def main() -> int:
    results = compile_recorded(decode_launches())
    for rec in results:
        print(json.dumps(rec), flush=True)
    bad = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(bad)}/{len(results)} kernel variants compiled for sm_90", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
