// Block-quantized kernel bodies (quant.h), compiled once per instruction set like kernels_impl.h: included by
// kernels_{avx512vnni,avx512,avx2,scalar}.cpp inside their SPK_NS / target pragma. Integer block dot products:
//   AVX-512:   4 blocks x R rows per step, with or without VNNI (quant_avx512.h);
//   AVX2:      one block per step; |w| (unsigned) x (x with w's sign) by vpmaddubsw, pairs to int32 by vpmaddwd,
//              8 int32 lanes per block scaled by d_w * d_x and accumulated in fp32; q4_0 multiplies the unsigned
//              nibbles (0..15) by x and subtracts 8 * sum(x block) afterwards, q4_1 likewise without the offset;
//   plain C++: the same sums in int32.
// q4_1 adds its minima's term sum_b m_b d_x,b sum(x block b) per row in one pass over the row's m (qmin_term).
// vpmaddubsw saturates at +-32767; the largest pair sum here is 2 * 128 * 127 = 32512 (q8) or 2 * 15 * 127 (q4).

#include "quant.h"

namespace SPK_NS {

static inline float half_to_float(uint16_t h) {
#if SPK_ISA >= 1
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while (!(man & 0x400));
      bits = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3FF) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

#ifndef SPK_VNNI
#define SPK_VNNI 0
#endif

#if SPK_ISA == 2
#include "quant_avx512.h"
#endif

// Activation quantization, plain C++ (AVX2 and scalar builds): see qquantize512 for the contract.
static void qquantize_plain(const float* x, int64_t n, int fmt, int8_t* q, float* d, int32_t* s, int8_t* ord,
                            int32_t* init) {
  const int64_t nb = n / spk::kQBlock, ng = spk::q_groups(n);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * 32;
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::fabs(xb[j]) > amax ? std::fabs(xb[j]) : amax;  // std::max's NaN rule
    const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
    int32_t sb = 0;
    for (int j = 0; j < 32; ++j) {
      // round half to even without libm's nearbyint (slow: it saves the FP environment): |x * id| <= 127, and
      // adding 1.5 * 2^23 pushes the fraction out of an fp32 mantissa under the default rounding mode (the compiler
      // may not fold (a + c) - c without -ffast-math)
      const float shifted = xb[j] * id + 12582912.0f;
      const int8_t v = int8_t(int32_t(shifted - 12582912.0f));
      q[b * 32 + j] = v;
      sb += v;
    }
    d[b] = db;
    s[b] = sb;
  }
  std::memset(q + nb * 32, 0, size_t((ng * 4 - nb) * 32));
  for (int64_t b = nb; b < ng * 4; ++b) d[b] = 0.0f, s[b] = 0;
  (void)fmt, (void)ord, (void)init;  // the AVX-512 layouts only
}

static void qquantize(const float* x, int64_t n, int fmt, int8_t* q, float* d, int32_t* s, int8_t* ord,
                      int32_t* init) {
#if SPK_ISA == 2
  qquantize512(x, n, fmt, q, d, s, ord, init);
#else
  qquantize_plain(x, n, fmt, q, d, s, ord, init);
#endif
}

#if SPK_ISA < 2
// q4_1's minima term of a row: sum_b m[b] * d_x[b] * s_x[b] (AVX2: 8 blocks per step).
static inline float qmin_term(const uint16_t* m, int64_t nb, const spk::QAct& a) {
  int64_t b = 0;
  float total = 0.0f;
#if SPK_ISA == 1
  __m256 acc = _mm256_setzero_ps();
  for (; b + 8 <= nb; b += 8) {
    const __m256 xm = _mm256_mul_ps(_mm256_loadu_ps(a.d + b),
                                    _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.s + b))));
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + b))), xm, acc);
  }
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
  total = _mm_cvtss_f32(s4);
#endif
  for (; b < nb; ++b) total += half_to_float(m[b]) * (a.d[b] * float(a.s[b]));
  return total;
}
#endif

// dot(row, x) over nb blocks; row = [fp16 d[nb]][q4_1: fp16 m[nb]][quants].
static inline float qdot(int fmt, const uint8_t* row, int64_t nb, const spk::QAct& a) {
#if SPK_ISA == 2
  return qdot1(fmt, row, nb, a);
#else
  const int8_t* xq = a.q;
  const float* xd = a.d;
  const int32_t* xs = a.s;
  const uint16_t* d = reinterpret_cast<const uint16_t*>(row);
  const uint8_t* q = row + spk::q_scale_bytes(fmt, nb * spk::kQBlock);
  const bool off8 = fmt == spk::kQ4_0;  // q4_0's nibble offset; q4_1 instead adds its minima's term
  int64_t b = 0;
  float total = fmt == spk::kQ4_1 ? qmin_term(d + nb, nb, a) : 0.0f;
#if SPK_ISA == 1
  __m256 acc = _mm256_setzero_ps();
  const __m256i ones16 = _mm256_set1_epi16(1);
  if (fmt == spk::kQ8_0) {
    for (; b < nb; ++b) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * 32));
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * 32));
      const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)), ones16);
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(half_to_float(d[b]) * xd[b]), acc);
    }
  } else {
    const __m128i lo4 = _mm_set1_epi8(0x0F);
    for (; b < nb; ++b) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 16));
      const __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), lo4), _mm_and_si128(raw, lo4));
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * 32));
      const __m256i p = _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(u, x), ones16),
                                         _mm256_set1_epi32(off8 ? xs[b] : 0));
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(half_to_float(d[b]) * xd[b]), acc);
    }
  }
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
  total += _mm_cvtss_f32(s4);
