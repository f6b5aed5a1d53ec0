// Kernel bodies, compiled once per instruction set.
//
// Included by kernels_{avx512,avx2,scalar}.cpp after they define SPK_ISA (2 = AVX-512, 1 = AVX2+FMA,
// 0 = plain C++), SPK_NS (a namespace private to that build) and, for the SIMD builds, a
// `#pragma GCC target(...)` that applies to every function below. Nothing here includes torch or
// the STL containers, so no inline function compiled for one ISA can leak into code run on another.
//
// The vector layer (kernels_simd.h) is a handful of inline functions over `vf` (a SIMD register, or a
// float for the plain build); the kernels are written once on top of it, templated on the weight type T
// (float, or uint16_t holding bf16 bits).

#include "kernels_simd.h"

namespace SPK_NS {

// ------------------------------------------------------------------------------------------------
// Kernels
// ------------------------------------------------------------------------------------------------
// Rows i and i + h of the range together: two far-apart forward streams, which the hardware prefetcher serves at
// full rate (interleaving *adjacent* rows measured 20-60% slower; the far pair 3-10% faster than one row at a time,
// bf16 from memory, standalone test), each load of x serving both. Per row the same sums as dot1.
template <class T>
static void matvec_t(const T* w, int64_t ld, int64_t n, const float* x, float* y, int64_t r0, int64_t r1) {
  const int64_t h = (r1 - r0) / 2;
  for (int64_t i = r0; i < r0 + h; ++i) {
    const T* rows[2] = {w + i * ld, w + (i + h) * ld};
    float o[2];
    dot_rows<2, 2>(rows, x, n, o);
    y[i - r0] = o[0];
    y[i + h - r0] = o[1];
  }
  if ((r1 - r0) % 2) y[r1 - 1 - r0] = dot1(w + (r1 - 1) * ld, x, n);
}

static void matvec(const void* w, bool bf16, int64_t ld, int64_t n, const float* x, float* y, int64_t r0, int64_t r1) {
  if (bf16) matvec_t(static_cast<const uint16_t*>(w), ld, n, x, y, r0, r1);
  else matvec_t(static_cast<const float*>(w), ld, n, x, y, r0, r1);
}


// Selected neurons in groups of R: R K2 rows against x2 at once, then their R V rows into acc in one
// read-modify-write pass. Rows are random, and R independent streams keep enough misses in flight: in a
// standalone test (bf16, one thread) R = 16 streamed 18 GB/s, R = 4 with pairwise V updates 11.5 GB/s,
// one neuron at a time 8 GB/s; software prefetch added nothing once R = 16.
template <int R, class T>
static inline void ffn_group(const int32_t* idx, const float* a, const T* k2, int64_t ld2, int64_t n2,
                             const float* x2, const T* v, int64_t ldv, int64_t nv, float* acc) {
  const T* rows[R];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) rows[i] = k2 + idx[i] * ld2;
  float h[R];
  dot_rows<R, 1>(rows, x2, n2, h);
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    h[i] *= a[i];
    rows[i] = v + idx[i] * ldv;
  }
  axpy_rows<R>(h, rows, acc, nv);
}

template <class T>
static void ffn_gather_t(const int32_t* idx, const float* a, int64_t cnt, const T* k2, int64_t ld2, int64_t n2,
                         const float* x2, const T* v, int64_t ldv, int64_t nv, float* acc) {
  int64_t t = 0;
  for (; t + 16 <= cnt; t += 16) ffn_group<16>(idx + t, a + t, k2, ld2, n2, x2, v, ldv, nv, acc);
  for (; t + 4 <= cnt; t += 4) ffn_group<4>(idx + t, a + t, k2, ld2, n2, x2, v, ldv, nv, acc);
  for (; t < cnt; ++t) ffn_group<1>(idx + t, a + t, k2, ld2, n2, x2, v, ldv, nv, acc);
}

