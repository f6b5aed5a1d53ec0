// Torch ops for activation-sparse pretrained models (sparse.h): torch.ops.sparkformer.gated_ffn_gather /
// cats_ffn_decode / sparse_input_matvec, and whole FFN steps in one call: lowrank_routed_ffn (a low-rank
// predictor's scores, the statistical threshold and the gather) and teal_ffn_decode (TEAL's two GEMVs).
// Argument checks, scratch and threading live here, as in ops.cpp: the work is split over torch's intra-op threads
// (at::parallel_for), each thread with its own fp32 accumulator, summed at the end. The plain-PyTorch references in
// sparkformer/ops/sparse_ffn_decode.py are the specification.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "dispatch.h"
#include "op_scratch.h"
#include "sparse.h"
#include "router.h"
#include "stats.h"

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

// Per-part counts of a parallel region (one slot per part; reused across calls, no allocation once grown).
int64_t* part_counts(int64_t parts) {
  thread_local std::vector<int64_t> buf;
  if (int64_t(buf.size()) < parts) buf.resize(size_t(parts));
  std::fill_n(buf.data(), parts, int64_t(0));
  return buf.data();
}

// The gather itself over range-checked int32 ids ip[0:cnt]: yp[0:d_out] = the gated FFN over those neurons (with
// the verify stage when vw is given); returns the number of W_down^T rows read. Scratch from the caller: acc
// (n_parts(cnt, 16) * d_out floats), hs (2 * cnt floats). Threads take contiguous slices of the list.
int64_t gather_run(const int32_t* ip, int64_t cnt, const Tensor& gate_up, const Tensor& w_down_t, bool bf16,
                   int act_id, const float* xp, float* yp, float* acc, float* hs, const float* vw, float vt) {
  const int64_t d = gate_up.size(2), dout = w_down_t.size(1);
  if (cnt == 0) {
    std::fill_n(yp, dout, 0.0f);
    return 0;
  }
  const int64_t parts = n_parts(cnt, 16);
  int64_t* kept = part_counts(parts);
  const SparseKernels* sk = SK();
  const char* gp = static_cast<const char*>(gate_up.data_ptr());
  const void* up = gp + gate_up.stride(1) * gate_up.element_size();
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t t0 = cnt * p / parts, t1 = cnt * (p + 1) / parts;
      float* ap = acc + p * dout;
      std::fill(ap, ap + dout, 0.0f);
      kept[p] = sk->gated_gather(ip + t0, t1 - t0, gp, up, gate_up.stride(0), w_down_t.data_ptr(), w_down_t.stride(0),
                                 d, dout, bf16, act_id, xp, ap, hs + 2 * t0, vw, vt);
    }
  });
  sum_parts(acc, parts, dout, yp);
  int64_t total = 0;
  for (int64_t p = 0; p < parts; ++p) total += kept[p];
  return total;
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
  const int64_t total = gather_run(ip, cnt, gate_up, w_down_t, bf16, act_id, xf.data_ptr<float>(), y.data_ptr<float>(),
                                   acc, hs, vw, vt);
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

// ------------------------------------------------------------------------------------------------
// Whole FFN steps in one call: a low-rank predictor's routed FFN, TEAL's two thresholded GEMVs
// ------------------------------------------------------------------------------------------------
// x as fp32: its own data when it is a contiguous fp32 tensor, else widened into buf (d floats of scratch).
const float* x_as_f32(const Tensor& x, float* buf) {
  if (x.scalar_type() == at::kFloat && x.is_contiguous()) return x.data_ptr<float>();
  at::from_blob(buf, {x.numel()}, at::TensorOptions().dtype(at::kFloat)).copy_(x);
  return buf;
}

int64_t pad16(int64_t n) { return (n + 15) / 16 * 16; }  // scratch segments start on 64-byte lines

