// Plain C++ build of the decode kernels (baseline x86-64 / any CPU); the fallback of last resort.
#include "kernels_common.h"

#define SPK_ISA 0
#define SPK_NS spk_scalar
#define SPK_NAME "scalar"
#include "kernels_impl.h"
#include "quant_impl.h"
#include "sparse_impl.h"

const spk::Kernels* spk::kernels_scalar() { return &spk_scalar::table; }
const spk::QuantKernels* spk::quant_kernels_scalar() { return &spk_scalar::qtable; }
const spk::SparseKernels* spk::sparse_kernels_scalar() { return &spk_scalar::sparse_table; }
