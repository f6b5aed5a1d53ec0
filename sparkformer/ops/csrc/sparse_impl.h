// Bodies of the activation-sparse kernels (sparse.h), compiled once per instruction set: included by
// kernels_{avx512,avx2,scalar}.cpp right after kernels_impl.h, so inside the same target pragma and with the same
// vector layer (kernels_simd.h: dot_rows, axpy_rows, act_inplace). sparse.h comes in with kernels_common.h.
//
// Access patterns follow what kernels.h records about this memory system: random rows want many misses in flight;
// near-sequential rows want far-apart forward streams (adjacent rows read interleaved are slow); accumulators are
// read-modify-written once per group of rows, not once per row.

namespace SPK_NS {

// ------------------------------------------------------------------------------------------------
// Sparse rows in S far-apart streams
// ------------------------------------------------------------------------------------------------
// A list of selected rows is read as S streams at list positions i, i + q, i + 2q, ... (q = cnt / S): with a
// sorted list (a router's nonzero(), a threshold's compaction) each stream runs forward through its own part of
// the matrix, rows that sit next to each other in memory are never read interleaved; with an unsorted list it is
// S random streams. The holes between kept rows stop the hardware prefetcher at every row, so while a row is read,
// each of its cache lines prefetches the same line of the row its stream reads kSparsePrefetch steps later: the
// prefetches go out at the rate the data is consumed, S * kSparsePrefetch rows ahead. In a standalone test (bf16,
// one thread, cold, sorted, a shared machine) at 50% of SmolLM2's FFN neurons this read 17 GB/s, against 14 with
// each whole row prefetched at once (a burst the core's miss queue cannot take), 13 for 16 consecutive rows at a
// time and 10-14 for one stream; a plain read of the same rows reached ~18-20 GB/s, the dense forward stream
// 24-30. Rows of TEAL's W^T at 50%: 17-20 GB/s against 14-15 with whole-row prefetches.
constexpr int kSparseStreams = 8;
constexpr int64_t kSparsePrefetch = 2;

template <class T>
static inline void prefetch_row(const T* base, int64_t row, int64_t ld, int64_t n) {
  prefetch_range_l2(base + row * ld, n * int64_t(sizeof(T)));
}

// dot_rows (kernels_simd.h) that also prefetches, per 64-byte line of each row w[r], that line of row nx[r].
template <int R, class T>
static inline void dot_rows_pf(const T* const* w, const T* const* nx, const float* x, int64_t n, float* out) {
  constexpr int64_t E = 64 / int64_t(sizeof(T));  // weights per cache line
  vf acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = vzero();
  int64_t i = 0;
  for (; i + E <= n; i += E) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) __builtin_prefetch(nx[r] + i, 0, 2);
#pragma GCC unroll 4
    for (int64_t e = 0; e < E; e += VW) {
      const vf xv = vld(x + i + e);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r] = vfma(vld(w[r] + i + e), xv, acc[r]);
    }
  }
  for (; i + VW <= n; i += VW) {
    const vf xv = vld(x + i);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] = vfma(vld(w[r] + i), xv, acc[r]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    float t = vsum(acc[r]);
    for (int64_t k = i; k < n; ++k) t += ld1(w[r] + k) * x[k];
    out[r] = t;
  }
}

// axpy_rows (kernels_simd.h) with the same per-line prefetch of rows nx[r].
template <int R, class T>
static inline void axpy_rows_pf(const float* h, const T* const* w, const T* const* nx, float* acc, int64_t n) {
  constexpr int64_t E = 64 / int64_t(sizeof(T));
  vf a[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) a[r] = vset(h[r]);
  int64_t i = 0;
  for (; i + E <= n; i += E) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) __builtin_prefetch(nx[r] + i, 0, 2);
#pragma GCC unroll 4
    for (int64_t e = 0; e < E; e += VW) {
      vf y = vld(acc + i + e);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) y = vfma(a[r], vld(w[r] + i + e), y);
      vst(acc + i + e, y);
    }
  }
  for (; i < n; ++i) {
    float y = acc[i];
    for (int r = 0; r < R; ++r) y += h[r] * ld1(w[r] + i);
    acc[i] = y;
  }
}

// Row pointers of step i of the S streams over list idx (stream k at list position i + k * q).
template <int S, class T>
static inline void stream_rows(const int32_t* idx, int64_t i, int64_t q, const T* base, int64_t ld, const T** rows) {
#pragma GCC unroll 16
  for (int k = 0; k < S; ++k) rows[k] = base + int64_t(idx[i + k * q]) * ld;
}