static void ffn_gather(const int32_t* idx, const float* a, int64_t cnt, const void* k2, int64_t ld2, int64_t n2,
                       const float* x2, const void* v, int64_t ldv, int64_t nv, bool bf16, float* acc) {
  if (bf16)
    ffn_gather_t(idx, a, cnt, static_cast<const uint16_t*>(k2), ld2, n2, x2, static_cast<const uint16_t*>(v), ldv, nv, acc);
  else
    ffn_gather_t(idx, a, cnt, static_cast<const float*>(k2), ld2, n2, x2, static_cast<const float*>(v), ldv, nv, acc);
}

// Spark FFN prefill, one neuron against G tokens: its K2 row against G inputs at once (each K2 load
// feeds G FMAs), then its V row into G output rows (each V load feeds G read-modify-writes). The
// neuron's two rows stay in L1 across its tokens; the token rows come from L2/L3.
template <int G, class T>
static inline void ffn_neuron_group(const T* k2, int64_t n2, const T* v, int64_t nv, const int32_t* tok,
                                    const float* a, const float* x, int64_t ldx, float* y, int64_t ldy) {
  const float* xs[G];
  float* ys[G];
  vf acc[G];
#pragma GCC unroll 8
  for (int i = 0; i < G; ++i) {
    xs[i] = x + int64_t(tok[i]) * ldx;
    ys[i] = y + int64_t(tok[i]) * ldy;
    acc[i] = vzero();
  }
  int64_t c = 0;
  for (; c + VW <= n2; c += VW) {
    const vf w = vld(k2 + c);
#pragma GCC unroll 8
    for (int i = 0; i < G; ++i) acc[i] = vfma(w, vld(xs[i] + c), acc[i]);
  }
  float h[G];
#pragma GCC unroll 8
  for (int i = 0; i < G; ++i) h[i] = vsum(acc[i]);
  for (; c < n2; ++c) {
    const float w = ld1(k2 + c);
    for (int i = 0; i < G; ++i) h[i] += w * xs[i][c];
  }
  vf hv[G];
#pragma GCC unroll 8
  for (int i = 0; i < G; ++i) {
    h[i] *= a[i];
    hv[i] = vset(h[i]);
  }
  c = 0;
  for (; c + VW <= nv; c += VW) {
    const vf w = vld(v + c);
#pragma GCC unroll 8
    for (int i = 0; i < G; ++i) vst(ys[i] + c, vfma(hv[i], w, vld(ys[i] + c)));
  }
  for (; c < nv; ++c) {
    const float w = ld1(v + c);
    for (int i = 0; i < G; ++i) ys[i][c] += h[i] * w;
  }
}

template <class T>
static void ffn_neuron_t(const T* k2, int64_t n2, const T* v, int64_t nv, const int32_t* tok, const float* a,
                         int64_t cnt, const float* x, int64_t ldx, float* y, int64_t ldy) {
  int64_t t = 0;
  for (; t + 8 <= cnt; t += 8) ffn_neuron_group<8>(k2, n2, v, nv, tok + t, a + t, x, ldx, y, ldy);
  for (; t + 4 <= cnt; t += 4) ffn_neuron_group<4>(k2, n2, v, nv, tok + t, a + t, x, ldx, y, ldy);
  for (; t < cnt; ++t) ffn_neuron_group<1>(k2, n2, v, nv, tok + t, a + t, x, ldx, y, ldy);
}

static void ffn_neuron(const void* k2, int64_t n2, const void* v, int64_t nv, bool bf16, const int32_t* tok,
                       const float* a, int64_t cnt, const float* x, int64_t ldx, float* y, int64_t ldy) {
  if (bf16)
    ffn_neuron_t(static_cast<const uint16_t*>(k2), n2, static_cast<const uint16_t*>(v), nv, tok, a, cnt, x, ldx, y,
                 ldy);
  else
    ffn_neuron_t(static_cast<const float*>(k2), n2, static_cast<const float*>(v), nv, tok, a, cnt, x, ldx, y, ldy);
}

