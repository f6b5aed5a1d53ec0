"""Triton pieces of the CUDA decode engine besides the Spark kernels: the dense attention baseline and fused glue.

- ``DenseAttnPlan``: flash-decoding for one query position (GQA, sliding window, Gemma-2 logit soft-cap, which
  SDPA/flash cannot express): launch 1 splits the valid keys of each kv head across programs, each scoring all
  query heads of the group with one tensor-core dot (query rows padded to 16) and keeping an online softmax;
  launch 2 merges the splits. The dense model gets the same engineering as the sparse one: an honest baseline.
  Reference: ``sparkformer.ops.dense_decode.dense_attn_decode_reference``.
- Glue, one launch each, so a decode step is GEMVs + a few fused kernels (launch count matters at ~1 ms/token):
  ``embed_norm`` (token from a device tensor -> scaled embedding -> first RMSNorm), ``residual_norm`` (optional
  post-norm of a sub-block output, residual add, next pre-norm), ``rope_cache`` (RoPE of q and k at the device
  position, k/v written into the cache: dense row-major or Spark blocked-predictor layout) and ``geglu_act``.
- ``res_norm_gemv``: the previous sub-block's residual add (with its post-norm) and the next pre-norm folded into
  the prologue of the GEMV that consumes them (q/k/v): one launch instead of two, no normalised vector round trip.
  Every program recomputes the norm (d floats from L2); program 0 writes the new residual into the other buffer of
  a ping-pong pair, so no program reads a residual another is overwriting.

All read the position / length from device tensors, so a captured CUDA graph replays at any position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparkformer.ops.triton_common import ACT_IDS, HAS_TRITON, INTERPRET, act_f32, next_pow2, tanh_f32, tl, triton

__all__ = ["DenseAttnPlan", "dense_attn_decode_triton", "embed_norm", "geglu_act", "res_norm_gemv", "residual_norm",
           "rope_cache"]

if HAS_TRITON:

    @triton.jit
    def _dense_attn_partial_kernel(q_ptr, stride_qh, k_ptr, k_skv, k_sl, v_ptr, v_skv, v_sl, len_ptr,
                                   m_ptr, l_ptr, acc_ptr, D, DV, WINDOW, scale, softcap,
                                   G: tl.constexpr, GP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                                   BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
        # IEEE: fp32 operands, exact fp32 dots (fp32 caches); else operands in the cache dtype on tensor cores
        g = tl.program_id(0)
        sp = tl.program_id(1)
        n_sp = tl.num_programs(1)
        length = tl.load(len_ptr)
        lo = length * 0
        if WINDOW > 0:
            lo = tl.maximum(length - WINDOW, 0)
        per = tl.cdiv(tl.cdiv(length - lo, n_sp), BLOCK_L) * BLOCK_L
        start = lo + sp * per
        end = tl.minimum(start + per, length)
        gi = tl.arange(0, GP)
        gm = gi < G
        dd = tl.arange(0, BLOCK_D)
        dm = dd < D
        dv = tl.arange(0, BLOCK_DV)
        dvm = dv < DV
        q = tl.load(q_ptr + (g * G + gi)[:, None] * stride_qh + dd[None, :], mask=gm[:, None] & dm[None, :],
                    other=0.0)
        q = q.to(tl.float32) if IEEE else q.to(k_ptr.dtype.element_ty)
        m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GP], dtype=tl.float32)
        acc = tl.zeros([GP, BLOCK_DV], dtype=tl.float32)
        for j0 in range(start, end, BLOCK_L):
            j = j0 + tl.arange(0, BLOCK_L)
            jm = j < end
            kt = tl.load(k_ptr + g * k_skv + j[None, :] * k_sl + dd[:, None], mask=dm[:, None] & jm[None, :],
                         other=0.0)
            if IEEE:
                s = tl.dot(q, kt.to(tl.float32), input_precision="ieee") * scale
            else:
                s = tl.dot(q, kt) * scale
            if softcap > 0:
                s = softcap * tanh_f32(s / softcap)
            s = tl.where(jm[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            pe = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(pe, axis=1)
            vt = tl.load(v_ptr + g * v_skv + j[:, None] * v_sl + dv[None, :], mask=jm[:, None] & dvm[None, :],
                         other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(pe, vt.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(pe.to(vt.dtype), vt)
            m_i = m_new
        h = g * G + gi
        tl.store(m_ptr + h * n_sp + sp, m_i, mask=gm)
        tl.store(l_ptr + h * n_sp + sp, l_i, mask=gm)
        tl.store(acc_ptr + (h * n_sp + sp)[:, None] * DV + dv[None, :], acc, mask=gm[:, None] & dvm[None, :])

    @triton.jit
    def _dense_attn_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, stride_oh, len_ptr, DV, N_SP,
                                   BLOCK_SP: tl.constexpr, BLOCK_DV: tl.constexpr):
        h = tl.program_id(0)
        sp = tl.arange(0, BLOCK_SP)
        spm = sp < N_SP
        m = tl.load(m_ptr + h * N_SP + sp, mask=spm, other=float("-inf"))
        l = tl.load(l_ptr + h * N_SP + sp, mask=spm, other=0.0)
        mx = tl.max(m, axis=0)
        w = tl.where(spm & (m > float("-inf")), tl.exp(m - mx), 0.0)
        denom = tl.sum(w * l, axis=0)
        inv = tl.where(tl.load(len_ptr) > 0, 1.0 / denom, 0.0)
        dv = tl.arange(0, BLOCK_DV)
        dvm = dv < DV
        a = tl.load(acc_ptr + (h * N_SP + sp)[:, None] * DV + dv[None, :], mask=spm[:, None] & dvm[None, :],
                    other=0.0)
        o = tl.sum(a * w[:, None], axis=0) * inv
        tl.store(out_ptr + h * stride_oh + dv, o.to(out_ptr.dtype.element_ty), mask=dvm)

    @triton.jit
    def _rms(x, mask, D, eps):
        ms = tl.sum(tl.where(mask, x * x, 0.0), axis=0) / D
        return x * (1.0 / tl.sqrt(ms + eps))

    @triton.jit
    def _embed_norm_kernel(tok_ptr, emb_ptr, stride_e, scale, h_ptr, w_ptr, xn_ptr, pos_ptr, len_ptr, D, eps,
                           BLOCK: tl.constexpr):
        dd = tl.arange(0, BLOCK)
        dm = dd < D
        tok = tl.load(tok_ptr)
        e = tl.load(emb_ptr + tok * stride_e + dd, mask=dm, other=0.0).to(tl.float32) * scale
        tl.store(h_ptr + dd, e, mask=dm)
        w = tl.load(w_ptr + dd, mask=dm, other=0.0)
        tl.store(xn_ptr + dd, (_rms(e, dm, D, eps) * w).to(xn_ptr.dtype.element_ty), mask=dm)
        tl.store(len_ptr, tl.load(pos_ptr) + 1)

    @triton.jit
    def _residual_norm_kernel(o_ptr, h_ptr, wpost_ptr, wpre_ptr, xn_ptr, D, eps, POST: tl.constexpr,
                              BLOCK: tl.constexpr):
        dd = tl.arange(0, BLOCK)
        dm = dd < D
        o = tl.load(o_ptr + dd, mask=dm, other=0.0).to(tl.float32)
        if POST:
            o = _rms(o, dm, D, eps) * tl.load(wpost_ptr + dd, mask=dm, other=0.0)
        h = tl.load(h_ptr + dd, mask=dm, other=0.0) + o
        tl.store(h_ptr + dd, h, mask=dm)
        tl.store(xn_ptr + dd, (_rms(h, dm, D, eps) * tl.load(wpre_ptr + dd, mask=dm, other=0.0)).to(
            xn_ptr.dtype.element_ty), mask=dm)

    @triton.jit
    def _res_norm_gemv_kernel(o_ptr, h_ptr, hout_ptr, wpost_ptr, wpre_ptr, w_ptr, stride_w, y_ptr, N, D, eps,
                              RESID: tl.constexpr, POST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        dd = tl.arange(0, BLOCK_D)
        dm = dd < D
        h = tl.load(h_ptr + dd, mask=dm, other=0.0)
        inv_o = 0.0
        if RESID:
            o = tl.load(o_ptr + dd, mask=dm, other=0.0).to(tl.float32)
            if POST:
                inv_o = 1.0 / tl.sqrt(tl.sum(o * o, axis=0) / D + eps)
                o = o * inv_o * tl.load(wpost_ptr + dd, mask=dm, other=0.0)
            h = h + o
            if pid == 0:
                tl.store(hout_ptr + dd, h, mask=dm)
        inv_h = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = rows < N
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):  # the normalised input, chunk by chunk from the (L1/L2-hot) residual
            cols = k0 + tl.arange(0, BLOCK_K)
            cm = cols < D
            w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
            hc = tl.load(h_ptr + cols, mask=cm, other=0.0)
            if RESID:
                oc = tl.load(o_ptr + cols, mask=cm, other=0.0).to(tl.float32)
                if POST:
                    oc = oc * inv_o * tl.load(wpost_ptr + cols, mask=cm, other=0.0)
                hc = hc + oc
            # rounded to the weights' dtype first, as the unfused path's normalised vector is
            xc = (hc * inv_h * tl.load(wpre_ptr + cols, mask=cm, other=0.0)).to(w_ptr.dtype.element_ty)
            acc += w.to(tl.float32) * xc.to(tl.float32)[None, :]
        tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=rm)

    @triton.jit
    def _rope_one(x_ptr, e, em, pos, cos_a, sin_a, cos_b, sin_b, RA, HD):
        """Rotate-half RoPE of one head vector; dims [0, RA) and [RA, HD) are separate rotary spaces."""
        in_a = e < RA
        off = tl.where(in_a, 0, RA)
        n = tl.where(in_a, RA, HD - RA)
        loc = e - off
        half = n // 2
        partner = off + (loc + half) % tl.maximum(n, 1)
        x = tl.load(x_ptr + e, mask=em, other=0.0).to(tl.float32)
        xp = tl.load(x_ptr + partner, mask=em, other=0.0).to(tl.float32)
        rot = tl.where(loc < half, -xp, xp)
        c = tl.where(in_a, tl.load(cos_a + pos * RA + loc, mask=em & in_a, other=0.0),
                     tl.load(cos_b + pos * (HD - RA) + loc, mask=em & ~in_a, other=0.0))
        s = tl.where(in_a, tl.load(sin_a + pos * RA + loc, mask=em & in_a, other=0.0),
                     tl.load(sin_b + pos * (HD - RA) + loc, mask=em & ~in_a, other=0.0))
        return x * c + rot * s

    @triton.jit
    def _rope_cache_kernel(qkv_ptr, pos_ptr, q_ptr, cos_a, sin_a, cos_b, sin_b,
                           k_ptr, k_skv, k_sblk, k_sd, k_sl, KB, kr_ptr, kr_skv, kr_sl, v_ptr, v_skv, v_sl,
                           H, HD, RA, SPARK: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        pos = tl.load(pos_ptr)
        e = tl.arange(0, BLOCK)
        em = e < HD
        y = _rope_one(qkv_ptr + pid * HD, e, em, pos, cos_a, sin_a, cos_b, sin_b, RA, HD)
        if pid < H:
            tl.store(q_ptr + pid * HD + e, y, mask=em)
        else:
            g = pid - H
            if SPARK:  # predictor half -> blocked feature-major kp; other half -> kr
                tl.store(k_ptr + g * k_skv + (pos // KB) * k_sblk + e * k_sd + (pos % KB) * k_sl,
                         y.to(k_ptr.dtype.element_ty), mask=em & (e < RA))
                tl.store(kr_ptr + g * kr_skv + pos * kr_sl + (e - RA), y.to(kr_ptr.dtype.element_ty),
                         mask=em & (e >= RA))
            else:
                tl.store(k_ptr + g * k_skv + pos * k_sl + e, y.to(k_ptr.dtype.element_ty), mask=em)
            n_kv = tl.num_programs(0) - H
            vv = tl.load(qkv_ptr + (H + n_kv + g) * HD + e, mask=em, other=0.0)
            tl.store(v_ptr + g * v_skv + pos * v_sl + e, vv.to(v_ptr.dtype.element_ty), mask=em)

    @triton.jit
    def _geglu_act_kernel(gu_ptr, a_ptr, M, ACT: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < M
        gv = tl.load(gu_ptr + i, mask=m, other=0.0).to(tl.float32)
        uv = tl.load(gu_ptr + M + i, mask=m, other=0.0).to(tl.float32)
        tl.store(a_ptr + i, (act_f32(gv, ACT) * uv).to(a_ptr.dtype.element_ty), mask=m)


@dataclass
class DenseAttnPlan:
    """Dense flash-decoding for one shape; ``run`` allocates nothing (CUDA-graph safe)."""

    n_heads: int
    n_kv: int
    head_dim: int
    dv: int
    device: torch.device
    splits: int = 0  # programs per kv head (0: about two waves of the GPU)
    block_l: int = 64
    warps: int = 4

    def __post_init__(self) -> None:
        dev = torch.device(self.device)
        self.device = dev
        self.group = self.n_heads // self.n_kv
        if not self.splits:
            sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 2
            self.splits = max(1, (2 * sms) // self.n_kv)
        H, S = self.n_heads, self.splits
        f32 = dict(dtype=torch.float32, device=dev)
        self.m = torch.empty(H * S, **f32)
        self.l = torch.empty(H * S, **f32)
        self.acc = torch.empty(H * S * self.dv, **f32)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor, scale: float,
            window: int | None, softcap: float | None, out: torch.Tensor) -> torch.Tensor:
        """q (H, D); k (n_kv, L, D), v (n_kv, L, dv) row-major (last dim contiguous); length int32 (1,) device
        tensor; writes out (H, dv) in out's dtype."""
        _dense_attn_partial_kernel[(self.n_kv, self.splits)](
            q, q.stride(0), k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1), length, self.m, self.l,
            self.acc, self.head_dim, self.dv, int(window or 0), float(scale), float(softcap or 0.0),
            G=self.group, GP=max(16, next_pow2(self.group)), BLOCK_L=self.block_l,
            BLOCK_D=next_pow2(self.head_dim), BLOCK_DV=next_pow2(self.dv),
            IEEE=k.dtype == torch.float32 or INTERPRET,  # the interpreter's bf16 dot is wrong: fp32 there
            num_warps=self.warps)
        _dense_attn_combine_kernel[(self.n_heads,)](
            self.m, self.l, self.acc, out, out.stride(0), length, self.dv, self.splits,
            BLOCK_SP=next_pow2(self.splits), BLOCK_DV=next_pow2(self.dv), num_warps=self.warps)
        return out