// acc[0:nout] += sum_t c[t] * w[idx[t]]: S rows per read-modify-write pass over acc.
template <int S, class T>
static void rows_axpy_t(const int32_t* idx, const float* c, int64_t cnt, const T* w, int64_t ldw, int64_t nout,
                        float* acc) {
  const int64_t q = cnt / S;
  for (int64_t i = 0; i < q && i < kSparsePrefetch; ++i)  // the first steps have no earlier step to prefetch them
    for (int k = 0; k < S; ++k) prefetch_row(w, idx[i + k * q], ldw, nout);
  for (int64_t i = 0; i < q; ++i) {
    const T* rows[S];
    const T* next[S];
    float h[S];
    stream_rows<S>(idx, i, q, w, ldw, rows);
    stream_rows<S>(idx, i + kSparsePrefetch < q ? i + kSparsePrefetch : i, q, w, ldw, next);
#pragma GCC unroll 16
    for (int k = 0; k < S; ++k) h[k] = c[i + k * q];
    axpy_rows_pf<S>(h, rows, next, acc, nout);
  }
  for (int64_t t = S * q; t < cnt; ++t) axpy1(c[t], w + int64_t(idx[t]) * ldw, acc, nout);
}

static void rows_axpy(const int32_t* idx, const float* c, int64_t cnt, const void* w, int64_t ldw, int64_t nout,
                      bool bf16, float* acc) {
  if (bf16) rows_axpy_t<kSparseStreams>(idx, c, cnt, static_cast<const uint16_t*>(w), ldw, nout, acc);
  else rows_axpy_t<kSparseStreams>(idx, c, cnt, static_cast<const float*>(w), ldw, nout, acc);
}

// out[t] = dot(w[idx[t]], x) for t < cnt, the rows read as S prefetching streams.
template <int S, class T>
static void rows_dot_t(const int32_t* idx, int64_t cnt, const T* w, int64_t ldw, int64_t n, const float* x,
                       float* out) {
  const int64_t q = cnt / S;
  for (int64_t i = 0; i < q && i < kSparsePrefetch; ++i)
    for (int k = 0; k < S; ++k) prefetch_row(w, idx[i + k * q], ldw, n);
  for (int64_t i = 0; i < q; ++i) {
    const T* rows[S];
    const T* next[S];
    float o[S];
    stream_rows<S>(idx, i, q, w, ldw, rows);
    stream_rows<S>(idx, i + kSparsePrefetch < q ? i + kSparsePrefetch : i, q, w, ldw, next);
    dot_rows_pf<S>(rows, next, x, n, o);
#pragma GCC unroll 16
    for (int k = 0; k < S; ++k) out[i + k * q] = o[k];
  }
  for (int64_t t = S * q; t < cnt; ++t) out[t] = dot1(w + int64_t(idx[t]) * ldw, x, n);
}

// ------------------------------------------------------------------------------------------------
// Selected neurons of a gated FFN
// ------------------------------------------------------------------------------------------------
// Streams as above. Per step, the S neurons' gate rows, then their up rows: with the (m, 2, d) layout a neuron's
// up row follows its gate row, so each stream runs forward through one neuron's 2d weights. Then the activation
// over the whole list (vectorised), then the W_down^T rows, streamed the same way.
template <int S, class T>
static int64_t gated_gather_t(const int32_t* idx, int64_t cnt, const T* g, const T* u, int64_t ld, const T* d,
                              int64_t ldd, int64_t n, int64_t nd, int act, const float* x, float* acc, float* hs,
                              const float* vw, float vt) {
  float* hg = hs;
  float* hu = hs + cnt;
  const int64_t q = cnt / S;
  for (int64_t i = 0; i < q && i < kSparsePrefetch; ++i)
    for (int k = 0; k < S; ++k) {
      prefetch_row(g, idx[i + k * q], ld, n);
      prefetch_row(u, idx[i + k * q], ld, n);
    }
  for (int64_t i = 0; i < q; ++i) {
    const T* rows[S];
    const T* next[S];
    float og[S], ou[S];
    const int64_t ip = i + kSparsePrefetch < q ? i + kSparsePrefetch : i;
    stream_rows<S>(idx, i, q, g, ld, rows);
    stream_rows<S>(idx, ip, q, g, ld, next);
    dot_rows_pf<S>(rows, next, x, n, og);
    stream_rows<S>(idx, i, q, u, ld, rows);
    stream_rows<S>(idx, ip, q, u, ld, next);
    dot_rows_pf<S>(rows, next, x, n, ou);
#pragma GCC unroll 16
    for (int k = 0; k < S; ++k) {
      hg[i + k * q] = og[k];
      hu[i + k * q] = ou[k];
    }
  }
  for (int64_t t = S * q; t < cnt; ++t) {
    const int64_t j = idx[t];
    hg[t] = dot1(g + j * ld, x, n);
    hu[t] = dot1(u + j * ld, x, n);
  }
  act_inplace(hg, cnt, act);
  if (vw == nullptr) {
    for (int64_t i = 0; i < cnt; ++i) hg[i] *= hu[i];
    rows_axpy_t<S>(idx, hg, cnt, d, ldd, nd, acc);
    return cnt;
  }
  // verify stage: compact the neurons whose exact output passes; their ids go where hu was (read before written)
  int32_t* kid = reinterpret_cast<int32_t*>(hu);
  int64_t kept = 0;
  for (int64_t i = 0; i < cnt; ++i) {
    const float h = hg[i] * hu[i];
    if (std::fabs(h) * vw[idx[i]] > vt) {
      hg[kept] = h;
      kid[kept++] = idx[i];
    }
  }
  rows_axpy_t<S>(kid, hg, kept, d, ldd, nd, acc);
  return kept;
}

