// Torch ops over block-quantized weights (quant.h): torch.ops.sparkformer.quant_matvec / quant_ffn_gather /
// quantize_act. The activation vector is quantized once per call (int8 blocks of 32, one fp32 scale each, the
// reference is sparkformer.ops.quant.quantize_act); threading over rows or selected neurons as in ops.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "dispatch.h"
#include "quant.h"
#include "quant_rows.h"

namespace {

// x (n,) -> its quantized form for format fmt (quant.h: QAct), in thread-local buffers reused by later calls (a
// decode step makes ~100 of these calls, so allocation would show).
QAct quantize(const Tensor& x, int fmt, const QuantKernels* qk) {
  const Tensor xf = x.to(at::kFloat).contiguous();
  return quantize_x(xf.data_ptr<float>(), xf.numel(), fmt, qk);
}

Tensor quant_matvec(const Tensor& w, int64_t fmt, int64_t n, const Tensor& x) {
  check_fmt(fmt, n, "quant_matvec", "weight");
  check_rows(w, q_row_bytes(int(fmt), n), "quant_matvec", "weight");
  TORCH_CHECK(x.dim() == 1 && x.size(0) == n, "sparkformer quant_matvec: x must be (", n, ",), got ", x.sizes());
  const QuantKernels* qk = QK();
  const QAct a = quantize(x, int(fmt), qk);
  const int64_t rows = w.size(0);
  Tensor y = at::empty({rows}, x.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  // one contiguous range per thread (a multiple of 4 rows: whole row groups of the kernels); matrices under 64 KB
  // on one thread: a parallel region costs a few microseconds
  const int64_t bytes = rows * w.size(1), parts = std::min<int64_t>(at::get_num_threads(), 1 + bytes / (64 << 10));
  const int64_t chunk = ((rows + parts - 1) / parts + 3) / 4 * 4;
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t r0 = std::min(rows, p * chunk), r1 = std::min(rows, r0 + chunk);
      if (r1 > r0) qk->matvec(int(fmt), wp, w.stride(0), n, a, yp + r0, r0, r1);
    }
  });
  return y;
}

// y (nv,) fp32 = sum_t a[t] * dot(K2 row of idx[t], x2) * V row of idx[t]; rows (n_neurons, bytes) hold each
// neuron's quantized K2 row (n2 weights) then its V row (nv weights).
Tensor quant_ffn_gather(const Tensor& idx, const Tensor& act, const Tensor& rows, int64_t fmt, int64_t n2, int64_t nv,
                        const Tensor& x2) {
  check_fmt(fmt, n2, "quant_ffn_gather", "K2");
  check_fmt(fmt, nv, "quant_ffn_gather", "V");
  check_rows(rows, q_row_bytes(int(fmt), n2) + q_row_bytes(int(fmt), nv), "quant_ffn_gather", "rows");
  TORCH_CHECK(idx.scalar_type() == at::kInt && idx.dim() == 1 && idx.is_contiguous(),
              "sparkformer quant_ffn_gather: idx must be a contiguous int32 vector");
  TORCH_CHECK(act.scalar_type() == at::kFloat && act.dim() == 1 && act.numel() == idx.numel() && act.is_contiguous(),
              "sparkformer quant_ffn_gather: a must be float32 with one value per index");
  TORCH_CHECK(x2.dim() == 1 && x2.size(0) == n2, "sparkformer quant_ffn_gather: x2 must be (", n2, ",)");
  const int64_t cnt = idx.numel();
  if (cnt > 0) {
    const int32_t* ip = idx.data_ptr<int32_t>();
    const auto mm = std::minmax_element(ip, ip + cnt);
    TORCH_CHECK(*mm.first >= 0 && *mm.second < rows.size(0), "sparkformer quant_ffn_gather: index out of range");
  }
  const QuantKernels* qk = QK();
  const QAct a = quantize(x2, int(fmt), qk);
  const int64_t parts = n_parts(cnt, 16), k2b = q_row_bytes(int(fmt), n2), ld = rows.stride(0);
  const AxpyRows fn = axpy_rows_fn();
  const int32_t* ip = idx.data_ptr<int32_t>();
  const float* ap = act.data_ptr<float>();
  const uint8_t* rp = rows.data_ptr<uint8_t>();
  std::vector<float> acc(size_t(parts * nv), 0.0f);
  // per neuron its K2 dot product, then its V row into the multi-row accumulation (RowStream: 8 rows per pass over
  // the accumulator), whole rows (K2 then V) prefetched kRowsAhead neurons ahead (8 measured the same).
  // `python benchmarks/quant_kernels.py --models gemma2` (spark_gather: 1104 of 13824 neurons, cold, 2 threads),
  // two runs interleaved with the previous one-row-at-a-time kernel: q8_0 321-395 us against 553-578 us; q4_0 and
  // q4_1 within the noise (306-340 against 260-377 us, 353-363 against 329-376 us).
  constexpr int kRowsAhead = 4;
  const int64_t used = k2b + q_row_bytes(int(fmt), nv);
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t t0 = cnt * p / parts, t1 = cnt * (p + 1) / parts;
      RowStream rs{qk, fn, int(fmt), nv, acc.data() + p * nv};
      for (int64_t t = t0; t < std::min(t1, t0 + kRowsAhead); ++t) prefetch_row(rp + int64_t(ip[t]) * ld, used);
      for (int64_t t = t0; t < t1; ++t) {
        if (t + kRowsAhead < t1) prefetch_row(rp + int64_t(ip[t + kRowsAhead]) * ld, used);
        const uint8_t* row = rp + int64_t(ip[t]) * ld;
        float h;
        qk->matvec(int(fmt), row, ld, n2, a, &h, 0, 1);
        rs.push(row + k2b, ap[t] * h);
      }
      rs.finish();
    }
  });
  Tensor y = at::empty({nv}, x2.options().dtype(at::kFloat));
  sum_parts(acc.data(), parts, nv, y.data_ptr<float>());
  return y;
}

// Test hook: the activation quantization the ops use -> (q int8 (n,), d fp32 (n / 32,)).
std::tuple<Tensor, Tensor> quantize_act(const Tensor& x) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) % kQBlock == 0, "sparkformer quantize_act: x must be (32 k,)");
  const QAct a = quantize(x, kQ8_0, QK());
  const int64_t n = x.size(0);
  Tensor q = at::empty({n}, x.options().dtype(at::kChar));
  Tensor d = at::empty({n / kQBlock}, x.options().dtype(at::kFloat));
  std::copy(a.q, a.q + n, q.data_ptr<int8_t>());
  std::copy(a.d, a.d + n / kQBlock, d.data_ptr<float>());
  return {q, d};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparkformer, m) {
  m.def("quant_matvec(Tensor w, int fmt, int n, Tensor x) -> Tensor");
  m.def("quant_ffn_gather(Tensor idx, Tensor a, Tensor rows, int fmt, int n2, int nv, Tensor x2) -> Tensor");
  m.def("_quantize_act(Tensor x) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparkformer, CPU, m) {
  m.impl("quant_matvec", &quant_matvec);
  m.impl("quant_ffn_gather", &quant_ffn_gather);
  m.impl("_quantize_act", &quantize_act);
}