def dense_attn_decode_triton(q, k, v, length: int, scale: float, window=None, softcap=None) -> torch.Tensor:
    """Triton dense attention decode, contract of ``dense_attn_decode_reference`` (row-major k)."""
    plan = DenseAttnPlan(q.shape[0], k.shape[0], q.shape[1], v.shape[2], q.device)
    out = torch.empty(q.shape[0], v.shape[2], dtype=q.dtype, device=q.device)
    ln = torch.tensor([int(length)], dtype=torch.int32, device=q.device)
    qq = q.to(k.dtype) if q.dtype != k.dtype and k.dtype != torch.float32 else q
    return plan.run(qq.contiguous(), k, v, ln, scale, window, softcap, out)


# ---- glue launchers (no allocation: outputs are given) ------------------------------------------------------
def embed_norm(tok: torch.Tensor, embed: torch.Tensor, scale: float, h: torch.Tensor, w: torch.Tensor,
               xn: torch.Tensor, pos: torch.Tensor, length: torch.Tensor, eps: float) -> None:
    """h = embed[tok] * scale (fp32); xn = rms_norm(h) * w; length = pos + 1."""
    d = embed.shape[1]
    _embed_norm_kernel[(1,)](tok, embed, embed.stride(0), float(scale), h, w, xn, pos, length, d, float(eps),
                             BLOCK=next_pow2(d), num_warps=8)


