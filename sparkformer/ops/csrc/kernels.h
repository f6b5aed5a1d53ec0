// Batch-1 decode kernels: the ISA-neutral interface.
//
// Each kernel works on a range of rows (or keys) and is free of torch; ops.cpp owns threading
// (at::parallel_for), selection and the torch op registration. The same kernel source
// (kernels_impl.h) is compiled three times -- AVX-512, AVX2+FMA and plain C++ -- and ops.cpp picks
// one table at load time from the CPU's features (see cpu_isa_rank in ops.cpp).
//
// What the memory system rewards (measured on the 2-core Zen 4 these were tuned on, standalone tests):
// one core streams ~33 GB/s from memory with 2 MB pages, ~23 GB/s with 4 KB pages, but only when each
// access stream is a plain forward run -- two *adjacent* rows read interleaved drop to 13 GB/s, and a
// single stream that also read-modify-writes an accumulator to ~23; two far-apart streams recover
// the full rate. Random rows (the sparse gathers) need many independent streams (16 at a time) plus
// software prefetch to keep enough misses in flight. The kernels below are laid out accordingly.
//
// Weights are fp32 or bf16 (passed as raw uint16 bits, `bf16 = true`); everything else -- inputs,
// accumulators, outputs -- is fp32. bf16 is widened to fp32 exactly (a 16-bit shift), so every
// product and sum is done in fp32 and the kernels agree with an fp32 reference on upcast weights.
// Strides (`ld*`) are in elements; the innermost dimension is always contiguous.
#pragma once

#include <cstdint>

namespace spk {

// The gated FFN activations the fused kernels implement (the ops take their names, see act_code in ops.cpp).
enum Act : int { kGeluTanh = 0, kSilu = 1 };

struct Kernels {
  const char* name;

  // y[i - r0] = dot(w[i*ld : i*ld + n], x)  for i in [r0, r1).
  void (*matvec)(const void* w, bool bf16, int64_t ld, int64_t n, const float* x, float* y,
                 int64_t r0, int64_t r1);

  // Spark FFN, selected rows: acc[0:nv] += sum_t a[t] * dot(k2[idx[t]], x2) * v[idx[t]].
  void (*ffn_gather)(const int32_t* idx, const float* a, int64_t cnt, const void* k2, int64_t ld2,
                     int64_t n2, const float* x2, const void* v, int64_t ldv, int64_t nv, bool bf16,
                     float* acc);

  // Spark FFN prefill, one neuron (its K2 row k2, V row v) and the tokens that selected it:
  // y[tok[t]*ldy : +nv] += a[t] * dot(k2, x[tok[t]*ldx : +n2]) * v  for t < cnt.
  void (*ffn_neuron)(const void* k2, int64_t n2, const void* v, int64_t nv, bool bf16, const int32_t* tok,
                     const float* a, int64_t cnt, const float* x, int64_t ldx, float* y, int64_t ldy);

  // Gated FFN neurons [j0, j1): h_j = act(dot(g_j, x)) * dot(u_j, x); acc[0:nd] += h_j * d_j (act: Act).
  // g, u: rows of length n (=len(x)); d: rows of length nd (W_down transposed). hs: 2 * (j1 - j0)
  // floats of scratch.
  void (*geglu_rows)(const void* g, int64_t ldg, const void* u, int64_t ldu, const void* d,
                     int64_t ldd, int64_t n, int64_t nd, bool bf16, const float* x, float* acc,
                     int64_t j0, int64_t j1, float* hs, int act);

  // Feature-major scores: out[h*ldo + j - j0] = sum_{c<r} q[h*r + c] * kp[c*ldc + j],
  // h < nq, j in [j0, j1). One streaming pass over r rows of keys for nq queries at once.
  void (*scores_fm)(const void* kp, bool bf16, int64_t ldc, int64_t r, const float* q, int64_t nq,
                    int64_t j0, int64_t j1, float* out, int64_t ldo);

  // Blocked feature-major scores: the same sums for keys stored in blocks of B (B % 64 == 0) keys,
  // block b at kp + b*ldb holding an (r, B) tile with row stride ldc. j0, j1 are absolute positions.
  // One forward stream over the tiles; partial sums stay in registers. If cap > 0 the scores are
  // soft-capped (cap * tanh(p / cap)) before they are stored; if stats is given, stats[2h] and
  // stats[2h + 1] get the sum and sum of squares of head h's stored scores added.
  void (*scores_blk)(const void* kp, bool bf16, int64_t ldb, int64_t ldc, int64_t B, int64_t r, const float* q,
                     int64_t nq, int64_t j0, int64_t j1, float* out, int64_t ldo, float cap, double* stats);

  // Row-major scores: out[h*ldo + j - j0] = dot(k[j*ldj : j*ldj + dq], q[h*dq : (h+1)*dq]).
  void (*scores_rm)(const void* k, bool bf16, int64_t ldj, int64_t dq, const float* q, int64_t nq,
                    int64_t j0, int64_t j1, float* out, int64_t ldo);

  // Row-major values: out[h*dv + c] += sum_{j in [j0,j1)} w[h*ldw + j - j0] * v[j*ldj + c].
  void (*values_rm)(const void* v, bool bf16, int64_t ldj, int64_t dv, const float* w, int64_t ldw,
                    int64_t nq, int64_t j0, int64_t j1, float* out);

  // Spark attention, kept keys of one head (qr pre-scaled):
  // out[0:dv] += sum_t w[t] * softplus(dot(kr[idx[t]], qr)) * v[idx[t]].
  void (*attn_gather)(const int32_t* idx, const float* w, int64_t cnt, const void* kr, int64_t ldk,
                      int64_t dr, const float* qr, const void* v, int64_t ldv, int64_t dv, bool bf16,
                      float* out);

  // Small vector helpers on fp32 arrays (vectorised exp / tanh).
  void (*sum_sumsq)(const float* p, int64_t n, double shift, double* sum, double* sumsq);
  void (*softcap)(float* p, int64_t n, float cap);           // p = cap * tanh(p / cap)
  float (*exp_sub)(const float* p, int64_t n, float m, float* out);  // out = exp(p - m); returns sum
  void (*gelu_tanh)(float* p, int64_t n);                    // p = gelu_tanh(p)
  void (*activate)(float* p, int64_t n, int act);            // p = act(p), act: Act
  float (*max)(const float* p, int64_t n);
  // idx[0:cnt] = the j in [0, n) with p[j] > theta, ascending; returns cnt. Writes only idx[0:n).
  int64_t (*compact_gt)(const float* p, int64_t n, float theta, int32_t* idx);
};


const Kernels* kernels_avx512();
const Kernels* kernels_avx2();
const Kernels* kernels_scalar();

}  // namespace spk
