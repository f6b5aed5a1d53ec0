// Shared pieces of the quantized decode ops (quant_ops.cpp, quant_sparse_ops.cpp): argument checks, the per-call
// activation quantization in thread-local buffers, thread slicing, software prefetch, and the multi-row dequantizing
// accumulation (RowStream over axpy_rows_*) that every gather of quantized rows (Spark FFN V rows, routed W_down^T
// rows, TEAL's W^T rows) runs. Its functions live in an anonymous namespace: one copy per translation unit (the thread-local
// buffers are per file as well).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <string>
#include <vector>

#include "dispatch.h"
#include "op_scratch.h"
#include "quant.h"

namespace {  // one copy per translation unit (see above)

using at::Tensor;
using namespace spk;

constexpr int kAhead = 4;  // rows prefetched ahead in the gathers (random rows need misses in flight)

void check_fmt(int64_t fmt, int64_t n, const char* op, const char* what) {
  TORCH_CHECK(q_fmt_ok(fmt), "sparkformer ", op, ": unknown quantized format ", fmt,
              " (0 = q8_0, 1 = q4_0, 2 = q4_1) for ", what);
  TORCH_CHECK(n > 0 && n % kQBlock == 0, "sparkformer ", op, ": ", what, " rows hold whole blocks of ", kQBlock,
              " weights, got ", n);
}

void check_rows(const Tensor& w, int64_t bytes, const char* op, const char* what) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2 && w.stride(1) == 1, "sparkformer ",
              op, ": ", what, " must be a 2-D uint8 CPU tensor with contiguous rows");
  TORCH_CHECK(w.size(1) >= bytes, "sparkformer ", op, ": ", what, " rows of ", w.size(1), " bytes, the format needs ",
              bytes);
}

// x (n,) quantized for the integer dot products of format fmt, in thread-local buffers (quant_ops.cpp's sizes).
QAct quantize_x(const float* x, int64_t n, int fmt, const QuantKernels* qk) {
  thread_local std::vector<int8_t> q, ord;
  thread_local std::vector<float> d;
  thread_local std::vector<int32_t> s, init;
  const int64_t ng = q_groups(n);
  if (int64_t(q.size()) < 128 * ng) {
    q.resize(size_t(128 * ng));
    ord.resize(size_t(128 * ng));
    d.resize(size_t(4 * ng));
    s.resize(size_t(4 * ng));
    init.resize(size_t(32 * ng));
  }
  qk->quantize(x, n, fmt, q.data(), d.data(), s.data(), ord.data(), init.data());
  return QAct{q.data(), d.data(), s.data(), ord.data(), init.data()};
}

// A software prefetch the compiler keeps: GCC deletes loops whose only statements are __builtin_prefetch calls (they
// have no side effects), which silently dropped every row prefetch here; volatile asm cannot be deleted.
inline void prefetch(const void* p) {
#if defined(__x86_64__)
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p);
#endif
}

inline void prefetch_row(const uint8_t* row, int64_t bytes) {
  for (int64_t off = 0; off < bytes && off < 4096; off += 64) prefetch(row + off);
}

// ------------------------------------------------------------------------------------------------
// acc[0:n] += sum over r < nr of h[r] * dequant(rows[r]), kBatch rows per pass: each block of the accumulator is loaded
// and stored once per pass instead of once per row (the table's per-row axpy is bound by that read-modify-write:
// ~1.8x slower than the bf16 float kernel on TEAL's rows of 2m, in cache). Per element the same fma sequence as
// successive table axpy calls (row by row, s = h * d, acc = fma(w, s, acc)), so the sums are identical. The rows of
// the next batch (nx[0:nn]) are prefetched line by line as this batch's lines are consumed (as sparse_impl.h's
// streams do: prefetching whole rows at once measured slower cold). Compiled for the ISA by target attributes (this
// file has no ISA flags), picked with the float kernels' ISA.
// ------------------------------------------------------------------------------------------------
constexpr int kBatch = 8;

using AxpyRows = void (*)(int fmt, const uint8_t* const* rows, const float* h, int nr, const uint8_t* const* nx,
                          int nn, int64_t n, float* acc);

#if defined(__x86_64__)
// Prefetch of the next batch's lines that block b of this pass passes over (scales at the first block).
inline void prefetch_next(int fmt, const uint8_t* const* nx, int nn, int64_t nb, int64_t b) {
  if (nn == 0) return;
  const int64_t qb = fmt == kQ8_0 ? 32 : 16, sb = q_scale_bytes(fmt, nb * kQBlock);  // quant bytes per block, scales
  if (b == 0)
    for (int r = 0; r < nn; ++r)
      for (int64_t off = 0; off < sb; off += 64) prefetch(nx[r] + off);
  if ((b * qb) % 64 == 0)
    for (int r = 0; r < nn; ++r) prefetch(nx[r] + sb + b * qb);
}

__attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma"))) void axpy_rows_avx512(
    int fmt, const uint8_t* const* rows, const float* h, int nr, const uint8_t* const* nx, int nn, int64_t n,
    float* acc) {
  const int64_t nb = n / kQBlock, sb = q_scale_bytes(fmt, n);
  const bool mins = fmt == kQ4_1;
  const __m128i lo4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(fmt == kQ4_0 ? 8 : 0);
  for (int64_t b = 0; b < nb; ++b) {
    prefetch_next(fmt, nx, nn, nb, b);
    float* a = acc + b * kQBlock;
    __m512 a0 = _mm512_loadu_ps(a), a1 = _mm512_loadu_ps(a + 16);
    for (int r = 0; r < nr; ++r) {
      const uint8_t* q = rows[r] + sb;
      const uint16_t* d = reinterpret_cast<const uint16_t*>(rows[r]);
      const __m512 vs = _mm512_set1_ps(h[r] * _cvtsh_ss(d[b]));
      if (mins) {  // q4_1: + h m first, then the scaled nibbles (the table axpy's order)
        const __m512 vt = _mm512_set1_ps(h[r] * _cvtsh_ss(d[nb + b]));
        a0 = _mm512_add_ps(a0, vt), a1 = _mm512_add_ps(a1, vt);
      }
      __m128i w0, w1;
      if (fmt == kQ8_0) {
        w0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 32));
        w1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 32 + 16));
      } else {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 16));
        w0 = _mm_sub_epi8(_mm_and_si128(raw, lo4), eight);
        w1 = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), lo4), eight);
      }
      a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(w0)), vs, a0);
      a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(w1)), vs, a1);
    }
    _mm512_storeu_ps(a, a0);
    _mm512_storeu_ps(a + 16, a1);
  }
}

__attribute__((target("avx2,f16c,fma"))) void axpy_rows_avx2(int fmt, const uint8_t* const* rows, const float* h,
                                                              int nr, const uint8_t* const* nx, int nn, int64_t n,
                                                              float* acc) {
  const int64_t nb = n / kQBlock, sb = q_scale_bytes(fmt, n);
  const bool mins = fmt == kQ4_1;
  const __m128i lo4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(fmt == kQ4_0 ? 8 : 0);
  for (int64_t b = 0; b < nb; ++b) {
    prefetch_next(fmt, nx, nn, nb, b);
    float* a = acc + b * kQBlock;
    __m256 av[4] = {_mm256_loadu_ps(a), _mm256_loadu_ps(a + 8), _mm256_loadu_ps(a + 16), _mm256_loadu_ps(a + 24)};
    for (int r = 0; r < nr; ++r) {
      const uint8_t* q = rows[r] + sb;
      const uint16_t* d = reinterpret_cast<const uint16_t*>(rows[r]);
      const __m256 vs = _mm256_set1_ps(h[r] * _cvtsh_ss(d[b]));
      if (mins) {  // q4_1: + h m first, then the scaled nibbles (the table axpy's order)
        const __m256 vt = _mm256_set1_ps(h[r] * _cvtsh_ss(d[nb + b]));
        for (int k = 0; k < 4; ++k) av[k] = _mm256_add_ps(av[k], vt);
      }
      __m128i w[2];
      if (fmt == kQ8_0) {
        w[0] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 32));
        w[1] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 32 + 16));
      } else {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 16));
        w[0] = _mm_sub_epi8(_mm_and_si128(raw, lo4), eight);
        w[1] = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), lo4), eight);
      }
      for (int k = 0; k < 2; ++k) {
        av[2 * k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w[k])), vs, av[2 * k]);
        av[2 * k + 1] =
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(w[k], 8))), vs, av[2 * k + 1]);
      }
    }
    for (int k = 0; k < 4; ++k) _mm256_storeu_ps(a + 8 * k, av[k]);
  }
}
#endif

// The multi-row accumulation of the active ISA (nullptr: the table's axpy row by row, the plain C++ build).
AxpyRows axpy_rows_fn() {
#if defined(__x86_64__)
  const std::string name = K()->name;
  if (name == "avx512") return axpy_rows_avx512;
  if (name == "avx2") return axpy_rows_avx2;
#endif
  return nullptr;
}

// Rows pushed one at a time, accumulated kBatch per pass; a full batch runs once kAheadBatches more are full, and its
// pass prefetches the newest of them (random rows need their misses in flight well before use). finish() runs the
// rest in order.
constexpr int kAheadBatches = 2;

struct RowStream {
  static constexpr int kSlots = kAheadBatches + 2;
  const QuantKernels* qk;
  AxpyRows fn;
  int fmt;
  int64_t n;
  float* acc;
  const uint8_t* rows[kSlots][kBatch];
  float h[kSlots][kBatch];
  int cnt[kSlots] = {};
  int head = 0, full = 0, cur = 0;  // oldest full batch, how many are full, the batch being filled

  void push(const uint8_t* row, float hv) {
    rows[cur][cnt[cur]] = row;
    h[cur][cnt[cur]] = hv;
    if (++cnt[cur] < kBatch) return;
    cur = (cur + 1) % kSlots;
    if (++full > kAheadBatches) {
      const int nx = (head + kAheadBatches) % kSlots;
      run(head, rows[nx], cnt[nx]);
      cnt[head] = 0;
      head = (head + 1) % kSlots;
      --full;
    }
  }
  void finish() {
    for (int b = head, left = full + (cnt[cur] > 0); left > 0; b = (b + 1) % kSlots, --left) {
      const int nx = (b + kAheadBatches) % kSlots;
      run(b, rows[nx], left > kAheadBatches ? cnt[nx] : 0);
      cnt[b] = 0;
    }
    head = cur = full = 0;
  }
  void run(int b, const uint8_t* const* nx, int nn) {
    if (fn != nullptr) return fn(fmt, rows[b], h[b], cnt[b], nx, nn, n, acc);
    for (int r = 0; r < cnt[b]; ++r) qk->axpy(fmt, rows[b][r], n, h[b][r], acc);
  }
};

}  // namespace
