// Block-quantized kernel bodies (quant.h), compiled once per instruction set like kernels_impl.h: included by
// kernels_{avx512,avx2,scalar}.cpp inside their SPK_NS / target pragma. Integer block dot products:
//   AVX-512BW: two blocks (64 weights) per step; |w| (unsigned) x (x with w's sign) by vpmaddubsw, pairs to int32 by
//              vpmaddwd, 8 int32 lanes per block scaled by d_w * d_x and accumulated in fp32;
//   AVX2:      one block per step, the same with vpsignb;
//   plain C++: the same sums in int32.
// q4_0 multiplies the unsigned nibbles (0..15) by x and subtracts 8 * sum(x block) afterwards, so no sign trick.
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

#if SPK_ISA == 2
// Lane -> block (within a step of 8 blocks) of a block pair k's int32 results: q8_0 lanes 0-7 are block 2k and
// 8-15 block 2k+1; q4_0 (pair order) lanes 0-3 and 8-11 are block 2k, 4-7 and 12-15 block 2k+1. Plain arrays:
// vector constants would be built by static initialisers, which run on every CPU.
alignas(64) static const int32_t kPick8[4][16] = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1},
    {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5},
    {6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7}};
alignas(64) static const int32_t kPick4[4][16] = {
    {0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1},
    {2, 2, 2, 2, 3, 3, 3, 3, 2, 2, 2, 2, 3, 3, 3, 3},
    {4, 4, 4, 4, 5, 5, 5, 5, 4, 4, 4, 4, 5, 5, 5, 5},
    {6, 6, 6, 6, 7, 7, 7, 7, 6, 6, 6, 6, 7, 7, 7, 7}};
#endif

// xq in q4_0 pair order for the AVX-512 kernel: per pair of blocks [b0 0-15, b1 0-15, b0 16-31, b1 16-31] (an odd
// last block stays as it is). out has room for n bytes.
static inline void q4_pair_order(const int8_t* xq, int64_t n, int8_t* out) {
  const int64_t nb = n / spk::kQBlock;
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    const int8_t* x0 = xq + b * 32;
    int8_t* o = out + b * 32;
    std::memcpy(o, x0, 16);
    std::memcpy(o + 16, x0 + 32, 16);
    std::memcpy(o + 32, x0 + 16, 16);
    std::memcpy(o + 48, x0 + 48, 16);
  }
  if (b < nb) std::memcpy(out + b * 32, xq + b * 32, 32);
}

// dot(row, x) over nb blocks; row = [fp16 d[nb]][quants].
static inline float qdot(int fmt, const uint8_t* row, int64_t nb, const int8_t* xq, const float* xd,
                         const int32_t* xs, const int8_t* xq_pairs) {
  const uint16_t* d = reinterpret_cast<const uint16_t*>(row);
  const uint8_t* q = row + 2 * nb;
  int64_t b = 0;
  float total = 0.0f;
#if SPK_ISA == 2
  // 8 blocks (256 weights) per step: their 8 fp16 scales times the 8 activation scales in one vector, each block
  // pair's two scales spread over its int32 lanes by one permute; two accumulators. q4_0 reads a pair's 32 bytes
  // once into both halves and shifts the upper half by 4 (low nibbles | high nibbles): x must then be in the pair
  // order [blk0 0-15, blk1 0-15, blk0 16-31, blk1 16-31] (xq_pairs, see q4_pair_order); the offset 8 is taken off
  // once per row: 8 * sum_b s_b * sum(x block b).
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  __m256 corr = _mm256_setzero_ps();
  const __m512i ones16 = _mm512_set1_epi16(1), lo4 = _mm512_set1_epi8(0x0F);
  const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  const bool q8 = fmt == spk::kQ8_0;
  const int8_t* xo = q8 ? xq : xq_pairs;
  for (; b + 8 <= nb; b += 8) {
    const __m256 s8 = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + b))),
                                    _mm256_loadu_ps(xd + b));
    const __m512 s16 = _mm512_castps256_ps512(s8);
    if (!q8)
      corr = _mm256_fmadd_ps(s8, _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs + b))),
                             corr);
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      const __m512i x = _mm512_loadu_si512(xo + (b + 2 * k) * 32);
      __m512i p;
      __m512 sc;
      if (q8) {
        const __m512i w = _mm512_loadu_si512(q + (b + 2 * k) * 32);
        const __m512i xsg = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
        p = _mm512_madd_epi16(_mm512_maddubs_epi16(_mm512_abs_epi8(w), xsg), ones16);
        sc = _mm512_permutexvar_ps(_mm512_load_si512(kPick8[k]), s16);
      } else {
        const __m512i raw = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + (b + 2 * k) * 16)));
        const __m512i u = _mm512_and_si512(_mm512_srlv_epi16(raw, shift), lo4);
        p = _mm512_madd_epi16(_mm512_maddubs_epi16(u, x), ones16);
        sc = _mm512_permutexvar_ps(_mm512_load_si512(kPick4[k]), s16);
      }
      if (k & 1) acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), sc, acc1);
      else acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), sc, acc0);
    }
  }
  total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  if (!q8) {
    __m128 c4 = _mm_add_ps(_mm256_castps256_ps128(corr), _mm256_extractf128_ps(corr, 1));
    c4 = _mm_add_ps(c4, _mm_movehl_ps(c4, c4));
    c4 = _mm_add_ss(c4, _mm_movehdup_ps(c4));
    total -= 8.0f * _mm_cvtss_f32(c4);
  }