// Gated FFN neurons [j0, j1) in two passes, both pure forward streams with nothing written to memory but
// small scratch: (1) per neuron its gate row and its up row (two streams: with pack_geglu the gate and
// up matrices are m*d apart) -> h_j; (2) the down rows four far-apart streams at a time (j, j+q, j+2q,
// j+3q), so the read-modify-write of acc happens once per four rows. (The earlier one-pass version --
// gate, up and down row of each neuron in turn -- ran ~30% below the plain matvec rate.)
// hs: 2 * (j1 - j0) floats of scratch.
template <class T>
static void geglu_rows_t(const T* g, int64_t ldg, const T* u, int64_t ldu, const T* d, int64_t ldd, int64_t n,
                         int64_t nd, const float* x, float* acc, int64_t j0, int64_t j1, float* hs, int act) {
  const int64_t cnt = j1 - j0;
  float* hg = hs;
  float* hu = hs + cnt;
  for (int64_t j = j0; j < j1; ++j) {
    const T* rows[2] = {g + j * ldg, u + j * ldu};
    float o[2];
    dot_rows<2, 1>(rows, x, n, o);
    hg[j - j0] = o[0];
    hu[j - j0] = o[1];
  }
  act_inplace(hg, cnt, act);
  for (int64_t i = 0; i < cnt; ++i) hg[i] *= hu[i];
  const int64_t q = cnt / 4;
  for (int64_t i = 0; i < q; ++i) {
    const T* rows[4] = {d + (j0 + i) * ldd, d + (j0 + i + q) * ldd, d + (j0 + i + 2 * q) * ldd,
                        d + (j0 + i + 3 * q) * ldd};
    const float h[4] = {hg[i], hg[i + q], hg[i + 2 * q], hg[i + 3 * q]};
    axpy_rows<4>(h, rows, acc, nd);
  }
  for (int64_t i = 4 * q; i < cnt; ++i) axpy1(hg[i], d + (j0 + i) * ldd, acc, nd);
}

static void geglu_rows(const void* g, int64_t ldg, const void* u, int64_t ldu, const void* d, int64_t ldd, int64_t n,
                       int64_t nd, bool bf16, const float* x, float* acc, int64_t j0, int64_t j1, float* hs,
                       int act) {
  if (bf16)
    geglu_rows_t(static_cast<const uint16_t*>(g), ldg, static_cast<const uint16_t*>(u), ldu,
                 static_cast<const uint16_t*>(d), ldd, n, nd, x, acc, j0, j1, hs, act);
  else
    geglu_rows_t(static_cast<const float*>(g), ldg, static_cast<const float*>(u), ldu,
                 static_cast<const float*>(d), ldd, n, nd, x, acc, j0, j1, hs, act);
}

// Feature-major scores: CB key-feature rows per pass over the output block, so the accumulators
// (nq x n floats, in L1/L2) are read and written once per CB rows of keys.
template <int CB, class T>
static void scores_fm_t(const T* kp, int64_t ldc, int64_t r, const float* q, int64_t nq, int64_t j0, int64_t j1,
                        float* out, int64_t ldo) {
  const int64_t n = j1 - j0;
  for (int64_t h = 0; h < nq; ++h)
    for (int64_t j = 0; j < n; ++j) out[h * ldo + j] = 0.0f;
  int64_t c = 0;
  for (; c + CB <= r; c += CB) {
    const T* k[CB];
#pragma GCC unroll 16
    for (int i = 0; i < CB; ++i) k[i] = kp + (c + i) * ldc + j0;
    for (int64_t h = 0; h < nq; ++h) {
      const float* qh = q + h * r + c;
      vf qv[CB];
#pragma GCC unroll 16
      for (int i = 0; i < CB; ++i) qv[i] = vset(qh[i]);
      float* o = out + h * ldo;
      int64_t j = 0;
      for (; j + VW <= n; j += VW) {
        vf a = vld(o + j);
#pragma GCC unroll 16
        for (int i = 0; i < CB; ++i) a = vfma(qv[i], vld(k[i] + j), a);
        vst(o + j, a);
      }
      for (; j < n; ++j) {
        float a = o[j];
        for (int i = 0; i < CB; ++i) a += qh[i] * ld1(k[i] + j);
        o[j] = a;
      }
    }
  }
  for (; c < r; ++c) {
    const T* k0 = kp + c * ldc + j0;
    for (int64_t h = 0; h < nq; ++h) axpy1(q[h * r + c], k0, out + h * ldo, n);
  }
}

