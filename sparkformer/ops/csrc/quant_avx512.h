// AVX-512 integer dot products of quantized rows (quant.h), included by quant_impl.h in the AVX-512 builds: with
// SPK_VNNI (vpdpbusd, its own build: the plain AVX-512 one must run on CPUs without VNNI) or without.
//
// Four blocks (128 weights) per step and R rows at once (two far-apart rows: qmatvec512), so each load of x (and of
// the lane offsets, init) serves R rows. Each int32 lane sums 4 byte products; the lanes of a block are scaled by
// d_w * d_x (the 4 scales of a group multiplied in one 128-bit vector, then spread over their lanes by one permute)
// and summed in fp32.
//   q4_0: one 64-byte load holds 4 blocks' nibbles; lanes 4k..4k+3 are block k. Unsigned nibbles times x (in the
//         `ord` order), the offset 8 taken off by starting the lanes from init = -8 * sum(x block).
//   q4_1: q4_0's nibble sums from init = 0, plus its minima's term sum_b m_b d_x,b sum(x block) in one pass over the
//         row's m, 16 blocks per step (q41_min), before its quants (the row stays one forward stream).
//   q8_0: two 64-byte loads of 2 blocks each; lanes 8k..8k+7 of a load are its block k. VNNI reads w + 128
//         (unsigned, a xor) and starts from init = -128 * sum(x block); without VNNI |w| times (x with w's sign) by
//         vpmaddubsw (largest pair sum 2 * 127 * 127, no saturation) and vpmaddwd.
// A last group of fewer than 4 blocks loads its weights and scales under a mask (x is zero-padded). (Half-width
// vectors for a last group of 1-2 blocks made no measurable difference.)
// Included inside quant_impl.h's namespace SPK_NS.

// Plain arrays: vector constants would be built by static initialisers, which run on every CPU.
alignas(64) static const int32_t kLane4[16] = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};
alignas(64) static const int32_t kLane8[2][16] = {{0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1},
                                                  {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3}};

// acc + sum of 4 products u * s per int32 lane (u unsigned bytes, s signed; no saturation for the callers' ranges)
static inline __m512i dot4(__m512i acc, __m512i u, __m512i s) {
#if SPK_VNNI
  return _mm512_dpbusd_epi32(acc, u, s);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}

// q4_0, group g of R rows (quants at q[r], scales at d[r]); Tail: only `rb` < 4 blocks exist.
template <int R, bool Tail>
static inline void q4_group(const uint8_t* const* q, const uint16_t* const* d, int64_t g, int rb, const spk::QAct& a,
                            __m512* facc) {
  const __m512i m4 = _mm512_set1_epi8(0x0F), lane4 = _mm512_load_si512(kLane4);
  const __m512i xlo = _mm512_loadu_si512(a.ord + g * 128), xhi = _mm512_loadu_si512(a.ord + g * 128 + 64);
  const __m512i init = _mm512_loadu_si512(a.init + g * 32);
  const __m128 xd = _mm_loadu_ps(a.d + g * 4);
  const __mmask64 wm = Tail ? (__mmask64(1) << (rb * 16)) - 1 : ~__mmask64(0);
  const __mmask8 dm = Tail ? __mmask8((1u << rb) - 1) : __mmask8(0xFF);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m512i w = Tail ? _mm512_maskz_loadu_epi8(wm, q[r] + g * 64) : _mm512_loadu_si512(q[r] + g * 64);
#if SPK_VNNI
    __m512i acc = dot4(init, _mm512_and_si512(w, m4), xlo);
    acc = dot4(acc, _mm512_and_si512(_mm512_srli_epi16(w, 4), m4), xhi);
#else  // both halves' byte pairs summed in int16 first (4 * 15 * 127 fits), one vpmaddwd
    const __m512i p16 = _mm512_add_epi16(_mm512_maddubs_epi16(_mm512_and_si512(w, m4), xlo),
                                         _mm512_maddubs_epi16(_mm512_and_si512(_mm512_srli_epi16(w, 4), m4), xhi));
    const __m512i acc = _mm512_add_epi32(init, _mm512_madd_epi16(p16, _mm512_set1_epi16(1)));
#endif
    const __m128i dh = Tail ? _mm_maskz_loadu_epi16(dm, d[r] + g * 4)
                            : _mm_loadl_epi64(reinterpret_cast<const __m128i*>(d[r] + g * 4));
    const __m128 s4 = _mm_mul_ps(_mm_cvtph_ps(dh), xd);
    const __m512 s = _mm512_permutexvar_ps(lane4, _mm512_castps128_ps512(s4));
    facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), s, facc[r]);
  }
}

