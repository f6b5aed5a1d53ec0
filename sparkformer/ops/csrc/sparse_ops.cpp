// Torch ops for activation-sparse pretrained models (sparse.h): torch.ops.sparkformer.gated_ffn_gather /
// cats_ffn_decode / sparse_input_matvec. Argument checks, scratch and threading live here, as in ops.cpp: the work
// is split over torch's intra-op threads (at::parallel_for), each thread with its own fp32 accumulator, summed at
// the end. The plain-PyTorch references in sparkformer/ops/sparse_ffn_decode.py are the specification.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "dispatch.h"
#include "sparse.h"

namespace {

using at::Tensor;
using namespace spk;

const SparseKernels* SK() {  // the sparse table of the ISA the float kernels run on (one switch for all)
  const std::string name = K()->name;
  if (name == "avx512" && sparse_kernels_avx512()) return sparse_kernels_avx512();
  if (name != "scalar" && sparse_kernels_avx2()) return sparse_kernels_avx2();
  return sparse_kernels_scalar();
}

bool is_bf16_weight(const Tensor& w, const char* op, const char* what) {
  TORCH_CHECK(w.device().is_cpu(), "sparkformer ", op, ": ", what, " must be a CPU tensor");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, "sparkformer ", op, ": ", what,
              " must be float32 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(w.size(-1) <= 1 || w.stride(-1) == 1, "sparkformer ", op, ": the last dim of ", what,
              " must be contiguous");
  return w.scalar_type() == at::kBFloat16;
}

void check_same_dtype(const Tensor& a, const Tensor& b, const char* op) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "sparkformer ", op, ": the weights must share one dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

Tensor activation_f32(const Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && at::isFloatingType(x.scalar_type()), "sparkformer ", op,
              ": x must be a floating-point CPU tensor");
  return x.to(at::kFloat).contiguous();
}

// Per-call scratch on the calling thread, reused across calls (a decode step makes many of these calls).
float* scratch_floats(int64_t n) {
  thread_local std::vector<float> buf;
  if (int64_t(buf.size()) < n + 64) buf.resize(size_t(n + 64));
  return buf.data();
}

int64_t n_parts(int64_t work, int64_t grain) {
  return std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(1, at::get_num_threads()), work / grain));
}

// out[0:n] = the sum of `parts` accumulators stored back to back.
void sum_parts(const float* acc, int64_t parts, int64_t n, float* out) {
  std::copy(acc, acc + n, out);
  for (int64_t p = 1; p < parts; ++p)
    for (int64_t i = 0; i < n; ++i) out[i] += acc[p * n + i];
}

// y = sum_t act(gate_{idx[t]} . x) * (up_{idx[t]} . x) * w_down_t[idx[t]] over the given neurons. gate_up
// (m, 2, d): each neuron's gate and up rows side by side (one forward stream per neuron); idx int32 or int64.
std::tuple<Tensor, Tensor> gather_impl(const Tensor& x, const Tensor& gate_up, const Tensor& w_down_t,
                                       const Tensor& idx, const std::string& act, const float* vw, float vt) {
  const char* op = "gated_ffn_gather";
  const int act_id = act_code(act);
  TORCH_CHECK(x.dim() == 1 && gate_up.dim() == 3 && gate_up.size(1) == 2 && w_down_t.dim() == 2,
              "sparkformer gated_ffn_gather: expected x (d,), gate_up (m, 2, d), w_down_t (m, d_out), got x ",
              x.sizes(), ", gate_up ", gate_up.sizes(), ", w_down_t ", w_down_t.sizes());
  const bool bf16 = is_bf16_weight(gate_up, op, "gate_up");
  is_bf16_weight(w_down_t, op, "w_down_t");
  check_same_dtype(gate_up, w_down_t, op);
  const int64_t m = gate_up.size(0), d = gate_up.size(2), dout = w_down_t.size(1);
  TORCH_CHECK(x.size(0) == d && w_down_t.size(0) == m, "sparkformer gated_ffn_gather: shape mismatch: x ", x.sizes(),
              ", gate_up ", gate_up.sizes(), ", w_down_t ", w_down_t.sizes());
  TORCH_CHECK(idx.device().is_cpu() && idx.dim() == 1 &&
                  (idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong),
              "sparkformer gated_ffn_gather: idx must be a 1-D int32 or int64 CPU tensor, got ", idx.scalar_type(),
              " of shape ", idx.sizes());
  TORCH_CHECK(m < std::numeric_limits<int32_t>::max(), "sparkformer gated_ffn_gather: too many neurons");
  const int64_t cnt = idx.numel();
  const int64_t parts = n_parts(cnt, 16);
  float* acc = scratch_floats(parts * dout + 3 * cnt);
  float* hs = acc + parts * dout;
  // the ids as int32 in scratch (no allocation for a router's int64 nonzero()), range-checked on the way
  int32_t* ip = reinterpret_cast<int32_t*>(hs + 2 * cnt);
  int64_t lo = 0, hi = 0;
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "gated_ffn_gather", [&] {
    const Tensor ic = idx.contiguous();
    const index_t* src = ic.data_ptr<index_t>();
    for (int64_t t = 0; t < cnt; ++t) {
      const int64_t v = int64_t(src[t]);
      lo = std::min(lo, v);
      hi = std::max(hi, v);
      ip[t] = int32_t(v);
    }
  });
  TORCH_CHECK(lo >= 0 && (cnt == 0 || hi < m), "sparkformer gated_ffn_gather: neuron index out of range [0, ", m,
              "): ", lo, " .. ", hi);
  const Tensor xf = activation_f32(x, op);
  Tensor y = at::empty({dout}, xf.options());
  float* yp = y.data_ptr<float>();
  if (cnt == 0) {
    std::fill_n(yp, dout, 0.0f);
    return {y.to(x.scalar_type()), at::scalar_tensor(int64_t(0), at::kLong)};
  }
  std::vector<int64_t> kept(parts, 0);
  const SparseKernels* sk = SK();
  const char* gp = static_cast<const char*>(gate_up.data_ptr());
  const void* up = gp + gate_up.stride(1) * gate_up.element_size();
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t t0 = cnt * p / parts, t1 = cnt * (p + 1) / parts;
      float* ap = acc + p * dout;
      std::fill(ap, ap + dout, 0.0f);
      kept[p] = sk->gated_gather(ip + t0, t1 - t0, gp, up, gate_up.stride(0), w_down_t.data_ptr(),
                                 w_down_t.stride(0), d, dout, bf16, act_id, xf.data_ptr<float>(), ap, hs + 2 * t0,
                                 vw, vt);
    }
  });
  sum_parts(acc, parts, dout, yp);
  int64_t total = 0;
  for (int64_t k : kept) total += k;
  return {y.to(x.scalar_type()), at::scalar_tensor(total, at::kLong)};
}