static void scores_fm(const void* kp, bool bf16, int64_t ldc, int64_t r, const float* q, int64_t nq, int64_t j0,
                      int64_t j1, float* out, int64_t ldo) {
  // 8 rows per pass measured best (1, 2, 4 and 16 were 5-60% slower)
  if (bf16) scores_fm_t<8>(static_cast<const uint16_t*>(kp), ldc, r, q, nq, j0, j1, out, ldo);
  else scores_fm_t<8>(static_cast<const float*>(kp), ldc, r, q, nq, j0, j1, out, ldo);
}

// Blocked feature-major scores: keys stored in blocks of B (a multiple of 64), each block an (r, B)
// row-major tile, tiles back to back (kv head layout (L_max / B, r, B)). A block is read front to back
// once per two query heads with the scores of 4*VW keys per head held in registers, so the whole
// predictor half is a single forward stream and no partial sums go through memory.
// out[h*ldo + j - j0] = sum_c q[h*r + c] * key_c(j), keys j in [j0, j1) (absolute positions).
// Optionally (cap > 0) soft-caps the scores in registers, cap * tanh(p / cap), and (stats != null) adds
// each head's sum and sum of squares of the stored scores into stats[2h], stats[2h + 1] (fp32 within a
// sub-block of 4*VW keys, double across), so the caller needs no further pass for either.
template <int NH, class T>
static inline void score_subblock(const T* base, int64_t ldc, int64_t r, const float* q, float* o, int64_t ldo,
                                  int64_t from, int64_t to, float cap, double* stats) {
  constexpr int S = 4 * VW;
  vf acc[NH][4];
#pragma GCC unroll 4
  for (int h = 0; h < NH; ++h)
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) acc[h][u] = vzero();
  for (int64_t c = 0; c < r; ++c) {
    const T* row = base + c * ldc;
    vf k0 = vld(row), k1 = vld(row + VW), k2 = vld(row + 2 * VW), k3 = vld(row + 3 * VW);
#pragma GCC unroll 4
    for (int h = 0; h < NH; ++h) {
      const vf qc = vset(q[h * r + c]);
      acc[h][0] = vfma(qc, k0, acc[h][0]);
      acc[h][1] = vfma(qc, k1, acc[h][1]);
      acc[h][2] = vfma(qc, k2, acc[h][2]);
      acc[h][3] = vfma(qc, k3, acc[h][3]);
    }
  }
  float tmp[S];
  for (int h = 0; h < NH; ++h) {
#if SPK_ISA > 0
    if (cap > 0.0f) {
      const vf c = vset(cap), ic = vset(1.0f / cap);
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) acc[h][u] = vmul(c, vtanh(vmul(acc[h][u], ic)));
    }
#endif
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) vst(tmp + u * VW, acc[h][u]);
#if SPK_ISA == 0
    if (cap > 0.0f)
      for (int i = 0; i < S; ++i) tmp[i] = cap * std::tanh(tmp[i] / cap);
