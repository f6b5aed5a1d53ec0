// AVX-512 + VNNI build of the quantized kernels (vpdpbusd); only called when the CPU reports these features. The
// float kernels of this ISA are the AVX-512 build's (VNNI is integer-only).
#include "kernels_common.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi,bmi2,popcnt")
#define SPK_ISA 2
#define SPK_VNNI 1
#define SPK_NS spk_avx512vnni
#define SPK_NAME "avx512vnni"
#include "quant_impl.h"
#pragma GCC pop_options

const spk::QuantKernels* spk::quant_kernels_avx512vnni() { return &spk_avx512vnni::qtable; }
#else
const spk::QuantKernels* spk::quant_kernels_avx512vnni() { return nullptr; }  // not an x86-64 build
#endif
