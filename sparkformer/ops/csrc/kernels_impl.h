// Kernel bodies, compiled once per instruction set.
//
// Included by kernels_{avx512,avx2,scalar}.cpp after they define SPK_ISA (2 = AVX-512, 1 = AVX2+FMA,
// 0 = plain C++), SPK_NS (a namespace private to that build) and, for the SIMD builds, a
// `#pragma GCC target(...)` that applies to every function below. Nothing here includes torch or
// the STL containers, so no inline function compiled for one ISA can leak into code run on another.
//
// The vector layer is a handful of inline functions over `vf` (a SIMD register, or a float for the
// plain build); the kernels are written once on top of it, templated on the weight type T
// (float, or uint16_t holding bf16 bits).

namespace SPK_NS {

// ------------------------------------------------------------------------------------------------
// Vector layer
// ------------------------------------------------------------------------------------------------
#if SPK_ISA == 2
using vf = __m512;
constexpr int VW = 16;
static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vset(float a) { return _mm512_set1_ps(a); }
static inline vf vld(const float* p) { return _mm512_loadu_ps(p); }
static inline vf vld(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline void vst(float* p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vabs(vf a) { return _mm512_abs_ps(a); }
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline float vfirst(vf a) { return _mm512_cvtss_f32(a); }
static inline float vhmax(vf a) { return _mm512_reduce_max_ps(a); }
static inline vf vround(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vpow2i(vf k) {  // 2^k for integral k in [-126, 127]
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
  return _mm512_castsi512_ps(e);
}
static inline vf vselect_lt(vf a, vf b, vf x, vf y) {  // a < b ? x : y
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x);
}
static inline vf vcopysign(vf mag, vf sgn) {
  const __m512i m = _mm512_set1_epi32(0x80000000);
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(mag),
                                             _mm512_and_si512(_mm512_castps_si512(sgn), m)));
}
#elif SPK_ISA == 1
using vf = __m256;
constexpr int VW = 8;
static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vset(float a) { return _mm256_set1_ps(a); }
static inline vf vld(const float* p) { return _mm256_loadu_ps(p); }
static inline vf vld(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline void vst(float* p, vf a) { _mm256_storeu_ps(p, a); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vabs(vf a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
static inline float vfirst(vf a) { return _mm256_cvtss_f32(a); }
static inline float vsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline float vhmax(vf a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline vf vround(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vpow2i(vf k) {
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_castsi256_ps(e);
}
static inline vf vselect_lt(vf a, vf b, vf x, vf y) {
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ));
}
static inline vf vcopysign(vf mag, vf sgn) {
  const vf m = _mm256_set1_ps(-0.0f);
  return _mm256_or_ps(_mm256_andnot_ps(m, mag), _mm256_and_ps(m, sgn));
}
#else
using vf = float;
constexpr int VW = 1;
static inline vf vzero() { return 0.0f; }
static inline vf vset(float a) { return a; }
static inline vf vld(const float* p) { return *p; }
static inline vf vld(const uint16_t* p) {
  uint32_t b = uint32_t(*p) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
static inline void vst(float* p, vf a) { *p = a; }
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
static inline vf vadd(vf a, vf b) { return a + b; }
static inline vf vsub(vf a, vf b) { return a - b; }
static inline vf vmul(vf a, vf b) { return a * b; }
static inline float vsum(vf a) { return a; }
static inline float vhmax(vf a) { return a; }
#endif

// Scalar load of one weight, for loop tails.
static inline float ld1(const float* p) { return *p; }
static inline float ld1(const uint16_t* p) {
  uint32_t b = uint32_t(*p) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

static inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

// Prefetch `bytes` bytes starting at p, one request per 64-byte line.
static inline void prefetch_range(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) prefetch(c + o);
}
static inline void prefetch_range_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

static inline float softplus1(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }

// ------------------------------------------------------------------------------------------------
// exp / tanh. The SIMD builds use their own polynomial versions (relative error ~2e-7); the plain
// build uses libm.
// ------------------------------------------------------------------------------------------------
#if SPK_ISA > 0
// exp(x) for x <= 88: x = k*ln2 + f, |f| <= ln2/2, exp(f) by its Taylor series to f^7 (truncation
// error < 6e-9), times 2^k built in the exponent field. Inputs below -87 give ~1e-38, not 0.
static inline vf vexp(vf x) {
  x = vmax(vmin(x, vset(88.0f)), vset(-87.0f));
  vf k = vround(vmul(x, vset(1.44269504088896341f)));
  vf f = vfma(k, vset(-0.693359375f), x);  // ln2 split in two so k*ln2 is exact enough
  f = vfma(k, vset(2.12194440e-4f), f);
  vf p = vset(1.0f / 5040.0f);
  p = vfma(p, f, vset(1.0f / 720.0f));
  p = vfma(p, f, vset(1.0f / 120.0f));
  p = vfma(p, f, vset(1.0f / 24.0f));
  p = vfma(p, f, vset(1.0f / 6.0f));
  p = vfma(p, f, vset(0.5f));
  p = vfma(p, f, vset(1.0f));
  p = vfma(p, f, vset(1.0f));
  return vmul(p, vpow2i(k));
}

// exp(y) - 1 for y <= 0 without cancellation near 0: Taylor series to y^9 when |y| < 0.5
// (truncation < 5e-10 relative), exp(y) - 1 otherwise (there |result| > 0.39).
static inline vf vexpm1_neg(vf y) {
  vf p = vset(1.0f / 362880.0f);
  p = vfma(p, y, vset(1.0f / 40320.0f));
  p = vfma(p, y, vset(1.0f / 5040.0f));
  p = vfma(p, y, vset(1.0f / 720.0f));
  p = vfma(p, y, vset(1.0f / 120.0f));
  p = vfma(p, y, vset(1.0f / 24.0f));
  p = vfma(p, y, vset(1.0f / 6.0f));
  p = vfma(p, y, vset(0.5f));
  p = vfma(p, y, vset(1.0f));
  p = vmul(p, y);
  vf e = vsub(vexp(y), vset(1.0f));
  return vselect_lt(vset(-0.5f), y, p, e);
}

// tanh(x) = -expm1(-2|x|) / (2 + expm1(-2|x|)), with the sign of x; saturates to +-1 past |x| = 9.
static inline vf vtanh(vf x) {
  vf a = vmin(vabs(x), vset(9.0f));
  vf e = vexpm1_neg(vmul(a, vset(-2.0f)));
  vf t = vdiv(vsub(vzero(), e), vadd(e, vset(2.0f)));
  return vcopysign(t, x);
}
#endif

#if SPK_ISA > 0
// softplus(x) = max(x, 0) + log1p(exp(-|x|)); log1p(y) for y in (0, 1] as 2 atanh(s), s = y / (2 + y) in
// (0, 1/3], by its odd series to s^17 (truncation < 1e-10, and no cancellation for small y).
static inline vf vsoftplus(vf x) {
  vf y = vexp(vsub(vzero(), vabs(x)));
  vf s = vdiv(y, vadd(y, vset(2.0f)));
  vf s2 = vmul(s, s);
  vf p = vset(1.0f / 17.0f);
  p = vfma(p, s2, vset(1.0f / 15.0f));
  p = vfma(p, s2, vset(1.0f / 13.0f));
  p = vfma(p, s2, vset(1.0f / 11.0f));
  p = vfma(p, s2, vset(1.0f / 9.0f));
  p = vfma(p, s2, vset(1.0f / 7.0f));
  p = vfma(p, s2, vset(1.0f / 5.0f));
  p = vfma(p, s2, vset(1.0f / 3.0f));
  p = vfma(p, s2, vset(1.0f));
  return vadd(vmax(x, vzero()), vmul(vset(2.0f), vmul(p, s)));
}
#endif

// p = softplus(p) (torch's default: x above 20 passes through)
static void softplus_inplace(float* p, int64_t n) {
  int64_t i = 0;
#if SPK_ISA > 0
  for (; i + VW <= n; i += VW) vst(p + i, vsoftplus(vld(p + i)));
#endif
  for (; i < n; ++i) p[i] = softplus1(p[i]);
}

static inline float gelu_tanh1(float z) {
  const float k0 = 0.7978845608028654f, k1 = 0.044715f;
  return 0.5f * z * (1.0f + std::tanh(k0 * (z + k1 * z * z * z)));
}

// ------------------------------------------------------------------------------------------------
// Dot products. R rows at once share each load of x; U accumulators per row hide FMA latency.
// ------------------------------------------------------------------------------------------------
template <int R, int U, class T>
static inline void dot_rows(const T* const* w, const float* x, int64_t n, float* out) {
  vf acc[R][U];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) acc[r][u] = vzero();
  int64_t i = 0;
  for (; i + U * VW <= n; i += U * VW) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      vf xv = vld(x + i + u * VW);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][u] = vfma(vld(w[r] + i + u * VW), xv, acc[r][u]);
    }
  }
  for (; i + VW <= n; i += VW) {
    vf xv = vld(x + i);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][0] = vfma(vld(w[r] + i), xv, acc[r][0]);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    vf s = acc[r][0];
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u) s = vadd(s, acc[r][u]);
    float t = vsum(s);
    for (int64_t k = i; k < n; ++k) t += ld1(w[r] + k) * x[k];
    out[r] = t;
  }
}