Tensor gated_ffn_gather(const Tensor& x, const Tensor& gate_up, const Tensor& w_down_t, const Tensor& idx,
                        const std::string& act) {
  return std::get<0>(gather_impl(x, gate_up, w_down_t, idx, act, nullptr, 0.0f));
}

// The verify stage of a predictor: of the proposed neurons idx, only those with |h_i| * weights[i] > threshold
// read their W_down^T row. Returns (y, number kept).
std::tuple<Tensor, Tensor> gated_ffn_gather_verify(const Tensor& x, const Tensor& gate_up, const Tensor& w_down_t,
                                                   const Tensor& idx, const std::string& act, const Tensor& weights,
                                                   double threshold) {
  TORCH_CHECK(weights.dim() == 1 && weights.scalar_type() == at::kFloat && weights.is_contiguous() &&
                  weights.size(0) == gate_up.size(0),
              "sparkformer gated_ffn_gather_verify: weights must be a contiguous fp32 (m,) tensor, got ",
              weights.scalar_type(), " ", weights.sizes());
  return gather_impl(x, gate_up, w_down_t, idx, act, weights.data_ptr<float>(), float(threshold));
}

// CATS: a = act(W_gate x) over all neurons; y = sum_{|a_i| > threshold} a_i * (up_i . x) * w_down_t[i].
// Returns (y in x's dtype, number of neurons kept as an int64 scalar).
std::tuple<Tensor, Tensor> cats_ffn_decode(const Tensor& x, const Tensor& w_gate, const Tensor& w_up,
                                           const Tensor& w_down_t, double threshold, const std::string& act) {
  const char* op = "cats_ffn_decode";
  const int act_id = act_code(act);
  TORCH_CHECK(x.dim() == 1 && w_gate.dim() == 2 && w_up.dim() == 2 && w_down_t.dim() == 2,
              "sparkformer cats_ffn_decode: expected x (d,), w_gate (m, d), w_up (m, d), w_down_t (m, d_out)");
  const bool bf16 = is_bf16_weight(w_gate, op, "w_gate");
  is_bf16_weight(w_up, op, "w_up");
  is_bf16_weight(w_down_t, op, "w_down_t");
  check_same_dtype(w_gate, w_up, op);
  check_same_dtype(w_gate, w_down_t, op);
  const int64_t m = w_gate.size(0), d = w_gate.size(1), dout = w_down_t.size(1);
  TORCH_CHECK(w_up.size(0) == m && w_up.size(1) == d && w_down_t.size(0) == m && x.size(0) == d,
              "sparkformer cats_ffn_decode: shape mismatch: x ", x.sizes(), ", w_gate ", w_gate.sizes(), ", w_up ",
              w_up.sizes(), ", w_down_t ", w_down_t.sizes());
  TORCH_CHECK(!std::isnan(threshold), "sparkformer cats_ffn_decode: threshold is NaN");
  TORCH_CHECK(m < std::numeric_limits<int32_t>::max(), "sparkformer cats_ffn_decode: too many neurons");
  const Tensor xf = activation_f32(x, op);
  const SparseKernels* sk = SK();
  // threads take contiguous halves of the neurons: far-apart forward streams through each matrix
  const int64_t parts = n_parts(m, 64);
  float* acc = scratch_floats(parts * dout + 2 * m);
  int32_t* idx = reinterpret_cast<int32_t*>(acc + parts * dout);
  float* hs = acc + parts * dout + m;
  std::vector<int64_t> kept(size_t(parts), 0);
  const float thr = float(threshold);
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t j0 = m * p / parts, j1 = m * (p + 1) / parts;
      float* ap = acc + p * dout;
      std::fill(ap, ap + dout, 0.0f);
      kept[size_t(p)] = sk->cats_rows(w_gate.data_ptr(), w_gate.stride(0), w_up.data_ptr(), w_up.stride(0),
                                      w_down_t.data_ptr(), w_down_t.stride(0), d, dout, bf16, act_id, thr,
                                      xf.data_ptr<float>(), ap, j0, j1, idx + j0, hs + j0);
    }
  });
  Tensor y = at::empty({dout}, xf.options());
  sum_parts(acc, parts, dout, y.data_ptr<float>());
  int64_t total = 0;
  for (int64_t k : kept) total += k;
  return {y.to(x.scalar_type()), at::scalar_tensor(total, at::kLong)};
}

