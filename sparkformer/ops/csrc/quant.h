// Block-quantized weights for batch-1 decode: the ISA-neutral interface (sparkformer/ops/quant.py is the
// reference and the Python side).
//
// A quantized matrix is one uint8 buffer of rows; each row is its blocks of 32 weights, scales first:
//   q8_0: [fp16 d[nb]] [int8 q[n]]          w = d * q                         (8.5 bits per weight)
//   q4_0: [fp16 d[nb]] [uint8 p[n / 2]]      block b's 16 bytes hold weights 0-15 in the low nibbles and
//                                           16-31 in the high nibbles; w = d * (nibble - 8)  (4.5 bits per weight)
// so a row is contiguous and a gather of selected rows reads each row as one stream.
//
// Dot products run on integers: the activation vector is quantized per token to int8 blocks of 32 with one fp32
// scale each (xq, xd) and, for q4_0, the per-block sums of xq (xs, to undo the nibble offset of 8); each block's
// integer dot product is scaled by d_w * d_x and summed in fp32 -- the scheme of llama.cpp's Q8_0 / Q4_0 kernels.
// Row accumulations (y += h * row, the Spark FFN's V rows) dequantize to fp32.
#pragma once

#include <cstdint>

namespace spk {

enum QFmt : int { kQ8_0 = 0, kQ4_0 = 1 };

constexpr int64_t kQBlock = 32;

inline int64_t q_row_bytes(int fmt, int64_t n) {
  const int64_t nb = n / kQBlock;
  return 2 * nb + (fmt == kQ8_0 ? n : n / 2);
}

struct QuantKernels {
  const char* name;
  // y[i - r0] = dot(row i, x) for rows [r0, r1) of a quantized matrix with ld bytes between rows.
  // xq_pairs: xq rearranged by pair_order (the q4_0 kernels of some ISAs read x in that order).
  void (*matvec)(int fmt, const uint8_t* w, int64_t ld, int64_t n, const int8_t* xq, const float* xd,
                 const int32_t* xs, const int8_t* xq_pairs, float* y, int64_t r0, int64_t r1);
  // Spark FFN over selected neurons: each neuron's row holds its K2 row (n2 weights) then its V row (nv weights);
  // acc[0:nv] += sum_t a[t] * dot(K2 row of idx[t], x2) * V row of idx[t].
  void (*ffn_gather)(int fmt, const int32_t* idx, const float* a, int64_t cnt, const uint8_t* rows, int64_t ld,
                     int64_t n2, int64_t nv, const int8_t* xq, const float* xd, const int32_t* xs,
                     const int8_t* xq_pairs, float* acc);
  // acc[0:n] += h * row (dequantized).
  void (*axpy)(int fmt, const uint8_t* row, int64_t n, float h, float* acc);
  // out[0:n] = xq rearranged in the order this ISA's q4_0 dot products read.
  void (*pair_order)(const int8_t* xq, int64_t n, int8_t* out);
};

const QuantKernels* quant_kernels_avx512();
const QuantKernels* quant_kernels_avx2();
const QuantKernels* quant_kernels_scalar();

}  // namespace spk