template <class T>
static inline float dot1(const T* w, const float* x, int64_t n) {
  const T* rows[1] = {w};
  float o;
  dot_rows<1, 4>(rows, x, n, &o);
  return o;
}

// acc[0:n] += h0 * w0 + h1 * w1   (two rows per pass halves the traffic on acc)
template <class T>
static inline void axpy2(float h0, const T* w0, float h1, const T* w1, float* acc, int64_t n) {
  vf a0 = vset(h0), a1 = vset(h1);
  int64_t i = 0;
  for (; i + 2 * VW <= n; i += 2 * VW) {
    vf y0 = vld(acc + i), y1 = vld(acc + i + VW);
    y0 = vfma(a0, vld(w0 + i), y0);
    y1 = vfma(a0, vld(w0 + i + VW), y1);
    y0 = vfma(a1, vld(w1 + i), y0);
    y1 = vfma(a1, vld(w1 + i + VW), y1);
    vst(acc + i, y0);
    vst(acc + i + VW, y1);
  }
  for (; i + VW <= n; i += VW) vst(acc + i, vfma(a1, vld(w1 + i), vfma(a0, vld(w0 + i), vld(acc + i))));
  for (; i < n; ++i) acc[i] += h0 * ld1(w0 + i) + h1 * ld1(w1 + i);
}

