"""Spark attention decode (one query position, all heads) in Triton: the GPU twin of
``spark_attn_decode_reference`` (see ``sparkformer.ops.spark_attn_decode`` for the cache layout and the rule).

Three launches, none of which needs the host to know the context length (it is read from a device tensor, so one
CUDA graph serves every position):

1. scores   grid (n_kv, key blocks): p_j = scale * q[:r] . kp[:, j] (then soft-cap) for both/all query heads of a
            kv group from one read of the feature-major predictor tile; stores p and per-block (count, mean, M2,
            max) partials. Blocks outside [lo, length) do nothing.
2. select   grid (heads, key chunks): every program combines the partials into theta = mean + std * ndtri(1 - k/n)
            (z from ``stat_topk.stat_z_table``, indexed by n, so it equals the reference's z exactly), keeps
            its chunk's keys with p > theta, appends them to the head's candidate list (atomic counter) and adds
            their exp(p - max) to the head's softmax denominator.
3. output   grid (heads, splits): finishes the selection -- when more than k keys survived, the hard cap keeps the
            k best by (p, position) (a bitonic top-k over 64-bit keys (ordered p bits << 32 | position), the
            reference's tie rule), and the denominator is recomputed over them; when none survived (degenerate
            scores) the k best of all valid keys -- then gathers the kept keys' other half and values:
            out = sum_j softmax(p)_j * softplus(scale * q[r:] . kr_j) * v_j, fp32 atomics across splits.

Every program of launch 3 repeats the (cheap: ~k candidates) cap step, which saves a launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparkformer.ops.stat_topk import stat_z_table
from sparkformer.ops.triton_common import HAS_TRITON, next_pow2, softplus_f32, tanh_f32, tl, triton

__all__ = ["SparkAttnPlan", "spark_attn_decode_triton", "triton_spark_attn_decode"]

_I64_MIN = tl.constexpr(-(2**63)) if HAS_TRITON else -(2**63)  # jit code reads only constexpr globals

if HAS_TRITON:

    @triton.jit
    def _valid_range(len_ptr, WINDOW):
        length = tl.load(len_ptr)
        lo = length * 0
        if WINDOW > 0:
            lo = tl.maximum(length - WINDOW, 0)
        return length, lo

    @triton.jit
    def _attn_score_kernel(q_ptr, stride_qh, kp_ptr, s_kv, s_blk, s_r, s_b, KB, len_ptr, p_ptr, stride_ph,
                           part_ptr, stride_part_h, cnt_ptr, zsum_ptr, R, WINDOW, scale, softcap,
                           G: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr):
        g = tl.program_id(0)
        b = tl.program_id(1)
        length, lo = _valid_range(len_ptr, WINDOW)
        j = b * BLOCK_L + tl.arange(0, BLOCK_L)
        valid = (j >= lo) & (j < length)
        rr = tl.arange(0, BLOCK_R)
        rm = rr < R
        # (BLOCK_R, BLOCK_L) tile of the feature-major predictor half; j -> (block j // KB, column j % KB)
        kp = tl.load(kp_ptr + g * s_kv + (j // KB)[None, :] * s_blk + rr[:, None] * s_r + (j % KB)[None, :] * s_b,
                     mask=rm[:, None] & valid[None, :], other=0.0).to(tl.float32)
        cnt = tl.sum(valid.to(tl.float32), axis=0)
        for gi in tl.static_range(G):
            h = g * G + gi
            qv = tl.load(q_ptr + h * stride_qh + rr, mask=rm, other=0.0).to(tl.float32)
            p = tl.sum(kp * qv[:, None], axis=0) * scale
            if softcap > 0:
                p = softcap * tanh_f32(p / softcap)
            tl.store(p_ptr + h * stride_ph + j, p, mask=valid)
            mean_b = tl.sum(tl.where(valid, p, 0.0), axis=0) / tl.maximum(cnt, 1.0)
            dev = tl.where(valid, p - mean_b, 0.0)
            base = part_ptr + h * stride_part_h + 4 * b
            tl.store(base, cnt)
            tl.store(base + 1, mean_b)
            tl.store(base + 2, tl.sum(dev * dev, axis=0))
            tl.store(base + 3, tl.max(tl.where(valid, p, float("-inf")), axis=0))
            if b == 0:  # reset the per-head accumulators of launches 2 and 3
                tl.store(cnt_ptr + h, 0)
                tl.store(zsum_ptr + h, 0.0)

    @triton.jit
    def _attn_stats(part_ptr, b0, b1, BLOCK_P: tl.constexpr):
        """(n, mean, M2, max) over blocks [b0, b1) of one head's partials (Chan's parallel combination)."""
        tot = tl.zeros([BLOCK_P], dtype=tl.float32)
        num = tl.zeros([BLOCK_P], dtype=tl.float32)
        mx = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
        for p0 in range(b0, b1, BLOCK_P):
            pb = p0 + tl.arange(0, BLOCK_P)
            pm = pb < b1
            c = tl.load(part_ptr + 4 * pb, mask=pm, other=0.0)
            num += c
            tot += c * tl.load(part_ptr + 4 * pb + 1, mask=pm, other=0.0)
            mx = tl.maximum(mx, tl.load(part_ptr + 4 * pb + 3, mask=pm, other=float("-inf")))
        n = tl.sum(num, axis=0)
        mean = tl.sum(tot, axis=0) / tl.maximum(n, 1.0)
        m2 = tl.zeros([BLOCK_P], dtype=tl.float32)
        for p0 in range(b0, b1, BLOCK_P):
            pb = p0 + tl.arange(0, BLOCK_P)
            pm = pb < b1
            c = tl.load(part_ptr + 4 * pb, mask=pm, other=0.0)
            d = tl.load(part_ptr + 4 * pb + 1, mask=pm, other=0.0) - mean
            m2 += tl.load(part_ptr + 4 * pb + 2, mask=pm, other=0.0) + c * d * d
        return n, mean, tl.sum(m2, axis=0), tl.max(mx, axis=0)

    @triton.jit
    def _attn_select_kernel(len_ptr, p_ptr, stride_ph, part_ptr, stride_part_h, ztab_ptr, cand_ptr, candp_ptr,
                            stride_ch, cnt_ptr, zsum_ptr, m_ptr, out_ptr, stride_oh, DV, K, WINDOW,
                            BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, CHUNK: tl.constexpr,
                            BLOCK_DV: tl.constexpr):
        h = tl.program_id(0)
        c = tl.program_id(1)
        length, lo = _valid_range(len_ptr, WINDOW)
        n_i = length - lo
        n, mean, m2, pmax = _attn_stats(part_ptr + h * stride_part_h, lo // BLOCK_L, tl.cdiv(length, BLOCK_L),
                                        BLOCK_P)
        z = tl.load(ztab_ptr + n_i)
        theta = mean + tl.sqrt(m2 / tl.maximum(n, 1.0)) * z
        theta = tl.where(n_i <= K, float("-inf"), theta)  # at most k valid keys: keep them all
        j = lo + c * CHUNK + tl.arange(0, CHUNK)
        valid = j < length
        p = tl.load(p_ptr + h * stride_ph + j, mask=valid, other=float("-inf"))
        sv = valid & (p > theta)
        sv_i = sv.to(tl.int32)
        ns = tl.sum(sv_i, axis=0)
        if ns > 0:
            base = tl.atomic_add(cnt_ptr + h, ns)
            slot = base + tl.cumsum(sv_i, axis=0) - 1
            tl.store(cand_ptr + h * stride_ch + slot, j, mask=sv)
            tl.store(candp_ptr + h * stride_ch + slot, p, mask=sv)
            tl.atomic_add(zsum_ptr + h, tl.sum(tl.where(sv, tl.exp(p - pmax), 0.0), axis=0), sem="relaxed")
        if c == 0:
            tl.store(m_ptr + h, pmax)
            dd = tl.arange(0, BLOCK_DV)
            for d0 in range(0, DV, BLOCK_DV):
                tl.store(out_ptr + h * stride_oh + d0 + dd, tl.zeros([BLOCK_DV], dtype=tl.float32),
                         mask=d0 + dd < DV)

    @triton.jit
    def _order_key(p, pos):
        """int64 keys ordered like (p, pos): p's fp32 bits made order-preserving as int32, then the position."""
        bits = p.to(tl.int32, bitcast=True)
        o = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        return (o.to(tl.int64) << 32) | pos.to(tl.int64)

    @triton.jit
    def _source_keys(degen, ii, im, lo, p_row, cand_row, candp_row):
        """(position, score) of source entries ii (valid where im): the head's candidate list, or for a degenerate
        head all valid keys. Masks mix a vector with the scalar ``degen`` through tl.where: Triton's interpreter
        (3.9) types ``vector & scalar`` as int32, which tl.load refuses as a mask."""
        from_list = tl.where(degen, False, im)
        from_all = tl.where(degen, im, False)
        pos = tl.where(degen, lo + ii, tl.load(cand_row + ii, mask=from_list, other=0))
        pv = tl.where(degen, tl.load(p_row + lo + ii, mask=from_all, other=0.0),
                      tl.load(candp_row + ii, mask=from_list, other=0.0))
        return pos, pv

    @triton.jit
    def _attn_output_kernel(q_ptr, stride_qh, kr_ptr, kr_skv, kr_sl, v_ptr, v_skv, v_sl, len_ptr, p_ptr, stride_ph,
                            cand_ptr, candp_ptr, stride_ch, cnt_ptr, zsum_ptr, m_ptr, out_ptr, stride_oh,
                            kept_ptr, capped_ptr, R, DR, DV, K, WINDOW, scale,
                            G: tl.constexpr, KP2: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_DR: tl.constexpr,
                            BLOCK_DV: tl.constexpr):
        h = tl.program_id(0)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        g = h // G
        length, lo = _valid_range(len_ptr, WINDOW)
        n = length - lo
        c = tl.load(cnt_ptr + h)
        degen = (c == 0) & (n > 0)  # nothing cleared theta: fall back to the k best of all valid keys
        nsrc = tl.where(degen, n, c)
        m = tl.load(m_ptr + h)
        zsum = tl.load(zsum_ptr + h)
        cutoff = tl.full([], _I64_MIN, tl.int64)
        if nsrc > K:
            # hard cap: streaming top-KP2 of the source's keys, then the k-th largest is the cutoff
            run = tl.full([KP2], _I64_MIN, tl.int64)
            for i0 in range(0, nsrc, KP2):
                ii = i0 + tl.arange(0, KP2)
                im = ii < nsrc
                pos, pv = _source_keys(degen, ii, im, lo, p_ptr + h * stride_ph, cand_ptr + h * stride_ch,
                                       candp_ptr + h * stride_ch)
                key = tl.where(im, _order_key(pv, pos), _I64_MIN)
                run = tl.topk(tl.reshape(tl.join(run, key), [2 * KP2]), KP2)
            cutoff = tl.sum(tl.where(tl.arange(0, KP2) == K - 1, run, 0), axis=0)
            zacc = tl.zeros([KP2], dtype=tl.float32)
            for i0 in range(0, nsrc, KP2):
                ii = i0 + tl.arange(0, KP2)
                im = ii < nsrc
                pos, pv = _source_keys(degen, ii, im, lo, p_ptr + h * stride_ph, cand_ptr + h * stride_ch,
                                       candp_ptr + h * stride_ch)
                keep = im & (_order_key(pv, pos) >= cutoff)
                zacc += tl.where(keep, tl.exp(pv - m), 0.0)
            zsum = tl.sum(zacc, axis=0)
        inv_z = 1.0 / zsum
        if split == 0:
            tl.store(kept_ptr + h, tl.minimum(nsrc, K).to(tl.int64))
            tl.store(capped_ptr + h, ((c > K) & ~degen).to(tl.int8))
        # gather the kept keys of this split: other key half -> softplus gate, values -> weighted sum
        dr = tl.arange(0, BLOCK_DR)
        drm = dr < DR
        q2 = tl.load(q_ptr + h * stride_qh + R + dr, mask=drm, other=0.0).to(tl.float32)
        dv = tl.arange(0, BLOCK_DV)
        dvm = dv < DV
        acc = tl.zeros([BLOCK_J, BLOCK_DV], dtype=tl.float32)
        for i0 in range(split * BLOCK_J, nsrc, n_splits * BLOCK_J):
            ii = i0 + tl.arange(0, BLOCK_J)
            im = ii < nsrc
            pos, pv = _source_keys(degen, ii, im, lo, p_ptr + h * stride_ph, cand_ptr + h * stride_ch,
                                   candp_ptr + h * stride_ch)
            keep = im & (_order_key(pv, pos) >= cutoff)
            kr = tl.load(kr_ptr + g * kr_skv + pos[:, None] * kr_sl + dr[None, :], mask=keep[:, None] & drm[None, :],
                         other=0.0).to(tl.float32)
            gate = softplus_f32(scale * tl.sum(kr * q2[None, :], axis=1))
            w = tl.where(keep, tl.exp(pv - m) * inv_z * gate, 0.0)
            vv = tl.load(v_ptr + g * v_skv + pos[:, None] * v_sl + dv[None, :], mask=keep[:, None] & dvm[None, :],
                         other=0.0).to(tl.float32)
            acc += w[:, None] * vv
        tl.atomic_add(out_ptr + h * stride_oh + dv, tl.sum(acc, axis=0), mask=tl.where(n > 0, dvm, False),
                      sem="relaxed")