#endif
    float* oh = o + h * ldo;
    if (stats && from == 0 && to == S) {
      vf sm = vadd(vadd(acc[h][0], acc[h][1]), vadd(acc[h][2], acc[h][3]));
      vf sq = vmul(acc[h][0], acc[h][0]);
      sq = vfma(acc[h][1], acc[h][1], sq);
      sq = vfma(acc[h][2], acc[h][2], sq);
      sq = vfma(acc[h][3], acc[h][3], sq);
#if SPK_ISA == 0
      sm = 0.0f;
      sq = 0.0f;
      for (int i = 0; i < S; ++i) {
        sm += tmp[i];
        sq += tmp[i] * tmp[i];
      }
#endif
      stats[2 * h] += double(vsum(sm));
      stats[2 * h + 1] += double(vsum(sq));
      for (int i = 0; i < S; ++i) oh[i] = tmp[i];
    } else {
      float sm = 0.0f, sq = 0.0f;
      for (int64_t i = from; i < to; ++i) {
        oh[i - from] = tmp[i];
        sm += tmp[i];
        sq += tmp[i] * tmp[i];
      }
      if (stats) {
        stats[2 * h] += double(sm);
        stats[2 * h + 1] += double(sq);
      }
    }
  }
}

template <class T>
static void scores_blk_t(const T* kp, int64_t ldb, int64_t ldc, int64_t B, int64_t r, const float* q, int64_t nq,
                         int64_t j0, int64_t j1, float* out, int64_t ldo, float cap, double* stats) {
  constexpr int64_t S = 4 * VW;
  for (int64_t s0 = (j0 / S) * S; s0 < j1; s0 += S) {
    const T* base = kp + (s0 / B) * ldb + (s0 % B);
    const int64_t from = (j0 > s0 ? j0 - s0 : 0), to = (j1 - s0 < S ? j1 - s0 : S);
    float* o = out + (s0 + from - j0);
    int64_t h = 0;
    for (; h + 2 <= nq; h += 2)
      score_subblock<2>(base, ldc, r, q + h * r, o + h * ldo, ldo, from, to, cap, stats ? stats + 2 * h : nullptr);
    if (h < nq)
      score_subblock<1>(base, ldc, r, q + h * r, o + h * ldo, ldo, from, to, cap, stats ? stats + 2 * h : nullptr);
  }
}

static void scores_blk(const void* kp, bool bf16, int64_t ldb, int64_t ldc, int64_t B, int64_t r, const float* q,
                       int64_t nq, int64_t j0, int64_t j1, float* out, int64_t ldo, float cap, double* stats) {
  if (bf16) scores_blk_t(static_cast<const uint16_t*>(kp), ldb, ldc, B, r, q, nq, j0, j1, out, ldo, cap, stats);
  else scores_blk_t(static_cast<const float*>(kp), ldb, ldc, B, r, q, nq, j0, j1, out, ldo, cap, stats);
}

// Row-major scores: each key row is read once for up to two queries; more queries re-read it from L1.
template <class T>
static void scores_rm_t(const T* k, int64_t ldj, int64_t dq, const float* q, int64_t nq, int64_t j0, int64_t j1,
                        float* out, int64_t ldo) {
  for (int64_t j = j0; j < j1; ++j) {
    const T* row = k + j * ldj;
    int64_t h = 0;
    for (; h + 2 <= nq; h += 2) {
      // one weight row against two query vectors: swap roles of "rows" and "x"
      const float* qs[2] = {q + h * dq, q + (h + 1) * dq};
      vf a0 = vzero(), a1 = vzero(), b0 = vzero(), b1 = vzero();
      int64_t i = 0;
      for (; i + 2 * VW <= dq; i += 2 * VW) {
        vf w0 = vld(row + i), w1 = vld(row + i + VW);
        a0 = vfma(w0, vld(qs[0] + i), a0);
        a1 = vfma(w1, vld(qs[0] + i + VW), a1);
        b0 = vfma(w0, vld(qs[1] + i), b0);
        b1 = vfma(w1, vld(qs[1] + i + VW), b1);
      }
      float s0 = vsum(vadd(a0, a1)), s1 = vsum(vadd(b0, b1));
      for (; i < dq; ++i) {
        float w = ld1(row + i);
        s0 += w * qs[0][i];
        s1 += w * qs[1][i];
      }
      out[h * ldo + (j - j0)] = s0;
      out[(h + 1) * ldo + (j - j0)] = s1;
    }
    for (; h < nq; ++h) out[h * ldo + (j - j0)] = dot1(row, q + h * dq, dq);
  }
}