template <class T>
static inline void axpy1(float h, const T* w, float* acc, int64_t n) {
  vf a = vset(h);
  int64_t i = 0;
  for (; i + VW <= n; i += VW) vst(acc + i, vfma(a, vld(w + i), vld(acc + i)));
  for (; i < n; ++i) acc[i] += h * ld1(w + i);
}

// ------------------------------------------------------------------------------------------------
// Kernels
// ------------------------------------------------------------------------------------------------
// One row at a time: with contiguous rows the whole matrix is then a single forward stream, which the
// hardware prefetcher serves best (several interleaved row streams measured 20-60% slower).
template <class T>
static void matvec_t(const T* w, int64_t ld, int64_t n, const float* x, float* y, int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) y[i - r0] = dot1(w + i * ld, x, n);
}

static void matvec(const void* w, bool bf16, int64_t ld, int64_t n, const float* x, float* y, int64_t r0, int64_t r1) {
  if (bf16) matvec_t(static_cast<const uint16_t*>(w), ld, n, x, y, r0, r1);
  else matvec_t(static_cast<const float*>(w), ld, n, x, y, r0, r1);
}


// Selected neurons four at a time: four K2 rows against x2 (four independent streams keep more misses in
// flight than one), then their V rows two by two into acc; the start of the next four neurons' rows is
// prefetched. (One neuron at a time was 25-40% slower here; eight, no better than four.)
constexpr int64_t kFfnRowPrefetch = 512;

template <class T>
static void ffn_gather_t(const int32_t* idx, const float* a, int64_t cnt, const T* k2, int64_t ld2, int64_t n2,
                         const float* x2, const T* v, int64_t ldv, int64_t nv, float* acc) {
  constexpr int R = 4;
  int64_t t = 0;
  for (; t + R <= cnt; t += R) {
    for (int64_t p = t + R; p < t + 2 * R && p < cnt; ++p) {
      prefetch_range(k2 + idx[p] * ld2, kFfnRowPrefetch);
      prefetch_range(v + idx[p] * ldv, kFfnRowPrefetch);
    }
    const T* rows[R] = {k2 + idx[t] * ld2, k2 + idx[t + 1] * ld2, k2 + idx[t + 2] * ld2, k2 + idx[t + 3] * ld2};
    float d[R];
    dot_rows<R, 1>(rows, x2, n2, d);
    axpy2(a[t] * d[0], v + idx[t] * ldv, a[t + 1] * d[1], v + idx[t + 1] * ldv, acc, nv);
    axpy2(a[t + 2] * d[2], v + idx[t + 2] * ldv, a[t + 3] * d[3], v + idx[t + 3] * ldv, acc, nv);
  }
  for (; t < cnt; ++t) axpy1(a[t] * dot1(k2 + idx[t] * ld2, x2, n2), v + idx[t] * ldv, acc, nv);
}

