// Activation-sparse decode over block-quantized weights (quant.h): the routed FFN gather (and a low-rank predictor's
// whole step), TEAL's thresholded inputs over quantized W^T rows, and CATS. The float versions are sparse_ops.cpp;
// the references are sparkformer/ops/quant_sparse.py.
//
// Every kept neuron or input is one contiguous quantized row: a routed neuron's gate and up rows back to back (one
// two-row matvec on the activation quantized once per call, as quant_matvec), its W_down^T row (a dequantizing row
// accumulation); a TEAL input's W^T row (the same). Dot products are the ISA's quantized table (quant.h) one neuron
// at a time; row accumulations run 8 rows per pass over the accumulator (axpy_rows_*, below). Threads take slices of
// the kept list, each with its own fp32 accumulator, summed at the end (as sparse_ops.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "dispatch.h"
#include "quant.h"
#include "quant_rows.h"
#include "router.h"
#include "stats.h"

namespace {

using at::Tensor;
using namespace spk;


Tensor f32(const Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && at::isFloatingType(x.scalar_type()) && x.dim() == 1, "sparkformer ", op,
              ": x must be a 1-D floating-point CPU tensor");
  return x.to(at::kFloat).contiguous();
}

int64_t pad16(int64_t n) { return (n + 15) / 16 * 16; }

// ids[0:cnt] = the j with |p[j]| > t, ascending (NaN never passes).
int64_t compact_abs_gt(const float* p, int64_t n, float t, int32_t* ids) {
  int64_t cnt = 0;
  for (int64_t j = 0; j < n; ++j)
    if (std::fabs(p[j]) > t) ids[cnt++] = int32_t(j);
  return cnt;
}

// acc[0:n] = sum over t < cnt of c[t] * dequant(row ids[t]) of w (ld bytes apart), threads over slices of the list.
// acc has room for n_parts(cnt, 16) * n floats (the first n are the result).
void rows_axpy(const QuantKernels* qk, int fmt, const uint8_t* w, int64_t ld, int64_t n, const int32_t* ids,
               const float* c, int64_t cnt, float* acc) {
  const int64_t parts = n_parts(cnt, 16);
  const AxpyRows fn = axpy_rows_fn();
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t t0 = cnt * p / parts, t1 = cnt * (p + 1) / parts;
      float* ap = acc + p * n;
      std::fill(ap, ap + n, 0.0f);
      RowStream rs{qk, fn, fmt, n, ap};
      for (int64_t t = t0; t < t1; ++t) rs.push(w + int64_t(ids[t]) * ld, c[t]);
      rs.finish();
    }
  });
  for (int64_t p = 1; p < parts; ++p)  // into the first part's accumulator
    for (int64_t i = 0; i < n; ++i) acc[i] += acc[p * n + i];
  if (cnt == 0) std::fill(acc, acc + n, 0.0f);
}

// ------------------------------------------------------------------------------------------------
// Routed FFN: gate/up rows of the chosen neurons, then their W_down^T rows
// ------------------------------------------------------------------------------------------------
struct GatedRows {
  const uint8_t* gu;  // neuron i: gate row at gu + i * ldg, up row rb bytes after it
  int64_t ldg, rb, d;
  int fmt;
  const uint8_t* down;
  int64_t ldd, dout;
  int fmt_down;
};

GatedRows gated_rows(const char* op, const Tensor& gate_up, int64_t fmt, const Tensor& down, int64_t fmt_down,
                     int64_t dout, int64_t d) {
  check_fmt(fmt, d, op, "gate/up");
  check_fmt(fmt_down, dout, op, "W_down^T");
  const int64_t rb = q_row_bytes(int(fmt), d);
  check_rows(gate_up, 2 * rb, op, "gate_up");
  check_rows(down, q_row_bytes(int(fmt_down), dout), op, "down");
  TORCH_CHECK(gate_up.size(0) == down.size(0), "sparkformer ", op, ": gate_up has ", gate_up.size(0),
              " neurons, down ", down.size(0));
  TORCH_CHECK(gate_up.size(0) < std::numeric_limits<int32_t>::max(), "sparkformer ", op, ": too many neurons");
  return {gate_up.data_ptr<uint8_t>(), gate_up.stride(0), rb, d, int(fmt),
          down.data_ptr<uint8_t>(), down.stride(0), dout, int(fmt_down)};
}

