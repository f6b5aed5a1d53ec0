// Which kernel table the ops call: the best instruction set the CPU supports (AVX-512 with or without VNNI,
// AVX2 + FMA, plain C++), narrowed by SPARKFORMER_ISA at load time or by torch.ops.sparkformer._set_isa (tests,
// benchmarks).
// Included by the *_ops.cpp files.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#include "kernels.h"
#include "quant.h"

namespace spk {

// ------------------------------------------------------------------------------------------------
// Kernel table selection. Ranks: 0 scalar, 1 avx2, 2 avx512, 3 avx512vnni (the AVX-512 float kernels with the
// VNNI build of the quantized ones, quant.h).
// ------------------------------------------------------------------------------------------------
inline int isa_rank(const std::string& name) {
  if (name == "avx512vnni") return 3;
  if (name == "avx512") return 2;
  if (name == "avx2") return 1;
  if (name == "scalar") return 0;
  return -1;
}

inline int cpu_isa_rank() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return __builtin_cpu_supports("avx512vnni") && quant_kernels_avx512vnni() ? 3 : 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

inline const Kernels* kernels_for(int rank) {
  if (rank >= 2 && kernels_avx512()) return kernels_avx512();
  if (rank >= 1 && kernels_avx2()) return kernels_avx2();
  return kernels_scalar();
}

// The active rank (SPARKFORMER_ISA may only narrow what the CPU has).
inline int& active_rank() {
  static int r = [] {
    int rank = cpu_isa_rank();
    if (const char* env = std::getenv("SPARKFORMER_ISA")) {
      int want = isa_rank(env);
      if (want >= 0 && want < rank) rank = want;
    }
    return rank;
  }();
  return r;
}

inline const Kernels*& active() {
  static const Kernels* k = kernels_for(active_rank());
  return k;
}

inline const Kernels* K() { return active(); }

// The quantized kernels of the active ISA.
inline const QuantKernels* QK() {
  const int r = active_rank();
  if (r >= 3 && quant_kernels_avx512vnni()) return quant_kernels_avx512vnni();
  if (r >= 2 && quant_kernels_avx512()) return quant_kernels_avx512();
  if (r >= 1 && quant_kernels_avx2()) return quant_kernels_avx2();
  return quant_kernels_scalar();
}

// torch.ops.sparkformer._set_isa("avx512vnni" | "avx512" | "avx2" | "scalar" | "auto") -> name now active.
// Asking for more than the CPU has is an error; "" just reports.
inline std::string set_isa(std::string name) {
  if (!name.empty()) {
    int have = cpu_isa_rank();
    int want = name == "auto" ? have : isa_rank(name);
    TORCH_CHECK(want >= 0, "sparkformer: unknown ISA '", name, "' (avx512vnni | avx512 | avx2 | scalar | auto)");
    TORCH_CHECK(want <= have, "sparkformer: this CPU does not support ", name);
    active_rank() = want;
    active() = kernels_for(want);
  }
  return active_rank() >= 3 ? "avx512vnni" : K()->name;
}

// The FFN activation of an op's `act` argument ("gelu_tanh" | "silu") as a kernel code (spk::Act).
inline int act_code(const std::string& name) {
  if (name == "gelu_tanh") return kGeluTanh;
  if (name == "silu") return kSilu;
  TORCH_CHECK(false, "sparkformer: unknown activation '", name, "' (gelu_tanh | silu)");
  return -1;
}

}  // namespace spk
