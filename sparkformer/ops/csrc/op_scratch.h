// Per-call helpers shared by the sparse decode ops (sparse_ops.cpp, and quant_rows.h for the quantized ones):
// scratch floats on the calling thread, how many parts a parallel region splits work into, and the sum of the parts'
// accumulators. In an anonymous namespace: one copy per translation unit (the scratch buffers are per file).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

// Per-call scratch on the calling thread, reused across calls (a decode step makes many of these calls).
float* scratch_floats(int64_t n) {
  thread_local std::vector<float> buf;
  if (int64_t(buf.size()) < n + 64) buf.resize(size_t(n + 64));
  return buf.data();
}

// Parts of a parallel region: one per thread, at least `grain` items each, at least one.
int64_t n_parts(int64_t work, int64_t grain) {
  return std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(1, at::get_num_threads()), work / grain));
}

// out[0:n] = the sum of `parts` accumulators stored back to back.
void sum_parts(const float* acc, int64_t parts, int64_t n, float* out) {
  std::copy(acc, acc + n, out);
  for (int64_t p = 1; p < parts; ++p)
    for (int64_t i = 0; i < n; ++i) out[i] += acc[p * n + i];
}

}  // namespace