// y[0:dout] = sum over t of act(g) * u * W_down^T row, over the ids ip[0:cnt] (only those with |h| * vw > vt when vw
// is given). Chunks of 32 neurons: their two-row dot products, one vectorised activation, then their down rows.
// Returns the down rows read. acc: n_parts(cnt, 16) * dout floats of scratch.
int64_t gather_run(const GatedRows& r, const int32_t* ip, int64_t cnt, int act_id, const QAct& xq, float* yp,
                   float* acc, const float* vw, float vt) {
  if (cnt == 0) {
    std::fill_n(yp, r.dout, 0.0f);
    return 0;
  }
  const QuantKernels* qk = QK();
  const Kernels* kern = K();
  const int64_t parts = n_parts(cnt, 16), bdown = q_row_bytes(r.fmt_down, r.dout);
  const AxpyRows fn = axpy_rows_fn();
  std::vector<int64_t> kept(size_t(parts), 0);
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    float g[32], u[32], two[2];
    for (int64_t p = b; p < e; ++p) {
      const int64_t t0 = cnt * p / parts, t1 = cnt * (p + 1) / parts;
      float* ap = acc + p * r.dout;
      std::fill(ap, ap + r.dout, 0.0f);
      RowStream rs{qk, fn, r.fmt_down, r.dout, ap};
      int64_t k = 0;
      for (int64_t c0 = t0; c0 < t1; c0 += 32) {
        const int64_t c1 = std::min(t1, c0 + 32);
        for (int64_t t = c0; t < c1; ++t) {
          if (t + kAhead < t1) {  // its gate/up rows now, its down row for the second loop below
            prefetch_row(r.gu + int64_t(ip[t + kAhead]) * r.ldg, 2 * r.rb);
            prefetch_row(r.down + int64_t(ip[t + kAhead]) * r.ldd, bdown);
          }
          qk->matvec(r.fmt, r.gu + int64_t(ip[t]) * r.ldg, r.rb, r.d, xq, two, 0, 2);
          g[t - c0] = two[0];
          u[t - c0] = two[1];
        }
        kern->activate(g, c1 - c0, act_id);
        for (int64_t t = c0; t < c1; ++t) {
          const float h = g[t - c0] * u[t - c0];
          if (vw != nullptr && !(std::fabs(h) * vw[ip[t]] > vt)) continue;
          rs.push(r.down + int64_t(ip[t]) * r.ldd, h);
          ++k;
        }
      }
      rs.finish();
      kept[size_t(p)] = k;
    }
  });
  sum_parts(acc, parts, r.dout, yp);
  int64_t total = 0;
  for (int64_t k : kept) total += k;
  return total;
}

const float* verify_ptr(const char* op, const std::optional<Tensor>& w, int64_t m, double t) {
  if (!w.has_value()) return nullptr;
  TORCH_CHECK(w->device().is_cpu() && w->dim() == 1 && w->scalar_type() == at::kFloat && w->is_contiguous() &&
                  w->size(0) == m,
              "sparkformer ", op, ": verify_weights must be a contiguous fp32 (m,) tensor, got ", w->scalar_type(),
              " ", w->sizes());
  TORCH_CHECK(!std::isnan(t), "sparkformer ", op, ": verify_threshold is NaN");
  return w->data_ptr<float>();
}