static void scores_rm(const void* k, bool bf16, int64_t ldj, int64_t dq, const float* q, int64_t nq, int64_t j0,
                      int64_t j1, float* out, int64_t ldo) {
  if (bf16) scores_rm_t(static_cast<const uint16_t*>(k), ldj, dq, q, nq, j0, j1, out, ldo);
  else scores_rm_t(static_cast<const float*>(k), ldj, dq, q, nq, j0, j1, out, ldo);
}

// Two value rows into two heads' accumulators, each value vector loaded once:
// o0 += a00 v0 + a01 v1, o1 += a10 v0 + a11 v1.
template <class T>
static inline void axpy_2x2(float a00, float a01, float a10, float a11, const T* v0, const T* v1, float* o0,
                            float* o1, int64_t n) {
  const vf b00 = vset(a00), b01 = vset(a01), b10 = vset(a10), b11 = vset(a11);
  int64_t i = 0;
  for (; i + VW <= n; i += VW) {
    const vf x0 = vld(v0 + i), x1 = vld(v1 + i);
    vst(o0 + i, vfma(b01, x1, vfma(b00, x0, vld(o0 + i))));
    vst(o1 + i, vfma(b11, x1, vfma(b10, x0, vld(o1 + i))));
  }
  for (; i < n; ++i) {
    const float x0 = ld1(v0 + i), x1 = ld1(v1 + i);
    o0[i] += a00 * x0 + a01 * x1;
    o1[i] += a10 * x0 + a11 * x1;
  }
}

// Row-major values, each row read once. Rows j and j + half go together: two independent streams (one
// stream with the accumulator read-modify-write reached 23 GB/s on one core in a standalone test, two
// far-apart streams 33 GB/s, two *adjacent* rows interleaved only 13), two heads per pass.
template <class T>
static void values_rm_t(const T* v, int64_t ldj, int64_t dv, const float* w, int64_t ldw, int64_t nq, int64_t j0,
                        int64_t j1, float* out) {
  const int64_t half = (j1 - j0) / 2;
  for (int64_t j = j0; j < j0 + half; ++j) {
    const int64_t j2 = j + half;
    const T* v0 = v + j * ldj;
    const T* v1 = v + j2 * ldj;
    const float* w0 = w + (j - j0);
    const float* w1 = w + (j2 - j0);
    int64_t h = 0;
    for (; h + 2 <= nq; h += 2)
      axpy_2x2(w0[h * ldw], w1[h * ldw], w0[(h + 1) * ldw], w1[(h + 1) * ldw], v0, v1, out + h * dv,
               out + (h + 1) * dv, dv);
    for (; h < nq; ++h) {
      const float hh[2] = {w0[h * ldw], w1[h * ldw]};
      const T* rows[2] = {v0, v1};
      axpy_rows<2>(hh, rows, out + h * dv, dv);
    }
  }
  for (int64_t j = j0 + 2 * half; j < j1; ++j)  // odd count: the last row alone
    for (int64_t h = 0; h < nq; ++h) axpy1(w[h * ldw + (j - j0)], v + j * ldj, out + h * dv, dv);
}