static void ffn_gather(const int32_t* idx, const float* a, int64_t cnt, const void* k2, int64_t ld2, int64_t n2,
                       const float* x2, const void* v, int64_t ldv, int64_t nv, bool bf16, float* acc) {
  if (bf16)
    ffn_gather_t(idx, a, cnt, static_cast<const uint16_t*>(k2), ld2, n2, x2, static_cast<const uint16_t*>(v), ldv, nv, acc);
  else
    ffn_gather_t(idx, a, cnt, static_cast<const float*>(k2), ld2, n2, x2, static_cast<const float*>(v), ldv, nv, acc);
}

// gelu_tanh of one value; in the SIMD builds through the vector tanh (cheaper than libm's tanhf).
static inline float gelu_tanh_fast(float z) {
#if SPK_ISA > 0
  const vf zv = vset(z);
  const vf u = vmul(vset(0.7978845608028654f), vfma(vmul(vset(0.044715f), vmul(zv, zv)), zv, zv));
  return 0.5f * z * (1.0f + vfirst(vtanh(u)));
#else
  return gelu_tanh1(z);
#endif
}

// GeGLU one neuron at a time -- gate row, up row, down row -- so with pack_geglu's layout the weights
// are one forward stream. The gelu is done in the vector unit on a one-lane vector.
template <class T>
static void geglu_rows_t(const T* g, int64_t ldg, const T* u, int64_t ldu, const T* d, int64_t ldd, int64_t n,
                         int64_t nd, const float* x, float* acc, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    const float gv = dot1(g + j * ldg, x, n);
    const float uv = dot1(u + j * ldu, x, n);
    axpy1(gelu_tanh_fast(gv) * uv, d + j * ldd, acc, nd);
  }
}

static void geglu_rows(const void* g, int64_t ldg, const void* u, int64_t ldu, const void* d, int64_t ldd, int64_t n,
                       int64_t nd, bool bf16, const float* x, float* acc, int64_t j0, int64_t j1) {
  if (bf16)
    geglu_rows_t(static_cast<const uint16_t*>(g), ldg, static_cast<const uint16_t*>(u), ldu,
                 static_cast<const uint16_t*>(d), ldd, n, nd, x, acc, j0, j1);
  else
    geglu_rows_t(static_cast<const float*>(g), ldg, static_cast<const float*>(u), ldu,
                 static_cast<const float*>(d), ldd, n, nd, x, acc, j0, j1);
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
template <int NH, class T>
static inline void score_subblock(const T* base, int64_t ldc, int64_t r, const float* q, int64_t nq, float* o,
                                  int64_t ldo, int64_t from, int64_t to) {
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
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) vst(tmp + u * VW, acc[h][u]);
    for (int64_t i = from; i < to; ++i) o[h * ldo + i - from] = tmp[i];
  }
  (void)nq;
}

template <class T>
static void scores_blk_t(const T* kp, int64_t ldb, int64_t ldc, int64_t B, int64_t r, const float* q, int64_t nq,
                         int64_t j0, int64_t j1, float* out, int64_t ldo) {
  constexpr int64_t S = 4 * VW;
  for (int64_t s0 = (j0 / S) * S; s0 < j1; s0 += S) {
    const T* base = kp + (s0 / B) * ldb + (s0 % B);
    const int64_t from = (j0 > s0 ? j0 - s0 : 0), to = (j1 - s0 < S ? j1 - s0 : S);
    float* o = out + (s0 + from - j0);
    int64_t h = 0;
    for (; h + 2 <= nq; h += 2) score_subblock<2>(base, ldc, r, q + h * r, 2, o + h * ldo, ldo, from, to);
    if (h < nq) score_subblock<1>(base, ldc, r, q + h * r, 1, o + h * ldo, ldo, from, to);
  }
}