// The gather over given neuron ids (any router). Returns (y fp32 (d_out,), down rows read).
std::tuple<Tensor, Tensor> quant_gated_gather(const Tensor& x, const Tensor& gate_up, int64_t fmt, const Tensor& down,
                                              int64_t fmt_down, int64_t dout, const Tensor& idx,
                                              const std::string& act, const std::optional<Tensor>& verify_weights,
                                              double verify_threshold) {
  const char* op = "quant_gated_gather";
  const int act_id = act_code(act);
  const Tensor xf = f32(x, op);
  const GatedRows r = gated_rows(op, gate_up, fmt, down, fmt_down, dout, xf.size(0));
  const int64_t m = gate_up.size(0);
  const float* vw = verify_ptr(op, verify_weights, m, verify_threshold);
  TORCH_CHECK(idx.device().is_cpu() && idx.dim() == 1 &&
                  (idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong),
              "sparkformer quant_gated_gather: idx must be a 1-D int32 or int64 CPU tensor");
  // the ids as int32 (range-checked in their own type first: an int64 id >= 2^31 must not wrap into range)
  const Tensor ic = idx.contiguous();
  const int64_t cnt = ic.numel();
  bool ok = true;
  if (ic.scalar_type() == at::kLong) {
    const int64_t* src = ic.data_ptr<int64_t>();
    for (int64_t t = 0; t < cnt; ++t) ok &= src[t] >= 0 && src[t] < m;
  } else {
    const int32_t* src = ic.data_ptr<int32_t>();
    for (int64_t t = 0; t < cnt; ++t) ok &= src[t] >= 0 && src[t] < m;
  }
  TORCH_CHECK(ok, "sparkformer quant_gated_gather: neuron index out of range [0, ", m, ")");
  const Tensor i32 = ic.scalar_type() == at::kInt ? ic : ic.to(at::kInt);
  const int32_t* ip = i32.data_ptr<int32_t>();
  const QAct xq = quantize_x(xf.data_ptr<float>(), xf.size(0), int(fmt), QK());
  float* acc = scratch_floats(n_parts(cnt, 16) * dout);
  Tensor y = at::empty({dout}, xf.options());
  const int64_t kept = gather_run(r, ip, cnt, act_id, xq, y.data_ptr<float>(), acc, vw, float(verify_threshold));
  return {y, at::scalar_tensor(kept, at::kLong)};
}

bool float_weight(const Tensor& w, const char* op, const char* what) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.stride(1) == 1 &&
                  (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "sparkformer ", op, ": ", what, " must be a 2-D fp32 or bf16 CPU tensor with contiguous rows");
  return w.scalar_type() == at::kBFloat16;
}