static void values_rm(const void* v, bool bf16, int64_t ldj, int64_t dv, const float* w, int64_t ldw, int64_t nq,
                      int64_t j0, int64_t j1, float* out) {
  if (bf16) values_rm_t(static_cast<const uint16_t*>(v), ldj, dv, w, ldw, nq, j0, j1, out);
  else values_rm_t(static_cast<const float*>(v), ldj, dv, w, ldw, nq, j0, j1, out);
}

// Kept keys in blocks of 128: the dot products with the other half of the keys first, then softplus
// over the block (vectorised), then the value rows. Both passes take 16 keys at a time (16 independent
// row streams; the value rows go into out in one read-modify-write pass) and prefetch whole rows
// kAttnPrefetchKeys keys ahead into L2. Rows are random and short, so the core's outstanding misses are
// the limit: in a standalone test this reached 15 GB/s (fp32, one thread) against 12.4 GB/s for two keys
// at a time; without the prefetch, 8.8 GB/s.
constexpr int64_t kAttnPrefetchKeys = 16;

template <int R, class T>
static inline void attn_dots(const int32_t* id, const T* kr, int64_t ldk, int64_t dr, const float* qr, float* g) {
  const T* rows[R];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) rows[i] = kr + id[i] * ldk;
  dot_rows<R, 1>(rows, qr, dr, g);
}

template <int R, class T>
static inline void attn_values(const int32_t* id, const float* g, const T* v, int64_t ldv, int64_t dv, float* out) {
  const T* rows[R];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) rows[i] = v + id[i] * ldv;
  axpy_rows<R>(g, rows, out, dv);
}

template <class T>
static void attn_gather_t(const int32_t* idx, const float* w, int64_t cnt, const T* kr, int64_t ldk, int64_t dr,
                          const float* qr, const T* v, int64_t ldv, int64_t dv, float* out) {
  constexpr int64_t B = 128, D = kAttnPrefetchKeys;
  const int64_t bk = dr * int64_t(sizeof(T)), bv = dv * int64_t(sizeof(T));
  float g[B];
  for (int64_t b0 = 0; b0 < cnt; b0 += B) {
    const int64_t nb = cnt - b0 < B ? cnt - b0 : B;
    const int32_t* id = idx + b0;
    for (int64_t t = 0; t < nb && t < D; ++t) prefetch_range_l2(kr + id[t] * ldk, bk);
    int64_t t = 0;
    for (; t + 16 <= nb; t += 16) {
      for (int64_t p = t + D; p < t + D + 16 && p < nb; ++p) prefetch_range_l2(kr + id[p] * ldk, bk);
      attn_dots<16>(id + t, kr, ldk, dr, qr, g + t);
    }
    for (; t < nb; ++t) attn_dots<1>(id + t, kr, ldk, dr, qr, g + t);
    softplus_inplace(g, nb);
    for (int64_t i = 0; i < nb; ++i) g[i] *= w[b0 + i];
    for (t = 0; t < nb && t < D; ++t) prefetch_range_l2(v + id[t] * ldv, bv);
    for (t = 0; t + 16 <= nb; t += 16) {
      for (int64_t p = t + D; p < t + D + 16 && p < nb; ++p) prefetch_range_l2(v + id[p] * ldv, bv);
      attn_values<16>(id + t, g + t, v, ldv, dv, out);
    }
    for (; t + 4 <= nb; t += 4) attn_values<4>(id + t, g + t, v, ldv, dv, out);
    for (; t < nb; ++t) attn_values<1>(id + t, g + t, v, ldv, dv, out);
  }
}

static void attn_gather(const int32_t* idx, const float* w, int64_t cnt, const void* kr, int64_t ldk, int64_t dr,
                        const float* qr, const void* v, int64_t ldv, int64_t dv, bool bf16, float* out) {
  if (bf16)
    attn_gather_t(idx, w, cnt, static_cast<const uint16_t*>(kr), ldk, dr, qr, static_cast<const uint16_t*>(v), ldv,
                  dv, out);
  else
    attn_gather_t(idx, w, cnt, static_cast<const float*>(kr), ldk, dr, qr, static_cast<const float*>(v), ldv, dv,
                  out);
}

