// AVX2 + FMA build of the decode kernels; only called when the CPU reports these features.
#include "kernels_common.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
#define SPK_ISA 1
#define SPK_NS spk_avx2
#define SPK_NAME "avx2"
#include "kernels_impl.h"
#include "quant_impl.h"
#include "sparse_impl.h"
#pragma GCC pop_options

const spk::Kernels* spk::kernels_avx2() { return &spk_avx2::table; }
const spk::QuantKernels* spk::quant_kernels_avx2() { return &spk_avx2::qtable; }
const spk::SparseKernels* spk::sparse_kernels_avx2() { return &spk_avx2::sparse_table; }
#else
const spk::Kernels* spk::kernels_avx2() { return nullptr; }  // not an x86-64 build
const spk::QuantKernels* spk::quant_kernels_avx2() { return nullptr; }
const spk::SparseKernels* spk::sparse_kernels_avx2() { return nullptr; }
#endif