@dataclass
class SparkAttnPlan:
    """Launch shapes and scratch for one attention shape (heads, kv heads, head dim, r, dv, max_len, k) on one
    device. ``run`` allocates nothing (CUDA-graph safe); one plan serves all layers (window is per call)."""

    n_heads: int
    n_kv: int
    head_dim: int
    r: int
    dv: int
    max_len: int
    k: int
    device: torch.device
    block_l: int = 64
    chunk: int = 256
    block_j: int = 16
    splits: int = 0  # launch 3 programs per head (0: enough to cover k keys BLOCK_J at a time)
    warps: int = 4

    def __post_init__(self) -> None:
        dev = torch.device(self.device)
        self.device = dev
        self.group = self.n_heads // self.n_kv
        self.n_blocks = triton.cdiv(self.max_len, self.block_l)
        self.block_p = min(1024, next_pow2(self.n_blocks))
        self.kp2 = next_pow2(self.k)
        self.splits = self.splits or max(1, triton.cdiv(self.k, self.block_j))
        H, L = self.n_heads, self.max_len
        f32 = dict(dtype=torch.float32, device=dev)
        self.p = torch.empty(H, L, **f32)
        self.part = torch.empty(H, self.n_blocks * 4, **f32)
        self.cand = torch.empty(H, L, dtype=torch.int32, device=dev)
        self.candp = torch.empty(H, L, **f32)
        self.cnt = torch.zeros(H, dtype=torch.int32, device=dev)
        self.zsum = torch.zeros(H, **f32)
        self.m = torch.zeros(H, **f32)
        self.out = torch.zeros(H, self.dv, **f32)
        self.kept = torch.zeros(H, dtype=torch.int64, device=dev)
        self.capped = torch.zeros(H, dtype=torch.int8, device=dev)
        self.ztab = stat_z_table(self.k, self.max_len, dev)

    def run(self, q: torch.Tensor, kp: torch.Tensor, kr: torch.Tensor, v: torch.Tensor, length: torch.Tensor,
            scale: float, window: int | None = None, softcap: float | None = None,
            out: torch.Tensor | None = None, kept: torch.Tensor | None = None,
            capped: torch.Tensor | None = None, stages: int = 3) -> torch.Tensor:
        """q (H, D); kp blocked (n_kv, L // B, r, B) or plain (n_kv, r, L); kr (n_kv, L, D - r); v (n_kv, L, dv);
        length: int32 device tensor of shape (1,) (filled positions). -> out (H, dv) fp32.
        ``out`` / ``kept`` (H,) int64 / ``capped`` (H,) int8: where to write (default: the plan's own)."""
        out = self.out if out is None else out
        kept = self.kept if kept is None else kept
        capped = self.capped if capped is None else capped
        if kp.dim() == 4:
            kb, s_kv, s_blk, s_r, s_b = kp.shape[3], kp.stride(0), kp.stride(1), kp.stride(2), kp.stride(3)
        else:
            kb, s_kv, s_blk, s_r, s_b = kp.shape[2], kp.stride(0), 0, kp.stride(1), kp.stride(2)
        if kr.stride(-1) != 1 or v.stride(-1) != 1 or q.stride(-1) != 1:
            raise ValueError("q, kr and v need a contiguous last dim")
        W = int(window or 0)
        cap = float(softcap or 0.0)
        H, R = self.n_heads, self.r
        _attn_score_kernel[(self.n_kv, self.n_blocks)](
            q, q.stride(0), kp, s_kv, s_blk, s_r, s_b, kb, length, self.p, self.p.stride(0), self.part,
            self.part.stride(0), self.cnt, self.zsum, R, W, float(scale), cap,
            G=self.group, BLOCK_L=self.block_l, BLOCK_R=next_pow2(R), num_warps=self.warps)
        if stages < 2:  # per-kernel timing only
            return out
        n_chunks = triton.cdiv(min(self.max_len, W) if W else self.max_len, self.chunk)
        _attn_select_kernel[(H, n_chunks)](
            length, self.p, self.p.stride(0), self.part, self.part.stride(0), self.ztab, self.cand, self.candp,
            self.cand.stride(0), self.cnt, self.zsum, self.m, out, out.stride(0), self.dv, self.k, W,
            BLOCK_L=self.block_l, BLOCK_P=self.block_p, CHUNK=self.chunk, BLOCK_DV=min(1024, next_pow2(self.dv)),
            num_warps=self.warps)
        if stages < 3:
            return out
        _attn_output_kernel[(H, self.splits)](
            q, q.stride(0), kr, kr.stride(0), kr.stride(1), v, v.stride(0), v.stride(1), length, self.p,
            self.p.stride(0), self.cand, self.candp, self.cand.stride(0), self.cnt, self.zsum, self.m, out,
            out.stride(0), kept, capped, R, self.head_dim - R, self.dv, self.k, W, float(scale),
            G=self.group, KP2=self.kp2, BLOCK_J=self.block_j, BLOCK_DR=next_pow2(self.head_dim - R),
            BLOCK_DV=next_pow2(self.dv), num_warps=self.warps)
        return out

    @classmethod
    def for_cache(cls, q: torch.Tensor, kp: torch.Tensor, kr: torch.Tensor, v: torch.Tensor, k: int,
                  **kw) -> "SparkAttnPlan":
        r = kp.shape[-2]
        max_len = kr.shape[1]
        return cls(q.shape[0], kp.shape[0], q.shape[1], r, v.shape[2], max_len, k, q.device, **kw)