static int64_t gated_gather(const int32_t* idx, int64_t cnt, const void* g, const void* u, int64_t ld,
                            const void* d, int64_t ldd, int64_t n, int64_t nd, bool bf16, int act, const float* x,
                            float* acc, float* hs, const float* vw, float vt) {
  if (bf16)
    return gated_gather_t<kSparseStreams>(idx, cnt, static_cast<const uint16_t*>(g), static_cast<const uint16_t*>(u),
                                          ld, static_cast<const uint16_t*>(d), ldd, n, nd, act, x, acc, hs, vw, vt);
  return gated_gather_t<kSparseStreams>(idx, cnt, static_cast<const float*>(g), static_cast<const float*>(u), ld,
                                        static_cast<const float*>(d), ldd, n, nd, act, x, acc, hs, vw, vt);
}

// ------------------------------------------------------------------------------------------------
// Compaction
// ------------------------------------------------------------------------------------------------
static int64_t compact_abs_gt(const float* p, int64_t n, float thr, int32_t* idx) {
  int64_t cnt = 0, j = 0;
#if SPK_ISA == 2
  const vf th = vset(thr);
  const __m512i step = _mm512_set1_epi32(VW);
  __m512i pos = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; j + VW <= n; j += VW) {
    const __mmask16 m = _mm512_cmp_ps_mask(vabs(vld(p + j)), th, _CMP_GT_OQ);
    if (m) {
      _mm512_storeu_si512(idx + cnt, _mm512_maskz_compress_epi32(m, pos));
      cnt += __builtin_popcount(m);
    }
    pos = _mm512_add_epi32(pos, step);
  }
#endif
  for (; j < n; ++j) {  // branch-free
    idx[cnt] = int32_t(j);
    cnt += std::fabs(p[j]) > thr;
  }
  return cnt;
}

// ------------------------------------------------------------------------------------------------
// CATS
// ------------------------------------------------------------------------------------------------
// One pass over the neurons in chunks of kCatsChunk: the chunk's gate rows (one forward stream), the activation,
// the survivors compacted, then their up rows as prefetching streams (rows_dot_t). The (neuron, h) pairs collect
// in idx / hs; the W_down^T rows go last, as in geglu_rows, as streams over the whole list (rows_axpy_t). (Up rows
// one at a time, one stream with holes prefetched a few rows ahead, or the down rows chunk by chunk, were no
// faster in a standalone test.) At 50% kept the up and down rows read at the gathers' ~13-16 GB/s per core while
// the gate rows stream at the dense rate, so on this memory system the op is only about as fast as the dense FFN;
// it gains where fewer neurons pass.
constexpr int64_t kCatsChunk = 512;

template <class T>
static int64_t cats_rows_t(const T* g, int64_t ldg, const T* u, int64_t ldu, const T* d, int64_t ldd, int64_t n,
                           int64_t nd, int act, float thr, const float* x, float* acc, int64_t j0, int64_t j1,
                           int32_t* idx, float* hs) {
  float a[kCatsChunk];
  int64_t kept = 0;
  for (int64_t c0 = j0; c0 < j1; c0 += kCatsChunk) {
    const int64_t len = j1 - c0 < kCatsChunk ? j1 - c0 : kCatsChunk;
    for (int64_t j = 0; j < len; ++j) a[j] = dot1(g + (c0 + j) * ldg, x, n);
    act_inplace(a, len, act);
    int32_t* id = idx + kept;
    const int64_t k = compact_abs_gt(a, len, thr, id);
    rows_dot_t<kSparseStreams>(id, k, u + c0 * ldu, ldu, n, x, hs + kept);
    for (int64_t t = 0; t < k; ++t) {
      hs[kept + t] *= a[id[t]];
      id[t] += int32_t(c0);
    }
    kept += k;
  }
  rows_axpy_t<kSparseStreams>(idx, hs, kept, d, ldd, nd, acc);
  return kept;
}

static int64_t cats_rows(const void* g, int64_t ldg, const void* u, int64_t ldu, const void* d, int64_t ldd,
                         int64_t n, int64_t nd, bool bf16, int act, float thr, const float* x, float* acc, int64_t j0,
                         int64_t j1, int32_t* idx, float* hs) {
  if (bf16)
    return cats_rows_t(static_cast<const uint16_t*>(g), ldg, static_cast<const uint16_t*>(u), ldu,
                       static_cast<const uint16_t*>(d), ldd, n, nd, act, thr, x, acc, j0, j1, idx, hs);
  return cats_rows_t(static_cast<const float*>(g), ldg, static_cast<const float*>(u), ldu,
                     static_cast<const float*>(d), ldd, n, nd, act, thr, x, acc, j0, j1, idx, hs);
}

static const spk::SparseKernels sparse_table = {SPK_NAME, gated_gather, cats_rows, compact_abs_gt, rows_axpy};

}  // namespace SPK_NS