static void scores_blk(const void* kp, bool bf16, int64_t ldb, int64_t ldc, int64_t B, int64_t r, const float* q,
                       int64_t nq, int64_t j0, int64_t j1, float* out, int64_t ldo) {
  if (bf16) scores_blk_t(static_cast<const uint16_t*>(kp), ldb, ldc, B, r, q, nq, j0, j1, out, ldo);
  else scores_blk_t(static_cast<const float*>(kp), ldb, ldc, B, r, q, nq, j0, j1, out, ldo);
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

// Row-major values, read front to back once: two rows at a time into two heads at a time.
template <class T>
static void values_rm_t(const T* v, int64_t ldj, int64_t dv, const float* w, int64_t ldw, int64_t nq, int64_t j0,
                        int64_t j1, float* out) {
  int64_t j = j0;
  for (; j + 2 <= j1; j += 2) {
    const T* v0 = v + j * ldj;
    const T* v1 = v0 + ldj;
    const float* wj = w + (j - j0);
    int64_t h = 0;
    for (; h + 2 <= nq; h += 2)
      axpy_2x2(wj[h * ldw], wj[h * ldw + 1], wj[(h + 1) * ldw], wj[(h + 1) * ldw + 1], v0, v1, out + h * dv,
               out + (h + 1) * dv, dv);
    for (; h < nq; ++h) axpy2(wj[h * ldw], v0, wj[h * ldw + 1], v1, out + h * dv, dv);
  }
  for (; j < j1; ++j)
    for (int64_t h = 0; h < nq; ++h) axpy1(w[h * ldw + (j - j0)], v + j * ldj, out + h * dv, dv);
}

static void values_rm(const void* v, bool bf16, int64_t ldj, int64_t dv, const float* w, int64_t ldw, int64_t nq,
                      int64_t j0, int64_t j1, float* out) {
  if (bf16) values_rm_t(static_cast<const uint16_t*>(v), ldj, dv, w, ldw, nq, j0, j1, out);
  else values_rm_t(static_cast<const float*>(v), ldj, dv, w, ldw, nq, j0, j1, out);
}

// Kept keys in blocks of 128: the dot products with the other half of the keys first, then softplus
// over the block (vectorised), then the value rows. Rows are random, so each pass prefetches whole rows
// kAttnPrefetchKeys keys ahead into L2; the core's outstanding misses are the limit here (a fused
// one-pass loop with L1 prefetch was 2x slower; partial-row prefetch, 1.4x).
constexpr int64_t kAttnPrefetchKeys = 16;

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
    for (; t + 2 <= nb; t += 2) {
      for (int64_t p = t + D; p < t + D + 2 && p < nb; ++p) prefetch_range_l2(kr + id[p] * ldk, bk);
      const T* rows[2] = {kr + id[t] * ldk, kr + id[t + 1] * ldk};
      dot_rows<2, 2>(rows, qr, dr, g + t);
    }
    if (t < nb) g[t] = dot1(kr + id[t] * ldk, qr, dr);
    softplus_inplace(g, nb);
    for (int64_t i = 0; i < nb; ++i) g[i] *= w[b0 + i];
    for (t = 0; t < nb && t < D; ++t) prefetch_range_l2(v + id[t] * ldv, bv);
    for (t = 0; t + 2 <= nb; t += 2) {
      for (int64_t p = t + D; p < t + D + 2 && p < nb; ++p) prefetch_range_l2(v + id[p] * ldv, bv);
      axpy2(g[t], v + id[t] * ldv, g[t + 1], v + id[t + 1] * ldv, out, dv);
    }
    if (t < nb) axpy1(g[t], v + id[t] * ldv, out, dv);
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

static void gelu_tanh(float* p, int64_t n) {
  int64_t i = 0;
#if SPK_ISA > 0
  const vf k0 = vset(0.7978845608028654f), k1 = vset(0.044715f), half = vset(0.5f), one = vset(1.0f);
  for (; i + VW <= n; i += VW) {
    vf z = vld(p + i);
    vf u = vmul(k0, vfma(vmul(k1, vmul(z, z)), z, z));
    vst(p + i, vmul(vmul(half, z), vadd(one, vtanh(u))));
  }
#endif
  for (; i < n; ++i) p[i] = gelu_tanh1(p[i]);
}

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
    SPK_NAME, matvec, ffn_gather, geglu_rows, scores_fm, scores_blk, scores_rm, values_rm, attn_gather,
    sum_sumsq, softcap, exp_sub, gelu_tanh, max_, compact_gt,
};

}  // namespace SPK_NS