def spark_attn_decode_triton(q, kp, kr, v, length: int, k: int, scale: float, window: int | None = None,
                             softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton Spark attention decode with the reference's contract: (out (H, dv) in q's dtype, kept (H,) int64,
    capped (H,) bool)."""
    plan = SparkAttnPlan.for_cache(q, kp, kr, v, k)
    ln = torch.tensor([int(length)], dtype=torch.int32, device=q.device)
    out = plan.run(q.contiguous(), kp, kr, v, ln, scale, window, softcap)
    return out.to(q.dtype), plan.kept.clone(), plan.capped.bool()


if HAS_TRITON:

    @torch.library.custom_op("sparkformer::triton_spark_attn_decode", mutates_args=())
    def triton_spark_attn_decode(q: torch.Tensor, kp: torch.Tensor, kr: torch.Tensor, v: torch.Tensor, length: int,
                                 k: int, scale: float, window: int | None = None,
                                 softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Torch custom op around ``spark_attn_decode_triton`` (same arguments and results)."""
        return spark_attn_decode_triton(q, kp, kr, v, length, k, scale, window, softcap)

    @triton_spark_attn_decode.register_fake
    def _(q, kp, kr, v, length, k, scale, window=None, softcap=None):
        H = q.shape[0]
        return (q.new_empty(H, v.shape[2]), q.new_empty(H, dtype=torch.int64), q.new_empty(H, dtype=torch.bool))
else:  # pragma: no cover
    triton_spark_attn_decode = None