// A low-rank predictor's routed step: z = A x, [g; u] = B z (float A, B: the predictor stays in the engine's float
// dtype), s = |act(g) u|, the neurons with s > stat_threshold(s, f), then the quantized gather.
// Returns (y fp32, neurons proposed, down rows read).
std::tuple<Tensor, Tensor, Tensor> quant_lowrank_routed_ffn(
    const Tensor& x, const Tensor& A, const Tensor& B, double f, const std::string& act, const Tensor& gate_up,
    int64_t fmt, const Tensor& down, int64_t fmt_down, int64_t dout, const std::optional<Tensor>& verify_weights,
    double verify_threshold, const std::optional<std::string>& score_act) {
  const char* op = "quant_lowrank_routed_ffn";
  const int act_id = act_code(act);
  const int sact = score_act.has_value() ? act_code(*score_act) : act_id;
  const Tensor xf = f32(x, op);
  const int64_t d = xf.size(0);
  const GatedRows r = gated_rows(op, gate_up, fmt, down, fmt_down, dout, d);
  const int64_t m = gate_up.size(0);
  const bool pbf16 = float_weight(A, op, "A");
  TORCH_CHECK(float_weight(B, op, "B") == pbf16, "sparkformer ", op, ": A and B must share one dtype");
  const int64_t rk = A.size(0);
  TORCH_CHECK(A.size(1) == d && B.size(0) == 2 * m && B.size(1) == rk, "sparkformer ", op,
              ": expected A (r, d), B (2m, r) for x (", d, ",) and ", m, " neurons, got A ", A.sizes(), ", B ",
              B.sizes());
  TORCH_CHECK(f > 0.0 && f <= 1.0, "sparkformer ", op, ": f must be in (0, 1], got ", f);
  const float* vw = verify_ptr(op, verify_weights, m, verify_threshold);
  // scratch: z (r) | g/u then s (2m) | ids (m) | accumulators
  const int64_t oz = 0, oy = pad16(rk), oi = oy + pad16(2 * m), oa = oi + pad16(m);
  float* ws = scratch_floats(oa + n_parts(m, 16) * dout);
  float* z = ws + oz;
  float* yb = ws + oy;
  int32_t* ids = reinterpret_cast<int32_t*>(ws + oi);
  const float* xp = xf.data_ptr<float>();
  const int64_t cnt = lowrank_select(A, B, pbf16, xp, d, rk, m, f, sact, z, yb, ids);
  const QAct xq = quantize_x(xp, d, int(fmt), QK());
  Tensor y = at::empty({dout}, xf.options());
  const int64_t kept = gather_run(r, ids, cnt, act_id, xq, y.data_ptr<float>(), ws + oa, vw, float(verify_threshold));
  return {y, at::scalar_tensor(cnt, at::kLong), at::scalar_tensor(kept, at::kLong)};
}

// ------------------------------------------------------------------------------------------------
// TEAL: inputs |x_j| > t read their quantized W^T row
// ------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> quant_sparse_input_matvec(const Tensor& w_t, int64_t fmt, int64_t n_out, const Tensor& x,
                                                     double threshold) {
  const char* op = "quant_sparse_input_matvec";
  check_fmt(fmt, n_out, op, "W^T");
  check_rows(w_t, q_row_bytes(int(fmt), n_out), op, "w_t");
  TORCH_CHECK(!std::isnan(threshold), "sparkformer ", op, ": threshold is NaN");
  const Tensor xf = f32(x, op);
  const int64_t n_in = xf.size(0);
  TORCH_CHECK(w_t.size(0) == n_in, "sparkformer ", op, ": w_t has ", w_t.size(0), " rows, x ", n_in, " entries");
  const float* xp = xf.data_ptr<float>();
  // scratch: ids (n_in) | their values (n_in) | accumulators
  float* ws = scratch_floats(2 * pad16(n_in) + n_parts(n_in, 16) * n_out);
  int32_t* ids = reinterpret_cast<int32_t*>(ws);
  float* c = ws + pad16(n_in);
  float* acc = c + pad16(n_in);
  const int64_t cnt = compact_abs_gt(xp, n_in, float(threshold), ids);
  for (int64_t t = 0; t < cnt; ++t) c[t] = xp[ids[t]];
  rows_axpy(QK(), int(fmt), w_t.data_ptr<uint8_t>(), w_t.stride(0), n_out, ids, c, cnt, acc);
  Tensor y = at::empty({n_out}, xf.options());
  std::copy(acc, acc + n_out, y.data_ptr<float>());
  return {y, at::scalar_tensor(cnt, at::kLong)};
}