#endif
  for (; b < nb; ++b) {  // plain C++
    int32_t isum = 0;
    const int8_t* x = xq + b * 32;
    if (fmt == spk::kQ8_0) {
      const int8_t* w = reinterpret_cast<const int8_t*>(q + b * 32);
      for (int j = 0; j < 32; ++j) isum += int32_t(w[j]) * x[j];
    } else {
      const uint8_t* p = q + b * 16;
      for (int j = 0; j < 16; ++j) isum += int32_t(p[j] & 0x0F) * x[j] + int32_t(p[j] >> 4) * x[j + 16];
      if (off8) isum -= 8 * xs[b];
    }
    total += float(isum) * (half_to_float(d[b]) * xd[b]);
  }
  return total;
#endif
}

static void qmatvec(int fmt, const uint8_t* w, int64_t ld, int64_t n, const spk::QAct& a, float* y, int64_t r0,
                    int64_t r1) {
#if SPK_ISA == 2
  qmatvec512(fmt, w, ld, n, a, y, r0, r1);
#else
  const int64_t nb = n / spk::kQBlock;
  for (int64_t i = r0; i < r1; ++i) y[i - r0] = qdot(fmt, w + i * ld, nb, a);
#endif
}

#if SPK_ISA >= 1
// Block b's 32 integer weights as signed bytes (q4_1: 0..15): w0 = weights 0-15, w1 = 16-31.
static inline void block_i8(int fmt, const uint8_t* q, int64_t b, __m128i* w0, __m128i* w1) {
  if (fmt == spk::kQ8_0) {
    *w0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 32));
    *w1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 32 + 16));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 16)), lo4 = _mm_set1_epi8(0x0F);
    const __m128i eight = _mm_set1_epi8(fmt == spk::kQ4_0 ? 8 : 0);
    *w0 = _mm_sub_epi8(_mm_and_si128(raw, lo4), eight);
    *w1 = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), lo4), eight);
  }
}
#endif

// acc[0:n] += h * dequant(row); q4_1 per block (h d) q + h m
static void qaxpy(int fmt, const uint8_t* row, int64_t n, float h, float* acc) {
  const int64_t nb = n / spk::kQBlock;
  const uint16_t* d = reinterpret_cast<const uint16_t*>(row);
  const uint16_t* m = d + nb;  // q4_1's minima
  const uint8_t* q = row + spk::q_scale_bytes(fmt, n);
  const bool mins = fmt == spk::kQ4_1;
  for (int64_t b = 0; b < nb; ++b) {
    const float s = h * half_to_float(d[b]), t = mins ? h * half_to_float(m[b]) : 0.0f;
    float* a = acc + b * 32;
#if SPK_ISA == 2
    const __m512 vs = _mm512_set1_ps(s), vt = _mm512_set1_ps(t);
    __m128i w0, w1;
    block_i8(fmt, q, b, &w0, &w1);
    __m512 a0 = _mm512_loadu_ps(a), a1 = _mm512_loadu_ps(a + 16);
    if (mins) a0 = _mm512_add_ps(a0, vt), a1 = _mm512_add_ps(a1, vt);
    _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(w0)), vs, a0));
    _mm512_storeu_ps(a + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(w1)), vs, a1));
#elif SPK_ISA == 1
    const __m256 vs = _mm256_set1_ps(s), vt = _mm256_set1_ps(t);
    __m128i w0, w1;
    block_i8(fmt, q, b, &w0, &w1);
    for (int k = 0; k < 2; ++k) {
      const __m128i w = k ? w1 : w0;
      const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w));
      const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(w, 8)));
      float* ak = a + 16 * k;
      __m256 a0 = _mm256_loadu_ps(ak), a1 = _mm256_loadu_ps(ak + 8);
      if (mins) a0 = _mm256_add_ps(a0, vt), a1 = _mm256_add_ps(a1, vt);
      _mm256_storeu_ps(ak, _mm256_fmadd_ps(f0, vs, a0));
      _mm256_storeu_ps(ak + 8, _mm256_fmadd_ps(f1, vs, a1));
    }
#else
    if (fmt == spk::kQ8_0) {
      const int8_t* w = reinterpret_cast<const int8_t*>(q + b * 32);
      for (int j = 0; j < 32; ++j) a[j] += s * float(w[j]);
    } else if (mins) {
      const uint8_t* p = q + b * 16;
      for (int j = 0; j < 16; ++j) {
        a[j] += s * float(p[j] & 0x0F) + t;
        a[j + 16] += s * float(p[j] >> 4) + t;
      }
    } else {
      const uint8_t* p = q + b * 16;
      for (int j = 0; j < 16; ++j) {
        a[j] += s * float(int(p[j] & 0x0F) - 8);
        a[j + 16] += s * float(int(p[j] >> 4) - 8);
      }
    }
#endif
  }
}

static const spk::QuantKernels qtable = {SPK_NAME, qquantize, qmatvec, qaxpy};

}  // namespace SPK_NS
