// The low-rank predictor's selection, shared by the float and the quantized routed FFN ops (sparse_ops.cpp,
// quant_sparse_ops.cpp): z = A x, [g; u] = B z, s_i = |act(g_i) * u_i| (overwriting g_i), then the neurons with
// s_i > routed_threshold(s, f) in ascending order. Returns how many; ids[0:count] holds them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "dispatch.h"
#include "stats.h"

namespace spk {

// A (r, d) and B (2m, r), fp32 or bf16 (pbf16), rows contiguous; x (d) fp32. Scratch: z (r), yb (2m), ids (m).
inline int64_t lowrank_select(const at::Tensor& A, const at::Tensor& B, bool pbf16, const float* x, int64_t d,
                              int64_t r, int64_t m, double f, int score_act, float* z, float* yb, int32_t* ids) {
  const Kernels* kern = K();
  at::parallel_for(0, r, std::max<int64_t>(8, 16384 / std::max<int64_t>(d, 1)), [&](int64_t b, int64_t e) {
    kern->matvec(A.data_ptr(), pbf16, A.stride(0), d, x, z + b, b, e);
  });
  // One row at a time: 4 adjacent rows of B per pass (dot_rows<4>) measured ~25% slower cold, as kernels.h says of
  // adjacent rows read interleaved.
  const char* bp = static_cast<const char*>(B.data_ptr());
  const void* bu = bp + m * B.stride(0) * B.element_size();
  at::parallel_for(0, m, std::max<int64_t>(16, 8192 / std::max<int64_t>(r, 1)), [&](int64_t b, int64_t e) {
    kern->matvec(bp, pbf16, B.stride(0), r, z, yb + b, b, e);
    kern->matvec(bu, pbf16, B.stride(0), r, z, yb + m + b, b, e);
    kern->activate(yb + b, e - b, score_act);
    for (int64_t i = b; i < e; ++i) yb[i] = std::fabs(yb[i] * yb[m + i]);
  });
  return kern->compact_gt(yb, m, routed_threshold(yb, m, f), ids);
}

}  // namespace spk