// TEAL's gated FFN step: kept inputs of [W_gate; W_up]^T (d, 2m) give [g; u], h = act(g) u, kept neurons |h_i| >
// t_down read their W_down^T (m, d_out) rows. Returns (y fp32, inputs kept, neurons kept).
std::tuple<Tensor, Tensor, Tensor> quant_teal_ffn_decode(const Tensor& x, const Tensor& gate_up_t, int64_t fmt,
                                                         const Tensor& down_t, int64_t fmt_down, int64_t dout,
                                                         double t_in, double t_down, const std::string& act) {
  const char* op = "quant_teal_ffn_decode";
  const int act_id = act_code(act);
  const int64_t m = down_t.size(0);
  check_fmt(fmt, 2 * m, op, "[W_gate; W_up]^T");
  check_fmt(fmt_down, dout, op, "W_down^T");
  check_rows(gate_up_t, q_row_bytes(int(fmt), 2 * m), op, "gate_up_t");
  check_rows(down_t, q_row_bytes(int(fmt_down), dout), op, "down_t");
  TORCH_CHECK(!std::isnan(t_in) && !std::isnan(t_down), "sparkformer ", op, ": threshold is NaN");
  const Tensor xf = f32(x, op);
  const int64_t d = xf.size(0);
  TORCH_CHECK(gate_up_t.size(0) == d, "sparkformer ", op, ": gate_up_t has ", gate_up_t.size(0), " rows, x ", d);
  const float* xp = xf.data_ptr<float>();
  const int64_t P = std::max<int64_t>(1, at::get_num_threads());
  // scratch: ids (max(d, m)) | values (max(d, m)) | accumulators of [g; u] (P * 2m) | of y (P * d_out)
  const int64_t n = pad16(std::max(d, m)), og = 2 * n, oy = og + P * 2 * m;
  float* ws = scratch_floats(oy + P * dout);
  int32_t* ids = reinterpret_cast<int32_t*>(ws);
  float* c = ws + n;
  float* gu = ws + og;
  const QuantKernels* qk = QK();
  const int64_t n_in = compact_abs_gt(xp, d, float(t_in), ids);
  for (int64_t t = 0; t < n_in; ++t) c[t] = xp[ids[t]];
  rows_axpy(qk, int(fmt), gate_up_t.data_ptr<uint8_t>(), gate_up_t.stride(0), 2 * m, ids, c, n_in, gu);
  K()->activate(gu, m, act_id);
  for (int64_t i = 0; i < m; ++i) gu[i] *= gu[m + i];
  const int64_t n_h = compact_abs_gt(gu, m, float(t_down), ids);
  for (int64_t t = 0; t < n_h; ++t) c[t] = gu[ids[t]];
  rows_axpy(qk, int(fmt_down), down_t.data_ptr<uint8_t>(), down_t.stride(0), dout, ids, c, n_h, ws + oy);
  Tensor y = at::empty({dout}, xf.options());
  std::copy(ws + oy, ws + oy + dout, y.data_ptr<float>());
  return {y, at::scalar_tensor(n_in, at::kLong), at::scalar_tensor(n_h, at::kLong)};
}