// q4_0 groups g0.. of nb blocks (ng whole groups, rb blocks after them) for R rows into facc[r].
template <int R>
static inline void q4_rows(const uint8_t* const* q, const uint16_t* const* d, int64_t g0, int64_t ng, int rb,
                           const spk::QAct& a, __m512* facc) {
  for (int64_t g = g0; g < ng; ++g) q4_group<R, false>(q, d, g, 4, a, facc);
  if (rb) q4_group<R, true>(q, d, ng, rb, a, facc);
}

// q4_1's minima term of R rows (minima at m[r]) added to acc[r]: sum_b m[r][b] * d_x[b] * s_x[b], 16 blocks per step
// under a mask (d_x, s_x are only padded to whole groups of 4).
template <int R>
static inline void q41_min(const uint16_t* const* m, int64_t nb, const spk::QAct& a, __m512* acc) {
  for (int64_t b = 0; b < nb; b += 16) {
    const __mmask16 k = nb - b >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (nb - b)) - 1);
    const __m512 xm =
        _mm512_mul_ps(_mm512_maskz_loadu_ps(k, a.d + b), _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(k, a.s + b)));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, m[r] + b)), xm, acc[r]);
  }
}

// facc: two accumulators per row (the FMA latency, not throughput, bounds one chain)
template <int R, bool Tail>
static inline void q8_group(const uint8_t* const* q, const uint16_t* const* d, int64_t g, int rb, const spk::QAct& a,
                            __m512* facc) {
  const __m512i x0 = _mm512_loadu_si512(a.q + g * 128), x1 = _mm512_loadu_si512(a.q + g * 128 + 64);
  const __m512i l0 = _mm512_load_si512(kLane8[0]), l1 = _mm512_load_si512(kLane8[1]);
#if SPK_VNNI
  const __m512i i0 = _mm512_loadu_si512(a.init + g * 32), i1 = _mm512_loadu_si512(a.init + g * 32 + 16);
  const __m512i flip = _mm512_set1_epi8(char(0x80));
#endif
  const __m128 xd = _mm_loadu_ps(a.d + g * 4);
  const int bytes = rb * 32;
  const __mmask64 m0 = !Tail || bytes >= 64 ? ~__mmask64(0) : (__mmask64(1) << bytes) - 1;
  const __mmask64 m1 = !Tail ? ~__mmask64(0) : bytes > 64 ? (__mmask64(1) << (bytes - 64)) - 1 : 0;
  const __mmask8 dm = Tail ? __mmask8((1u << rb) - 1) : __mmask8(0xFF);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const uint8_t* p = q[r] + g * 128;
    const __m128i dh = Tail ? _mm_maskz_loadu_epi16(dm, d[r] + g * 4)
                            : _mm_loadl_epi64(reinterpret_cast<const __m128i*>(d[r] + g * 4));
    const __m512 s4 = _mm512_castps128_ps512(_mm_mul_ps(_mm_cvtph_ps(dh), xd));
#if !SPK_VNNI
    const __m512i z = _mm512_setzero_si512(), one = _mm512_set1_epi16(1);
#endif
    for (int h = 0; h < (Tail && rb <= 2 ? 1 : 2); ++h) {  // a last group of 1-2 blocks: the first half only
      const __m512i w = Tail ? _mm512_maskz_loadu_epi8(h ? m1 : m0, p + 64 * h) : _mm512_loadu_si512(p + 64 * h);
      const __m512i x = h ? x1 : x0;
#if SPK_VNNI
      const __m512i acc = dot4(h ? i1 : i0, _mm512_xor_si512(w, flip), x);
#else
      const __m512i sx = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), z, x);
      const __m512i acc = _mm512_madd_epi16(_mm512_maddubs_epi16(_mm512_abs_epi8(w), sx), one);
#endif
      const __m512 sc = _mm512_permutexvar_ps(h ? l1 : l0, s4);
      facc[2 * r + h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), sc, facc[2 * r + h]);
    }
  }
}