def residual_norm(o: torch.Tensor, h: torch.Tensor, w_post: torch.Tensor | None, w_pre: torch.Tensor,
                  xn: torch.Tensor, eps: float) -> None:
    """h += rms_norm(o) * w_post (or h += o without a post-norm); xn = rms_norm(h) * w_pre."""
    d = h.shape[0]
    _residual_norm_kernel[(1,)](o, h, w_post if w_post is not None else w_pre, w_pre, xn, d, float(eps),
                                POST=w_post is not None, BLOCK=next_pow2(d), num_warps=8)


def res_norm_gemv(o: torch.Tensor | None, h: torch.Tensor, h_out: torch.Tensor | None, w_post: torch.Tensor | None,
                  w_pre: torch.Tensor, w: torch.Tensor, y: torch.Tensor, eps: float, block_n: int = 16,
                  block_k: int = 512, warps: int = 4) -> None:
    """y = W @ (rms_norm(h') * w_pre) with h' = h + rms_norm(o) * w_post (or h + o without a post-norm, or h alone
    when ``o`` is None); h' is written to ``h_out`` (which must not be ``h``). The fused form of ``residual_norm``
    followed by ``torch.mv``; reference: those two."""
    d, n = h.shape[0], w.shape[0]
    if o is not None and h_out is h:
        raise ValueError("h_out must be another buffer than h (other programs still read h)")
    _res_norm_gemv_kernel[(triton.cdiv(n, block_n),)](
        o if o is not None else h, h, h_out if h_out is not None else h, w_post if w_post is not None else w_pre,
        w_pre, w, w.stride(0), y, n, d, float(eps), RESID=o is not None, POST=w_post is not None, BLOCK_N=block_n,
        BLOCK_K=min(block_k, next_pow2(d)), BLOCK_D=next_pow2(d), num_warps=warps)


