// The SIMD layer of the kernel builds: the vector type `vf` and its primitives per ISA, vectorised exp /
// tanh / softplus / gelu, and the dot-product and axpy building blocks the kernels are made of.
//
// Included by kernels_impl.h, so, like it, once per ISA build: in that build's namespace SPK_NS and under its
// target pragma. Nothing here includes torch or the STL containers.

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
static inline float vhmax(vf a) { return _mm512_reduce_max_ps(a); }
static inline vf vround(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vpow2i(vf k) {  // 2^k for integral k in [-126, 127]
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
  return _mm512_castsi512_ps(e);
}
static inline vf vselect_lt(vf a, vf b, vf x, vf y) {  // a < b ? x : y
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x);
}
static inline bool vall_lt(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ) == 0xFFFF; }
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
static inline bool vall_lt(vf a, vf b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_LT_OQ)) == 0xFF; }
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

// Prefetch `bytes` bytes starting at p into L2, one request per 64-byte line.
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
// When every lane has |x| < 1/4 (soft-capped logits mostly do), its Taylor series to x^11 instead
// (truncation < 2e-10 relative), a quarter of the work.
static inline vf vtanh(vf x) {
  if (vall_lt(vabs(x), vset(0.25f))) {
    const vf x2 = vmul(x, x);
    vf p = vset(-1382.0f / 155925.0f);
    p = vfma(p, x2, vset(62.0f / 2835.0f));
    p = vfma(p, x2, vset(-17.0f / 315.0f));
    p = vfma(p, x2, vset(2.0f / 15.0f));
    p = vfma(p, x2, vset(-1.0f / 3.0f));
    return vfma(vmul(p, x2), x, x);
  }
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

// silu(z) = z / (1 + exp(-z)); exp overflows to inf for z < -88 and the quotient is then -0, as in torch.
static inline float silu1(float z) { return z / (1.0f + std::exp(-z)); }

#if SPK_ISA > 0
static inline vf vgelu_tanh(vf z) {
  const vf u = vmul(vset(0.7978845608028654f), vfma(vmul(vset(0.044715f), vmul(z, z)), z, z));
  return vmul(vmul(vset(0.5f), z), vadd(vset(1.0f), vtanh(u)));
}
// vexp clamps its argument to [-87, 88], so very negative z gives z / ~1e38 (~0) and large z gives z.
static inline vf vsilu(vf z) { return vdiv(z, vadd(vset(1.0f), vexp(vsub(vzero(), z)))); }
#endif

// p = act(p) for the FFN activations of spk::Act (kernels.h); unknown codes are refused by the ops.
static void act_inplace(float* p, int64_t n, int act) {
  int64_t i = 0;
  if (act == spk::kSilu) {
#if SPK_ISA > 0
    for (; i + VW <= n; i += VW) vst(p + i, vsilu(vld(p + i)));
#endif
    for (; i < n; ++i) p[i] = silu1(p[i]);
  } else {
#if SPK_ISA > 0
    for (; i + VW <= n; i += VW) vst(p + i, vgelu_tanh(vld(p + i)));
#endif
    for (; i < n; ++i) p[i] = gelu_tanh1(p[i]);
  }
}

// ------------------------------------------------------------------------------------------------
// Dot products. R rows at once share each load of x; U accumulators per row hide FMA latency.
// ------------------------------------------------------------------------------------------------
template <int R, int U, class T>
static inline void dot_rows(const T* const* w, const float* x, int64_t n, float* out) {
  vf acc[R][U];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) acc[r][u] = vzero();
  int64_t i = 0;
  for (; i + U * VW <= n; i += U * VW) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      vf xv = vld(x + i + u * VW);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r][u] = vfma(vld(w[r] + i + u * VW), xv, acc[r][u]);
    }
  }
  for (; i + VW <= n; i += VW) {
    vf xv = vld(x + i);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r][0] = vfma(vld(w[r] + i), xv, acc[r][0]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    vf s = acc[r][0];
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u) s = vadd(s, acc[r][u]);
    float t = vsum(s);
    for (int64_t k = i; k < n; ++k) t += ld1(w[r] + k) * x[k];
    out[r] = t;
  }
}

// One row: two accumulators. (Four, i.e. four cache lines per iteration, streamed 20-25% slower from
// memory on Zen 4 in a standalone test: 47 vs 60 GB/s with two threads.)
template <class T>
static inline float dot1(const T* w, const float* x, int64_t n) {
  const T* rows[1] = {w};
  float o;
  dot_rows<1, 2>(rows, x, n, &o);
  return o;
}

template <class T>
static inline void axpy1(float h, const T* w, float* acc, int64_t n) {
  vf a = vset(h);
  int64_t i = 0;
  for (; i + VW <= n; i += VW) vst(acc + i, vfma(a, vld(w + i), vld(acc + i)));
  for (; i < n; ++i) acc[i] += h * ld1(w + i);
}

// acc[0:n] += sum_r h[r] * w[r]: R rows into one read-modify-write pass over acc.
template <int R, class T>
static inline void axpy_rows(const float* h, const T* const* w, float* acc, int64_t n) {
  vf a[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) a[r] = vset(h[r]);
  int64_t i = 0;
  for (; i + VW <= n; i += VW) {
    vf y = vld(acc + i);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) y = vfma(a[r], vld(w[r] + i), y);
    vst(acc + i, y);
  }
  for (; i < n; ++i) {
    float y = acc[i];
    for (int r = 0; r < R; ++r) y += h[r] * ld1(w[r] + i);
    acc[i] = y;
  }
}

}  // namespace SPK_NS