// A low-rank predictor's routed FFN step: z = A x, [g; u] = B z (fp32), s_i = |act(g_i) * u_i|, the neurons with
// s_i > stat_threshold(s, f), then the gather (with the verify stage when verify_weights is given).
// Three parallel regions: A's rows, B's rows (each thread a range of neurons: its g and u rows, then their scores),
// the gather. Returns (y in x's dtype, neurons proposed, W_down^T rows read).
std::tuple<Tensor, Tensor, Tensor> lowrank_routed_ffn(const Tensor& x, const Tensor& A, const Tensor& B, double f,
                                                      const std::string& act, const Tensor& gate_up,
                                                      const Tensor& w_down_t,
                                                      const std::optional<Tensor>& verify_weights,
                                                      double verify_threshold,
                                                      const std::optional<std::string>& score_act) {
  const char* op = "lowrank_routed_ffn";
  const int act_id = act_code(act);
  const int sact = score_act.has_value() ? act_code(*score_act) : act_id;
  TORCH_CHECK(x.dim() == 1 && A.dim() == 2 && B.dim() == 2 && gate_up.dim() == 3 && gate_up.size(1) == 2 &&
                  w_down_t.dim() == 2,
              "sparkformer lowrank_routed_ffn: expected x (d,), A (r, d), B (2m, r), gate_up (m, 2, d), w_down_t "
              "(m, d_out), got x ", x.sizes(), ", A ", A.sizes(), ", B ", B.sizes(), ", gate_up ", gate_up.sizes(),
              ", w_down_t ", w_down_t.sizes());
  TORCH_CHECK(x.device().is_cpu() && at::isFloatingType(x.scalar_type()),
              "sparkformer lowrank_routed_ffn: x must be a floating-point CPU tensor");
  const bool pbf16 = is_bf16_weight(A, op, "A");
  is_bf16_weight(B, op, "B");
  check_same_dtype(A, B, op);
  const bool bf16 = is_bf16_weight(gate_up, op, "gate_up");
  is_bf16_weight(w_down_t, op, "w_down_t");
  check_same_dtype(gate_up, w_down_t, op);
  const int64_t r = A.size(0), d = A.size(1), m = gate_up.size(0), dout = w_down_t.size(1);
  TORCH_CHECK(x.size(0) == d && gate_up.size(2) == d && B.size(0) == 2 * m && B.size(1) == r &&
                  w_down_t.size(0) == m,
              "sparkformer lowrank_routed_ffn: shape mismatch: x ", x.sizes(), ", A ", A.sizes(), ", B ", B.sizes(),
              ", gate_up ", gate_up.sizes(), ", w_down_t ", w_down_t.sizes(), " (need A (r, d), B (2m, r))");
  TORCH_CHECK(f > 0.0 && f <= 1.0, "sparkformer lowrank_routed_ffn: f must be in (0, 1], got ", f);
  TORCH_CHECK(m > 0 && m < std::numeric_limits<int32_t>::max(), "sparkformer lowrank_routed_ffn: bad neuron count ",
              m);
  const float* vw = nullptr;
  if (verify_weights.has_value()) {
    const Tensor& w = *verify_weights;
    TORCH_CHECK(w.device().is_cpu() && w.dim() == 1 && w.scalar_type() == at::kFloat && w.is_contiguous() &&
                    w.size(0) == m,
                "sparkformer lowrank_routed_ffn: verify_weights must be a contiguous fp32 (m,) tensor, got ",
                w.scalar_type(), " ", w.sizes());
    TORCH_CHECK(!std::isnan(verify_threshold), "sparkformer lowrank_routed_ffn: verify_threshold is NaN");
    vw = w.data_ptr<float>();
  }
  // scratch: x (d) | z (r) | g/u then s (2m) | ids (m) | hs (2m) | per-thread accumulators
  const int64_t P = std::max<int64_t>(1, at::get_num_threads());
  const int64_t ox = 0, oz = pad16(d), oy = oz + pad16(r), oi = oy + pad16(2 * m), oh = oi + pad16(m),
                oa = oh + pad16(2 * m);
  float* ws = scratch_floats(oa + P * dout);
  const float* xp = x_as_f32(x, ws + ox);
  float* z = ws + oz;
  float* yb = ws + oy;
  int32_t* idx = reinterpret_cast<int32_t*>(ws + oi);
  // 1-3. the predictor's scores and selection (ascending ids)
  const int64_t cnt = lowrank_select(A, B, pbf16, xp, d, r, m, f, sact, z, yb, idx);
  // 4. the gather
  Tensor y = at::empty({dout}, at::TensorOptions().dtype(at::kFloat));
  const int64_t kept = gather_run(idx, cnt, gate_up, w_down_t, bf16, act_id, xp, y.data_ptr<float>(), ws + oa,
                                  ws + oh, vw, float(verify_threshold));
  return {y.to(x.scalar_type()), at::scalar_tensor(cnt, at::kLong), at::scalar_tensor(kept, at::kLong)};
}

