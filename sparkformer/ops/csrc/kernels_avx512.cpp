// AVX-512 (F/BW/VL/DQ) build of the decode kernels; only called when the CPU reports these features. No VNNI
// here: that has its own build (kernels_avx512vnni.cpp), so this one runs on every AVX-512 CPU.
#include "kernels_common.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")
#define SPK_ISA 2
#define SPK_NS spk_avx512
#define SPK_NAME "avx512"
#include "kernels_impl.h"
#include "quant_impl.h"
#include "sparse_impl.h"
#pragma GCC pop_options

const spk::Kernels* spk::kernels_avx512() { return &spk_avx512::table; }
const spk::QuantKernels* spk::quant_kernels_avx512() { return &spk_avx512::qtable; }
const spk::SparseKernels* spk::sparse_kernels_avx512() { return &spk_avx512::sparse_table; }
#else
const spk::Kernels* spk::kernels_avx512() { return nullptr; }  // not an x86-64 build
const spk::QuantKernels* spk::quant_kernels_avx512() { return nullptr; }
const spk::SparseKernels* spk::sparse_kernels_avx512() { return nullptr; }
#endif
