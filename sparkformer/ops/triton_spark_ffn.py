"""Spark FFN decode in Triton: the GPU twin of ``spark_ffn_decode_reference`` (and, for B > 1 tokens, of
``spark_ffn_decode_batch``: each token its own selection, the K2 and V rows of the union read once).

Same math as the reference (``sparkformer.ops.spark_ffn_decode``), fp32 accumulation over bf16/fp16/fp32 weights:

    s     = K1 x[:r]                                  F1, grid (d_ff / BLOCK_N,): one [BLOCK_N x r] tile of K1 per
                                                      program, no loop; writes s and the tile's (mean, M2), and
                                                      zeroes y and the counts (so no memset launch is needed)
    theta = mean(s) + std(s) * ndtri(1 - f)           F2, grid (d_ff / BLOCK_C, column splits): every program
    S     = {i : s_i > theta}                             Chan-combines all partials into theta in registers (the
    h_i   = act(s_i - theta) * (K2[i] . x[r:])            one global reduction costs one kernel boundary, no serial
    y     = sum_{i in S} h_i V[i]                         step), compacts its chunk's survivors into SUB slots, issues
                                                          the K2 and V row gathers before using either (one memory
                                                          latency deep), adds its partial y with fp32 atomics (none
                                                          when nothing was selected); a second round only when more
                                                          than SUB neurons of the chunk survive

Why this shape: batch-1 decode is latency-bound unless enough bytes are in flight; hundreds of single-tile programs
keep ~MBs in flight where the previous kernels (108 programs, ~31 dependent loads each) kept ~0.5 MB
(``docs/gpu-decode.md``). ``atomic=False`` is the variant without output atomics: F2 writes each chunk's compacted
(neuron, h) into per-chunk slots, and F3 (grid: column tiles of y) gathers the V rows and stores y once
(deterministic). ``SparkFFNPlan.pick`` times the variants as CUDA-graph replays and keeps the fastest.

With atomics the fp32 summation order of y depends on scheduling: reproducible to rounding, not bitwise.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from sparkformer.ops.stat_topk import stat_z
from sparkformer.ops.triton_common import (ACT_IDS, HAS_TRITON, INTERPRET, act_f32, cuda_graph_us, launch_opts,
                                           next_pow2, pow2_pieces, release_dependents, tl, triton, wait_prior)

__all__ = ["SparkFFNPlan", "spark_ffn_decode_triton", "triton_spark_ffn_decode"]


if HAS_TRITON:

    @triton.jit
    def _ffn_predict_kernel(x_ptr, stride_xb, k1_ptr, stride_k1, s_ptr, pm_ptr, pm2_ptr, y_ptr, cnt_ptr,
                            N, R, D_OUT_B, n_parts,
                            B: tl.constexpr, BP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_Y: tl.constexpr, PDL: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        cols = tl.arange(0, BLOCK_K)
        cm = cols < R
        # the weight tile does not depend on the previous kernel: start its load before waiting (PDL)
        w = tl.load(k1_ptr + rows[:, None] * stride_k1 + cols[None, :], mask=rmask[:, None] & cm[None, :],
                    other=0.0).to(tl.float32)
        wait_prior(PDL)
        cnt = tl.minimum(N - pid * BLOCK_N, BLOCK_N).to(tl.float32)
        for b in tl.static_range(B):
            xv = tl.load(x_ptr + b * stride_xb + cols, mask=cm, other=0.0).to(tl.float32)
            s = tl.sum(w * xv[None, :], axis=1)
            tl.store(s_ptr + b * N + rows, s, mask=rmask)
            # this tile's (mean, M2), combined with Chan's formula in F2: no E[s^2] - mean^2 cancellation
            mean_b = tl.sum(tl.where(rmask, s, 0.0), axis=0) / cnt
            dev = tl.where(rmask, s - mean_b, 0.0)
            tl.store(pm_ptr + b * n_parts + pid, mean_b)
            tl.store(pm2_ptr + b * n_parts + pid, tl.sum(dev * dev, axis=0))
        # zero the output accumulator (B x d_out, flat) and the selected counts for F2
        yc = pid * BLOCK_Y + tl.arange(0, BLOCK_Y)
        tl.store(y_ptr + yc, tl.zeros([BLOCK_Y], dtype=tl.float32), mask=yc < D_OUT_B)
        if pid == 0:
            bb = tl.arange(0, BP)
            tl.store(cnt_ptr + bb, tl.zeros([BP], dtype=tl.int32), mask=bb < B)
        release_dependents(PDL)

    @triton.jit
    def _ffn_thetas(pm_ptr, pm2_ptr, N, n_parts, z, B: tl.constexpr, BP: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_P: tl.constexpr):
        """theta of each batch row (BP,) from F1's per-tile (mean, M2), population std, in one 2-D load."""
        bb = tl.arange(0, BP)
        p = tl.arange(0, BLOCK_P)
        pm = (bb < B)[:, None] & (p < n_parts)[None, :]
        off = bb[:, None] * n_parts + p[None, :]
        mb = tl.load(pm_ptr + off, mask=pm, other=0.0)
        m2b = tl.load(pm2_ptr + off, mask=pm, other=0.0)
        c = tl.where(pm, tl.minimum(N - p * BLOCK_N, BLOCK_N).to(tl.float32)[None, :], 0.0)
        mean = tl.sum(c * mb, axis=1) / N
        d = mb - mean[:, None]
        m2 = tl.sum(tl.where(pm, m2b + c * d * d, 0.0), axis=1)
        return mean + tl.sqrt(m2 / N) * z

    @triton.jit
    def _pick_row(mat, bb, b):
        """Row b of a (BP, X) register tile."""
        return tl.sum(tl.where(bb[:, None] == b, mat, 0.0), axis=0)

    @triton.jit
    def _ffn_select_kernel(s_ptr, pm_ptr, pm2_ptr, x_ptr, stride_xb, k2_ptr, stride_k2, v_ptr, stride_v, y_ptr,
                           cnt_ptr, sidx_ptr, sh_ptr, scnt_ptr, bcnt_ptr, N, R, D2, D_OUT, COLS, n_parts, n_chunks, z,
                           B: tl.constexpr, BP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                           BLOCK_C: tl.constexpr, SUB: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr,
                           VA: tl.constexpr, VB: tl.constexpr, ATOMIC: tl.constexpr, ACT: tl.constexpr,
                           PDL: tl.constexpr):
        c = tl.program_id(0)
        t = tl.program_id(1)
        wait_prior(PDL)
        bb = tl.arange(0, BP)
        theta = _ffn_thetas(pm_ptr, pm2_ptr, N, n_parts, z, B, BP, BLOCK_N, BLOCK_P)
        rows = c * BLOCK_C + tl.arange(0, BLOCK_C)
        rm = rows < N
        sm = (bb < B)[:, None] & rm[None, :]
        s2 = tl.load(s_ptr + bb[:, None] * N + rows[None, :], mask=sm, other=0.0)  # (BP, BLOCK_C)
        sel2 = sm & (s2 > theta[:, None])
        nsel_b = tl.sum(sel2.to(tl.int32), axis=1)
        if ATOMIC:
            if t == 0:
                tl.atomic_add(cnt_ptr + bb, nsel_b, mask=bb < B, sem="relaxed")
        else:
            tl.store(bcnt_ptr + bb * n_chunks + c, nsel_b, mask=bb < B)
        union = tl.max(sel2.to(tl.int32), axis=0)  # neurons any batch row selected
        nsel = tl.sum(union, axis=0)
        rank = tl.cumsum(union, axis=0) - 1
        if not ATOMIC:
            tl.store(scnt_ptr + c, nsel)
        col0 = t * COLS
        col1 = tl.minimum(col0 + COLS, D_OUT)
        ka = tl.arange(0, KA)
        va = col0 + tl.arange(0, VA)
        for j0 in range(0, nsel, SUB):  # one round unless more than SUB neurons of this chunk survive
            slot = j0 + tl.arange(0, SUB)
            match = (rank[None, :] == slot[:, None]) & (union[None, :] > 0)  # (SUB, BLOCK_C) compaction
            row = tl.sum(tl.where(match, rows[None, :], 0), axis=1)
            valid = slot < nsel
            # both gathers depend only on the indices: issue them before any arithmetic uses either
            k2a = tl.load(k2_ptr + row[:, None] * stride_k2 + ka[None, :], mask=valid[:, None] & (ka < D2)[None, :],
                          other=0.0)
            if KB > 0:
                kb = KA + tl.arange(0, KB)
                k2b = tl.load(k2_ptr + row[:, None] * stride_k2 + kb[None, :],
                              mask=valid[:, None] & (kb < D2)[None, :], other=0.0)
            if ATOMIC:
                v_a = tl.load(v_ptr + row[:, None] * stride_v + va[None, :], mask=valid[:, None] & (va < col1)[None, :],
                              other=0.0)
                if VB > 0:
                    vb = col0 + VA + tl.arange(0, VB)
                    v_b = tl.load(v_ptr + row[:, None] * stride_v + vb[None, :],
                                  mask=valid[:, None] & (vb < col1)[None, :], other=0.0)
            for b in tl.static_range(B):
                x2 = tl.load(x_ptr + b * stride_xb + R + ka, mask=ka < D2, other=0.0).to(tl.float32)
                u = tl.sum(k2a.to(tl.float32) * x2[None, :], axis=1)
                if KB > 0:
                    x2b = tl.load(x_ptr + b * stride_xb + R + kb, mask=kb < D2, other=0.0).to(tl.float32)
                    u += tl.sum(k2b.to(tl.float32) * x2b[None, :], axis=1)
                s_b = _pick_row(s2, bb, b)
                sel_b = _pick_row(sel2.to(tl.float32), bb, b)
                s_j = tl.sum(tl.where(match, s_b[None, :], 0.0), axis=1)
                on = tl.sum(tl.where(match, sel_b[None, :], 0.0), axis=1) > 0  # this row selected slot j
                theta_b = tl.sum(tl.where(bb == b, theta, 0.0), axis=0)
                h = tl.where(on, act_f32(s_j - theta_b, ACT) * u, 0.0)
                if ATOMIC:
                    tl.atomic_add(y_ptr + b * D_OUT + va, tl.sum(v_a.to(tl.float32) * h[:, None], axis=0),
                                  mask=va < col1, sem="relaxed")
                    if VB > 0:
                        tl.atomic_add(y_ptr + b * D_OUT + vb, tl.sum(v_b.to(tl.float32) * h[:, None], axis=0),
                                      mask=vb < col1, sem="relaxed")
                else:
                    tl.store(sh_ptr + b * N + c * BLOCK_C + slot, h, mask=valid)
            if not ATOMIC:
                tl.store(sidx_ptr + c * BLOCK_C + slot, row, mask=valid)
        release_dependents(PDL)

    @triton.jit
    def _ffn_slots_out_kernel(sidx_ptr, sh_ptr, scnt_ptr, bcnt_ptr, v_ptr, stride_v, y_ptr, cnt_ptr, N, D_OUT,
                              n_chunks, B: tl.constexpr, BP: tl.constexpr, BLOCK_C: tl.constexpr,
                              CPG: tl.constexpr, SUB: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
        # F3 (no output atomics): each program owns BLOCK_D columns of y for every batch row and stores them once
        t = tl.program_id(0)
        wait_prior(PDL)
        bb = tl.arange(0, BP)
        cols = t * BLOCK_D + tl.arange(0, BLOCK_D)
        cm = cols < D_OUT
        acc = tl.zeros([BP, BLOCK_D], dtype=tl.float32)
        jj = tl.arange(0, SUB)
        for c0 in range(0, n_chunks, CPG):
            cc = c0 + tl.arange(0, CPG)
            cnts = tl.load(scnt_ptr + cc, mask=cc < n_chunks, other=0)
            for j0 in range(0, tl.max(cnts, axis=0), SUB):
                e = tl.reshape(cc[:, None] * BLOCK_C + j0 + jj[None, :], [CPG * SUB])
                valid = tl.reshape((j0 + jj)[None, :] < cnts[:, None], [CPG * SUB])
                row = tl.load(sidx_ptr + e, mask=valid, other=0)
                w = tl.load(v_ptr + row[:, None] * stride_v + cols[None, :], mask=valid[:, None] & cm[None, :],
                            other=0.0).to(tl.float32)
                h = tl.load(sh_ptr + bb[:, None] * N + e[None, :], mask=(bb < B)[:, None] & valid[None, :], other=0.0)
                acc += tl.sum(h[:, :, None] * w[None, :, :], axis=1)
        tl.store(y_ptr + bb[:, None] * D_OUT + cols[None, :], acc, mask=(bb < B)[:, None] & cm[None, :])
        if t == 0:  # the selected counts, from the per-chunk counts
            tot = tl.zeros([BP], dtype=tl.int32)
            for c0 in range(0, n_chunks, CPG):
                cc = c0 + tl.arange(0, CPG)
                tot += tl.sum(tl.load(bcnt_ptr + bb[:, None] * n_chunks + cc[None, :],
                                      mask=(bb < B)[:, None] & (cc < n_chunks)[None, :], other=0), axis=1)
            tl.store(cnt_ptr + bb, tot, mask=bb < B)


@dataclass
class SparkFFNPlan:
    """Launch shapes and scratch buffers for one (d_ff, r, d - r, d_out) Spark FFN shape, batch ``batch``, on one
    device. ``run`` writes y (fp32, (batch, d_out)) and the selected counts (int32, (batch,)); it allocates nothing,
    so it can be captured in a CUDA graph. One plan serves every layer of that shape."""

    n: int
    r: int
    d2: int
    d_out: int
    fraction: float
    device: torch.device
    batch: int = 1
    block_n: int = 16  # F1: K1 rows per program (all r columns at once)
    block_c: int = 32  # F2: neurons per program
    sub: int = 8  # F2: survivor slots per round (P(Binomial(32, 0.08) > 8) ~ 0.1%)
    col_splits: int = 1  # F2: programs per chunk, each owning d_out / col_splits columns of V (atomic variant)
    atomic: bool = True  # False: per-chunk slots + F3, no output atomics
    block_d: int = 64  # F3: output columns per program
    cpg: int = 8  # F3: chunks per step
    warps1: int = 4
    warps2: int = 8
    pdl: bool = False  # programmatic dependent launch (CUDA, Hopper+; never under the interpreter)
    activation: str = "gelu_tanh"

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction}")
        dev = torch.device(self.device)
        self.device = dev
        self.pdl = bool(self.pdl) and dev.type == "cuda" and not INTERPRET
        self.z = stat_z(self.fraction)  # the kernel rounds it to fp32, as stat_threshold does
        self.bp = next_pow2(self.batch)
        self.n_parts = triton.cdiv(self.n, self.block_n)
        self.block_p = next_pow2(self.n_parts)
        self.block_k = next_pow2(self.r)
        self.block_y = max(16, next_pow2(triton.cdiv(self.batch * self.d_out, self.n_parts)))
        self.n_chunks = triton.cdiv(self.n, self.block_c)
        self.col_splits = self.col_splits if self.atomic else 1
        self.cols = triton.cdiv(self.d_out, self.col_splits)
        self.ka, self.kb = pow2_pieces(self.d2)
        self.va, self.vb = pow2_pieces(self.cols)
        self.block_d = min(self.block_d, next_pow2(self.d_out))
        f32 = dict(dtype=torch.float32, device=dev)
        B = self.batch
        self.s = torch.empty(B * self.n, **f32)
        self.pm = torch.empty(B * self.n_parts, **f32)
        self.pm2 = torch.empty(B * self.n_parts, **f32)
        self.cnt = torch.zeros(B, dtype=torch.int32, device=dev)
        self.y = torch.empty(B, self.d_out, **f32)
        n_slots = 1 if self.atomic else self.n_chunks * self.block_c
        self.sidx = torch.empty(n_slots, dtype=torch.int32, device=dev)
        self.sh = torch.empty(B * n_slots if not self.atomic else 1, **f32)
        self.scnt = torch.empty(self.n_chunks if not self.atomic else 1, dtype=torch.int32, device=dev)
        self.bcnt = torch.empty(B * self.n_chunks if not self.atomic else 1, dtype=torch.int32, device=dev)

    def shape(self) -> dict:
        """The launch-shape fields (what the tuner varies), for reports."""
        skip = {"n", "r", "d2", "d_out", "fraction", "device", "activation"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    def run(self, x: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v: torch.Tensor,
            y: torch.Tensor | None = None, cnt: torch.Tensor | None = None, stages: int = 3) -> torch.Tensor:
        """x (d,) or (batch, d), any float dtype; k1 (n, r), k2 (n, d - r), v (n, d_out): last dims contiguous.
        -> y fp32 (batch, d_out) (``y``/``cnt``: where to write y and the int32 selected counts; default: own).
        ``stages`` < 3 stops after that many launches (per-kernel timing only)."""
        y = self.y if y is None else y
        cnt = self.cnt if cnt is None else cnt
        sx = x.stride(0) if x.dim() == 2 else 0
        B, BP = self.batch, self.bp
        _ffn_predict_kernel[(self.n_parts,)](
            x, sx, k1, k1.stride(0), self.s, self.pm, self.pm2, y, cnt, self.n, self.r, B * self.d_out, self.n_parts,
            B=B, BP=BP, BLOCK_N=self.block_n, BLOCK_K=self.block_k, BLOCK_Y=self.block_y, PDL=self.pdl,
            **launch_opts(self.warps1, self.pdl))
        if stages < 2:
            return y
        _ffn_select_kernel[(self.n_chunks, self.col_splits)](
            self.s, self.pm, self.pm2, x, sx, k2, k2.stride(0), v, v.stride(0), y, cnt, self.sidx, self.sh,
            self.scnt, self.bcnt, self.n, self.r, self.d2, self.d_out, self.cols, self.n_parts, self.n_chunks, self.z,
            B=B, BP=BP, BLOCK_N=self.block_n, BLOCK_P=self.block_p, BLOCK_C=self.block_c, SUB=self.sub,
            KA=self.ka, KB=self.kb, VA=self.va, VB=self.vb, ATOMIC=self.atomic, ACT=ACT_IDS[self.activation],
            PDL=self.pdl, **launch_opts(self.warps2, self.pdl))
        if not self.atomic and stages >= 3:
            _ffn_slots_out_kernel[(triton.cdiv(self.d_out, self.block_d),)](
                self.sidx, self.sh, self.scnt, self.bcnt, v, v.stride(0), y, cnt, self.n, self.d_out, self.n_chunks,
                B=B, BP=BP, BLOCK_C=self.block_c, CPG=self.cpg, SUB=self.sub, BLOCK_D=self.block_d, PDL=self.pdl,
                **launch_opts(self.warps1, self.pdl))
        return y

    @classmethod
    def for_weights(cls, k1: torch.Tensor, k2: torch.Tensor, v: torch.Tensor, fraction: float, **kw) -> "SparkFFNPlan":
        return cls(k1.shape[0], k1.shape[1], k2.shape[1], v.shape[1], fraction, k1.device, **kw)

    # F2 at BLOCK_C 32 / SUB 8 compiles to ~250 registers x 8 warps for sm_90 (both gathers in registers at once):
    # one program per SM at a time, 3.3 waves. BLOCK_C 64 fills its 8 slots better (~5 survivors, 1.6 waves);
    # column splits halve the V tile (more, smaller programs); the device decides between them.
    CANDIDATES = (
        dict(),
        dict(block_c=64, sub=8),
        dict(block_c=64, sub=8, col_splits=2),
        dict(block_c=32, sub=8, col_splits=2),
        dict(block_c=64, sub=8, warps2=16),
        dict(block_c=16, sub=4),
        dict(block_n=8),
        dict(atomic=False),
        dict(atomic=False, block_d=32),
    )

    @classmethod
    def pick(cls, x, k1, k2, v, fraction: float, candidates: list[dict] | None = None, reps: int = 20,
             weights: list[tuple] | None = None, timer=None, **common) -> "SparkFFNPlan":
        """Time launch shapes as CUDA-graph replays over ``weights`` (several layers' (k1, k2, v), so the timing
        reads cold weights: one layer's K1 fits in an H100/H200's L2) and return the fastest plan (its time in
        ``pick_us``, every candidate's in ``pick_table``). ``timer(fn) -> us`` replaces the graph timing (the
        interpreter test runs this code path with a plain clock). Off CUDA without a timer: the default plan."""
        if timer is None:
            if k1.device.type != "cuda":
                return cls.for_weights(k1, k2, v, fraction, **common)
            timer = lambda fn: cuda_graph_us(fn, reps)  # noqa: E731
        weights = weights or [(k1, k2, v)]
        best, table = None, []
        for c in candidates or cls.CANDIDATES:
            plan = cls.for_weights(k1, k2, v, fraction, **{**common, **c})
            try:
                t = timer(lambda: [plan.run(x, *w) for w in weights]) / len(weights)
            except Exception as e:  # a shape this GPU cannot compile (registers, shared memory): skip it
                table.append({**c, "error": type(e).__name__})
                continue
            plan.pick_us = t
            table.append({**c, "us": round(t, 2)})
            if best is None or t < best.pick_us:
                best = plan
        if best is None:
            raise RuntimeError(f"no Spark FFN launch shape ran: {table}")
        best.pick_table = table
        return best


def spark_ffn_decode_triton(x: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v: torch.Tensor,
                            fraction: float, atomic: bool = True, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton Spark FFN decode with the reference's contract: (y (d_out,) in x's dtype, n_selected int64); for x of
    shape (B, d) that of ``spark_ffn_decode_batch`` without the union size: (y (B, d_out), n_selected (B,))."""
    batch = x.shape[0] if x.dim() == 2 else 1
    plan = SparkFFNPlan.for_weights(k1, k2, v, fraction, atomic=atomic, batch=batch, **kw)
    y = plan.run(x.contiguous(), k1, k2, v)
    if x.dim() == 1:
        return y[0].to(x.dtype), plan.cnt[0].to(torch.int64)
    return y.to(x.dtype), plan.cnt.to(torch.int64)


if HAS_TRITON:

    @torch.library.custom_op("sparkformer::triton_spark_ffn_decode", mutates_args=())
    def triton_spark_ffn_decode(x: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v: torch.Tensor,
                                fraction: float, atomic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Torch custom op around ``spark_ffn_decode_triton`` (same arguments and results)."""
        return spark_ffn_decode_triton(x, k1, k2, v, fraction, atomic)

    @triton_spark_ffn_decode.register_fake
    def _(x, k1, k2, v, fraction, atomic=True):
        if x.dim() == 2:
            return x.new_empty(x.shape[0], v.shape[1]), x.new_empty(x.shape[0], dtype=torch.int64)
        return x.new_empty(v.shape[1]), x.new_empty((), dtype=torch.int64)
else:  # pragma: no cover
    triton_spark_ffn_decode = None