#elif SPK_ISA == 1
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
                                         _mm256_set1_epi32(xs[b]));
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(half_to_float(d[b]) * xd[b]), acc);
    }
  }
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
  total = _mm_cvtss_f32(s4);
#endif
  for (; b < nb; ++b) {  // plain C++ (and the odd last block of the AVX-512 build)
    int32_t isum = 0;
    const int8_t* x = xq + b * 32;
    if (fmt == spk::kQ8_0) {
      const int8_t* w = reinterpret_cast<const int8_t*>(q + b * 32);
      for (int j = 0; j < 32; ++j) isum += int32_t(w[j]) * x[j];
    } else {
      const uint8_t* p = q + b * 16;
      for (int j = 0; j < 16; ++j) isum += int32_t(p[j] & 0x0F) * x[j] + int32_t(p[j] >> 4) * x[j + 16];
      isum -= 8 * xs[b];
    }
    total += float(isum) * (half_to_float(d[b]) * xd[b]);
  }
  return total;
}

static void qmatvec(int fmt, const uint8_t* w, int64_t ld, int64_t n, const int8_t* xq, const float* xd,
                    const int32_t* xs, const int8_t* xq_pairs, float* y, int64_t r0, int64_t r1) {
  const int64_t nb = n / spk::kQBlock;
  for (int64_t i = r0; i < r1; ++i) y[i - r0] = qdot(fmt, w + i * ld, nb, xq, xd, xs, xq_pairs);
}

#if SPK_ISA >= 1
// Block b's 32 weights as signed bytes: w0 = weights 0-15, w1 = 16-31.
static inline void block_i8(int fmt, const uint8_t* q, int64_t b, __m128i* w0, __m128i* w1) {
  if (fmt == spk::kQ8_0) {
    *w0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 32));
    *w1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 32 + 16));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 16)), lo4 = _mm_set1_epi8(0x0F);
    const __m128i eight = _mm_set1_epi8(8);
    *w0 = _mm_sub_epi8(_mm_and_si128(raw, lo4), eight);
    *w1 = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), lo4), eight);
  }
}
#endif

// acc[0:n] += h * dequant(row)
static void qaxpy(int fmt, const uint8_t* row, int64_t n, float h, float* acc) {
  const int64_t nb = n / spk::kQBlock;
  const uint16_t* d = reinterpret_cast<const uint16_t*>(row);
  const uint8_t* q = row + 2 * nb;
  for (int64_t b = 0; b < nb; ++b) {
    const float s = h * half_to_float(d[b]);
    float* a = acc + b * 32;
#if SPK_ISA == 2
    const __m512 vs = _mm512_set1_ps(s);
    __m128i w0, w1;
    block_i8(fmt, q, b, &w0, &w1);
    _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(w0)), vs, _mm512_loadu_ps(a)));
    _mm512_storeu_ps(a + 16,
                     _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(w1)), vs, _mm512_loadu_ps(a + 16)));
#elif SPK_ISA == 1
    const __m256 vs = _mm256_set1_ps(s);
    __m128i w0, w1;
    block_i8(fmt, q, b, &w0, &w1);
    for (int k = 0; k < 2; ++k) {
      const __m128i w = k ? w1 : w0;
      const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w));
      const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(w, 8)));
      float* ak = a + 16 * k;
      _mm256_storeu_ps(ak, _mm256_fmadd_ps(f0, vs, _mm256_loadu_ps(ak)));
      _mm256_storeu_ps(ak + 8, _mm256_fmadd_ps(f1, vs, _mm256_loadu_ps(ak + 8)));
    }
#else
    if (fmt == spk::kQ8_0) {
      const int8_t* w = reinterpret_cast<const int8_t*>(q + b * 32);
      for (int j = 0; j < 32; ++j) a[j] += s * float(w[j]);
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

// Selected neurons one after another, the rows a few neurons ahead prefetched (each row is one contiguous run of
// its K2 then its V blocks, so after the first lines the hardware prefetcher streams it).
static void qffn_gather(int fmt, const int32_t* idx, const float* a, int64_t cnt, const uint8_t* rows, int64_t ld,
                        int64_t n2, int64_t nv, const int8_t* xq, const float* xd, const int32_t* xs,
                        const int8_t* xq_pairs, float* acc) {
  const int64_t nb2 = n2 / spk::kQBlock, k2_bytes = spk::q_row_bytes(fmt, n2);
  constexpr int kAhead = 4;
  for (int64_t t = 0; t < cnt; ++t) {
    if (t + kAhead < cnt) {
      const uint8_t* nxt = rows + int64_t(idx[t + kAhead]) * ld;
      for (int64_t off = 0; off < 512 && off < ld; off += 64) __builtin_prefetch(nxt + off);
    }
    const uint8_t* row = rows + int64_t(idx[t]) * ld;
    const float h = a[t] * qdot(fmt, row, nb2, xq, xd, xs, xq_pairs);
    qaxpy(fmt, row + k2_bytes, nv, h, acc);
  }
}

static const spk::QuantKernels qtable = {SPK_NAME, qmatvec, qffn_gather, qaxpy, q4_pair_order};

}  // namespace SPK_NS