// ------------------------------------------------------------------------------------------------
// CATS: a = act(W_gate x) over every neuron (integer dot products), then the neurons |a_i| > t read their up row
// (a dot product) and W_down^T row. gate_up (2m, d): the gate rows then the up rows (QuantGeglu.gate_up).
// ------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> quant_cats_ffn_decode(const Tensor& x, const Tensor& gate_up, int64_t fmt,
                                                 const Tensor& down_t, int64_t fmt_down, int64_t dout,
                                                 double threshold, const std::string& act) {
  const char* op = "quant_cats_ffn_decode";
  const int act_id = act_code(act);
  const Tensor xf = f32(x, op);
  const int64_t d = xf.size(0), m = down_t.size(0);
  check_fmt(fmt, d, op, "gate/up");
  check_fmt(fmt_down, dout, op, "W_down^T");
  check_rows(gate_up, q_row_bytes(int(fmt), d), op, "gate_up");
  check_rows(down_t, q_row_bytes(int(fmt_down), dout), op, "down_t");
  TORCH_CHECK(gate_up.size(0) == 2 * m, "sparkformer ", op, ": gate_up has ", gate_up.size(0), " rows, need 2 x ", m);
  TORCH_CHECK(!std::isnan(threshold), "sparkformer ", op, ": threshold is NaN");
  const QuantKernels* qk = QK();
  const QAct xq = quantize_x(xf.data_ptr<float>(), d, int(fmt), qk);
  // scratch: a (m) | ids (m) | accumulators
  const int64_t parts_max = n_parts(m, 16);
  float* ws = scratch_floats(2 * pad16(m) + parts_max * dout);
  float* a = ws;
  int32_t* ids = reinterpret_cast<int32_t*>(ws + pad16(m));
  float* acc = ws + 2 * pad16(m);
  const uint8_t* gp = gate_up.data_ptr<uint8_t>();
  const int64_t ld = gate_up.stride(0), bdown = q_row_bytes(int(fmt_down), dout);
  at::parallel_for(0, m, 64, [&](int64_t b, int64_t e) { qk->matvec(int(fmt), gp, ld, d, xq, a + b, b, e); });
  K()->activate(a, m, act_id);
  const int64_t cnt = compact_abs_gt(a, m, float(threshold), ids);
  const int64_t parts = n_parts(cnt, 16);
  const uint8_t* up = gp + m * ld;
  const uint8_t* dp = down_t.data_ptr<uint8_t>();
  const int64_t ldd = down_t.stride(0);
  const AxpyRows fn = axpy_rows_fn();
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t t0 = cnt * p / parts, t1 = cnt * (p + 1) / parts;
      float* ap = acc + p * dout;
      std::fill(ap, ap + dout, 0.0f);
      RowStream rs{qk, fn, int(fmt_down), dout, ap};
      for (int64_t t = t0; t < t1; ++t) {
        if (t + kAhead < t1) {
          prefetch_row(up + int64_t(ids[t + kAhead]) * ld, ld);
          prefetch_row(dp + int64_t(ids[t + kAhead]) * ldd, bdown);
        }
        const int64_t i = ids[t];
        float u;
        qk->matvec(int(fmt), up + i * ld, ld, d, xq, &u, 0, 1);
        rs.push(dp + i * ldd, a[i] * u);
      }
      rs.finish();
    }
  });
  Tensor y = at::empty({dout}, xf.options());
  if (cnt == 0)
    y.zero_();
  else
    sum_parts(acc, parts, dout, y.data_ptr<float>());
  return {y, at::scalar_tensor(cnt, at::kLong)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparkformer, m) {
  m.def(
      "quant_gated_gather(Tensor x, Tensor gate_up, int fmt, Tensor down, int fmt_down, int d_out, Tensor idx,"
      " str act, Tensor? verify_weights=None, float verify_threshold=0.0) -> (Tensor, Tensor)");
  m.def(
      "quant_lowrank_routed_ffn(Tensor x, Tensor A, Tensor B, float f, str act, Tensor gate_up, int fmt,"
      " Tensor down, int fmt_down, int d_out, Tensor? verify_weights=None, float verify_threshold=0.0,"
      " str? score_act=None) -> (Tensor, Tensor, Tensor)");
  m.def("quant_sparse_input_matvec(Tensor w_t, int fmt, int n_out, Tensor x, float threshold) -> (Tensor, Tensor)");
  m.def(
      "quant_teal_ffn_decode(Tensor x, Tensor gate_up_t, int fmt, Tensor down_t, int fmt_down, int d_out,"
      " float t_in, float t_down, str act) -> (Tensor, Tensor, Tensor)");
  m.def(
      "quant_cats_ffn_decode(Tensor x, Tensor gate_up, int fmt, Tensor down_t, int fmt_down, int d_out,"
      " float threshold, str act) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparkformer, CPU, m) {
  m.impl("quant_gated_gather", &quant_gated_gather);
  m.impl("quant_lowrank_routed_ffn", &quant_lowrank_routed_ffn);
  m.impl("quant_sparse_input_matvec", &quant_sparse_input_matvec);
  m.impl("quant_teal_ffn_decode", &quant_teal_ffn_decode);
  m.impl("quant_cats_ffn_decode", &quant_cats_ffn_decode);
}
