"""Spark FFN decode (batch 1) in Triton: the GPU twin of ``spark_ffn_decode_reference``.

Same math as the reference (``sparkformer.ops.spark_ffn_decode``), fp32 accumulation over bf16/fp16/fp32 weights:

    s     = K1 x[:r]                                   kernel 1: GEMV over all of K1, plus per-block
    theta = mean(s) + std(s) * ndtri(1 - f)                      (mean, M2) partials for the statistics
                                                                 (stat_topk.stat_threshold; z = stat_z(f))
    S     = {i : s_i > theta}                          kernel 2: every program combines the partials into theta,
    h_i   = gelu_tanh(s_i - theta) * (K2[i] . x[r:])             compacts its chunk's selected neurons in
                                                                 registers, reserves slots in one global list
                                                                 (atomic counter) and computes h for them
    y     = sum_{i in S} h_i V[i]                      kernel 3: split-K over the compacted list, column
                                                                 tiles of V rows, fp32 atomics into y

Only the selected rows of K2 and V are read, and every read is a whole contiguous row segment, so the scattered
selection costs no partial cache lines. Kernel 1 also zeroes y and the counter, so the three launches need no
memset and replay under a CUDA graph with nothing on the host. ``fuse_out=True`` folds kernel 3 into kernel 2
(each program adds its own neurons' V rows into y): one launch less, more atomics; ``SparkFFNPlan.pick`` times
both on the device and keeps the faster.

The list order (and so the fp32 summation order of y) depends on atomic scheduling: results are reproducible to
rounding, not bitwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparkformer.ops.stat_topk import stat_z
from sparkformer.ops.triton_common import ACT_IDS, HAS_TRITON, act_f32, next_pow2, tl, triton

__all__ = ["SparkFFNPlan", "spark_ffn_decode_triton", "triton_spark_ffn_decode"]


if HAS_TRITON:

    @triton.jit
    def _ffn_predict_kernel(x_ptr, k1_ptr, stride_k1, s_ptr, part_ptr, y_ptr, cnt_ptr, N, R, D_OUT,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_Y: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, R, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cm = cols < R
            xv = tl.load(x_ptr + cols, mask=cm, other=0.0).to(tl.float32)
            w = tl.load(k1_ptr + rows[:, None] * stride_k1 + cols[None, :], mask=rmask[:, None] & cm[None, :],
                        other=0.0).to(tl.float32)
            acc += w * xv[None, :]
        s = tl.sum(acc, axis=1)
        tl.store(s_ptr + rows, s, mask=rmask)
        # this block's (mean, M2); combined with Chan's formula later, so no E[s^2] - mean^2 cancellation
        cnt = tl.minimum(N - pid * BLOCK_N, BLOCK_N).to(tl.float32)
        mean_b = tl.sum(tl.where(rmask, s, 0.0), axis=0) / cnt
        dev = tl.where(rmask, s - mean_b, 0.0)
        tl.store(part_ptr + 2 * pid, mean_b)
        tl.store(part_ptr + 2 * pid + 1, tl.sum(dev * dev, axis=0))
        # zero the output accumulator and the list counter for the kernels that follow
        ycols = pid * BLOCK_Y + tl.arange(0, BLOCK_Y)
        tl.store(y_ptr + ycols, tl.zeros([BLOCK_Y], dtype=tl.float32), mask=ycols < D_OUT)
        if pid == 0:
            tl.store(cnt_ptr, 0)

    @triton.jit
    def _ffn_theta(part_ptr, N, n_parts, z, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
        """theta from kernel 1's per-block (mean, M2), population std (Chan's parallel combination)."""
        tot = tl.zeros([BLOCK_P], dtype=tl.float32)
        for p0 in range(0, n_parts, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            pm = p < n_parts
            c = tl.minimum(N - p * BLOCK_N, BLOCK_N).to(tl.float32)
            tot += tl.where(pm, c * tl.load(part_ptr + 2 * p, mask=pm, other=0.0), 0.0)
        mean = tl.sum(tot, axis=0) / N
        m2 = tl.zeros([BLOCK_P], dtype=tl.float32)
        for p0 in range(0, n_parts, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            pm = p < n_parts
            c = tl.minimum(N - p * BLOCK_N, BLOCK_N).to(tl.float32)
            d = tl.load(part_ptr + 2 * p, mask=pm, other=0.0) - mean
            m2 += tl.where(pm, tl.load(part_ptr + 2 * p + 1, mask=pm, other=0.0) + c * d * d, 0.0)
        return mean + tl.sqrt(tl.sum(m2, axis=0) / N) * z

    @triton.jit
    def _ffn_rows_out(rows, hv, valid, v_ptr, stride_v, y_ptr, D_OUT, col0, col1, BLOCK_D: tl.constexpr):
        """y[col0:col1] += sum_j hv_j V[rows_j, col0:col1] over the valid j (fp32 atomics)."""
        for c0 in range(col0, col1, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            cm = (cols < col1) & (cols < D_OUT)
            w = tl.load(v_ptr + rows[:, None] * stride_v + cols[None, :], mask=valid[:, None] & cm[None, :],
                        other=0.0).to(tl.float32)
            tl.atomic_add(y_ptr + cols, tl.sum(w * hv[:, None], axis=0), mask=cm, sem="relaxed")

    @triton.jit
    def _ffn_select_kernel(s_ptr, part_ptr, x_ptr, k2_ptr, stride_k2, v_ptr, stride_v, idx_ptr, h_ptr, cnt_ptr,
                           y_ptr, N, R, D2, D_OUT, n_parts, z,
                           BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                           SUB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, FUSE_OUT: tl.constexpr,
                           ACT: tl.constexpr):
        pid = tl.program_id(0)
        theta = _ffn_theta(part_ptr, N, n_parts, z, BLOCK_N, BLOCK_P)
        rows = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        s = tl.load(s_ptr + rows, mask=rows < N, other=0.0)
        sel = (s > theta) & (rows < N)
        sel_i = sel.to(tl.int32)
        nsel = tl.sum(sel_i, axis=0)
        rank = tl.cumsum(sel_i, axis=0) - 1
        if not FUSE_OUT:
            base = tl.atomic_add(cnt_ptr, nsel)
        else:
            tl.atomic_add(cnt_ptr, nsel, sem="relaxed")  # only the count is needed (stats)
        # walk the selected neurons SUB at a time; slot j holds the neuron of local rank j (compaction in
        # registers: a (SUB, BLOCK_C) match instead of a shuffle, so gathers below load only selected rows)
        for j0 in range(0, nsel, SUB):
            slots = j0 + tl.arange(0, SUB)
            match = (rank[None, :] == slots[:, None]) & sel[None, :]
            row = tl.sum(tl.where(match, rows[None, :], 0), axis=1)
            s_j = tl.sum(tl.where(match, s[None, :], 0.0), axis=1)
            valid = slots < nsel
            acc = tl.zeros([SUB, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, D2, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                cm = cols < D2
                xv = tl.load(x_ptr + R + cols, mask=cm, other=0.0).to(tl.float32)
                w = tl.load(k2_ptr + row[:, None] * stride_k2 + cols[None, :], mask=valid[:, None] & cm[None, :],
                            other=0.0).to(tl.float32)
                acc += w * xv[None, :]
            h = act_f32(s_j - theta, ACT) * tl.sum(acc, axis=1)
            if FUSE_OUT:
                _ffn_rows_out(row, h, valid, v_ptr, stride_v, y_ptr, D_OUT, 0, D_OUT, BLOCK_D)
            else:
                tl.store(idx_ptr + base + slots, row, mask=valid)
                tl.store(h_ptr + base + slots, h, mask=valid)

    @triton.jit
    def _ffn_out_kernel(idx_ptr, h_ptr, cnt_ptr, v_ptr, stride_v, y_ptr, D_OUT, COLS_PER: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        # grid (column tiles, splits): split s takes every n_splits-th group of BLOCK_S list entries
        col0 = tl.program_id(0) * COLS_PER
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        n = tl.load(cnt_ptr)
        acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
        cols = col0 + tl.arange(0, BLOCK_D)
        cm = (cols < D_OUT) & (cols < col0 + COLS_PER)
        for i0 in range(split * BLOCK_S, n, n_splits * BLOCK_S):
            ii = i0 + tl.arange(0, BLOCK_S)
            m = ii < n
            row = tl.load(idx_ptr + ii, mask=m, other=0)
            hv = tl.load(h_ptr + ii, mask=m, other=0.0)
            w = tl.load(v_ptr + row[:, None] * stride_v + cols[None, :], mask=m[:, None] & cm[None, :],
                        other=0.0).to(tl.float32)
            acc += w * hv[:, None]
        tl.atomic_add(y_ptr + cols, tl.sum(acc, axis=0), mask=cm, sem="relaxed")


@dataclass
class SparkFFNPlan:
    """Launch shapes and scratch buffers for one (d_ff, r, d - r, d_out) Spark FFN shape on one device.

    ``run`` writes y (fp32, length d_out) into ``self.y`` and the selected count into ``self.cnt[0]``; it
    allocates nothing, so it can be captured in a CUDA graph. One plan serves every layer of that shape."""

    n: int
    r: int
    d2: int
    d_out: int
    fraction: float
    device: torch.device
    fuse_out: bool = False
    block_n: int = 16
    block_k: int = 256
    block_c: int = 128
    sub: int = 16
    block_k2: int = 256
    block_d: int = 256
    block_s: int = 8
    splits: int = 0  # 0: chosen from the SM count
    cols_per: int = 0  # kernel 3 column tile (0: block_d)
    warps: int = 4
    activation: str = "gelu_tanh"

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction}")
        dev = torch.device(self.device)
        self.device = dev
        self.z = stat_z(self.fraction)  # the kernel rounds it to fp32, as stat_threshold does
        self.n_parts = triton.cdiv(self.n, self.block_n)
        self.block_p = min(1024, next_pow2(self.n_parts))
        self.block_y = max(16, next_pow2(triton.cdiv(self.d_out, self.n_parts)))
        self.block_k = min(self.block_k, next_pow2(self.r))
        self.block_k2 = min(self.block_k2, next_pow2(self.d2))
        self.block_d = min(self.block_d, next_pow2(self.d_out))
        self.cols_per = self.cols_per or self.block_d
        if not self.splits:
            sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
            self.splits = max(1, (2 * sms) // triton.cdiv(self.d_out, self.cols_per))
        f32 = dict(dtype=torch.float32, device=dev)
        self.s = torch.empty(self.n, **f32)
        self.part = torch.empty(2 * self.n_parts, **f32)
        self.idx = torch.empty(self.n, dtype=torch.int32, device=dev)
        self.h = torch.empty(self.n, **f32)
        self.cnt = torch.zeros(1, dtype=torch.int32, device=dev)
        self.y = torch.empty(self.d_out, **f32)

    def run(self, x: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v: torch.Tensor,
            y: torch.Tensor | None = None, cnt: torch.Tensor | None = None, stages: int = 3) -> torch.Tensor:
        """x (d,) any float dtype; k1 (n, r), k2 (n, d - r), v (n, d_out): last dims contiguous. -> y fp32.
        ``y`` / ``cnt`` (int32, 1 element): where to write the output and the selected count (default: own).
        ``stages`` < 3 stops after that many launches (per-kernel timing only)."""
        y = self.y if y is None else y
        cnt = self.cnt if cnt is None else cnt
        _ffn_predict_kernel[(self.n_parts,)](
            x, k1, k1.stride(0), self.s, self.part, y, cnt, self.n, self.r, self.d_out,
            BLOCK_N=self.block_n, BLOCK_K=self.block_k, BLOCK_Y=self.block_y, num_warps=self.warps)
        if stages < 2:
            return y
        _ffn_select_kernel[(triton.cdiv(self.n, self.block_c),)](
            self.s, self.part, x, k2, k2.stride(0), v, v.stride(0), self.idx, self.h, cnt, y,
            self.n, self.r, self.d2, self.d_out, self.n_parts, self.z,
            BLOCK_N=self.block_n, BLOCK_P=self.block_p, BLOCK_C=self.block_c, SUB=self.sub,
            BLOCK_K=self.block_k2, BLOCK_D=self.block_d, FUSE_OUT=self.fuse_out, ACT=ACT_IDS[self.activation],
            num_warps=self.warps)
        if not self.fuse_out and stages >= 3:
            _ffn_out_kernel[(triton.cdiv(self.d_out, self.cols_per), self.splits)](
                self.idx, self.h, cnt, v, v.stride(0), y, self.d_out, COLS_PER=self.cols_per,
                BLOCK_S=self.block_s, BLOCK_D=self.block_d, num_warps=self.warps)
        return y

    @classmethod
    def for_weights(cls, k1: torch.Tensor, k2: torch.Tensor, v: torch.Tensor, fraction: float, **kw) -> "SparkFFNPlan":
        return cls(k1.shape[0], k1.shape[1], k2.shape[1], v.shape[1], fraction, k1.device, **kw)

    @classmethod
    def pick(cls, x, k1, k2, v, fraction: float, candidates: list[dict] | None = None, reps: int = 50,
             weights: list[tuple] | None = None) -> "SparkFFNPlan":
        """Time a few launch configurations on the device (CUDA) and return the fastest plan.

        ``weights``: several (k1, k2, v) of the same shape to rotate through, so the timing reads cold weights
        (one layer's K1 fits in an H100/H200's L2). On CPU returns the default plan."""
        if k1.device.type != "cuda":
            return cls.for_weights(k1, k2, v, fraction)
        candidates = candidates or [
            dict(fuse_out=False), dict(fuse_out=True),
            dict(fuse_out=False, block_n=32, block_k=512, warps=8),
            dict(fuse_out=False, block_c=64, sub=8, block_s=16),
            dict(fuse_out=True, block_c=64, sub=8),
            # more, shorter programs (the select chain is latency-bound at 108 programs)
            dict(fuse_out=False, block_c=32, sub=8, splits=64),
            dict(fuse_out=True, block_c=32, sub=8),
            dict(fuse_out=False, block_n=8, block_k=1024, block_c=32, sub=8, splits=64, block_s=4),
        ]
        weights = weights or [(k1, k2, v)]
        best, best_t = None, float("inf")
        for c in candidates:
            plan = cls.for_weights(k1, k2, v, fraction, **c)
            for w in weights:  # compile + warm
                plan.run(x, *w)
            torch.cuda.synchronize()
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            for i in range(reps):
                plan.run(x, *weights[i % len(weights)])
            t1.record()
            torch.cuda.synchronize()
            t = t0.elapsed_time(t1) / reps
            plan.pick_ms = t
            if t < best_t:
                best, best_t = plan, t
        return best


def spark_ffn_decode_triton(x: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v: torch.Tensor,
                            fraction: float, fuse_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton Spark FFN decode with the reference's contract: (y (d_out,) in x's dtype, n_selected int64)."""
    plan = SparkFFNPlan.for_weights(k1, k2, v, fraction, fuse_out=fuse_out)
    y = plan.run(x.contiguous(), k1, k2, v)
    return y.to(x.dtype), plan.cnt[0].to(torch.int64)


if HAS_TRITON:

    @torch.library.custom_op("sparkformer::triton_spark_ffn_decode", mutates_args=())
    def triton_spark_ffn_decode(x: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v: torch.Tensor,
                                fraction: float, fuse_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Torch custom op around ``spark_ffn_decode_triton`` (same arguments and results)."""
        return spark_ffn_decode_triton(x, k1, k2, v, fraction, fuse_out)

    @triton_spark_ffn_decode.register_fake
    def _(x, k1, k2, v, fraction, fuse_out=False):
        return x.new_empty(v.shape[1]), x.new_empty((), dtype=torch.int64)
else:  # pragma: no cover
    triton_spark_ffn_decode = None
