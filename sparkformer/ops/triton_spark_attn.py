"""Spark attention decode (one query position, all heads) in Triton: the GPU twin of
``spark_attn_decode_reference`` (see ``sparkformer.ops.spark_attn_decode`` for the cache layout and the rule).

Two launches per layer, no cast, neither needing the host to know the context length (read from a device tensor,
so one CUDA graph serves every position):

A1 scores  grid (n_kv, key blocks): p_j = scale * q[:r] . kp[:, j] (then soft-cap) for every query head of a kv
           group from one read of the feature-major predictor tile; stores p and the block's (count, mean, M2, max).
           Blocks outside [lo, length) do nothing.
A2 select  grid (heads, splits): every program of a head combines the partials into theta = mean + std *
           ndtri(1 - k/n) (z from ``stat_topk.stat_z_table`` indexed by n: the reference's z bit for bit) and counts
           the survivors p > theta. If more than k survive (the hard cap), or none (degenerate scores: the k best of
           all valid keys), the exact k-th best key is found by radix select: 8-bit histogram passes over the key
           (order-preserving fp32 bits of p, then the position, so ties go to the more recent key, as in the
           reference) -- no sort. Split s then takes the kept keys of ranks [s * BLOCK_J, (s + 1) * BLOCK_J) in
           position order, gathers their other key half and value rows (both loads before use), and computes
           sum_j softmax(p)_j * softplus(scale * q[r:] . kr_j) * v_j over them. The splits' partial outputs go to
           per-split slots; a self-resetting per-head ticket lets the last split sum them (fixed order:
           deterministic) and write the result in the output's dtype, straight into the o-projection input.

Every split repeats the selection (~n scores from L2), which costs less than another launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparkformer.ops.stat_topk import stat_z_table
from sparkformer.ops.triton_common import (HAS_TRITON, INTERPRET, launch_opts, next_pow2, release_dependents,
                                           softplus_f32, tanh_f32, ticket, tl, triton, wait_prior)

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
                           part_ptr, stride_part_h, R, WINDOW, scale, softcap,
                           G: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr):
        g = tl.program_id(0)
        b = tl.program_id(1)
        wait_prior(PDL)
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
        release_dependents(PDL)

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
    def _order_key(p, pos, PB: tl.constexpr):
        """Non-negative int64 keys ordered like (p, pos): p's fp32 bits made order-preserving as an unsigned 32-bit
        number, shifted above the PB position bits (ties in p -> the later position is larger)."""
        bits = tl.where(p == 0.0, 0.0, p).to(tl.int32, bitcast=True)  # -0.0 ties with 0.0, as in a sort
        o = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed order
        u = o.to(tl.int64) + 2147483647 + 1  # unsigned order, 0 .. 2^32 - 1 (int32 literals only)
        return (u << PB) | pos.to(tl.int64)

    @triton.jit
    def _radix_cutoff(p_row, lo, length, theta, K, PB: tl.constexpr, CH: tl.constexpr):
        """The key of the K-th largest (p, position) among valid positions with p > theta (there are more than K):
        one 256-bin histogram per 8-bit digit, most significant first, keeping only keys under the prefix found so
        far; stops as soon as the prefix's bin holds exactly the keys still needed (usually before the position
        bits, i.e. when there is no tie in p at the cutoff)."""
        TB: tl.constexpr = ((32 + PB + 7) // 8) * 8  # key bits, rounded up to whole digits
        NPASS: tl.constexpr = TB // 8
        bins = tl.arange(0, 256)
        prefix = tl.full([], 0, tl.int64)
        need = K
        cut = tl.full([], 0, tl.int64)
        done = K * 0
        for i in tl.static_range(NPASS):
            if done == 0:
                hist = tl.zeros([256], dtype=tl.int32)
                for c0 in range(lo, length, CH):
                    j = c0 + tl.arange(0, CH)
                    jm = j < length
                    p = tl.load(p_row + j, mask=jm, other=0.0)
                    key = _order_key(p, j, PB)
                    # digit i sits at bit TB - 8 (i + 1); written out, not in a variable: a constexpr assigned in an
                    # unrolled loop is a tensor to the compiler (the interpreter would not notice)
                    under = jm & (p > theta) & ((key >> (TB - 8 * i)) == prefix)
                    hist += tl.histogram(((key >> (TB - 8 * i - 8)) & 255).to(tl.int32), 256, mask=under)
                above_eq = tl.cumsum(hist, axis=0, reverse=True)  # keys under the prefix with digit >= bin
                dstar = tl.max(tl.where(above_eq >= need, bins, -1), axis=0)
                need = need - tl.sum(tl.where(bins > dstar, hist, 0), axis=0)
                prefix = (prefix << 8) | dstar.to(tl.int64)
                in_bin = tl.sum(tl.where(bins == dstar, hist, 0), axis=0)
                if in_bin == need:  # every key in this bin is kept: the cutoff is the bin's lowest key
                    cut = prefix << (TB - 8 * i - 8)
                    done = K * 0 + 1
        return cut

    @triton.jit
    def _attn_select_kernel(q_ptr, stride_qh, kr_ptr, kr_skv, kr_sl, v_ptr, v_skv, v_sl, len_ptr, p_ptr, stride_ph,
                            part_ptr, stride_part_h, ztab_ptr, slot_ptr, ticket_ptr, out_ptr, stride_oh,
                            kept_ptr, capped_ptr, R, DR, DV, K, WINDOW, scale,
                            G: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, CH: tl.constexpr,
                            BLOCK_J: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
                            PB: tl.constexpr, CAP_MODE: tl.constexpr, PDL: tl.constexpr):
        h = tl.program_id(0)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        g = h // G
        # the query's other half and the index ranges do not depend on A1: load before waiting (PDL)
        dr = tl.arange(0, BLOCK_DR)
        drm = dr < DR
        q2 = tl.load(q_ptr + h * stride_qh + R + dr, mask=drm, other=0.0).to(tl.float32)
        dv = tl.arange(0, BLOCK_DV)
        dvm = dv < DV
        wait_prior(PDL)
        length, lo = _valid_range(len_ptr, WINDOW)
        n_i = length - lo
        n, mean, m2, pmax = _attn_stats(part_ptr + h * stride_part_h, lo // BLOCK_L, tl.cdiv(length, BLOCK_L),
                                        BLOCK_P)
        z = tl.load(ztab_ptr + n_i)
        theta = mean + tl.sqrt(m2 / tl.maximum(n, 1.0)) * z
        theta = tl.where(n_i <= K, float("-inf"), theta)  # at most k valid keys: keep them all
        p_row = p_ptr + h * stride_ph
        cnt = tl.zeros([CH], dtype=tl.int32)
        for c0 in range(lo, length, CH):
            j = c0 + tl.arange(0, CH)
            jm = j < length
            cnt += (jm & (tl.load(p_row + j, mask=jm, other=0.0) > theta)).to(tl.int32)
        count = tl.sum(cnt, axis=0)
        degen = (count == 0) & (n_i > 0)  # nothing cleared theta: the k best of all valid keys instead
        theta = tl.where(degen, float("-inf"), theta)
        nsrc = tl.where(degen, n_i, count)
        cut = tl.full([], _I64_MIN, tl.int64)
        if CAP_MODE == 1:  # timing only: always pay for the radix select
            cut = _radix_cutoff(p_row, lo, length, theta, K, PB, CH)
        elif CAP_MODE == 0:
            if nsrc > K:
                cut = _radix_cutoff(p_row, lo, length, theta, K, PB, CH)
        # one pass: the softmax denominator over the kept keys, and the positions of this split's ranks
        jj = tl.arange(0, BLOCK_J)
        want = split * BLOCK_J + jj
        pos_j = tl.zeros([BLOCK_J], dtype=tl.int32)
        p_j = tl.zeros([BLOCK_J], dtype=tl.float32)
        zacc = tl.zeros([CH], dtype=tl.float32)
        base = K * 0
        for c0 in range(lo, length, CH):
            j = c0 + tl.arange(0, CH)
            jm = j < length
            p = tl.load(p_row + j, mask=jm, other=0.0)
            keep = jm & (p > theta) & (_order_key(p, j, PB) >= cut)
            zacc += tl.where(keep, tl.exp(p - pmax), 0.0)
            ki = keep.to(tl.int32)
            rank = base + tl.cumsum(ki, axis=0) - 1
            nk = tl.sum(ki, axis=0)
            if (base < split * BLOCK_J + BLOCK_J) & (base + nk > split * BLOCK_J):  # some of my ranks are here
                match = keep[None, :] & (rank[None, :] == want[:, None])  # (BLOCK_J, CH)
                pos_j += tl.sum(tl.where(match, j[None, :], 0), axis=1)
                p_j += tl.sum(tl.where(match, p[None, :], 0.0), axis=1)
            base += nk
        zsum = tl.sum(zacc, axis=0)
        mine = want < base
        # gather the kept keys' other half and values together, then the gate and the weighted sum
        kr = tl.load(kr_ptr + g * kr_skv + pos_j[:, None] * kr_sl + dr[None, :], mask=mine[:, None] & drm[None, :],
                     other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + g * v_skv + pos_j[:, None] * v_sl + dv[None, :], mask=mine[:, None] & dvm[None, :],
                     other=0.0).to(tl.float32)
        gate = softplus_f32(scale * tl.sum(kr * q2[None, :], axis=1))
        w = tl.where(mine, tl.exp(p_j - pmax) / zsum * gate, 0.0)
        part = tl.sum(w[:, None] * vv, axis=0)
        if split == 0:
            tl.store(kept_ptr + h, tl.minimum(nsrc, K).to(tl.int64))
            tl.store(capped_ptr + h, ((count > K) & ~degen).to(tl.int8))
        if n_splits == 1:
            tl.store(out_ptr + h * stride_oh + dv, part.to(out_ptr.dtype.element_ty), mask=dvm)
        else:
            tl.store(slot_ptr + (h * n_splits + split) * DV + dv, part, mask=dvm)
            if ticket(ticket_ptr + h, n_splits):  # the last split of this head sums the slots in a fixed order
                acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
                for s in range(0, n_splits):
                    acc += tl.load(slot_ptr + (h * n_splits + s) * DV + dv, mask=dvm, other=0.0,
                                   cache_modifier=".cg")
                tl.store(out_ptr + h * stride_oh + dv, acc.to(out_ptr.dtype.element_ty), mask=dvm)
        release_dependents(PDL)


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
    block_l: int = 64  # A1: keys per program
    chunk: int = 512  # A2: scores per step of its scans
    block_j: int = 16  # A2: kept keys per split (splits = k / block_j)
    warps: int = 4
    cap_mode: int = 0  # 0 exact; 1 always / 2 never run the radix select (timing only: wrong results)
    pdl: bool = False

    def __post_init__(self) -> None:
        dev = torch.device(self.device)
        self.device = dev
        self.pdl = bool(self.pdl) and dev.type == "cuda" and not INTERPRET
        self.group = self.n_heads // self.n_kv
        self.n_blocks = triton.cdiv(self.max_len, self.block_l)
        self.block_p = min(1024, next_pow2(self.n_blocks))
        self.splits = max(1, triton.cdiv(self.k, self.block_j))
        self.pos_bits = max(1, int(self.max_len).bit_length())
        if 32 + self.pos_bits > 63:
            raise ValueError(f"max_len {self.max_len} too large for 64-bit (score, position) keys")
        H, L = self.n_heads, self.max_len
        f32 = dict(dtype=torch.float32, device=dev)
        self.p = torch.empty(H, L, **f32)
        self.part = torch.empty(H, self.n_blocks * 4, **f32)
        self.slots = torch.empty(H * self.splits * self.dv, **f32)
        self.tickets = torch.zeros(H, dtype=torch.int32, device=dev)  # self-resetting: zero between calls
        self.out = torch.zeros(H, self.dv, **f32)
        self.kept = torch.zeros(H, dtype=torch.int64, device=dev)
        self.capped = torch.zeros(H, dtype=torch.int8, device=dev)
        self.ztab = stat_z_table(self.k, self.max_len, dev)

    def run(self, q: torch.Tensor, kp: torch.Tensor, kr: torch.Tensor, v: torch.Tensor, length: torch.Tensor,
            scale: float, window: int | None = None, softcap: float | None = None,
            out: torch.Tensor | None = None, kept: torch.Tensor | None = None,
            capped: torch.Tensor | None = None, stages: int = 2) -> torch.Tensor:
        """q (H, D); kp blocked (n_kv, L // B, r, B) or plain (n_kv, r, L); kr (n_kv, L, D - r); v (n_kv, L, dv);
        length: int32 device tensor of shape (1,) (filled positions). -> out (H, dv), written in out's dtype
        (default: the plan's fp32 buffer). ``kept`` (H,) int64 / ``capped`` (H,) int8: where to write (default:
        the plan's own). ``stages=1`` runs A1 only (per-kernel timing)."""
        out = self.out if out is None else out
        kept = self.kept if kept is None else kept
        capped = self.capped if capped is None else capped
        if kp.dim() == 4:
            kb, s_kv, s_blk, s_r, s_b = kp.shape[3], kp.stride(0), kp.stride(1), kp.stride(2), kp.stride(3)
        else:
            kb, s_kv, s_blk, s_r, s_b = kp.shape[2], kp.stride(0), 0, kp.stride(1), kp.stride(2)
        if kr.stride(-1) != 1 or v.stride(-1) != 1 or q.stride(-1) != 1 or out.stride(-1) != 1:
            raise ValueError("q, kr, v and out need a contiguous last dim")
        W = int(window or 0)
        cap = float(softcap or 0.0)
        R = self.r
        _attn_score_kernel[(self.n_kv, self.n_blocks)](
            q, q.stride(0), kp, s_kv, s_blk, s_r, s_b, kb, length, self.p, self.p.stride(0), self.part,
            self.part.stride(0), R, W, float(scale), cap,
            G=self.group, BLOCK_L=self.block_l, BLOCK_R=next_pow2(R), PDL=self.pdl,
            **launch_opts(self.warps, self.pdl))
        if stages < 2:
            return out
        _attn_select_kernel[(self.n_heads, self.splits)](
            q, q.stride(0), kr, kr.stride(0), kr.stride(1), v, v.stride(0), v.stride(1), length, self.p,
            self.p.stride(0), self.part, self.part.stride(0), self.ztab, self.slots, self.tickets, out, out.stride(0),
            kept, capped, R, self.head_dim - R, self.dv, self.k, W, float(scale),
            G=self.group, BLOCK_L=self.block_l, BLOCK_P=self.block_p, CH=self.chunk, BLOCK_J=self.block_j,
            BLOCK_DR=next_pow2(self.head_dim - R), BLOCK_DV=next_pow2(self.dv), PB=self.pos_bits,
            CAP_MODE=self.cap_mode, PDL=self.pdl, **launch_opts(self.warps, self.pdl))
        return out

    @classmethod
    def for_cache(cls, q: torch.Tensor, kp: torch.Tensor, kr: torch.Tensor, v: torch.Tensor, k: int,
                  **kw) -> "SparkAttnPlan":
        r = kp.shape[-2]
        max_len = kr.shape[1]
        return cls(q.shape[0], kp.shape[0], q.shape[1], r, v.shape[2], max_len, k, q.device, **kw)


def spark_attn_decode_triton(q, kp, kr, v, length: int, k: int, scale: float, window: int | None = None,
                             softcap: float | None = None, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton Spark attention decode with the reference's contract: (out (H, dv) in q's dtype, kept (H,) int64,
    capped (H,) bool). ``kw``: launch-shape fields of ``SparkAttnPlan``."""
    plan = SparkAttnPlan.for_cache(q, kp, kr, v, k, **kw)
    ln = torch.tensor([int(length)], dtype=torch.int32, device=q.device)
    out = torch.empty(q.shape[0], v.shape[2], dtype=q.dtype, device=q.device)
    plan.run(q.contiguous(), kp, kr, v, ln, scale, window, softcap, out=out)
    return out, plan.kept.clone(), plan.capped.bool()


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