// The sums of 4 vectors' lanes as one 128-bit vector [sum a, sum b, sum c, sum d].
static inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a0+a2 b0+b2 a1+a3 b1+b3
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                                    _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// out[r] = dot(row r, x) for R rows of nb blocks each, one row after another (reading 4 rows interleaved, even
// adjacent ones, cost 2-2.5x from memory in a standalone test: the prefetcher follows one forward stream best;
// software prefetch did not help), reduced together.
template <int R>
static inline void qrows(int fmt, const uint8_t* const* rows, int64_t nb, const spk::QAct& a, float* out) {
  __m512 sum[R];
  const int64_t ng = nb / 4;
  const int rb = int(nb % 4);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const uint16_t* d = reinterpret_cast<const uint16_t*>(rows[r]);
    const uint8_t* q = rows[r] + spk::q_scale_bytes(fmt, nb * spk::kQBlock);
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};  // two chains: the FMA latency bounds one
    if (fmt != spk::kQ8_0) {
      if (fmt == spk::kQ4_1) {
        const uint16_t* m = d + nb;
        q41_min<1>(&m, nb, a, &acc[1]);
      }
      int64_t g = 0;
      for (; g + 2 <= ng; g += 2) {
        q4_group<1, false>(&q, &d, g, 4, a, &acc[0]);
        q4_group<1, false>(&q, &d, g + 1, 4, a, &acc[1]);
      }
      q4_rows<1>(&q, &d, g, ng, rb, a, &acc[0]);
    } else {
      for (int64_t g = 0; g < ng; ++g) q8_group<1, false>(&q, &d, g, 4, a, acc);
      if (rb) q8_group<1, true>(&q, &d, ng, rb, a, acc);
    }
    sum[r] = _mm512_add_ps(acc[0], acc[1]);
  }
  if constexpr (R == 4) {
    _mm_storeu_ps(out, reduce4(sum[0], sum[1], sum[2], sum[3]));
  } else {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(sum[r]);
  }
}

static inline float qdot1(int fmt, const uint8_t* row, int64_t nb, const spk::QAct& a) {
  float o;
  qrows<1>(fmt, &row, nb, a, &o);
  return o;
}

// R far-apart rows at once (R forward streams, which the prefetcher follows at full rate, unlike adjacent rows
// interleaved); each load of x serves all R. sum[0..R-1] = the rows' lane sums.
template <int R>
static inline void qrows_far(int fmt, const uint8_t* const* rows, int64_t nb, const spk::QAct& a, __m512* sum) {
  const int64_t sb = spk::q_scale_bytes(fmt, nb * spk::kQBlock);
  const uint8_t* q[R];
  const uint16_t* d[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) q[r] = rows[r] + sb, d[r] = reinterpret_cast<const uint16_t*>(rows[r]);
  const int64_t ng = nb / 4;
  const int rb = int(nb % 4);
  if (fmt != spk::kQ8_0) {
    __m512 acc[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    if (fmt == spk::kQ4_1) {
      const uint16_t* m[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) m[r] = d[r] + nb;
      q41_min<R>(m, nb, a, acc);
    }
    q4_rows<R>(q, d, 0, ng, rb, a, acc);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) sum[r] = acc[r];
  } else {
    __m512 acc[2 * R];
#pragma GCC unroll 8
    for (int r = 0; r < 2 * R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) q8_group<R, false>(q, d, g, 4, a, acc);
    if (rb) q8_group<R, true>(q, d, ng, rb, a, acc);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) sum[r] = _mm512_add_ps(acc[2 * r], acc[2 * r + 1]);
  }
}

// Rows in pairs (i, i + h) of far-apart rows, two pairs per reduction (in a standalone test 5-25% faster from
// memory than four rows one after another); the rest four, then one at a time. Rows of kLongRowBlocks blocks or
// more go four far-apart rows per pass instead, each load of x (and of the lane offsets) serving four rows: on
// gemma2-2b's down projection (2304 x 9216, cold weights, one thread) 1.2-1.4x faster than the pairs (q4_0 and q8_0,
// A/B of the two builds interleaved); rows of 2304 gain nothing. Long rows still stream ~25% slower than short rows
// of the same bytes (not understood: moving x's lane offsets out of the way did not change it).
constexpr int64_t kLongRowBlocks = 128;  // 4096 weights

