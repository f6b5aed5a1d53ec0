// Block-quantized weights for batch-1 decode: the ISA-neutral interface (sparkformer/ops/quant.py is the
// reference and the Python side).
//
// A quantized matrix is one uint8 buffer of rows; each row is its blocks of 32 weights, scales first:
//   q8_0: [fp16 d[nb]] [int8 q[n]]          w = d * q                         (8.5 bits per weight)
//   q4_0: [fp16 d[nb]] [uint8 p[n / 2]]      block b's 16 bytes hold weights 0-15 in the low nibbles and
//                                           16-31 in the high nibbles; w = d * (nibble - 8)  (4.5 bits per weight)
//   q4_1: [fp16 d[nb]] [fp16 m[nb]] [uint8 p[n / 2]]
//                                           q4_0's nibbles, no offset; w = d * nibble + m  (5 bits per weight)
// so a row is contiguous and a gather of selected rows reads each row as one stream.
//
// Dot products run on integers: the activation vector is quantized per token to int8 blocks of 32 with one fp32
// scale each (xq, xd) and the per-block sums of xq (xs: q4_0 undoes its nibble offset of 8 with them, q4_1 adds its
// minima's term); each block's integer dot product is scaled by d_w * d_x and summed in fp32, q4_1 adding
// m_w * d_x * xs per block -- the scheme of llama.cpp's Q8_0 / Q4_0 / Q4_1 kernels.
// Row accumulations (y += h * row, the Spark FFN's V rows) dequantize to fp32.
#pragma once

#include <cstdint>

namespace spk {

enum QFmt : int { kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2 };

constexpr int64_t kQBlock = 32;

inline bool q_fmt_ok(int64_t fmt) { return fmt == kQ8_0 || fmt == kQ4_0 || fmt == kQ4_1; }

// Bytes of a row's scales (q4_1: and minima) before its quants.
inline int64_t q_scale_bytes(int fmt, int64_t n) { return (fmt == kQ4_1 ? 4 : 2) * (n / kQBlock); }

inline int64_t q_row_bytes(int fmt, int64_t n) { return q_scale_bytes(fmt, n) + (fmt == kQ8_0 ? n : n / 2); }

// The activation vector of one call, quantized (QuantKernels::quantize fills it; the buffers have the sizes of
// QActSizes, and everything past the last block is zero so the kernels read whole groups of 4 blocks):
//   q     int8 [128 ng]   natural order
//   d     fp32 [4 ng]     block scales
//   s     int32 [4 ng]    block sums of q (q4_0 undoes its nibble offset of 8 with them; q4_1's minima term)
//   ord   int8 [128 ng]   q4_0 / q4_1 (AVX-512): per group of 4 blocks the low halves (x 0-15 of each block) then
//                         the high halves, so one 64-byte load of 4 blocks' packed nibbles meets its x in two vectors
//   init  int32 [32 ng]   AVX-512: per group the int32 lanes the dot products start from, which take the offsets off
//                         (q4_0: -8 s; q4_1: 0; q8_0 with VNNI, whose weights are read as w + 128: -128 s)
struct QAct {
  const int8_t* q;
  const float* d;
  const int32_t* s;
  const int8_t* ord;
  const int32_t* init;
};

inline int64_t q_groups(int64_t n) { return (n / kQBlock + 3) / 4; }

struct QuantKernels {
  const char* name;
  // Quantize x (n,) fp32 for format fmt into the buffers of a (see QAct).
  void (*quantize)(const float* x, int64_t n, int fmt, int8_t* q, float* d, int32_t* s, int8_t* ord, int32_t* init);
  // y[i - r0] = dot(row i, x) for rows [r0, r1) of a quantized matrix with ld bytes between rows.
  void (*matvec)(int fmt, const uint8_t* w, int64_t ld, int64_t n, const QAct& x, float* y, int64_t r0, int64_t r1);
  // acc[0:n] += h * row (dequantized).
  void (*axpy)(int fmt, const uint8_t* row, int64_t n, float h, float* acc);
};

const QuantKernels* quant_kernels_avx512vnni();  // AVX-512 + VNNI (vpdpbusd); the float kernels are the AVX-512 ones
const QuantKernels* quant_kernels_avx512();
const QuantKernels* quant_kernels_avx2();
const QuantKernels* quant_kernels_scalar();

}  // namespace spk