// TEAL-style input sparsity: y = W x with only the inputs |x_j| > threshold, W stored transposed (w_t = W^T,
// (n_in, n_out)) so that each kept input reads one contiguous row. Returns (y in x's dtype, inputs kept).
std::tuple<Tensor, Tensor> sparse_input_matvec(const Tensor& w_t, const Tensor& x, double threshold) {
  const char* op = "sparse_input_matvec";
  TORCH_CHECK(w_t.dim() == 2 && x.dim() == 1 && w_t.size(0) == x.size(0),
              "sparkformer sparse_input_matvec: expected w_t (n_in, n_out) = W^T and x (n_in,), got w_t ",
              w_t.sizes(), ", x ", x.sizes());
  const bool bf16 = is_bf16_weight(w_t, op, "w_t");
  TORCH_CHECK(!std::isnan(threshold), "sparkformer sparse_input_matvec: threshold is NaN");
  const int64_t n_in = w_t.size(0), n_out = w_t.size(1);
  TORCH_CHECK(n_in < std::numeric_limits<int32_t>::max(), "sparkformer sparse_input_matvec: too many inputs");
  const Tensor xf = activation_f32(x, op);
  const float* xp = xf.data_ptr<float>();
  const SparseKernels* sk = SK();
  const int64_t parts_max = std::max<int64_t>(1, at::get_num_threads());
  float* ws = scratch_floats(2 * n_in + parts_max * n_out);
  int32_t* idx = reinterpret_cast<int32_t*>(ws);
  float* c = ws + n_in;
  float* acc = ws + 2 * n_in;
  const int64_t cnt = sk->compact_abs_gt(xp, n_in, float(threshold), idx);
  for (int64_t t = 0; t < cnt; ++t) c[t] = xp[idx[t]];
  const int64_t parts = n_parts(cnt, 16);
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t t0 = cnt * p / parts, t1 = cnt * (p + 1) / parts;
      float* ap = acc + p * n_out;
      std::fill(ap, ap + n_out, 0.0f);
      sk->rows_axpy(idx + t0, c + t0, t1 - t0, w_t.data_ptr(), w_t.stride(0), n_out, bf16, ap);
    }
  });
  Tensor y = at::empty({n_out}, xf.options());
  sum_parts(acc, parts, n_out, y.data_ptr<float>());
  return {y.to(x.scalar_type()), at::scalar_tensor(cnt, at::kLong)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparkformer, m) {
  m.def("gated_ffn_gather(Tensor x, Tensor gate_up, Tensor w_down_t, Tensor idx, str act) -> Tensor");
  m.def(
      "gated_ffn_gather_verify(Tensor x, Tensor gate_up, Tensor w_down_t, Tensor idx, str act, Tensor weights,"
      " float threshold) -> (Tensor, Tensor)");
  m.def(
      "cats_ffn_decode(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down_t, float threshold, str act)"
      " -> (Tensor, Tensor)");
  m.def("sparse_input_matvec(Tensor w_t, Tensor x, float threshold) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparkformer, CPU, m) {
  m.impl("gated_ffn_gather", &gated_ffn_gather);
  m.impl("gated_ffn_gather_verify", &gated_ffn_gather_verify);
  m.impl("cats_ffn_decode", &cats_ffn_decode);
  m.impl("sparse_input_matvec", &sparse_input_matvec);
}
