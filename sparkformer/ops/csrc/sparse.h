// Activation-sparse kernels for pretrained gated FFNs and matrices: the ISA-neutral interface.
//
// gated_gather   selected neurons of a gated FFN (a router or predictor chose them): their gate and up rows, then
//                their W_down^T rows -- the routed / predictor-sparse FFN.
// cats_rows      CATS (a threshold on the gate activation): every gate row, then up and W_down^T rows only for the
//                neurons whose |act(gate)| passed.
// rows_axpy      TEAL-style input sparsity: y = W x with W stored transposed, only the rows of W^T whose input
//                survived its threshold.
//
// Same conventions as kernels.h: fp32 or bf16 weights (raw uint16 bits, `bf16 = true`), fp32 everything else,
// strides in elements, innermost dimension contiguous; compiled once per ISA (sparse_impl.h) and picked with the
// float table (sparse_ops.cpp). The plain-PyTorch references are in sparkformer/ops/sparse_ffn_decode.py.
#pragma once

#include <cstdint>

namespace spk {

struct SparseKernels {
  const char* name;

  // acc[0:nd] += sum_t act(dot(g + idx[t]*ldgu, x)) * dot(u + idx[t]*ldgu, x) * (d + idx[t]*ldd), rows of
  // g and u of length n. act: spk::Act. hs: 2 * cnt floats of scratch. With vw (verify weights, indexed by neuron)
  // only the t with |h_t| * vw[idx[t]] > vt read their d row. Returns the number of d rows read.
  int64_t (*gated_gather)(const int32_t* idx, int64_t cnt, const void* g, const void* u, int64_t ldgu, const void* d,
                          int64_t ldd, int64_t n, int64_t nd, bool bf16, int act, const float* x, float* acc,
                          float* hs, const float* vw, float vt);

  // CATS over neurons [j0, j1): a_j = act(dot(g_j, x)); for the j with |a_j| > thr,
  // acc[0:nd] += a_j * dot(u_j, x) * d_j. Scratch: idx (j1 - j0 ints), hs (j1 - j0 floats).
  // Returns the number of neurons kept.
  int64_t (*cats_rows)(const void* g, int64_t ldg, const void* u, int64_t ldu, const void* d, int64_t ldd,
                       int64_t n, int64_t nd, bool bf16, int act, float thr, const float* x, float* acc, int64_t j0,
                       int64_t j1, int32_t* idx, float* hs);

  // idx[0:cnt] = the j in [0, n) with |p[j]| > thr, ascending; returns cnt. Writes only idx[0:n).
  int64_t (*compact_abs_gt)(const float* p, int64_t n, float thr, int32_t* idx);

  // acc[0:nout] += sum_t c[t] * (w + idx[t]*ldw)[0:nout].
  void (*rows_axpy)(const int32_t* idx, const float* c, int64_t cnt, const void* w, int64_t ldw, int64_t nout,
                    bool bf16, float* acc);
};

const SparseKernels* sparse_kernels_avx512();
const SparseKernels* sparse_kernels_avx2();
const SparseKernels* sparse_kernels_scalar();

}  // namespace spk