// TEAL's gated FFN step: the inputs |x_j| > t_in read their rows of gate_up_t = [W_gate; W_up]^T (d, 2m), giving
// [g; u] (fp32); h = act(g) * u; the neurons |h_i| > t_down read their W_down^T rows. Threads take slices of the
// kept inputs, then of the kept neurons (each with its own accumulators, summed).
// Returns (y in x's dtype, inputs kept, neurons kept).
std::tuple<Tensor, Tensor, Tensor> teal_ffn_decode(const Tensor& x, const Tensor& gate_up_t, const Tensor& w_down_t,
                                                   double t_in, double t_down, const std::string& act) {
  const char* op = "teal_ffn_decode";
  const int act_id = act_code(act);
  TORCH_CHECK(x.dim() == 1 && gate_up_t.dim() == 2 && w_down_t.dim() == 2,
              "sparkformer teal_ffn_decode: expected x (d,), gate_up_t (d, 2m), w_down_t (m, d_out), got x ",
              x.sizes(), ", gate_up_t ", gate_up_t.sizes(), ", w_down_t ", w_down_t.sizes());
  TORCH_CHECK(x.device().is_cpu() && at::isFloatingType(x.scalar_type()),
              "sparkformer teal_ffn_decode: x must be a floating-point CPU tensor");
  const bool bf16 = is_bf16_weight(gate_up_t, op, "gate_up_t");
  is_bf16_weight(w_down_t, op, "w_down_t");
  check_same_dtype(gate_up_t, w_down_t, op);
  const int64_t d = gate_up_t.size(0), m = w_down_t.size(0), dout = w_down_t.size(1);
  TORCH_CHECK(x.size(0) == d && gate_up_t.size(1) == 2 * m, "sparkformer teal_ffn_decode: shape mismatch: x ",
              x.sizes(), ", gate_up_t ", gate_up_t.sizes(), ", w_down_t ", w_down_t.sizes(),
              " (need gate_up_t (d, 2m), w_down_t (m, d_out))");
  TORCH_CHECK(!std::isnan(t_in) && !std::isnan(t_down), "sparkformer teal_ffn_decode: threshold is NaN");
  TORCH_CHECK(d < std::numeric_limits<int32_t>::max() && m < std::numeric_limits<int32_t>::max(),
              "sparkformer teal_ffn_decode: too large");
  // scratch: x (d) | input ids (d) | their values (d) | g/u then h (2m) | neuron ids (m) | their h (m) |
  // accumulators of the down rows (P * d_out) | of the gate/up rows of threads 1.. (P - 1) * 2m
  const int64_t P = std::max<int64_t>(1, at::get_num_threads());
  const int64_t oii = pad16(d), oc = oii + pad16(d), og = oc + pad16(d), oni = og + pad16(2 * m),
                ohv = oni + pad16(m), oa = ohv + pad16(m), oa1 = oa + pad16(P * dout);
  float* ws = scratch_floats(oa1 + (P - 1) * pad16(2 * m));
  const float* xp = x_as_f32(x, ws);
  int32_t* iin = reinterpret_cast<int32_t*>(ws + oii);
  float* c = ws + oc;
  float* gu = ws + og;
  int32_t* ih = reinterpret_cast<int32_t*>(ws + oni);
  float* hv = ws + ohv;
  float* acc = ws + oa;
  float* acc1 = ws + oa1;
  const SparseKernels* sk = SK();
  // 1. the kept inputs, then [g; u]: threads take slices of the kept rows (far-apart forward streams; two threads
  // reading the two halves of the same rows were ~25% slower), each with its own 2m accumulator, summed after
  const int64_t n_in = sk->compact_abs_gt(xp, d, float(t_in), iin);
  for (int64_t t = 0; t < n_in; ++t) c[t] = xp[iin[t]];
  const int64_t ncol = 2 * m;
  const int64_t parts1 = n_parts(n_in, 16);
  at::parallel_for(0, parts1, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t t0 = n_in * p / parts1, t1 = n_in * (p + 1) / parts1;
      float* ap = p == 0 ? gu : acc1 + (p - 1) * pad16(ncol);
      std::fill(ap, ap + ncol, 0.0f);
      sk->rows_axpy(iin + t0, c + t0, t1 - t0, gate_up_t.data_ptr(), gate_up_t.stride(0), ncol, bf16, ap);
    }
  });
  for (int64_t p = 1; p < parts1; ++p) {
    const float* ap = acc1 + (p - 1) * pad16(ncol);
    for (int64_t i = 0; i < ncol; ++i) gu[i] += ap[i];
  }
  // 2. h = act(g) * u, the kept neurons
  K()->activate(gu, m, act_id);
  for (int64_t i = 0; i < m; ++i) gu[i] *= gu[m + i];
  const int64_t n_h = sk->compact_abs_gt(gu, m, float(t_down), ih);
  for (int64_t t = 0; t < n_h; ++t) hv[t] = gu[ih[t]];
  // 3. their W_down^T rows, slices of the list per thread
  const int64_t parts = n_parts(n_h, 16);
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t t0 = n_h * p / parts, t1 = n_h * (p + 1) / parts;
      float* ap = acc + p * dout;
      std::fill(ap, ap + dout, 0.0f);
      sk->rows_axpy(ih + t0, hv + t0, t1 - t0, w_down_t.data_ptr(), w_down_t.stride(0), dout, bf16, ap);
    }
  });
  Tensor y = at::empty({dout}, at::TensorOptions().dtype(at::kFloat));
  sum_parts(acc, parts, dout, y.data_ptr<float>());
  return {y.to(x.scalar_type()), at::scalar_tensor(n_in, at::kLong), at::scalar_tensor(n_h, at::kLong)};
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
  m.def(
      "lowrank_routed_ffn(Tensor x, Tensor A, Tensor B, float f, str act, Tensor gate_up, Tensor w_down_t,"
      " Tensor? verify_weights=None, float verify_threshold=0.0, str? score_act=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "teal_ffn_decode(Tensor x, Tensor gate_up_t, Tensor w_down_t, float t_in, float t_down, str act)"
      " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparkformer, CPU, m) {
  m.impl("gated_ffn_gather", &gated_ffn_gather);
  m.impl("gated_ffn_gather_verify", &gated_ffn_gather_verify);
  m.impl("cats_ffn_decode", &cats_ffn_decode);
  m.impl("sparse_input_matvec", &sparse_input_matvec);
  m.impl("lowrank_routed_ffn", &lowrank_routed_ffn);
  m.impl("teal_ffn_decode", &teal_ffn_decode);
}