def rope_cache(qkv: torch.Tensor, pos: torch.Tensor, q_out: torch.Tensor, rope_a, rope_b, cache: tuple,
               n_heads: int, n_kv: int, head_dim: int, ra: int) -> None:
    """RoPE of q (into q_out, fp32) and k at position pos; k and v written into ``cache``.

    cache: ("dense", k (n_kv, L, D), v (n_kv, L, dv)) or ("spark", kp (n_kv, L // B, r, B), kr, v).
    rope_a / rope_b: (cos, sin) tables (L, ra) and (L, D - ra) (rope_b unused when ra == D)."""
    cos_a, sin_a = rope_a
    cos_b, sin_b = rope_b if rope_b is not None else rope_a
    if cache[0] == "spark":
        _, kp, kr, v = cache
        ks = (kp, kp.stride(0), kp.stride(1), kp.stride(2), kp.stride(3), kp.shape[3], kr, kr.stride(0), kr.stride(1))
    else:
        _, k, v = cache
        ks = (k, k.stride(0), 0, 1, k.stride(1), 1, k, 0, 0)
    _rope_cache_kernel[(n_heads + n_kv,)](qkv, pos, q_out, cos_a, sin_a, cos_b, sin_b, *ks, v, v.stride(0),
                                         v.stride(1), n_heads, head_dim, ra, SPARK=cache[0] == "spark",
                                         BLOCK=next_pow2(head_dim), num_warps=4)


def geglu_act(gu: torch.Tensor, a: torch.Tensor, activation: str = "gelu_tanh") -> None:
    """a = act(gu[:m]) * gu[m:] (m = a's length), in a's dtype."""
    m = a.shape[-1]
    block = 1024
    _geglu_act_kernel[(triton.cdiv(m, block),)](gu, a, m, ACT=ACT_IDS[activation], BLOCK=block, num_warps=4)