static void qmatvec512(int fmt, const uint8_t* w, int64_t ld, int64_t n, const spk::QAct& a, float* y, int64_t r0,
                       int64_t r1) {
  const int64_t nb = n / spk::kQBlock;
  int64_t i = r0;
  if (nb >= kLongRowBlocks) {  // long rows: four far-apart rows per pass (i, i + q, i + 2q, i + 3q)
    const int64_t qr = (r1 - r0) / 4;
    for (; i < r0 + qr; ++i) {
      const uint8_t* rows[4] = {w + i * ld, w + (i + qr) * ld, w + (i + 2 * qr) * ld, w + (i + 3 * qr) * ld};
      __m512 s[4];
      qrows_far<4>(fmt, rows, nb, a, s);
      alignas(16) float o[4];
      _mm_store_ps(o, reduce4(s[0], s[1], s[2], s[3]));
      for (int k = 0; k < 4; ++k) y[i + k * qr - r0] = o[k];
    }
    for (i = r0 + 4 * qr; i < r1; ++i) y[i - r0] = qdot1(fmt, w + i * ld, nb, a);
    return;
  }
  const int64_t h = (r1 - r0) / 4 * 2;
  for (; i + 2 <= r0 + h; i += 2) {
    __m512 s[4];
    const uint8_t* p0[2] = {w + i * ld, w + (i + h) * ld};
    const uint8_t* p1[2] = {w + (i + 1) * ld, w + (i + 1 + h) * ld};
    qrows_far<2>(fmt, p0, nb, a, s);
    qrows_far<2>(fmt, p1, nb, a, s + 2);
    alignas(16) float o[4];
    _mm_store_ps(o, reduce4(s[0], s[2], s[1], s[3]));
    y[i - r0] = o[0], y[i + 1 - r0] = o[1], y[i + h - r0] = o[2], y[i + h + 1 - r0] = o[3];
  }
  i = r0 + 2 * h;
  for (; i + 4 <= r1; i += 4) {
    const uint8_t* rows[4] = {w + i * ld, w + (i + 1) * ld, w + (i + 2) * ld, w + (i + 3) * ld};
    qrows<4>(fmt, rows, nb, a, y + (i - r0));
  }
  for (; i < r1; ++i) y[i - r0] = qdot1(fmt, w + i * ld, nb, a);
}

// Activation quantization (quant_ops.cpp's contract, QAct): per block d = max|x| / 127, q = round-half-even(x / d)
// computed as x * (1 / d) like the reference, s = sum q; plus ord and init (q4_1: zero), and zeros past the last block.
static void qquantize512(const float* x, int64_t n, int fmt, int8_t* q, float* d, int32_t* s, int8_t* ord,
                         int32_t* init) {
  const int64_t nb = n / spk::kQBlock, ng = spk::q_groups(n);
  std::memset(q + nb * 32, 0, size_t((ng * 4 - nb) * 32));
  std::memset(ord + (nb / 4) * 128, 0, size_t((ng - nb / 4) * 128));
  std::memset(init, 0, size_t(ng * 32 * 4));
  for (int64_t b = nb; b < ng * 4; ++b) d[b] = 0.0f, s[b] = 0;
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + b * 32), v1 = _mm512_loadu_ps(x + b * 32 + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
    const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
    const __m512 vid = _mm512_set1_ps(id);
    const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512i i0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v0, vid), rnd);
    const __m512i i1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v1, vid), rnd);
    const __m128i lo = _mm512_cvtepi32_epi8(i0), hi = _mm512_cvtepi32_epi8(i1);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * 32), lo);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * 32 + 16), hi);
    const int64_t g = b / 4, k = b % 4;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(ord + g * 128 + k * 16), lo);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(ord + g * 128 + 64 + k * 16), hi);
    const int32_t sb = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    d[b] = db;
    s[b] = sb;
    if (fmt == spk::kQ4_0) init[g * 32 + k * 4] = -8 * sb;
    else if (fmt == spk::kQ8_0) init[g * 32 + (k / 2) * 16 + (k % 2) * 8] = -128 * sb;  // q4_1: 0
  }
}