// ------------------------------------------------------------------------------------------------
// Vector helpers
// ------------------------------------------------------------------------------------------------
// sum and sum of squares of (p - shift): fp32 lanes, flushed into doubles every 1024 elements.
static void sum_sumsq(const float* p, int64_t n, double shift, double* sum, double* sumsq) {
  double s = 0.0, ss = 0.0;
  const float sh = float(shift);
  const vf shv = vset(sh);
  int64_t i = 0;
  while (i < n) {
    const int64_t end = (i + 1024 < n ? i + 1024 : n);
    vf a = vzero(), a2 = vzero();
    for (; i + VW <= end; i += VW) {
      vf x = vsub(vld(p + i), shv);
      a = vadd(a, x);
      a2 = vfma(x, x, a2);
    }
    s += double(vsum(a));
    ss += double(vsum(a2));
    for (; i < end; ++i) {
      double x = double(p[i] - sh);
      s += x;
      ss += x * x;
    }
  }
  *sum = s;
  *sumsq = ss;
}

static void softcap(float* p, int64_t n, float cap) {
  const float inv = 1.0f / cap;
  int64_t i = 0;
#if SPK_ISA > 0
  const vf c = vset(cap), ic = vset(inv);
  for (; i + VW <= n; i += VW) vst(p + i, vmul(c, vtanh(vmul(vld(p + i), ic))));
#endif
  for (; i < n; ++i) p[i] = cap * std::tanh(p[i] * inv);
}

static float exp_sub(const float* p, int64_t n, float m, float* out) {
  int64_t i = 0;
  float tail = 0.0f;
#if SPK_ISA > 0
  const vf mv = vset(m);
  vf acc = vzero();
  for (; i + VW <= n; i += VW) {
    vf e = vexp(vsub(vld(p + i), mv));
    vst(out + i, e);
    acc = vadd(acc, e);
  }
  tail = vsum(acc);
#endif
  for (; i < n; ++i) {
    out[i] = std::exp(p[i] - m);
    tail += out[i];
  }
  return tail;
}

static void gelu_tanh(float* p, int64_t n) { act_inplace(p, n, spk::kGeluTanh); }

static float max_(const float* p, int64_t n) {
  float m = -INFINITY;
  int64_t i = 0;
#if SPK_ISA > 0
  if (n >= VW) {
    vf a = vld(p);
    for (i = VW; i + VW <= n; i += VW) a = vmax(a, vld(p + i));
    m = vhmax(a);
  }
#endif
  for (; i < n; ++i) m = p[i] > m ? p[i] : m;
  return m;
}

static int64_t compact_gt(const float* p, int64_t n, float theta, int32_t* idx) {
  int64_t cnt = 0, j = 0;
#if SPK_ISA == 2
  const vf th = vset(theta);
  const __m512i step = _mm512_set1_epi32(VW);
  __m512i pos = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; j + VW <= n; j += VW) {
    const __mmask16 m = _mm512_cmp_ps_mask(vld(p + j), th, _CMP_GT_OQ);
    if (m) {
      _mm512_storeu_si512(idx + cnt, _mm512_maskz_compress_epi32(m, pos));
      cnt += __builtin_popcount(m);
    }
    pos = _mm512_add_epi32(pos, step);
  }
#endif
  for (; j < n; ++j) {  // branch-free
    idx[cnt] = int32_t(j);
    cnt += p[j] > theta;
  }
  return cnt;
}

static const spk::Kernels table = {
    SPK_NAME, matvec, ffn_gather, ffn_neuron, geglu_rows, scores_fm, scores_blk, scores_rm, values_rm, attn_gather,
    sum_sumsq, softcap, exp_sub, gelu_tanh, act_inplace, max_, compact_gt,
};

}  // namespace SPK_NS
