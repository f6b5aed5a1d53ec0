// Torch custom ops for batch-1 decode (namespace `sparkformer`): Spark FFN, Spark attention, and the
// dense baselines (GeGLU FFN, attention, plain matvec).
//
// This file owns everything torch-facing: argument checks, workspace, threading (at::parallel_for,
// which uses torch's intra-op thread pool) and the key selection, with the statistical threshold in
// stats.h. The arithmetic on weights lives in kernels_impl.h, compiled per ISA; one table of those
// kernels is chosen at load time from the CPU's features (dispatch.h) and can be narrowed with
// SPARKFORMER_ISA or torch.ops.sparkformer._set_isa (for tests).
//
// The plain-PyTorch references in sparkformer/ops/*_decode.py are the specification of each op.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "dispatch.h"
#include "kernels.h"
#include "stats.h"

namespace {

using at::Tensor;
using namespace spk;  // the kernel table (dispatch.h) and the statistics (stats.h)

// ------------------------------------------------------------------------------------------------
// Argument helpers
// ------------------------------------------------------------------------------------------------
bool weight_is_bf16(const Tensor& w, const char* what) {
  TORCH_CHECK(w.device().is_cpu(), "sparkformer: ", what, " must be a CPU tensor");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, "sparkformer: ", what,
              " must be float32 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(w.size(-1) <= 1 || w.stride(-1) == 1, "sparkformer: the last dim of ", what, " must be contiguous");
  return w.scalar_type() == at::kBFloat16;
}

void same_dtype(const Tensor& a, const Tensor& b, const char* what) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "sparkformer: ", what, " must share one dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

// Element pointer with an offset, for fp32 or bf16 storage.
const void* at_elem(const Tensor& t, int64_t offset) {
  return static_cast<const char*>(t.data_ptr()) + offset * int64_t(t.element_size());
}

Tensor as_f32(const Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "sparkformer: activations must be CPU tensors");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "sparkformer: activations must be floating point");
  return x.to(at::kFloat).contiguous();
}

// Scratch memory: the caller's float32 `workspace` if given (checked for size), else a
// thread-local buffer that grows on demand and is reused by later calls.
float* scratch(const std::optional<Tensor>& workspace, int64_t need) {
  need += 64;  // slack so vector code never needs a tail guard on scratch arrays
  if (workspace.has_value() && workspace->defined()) {
    const Tensor& w = *workspace;
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.is_contiguous(),
                "sparkformer: workspace must be a contiguous float32 CPU tensor");
    TORCH_CHECK(w.numel() >= need, "sparkformer: workspace has ", w.numel(), " elements, this call needs ", need);
    return w.data_ptr<float>();
  }
  thread_local std::vector<float> buf;
  if (int64_t(buf.size()) < need) buf.resize(size_t(need));
  return buf.data();
}

int64_t n_threads() { return std::max<int64_t>(1, at::get_num_threads()); }

// Sum `parts` accumulators of length n (stored back to back) into out.
void reduce_parts(const float* acc, int64_t parts, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = acc[i];
  for (int64_t p = 1; p < parts; ++p)
    for (int64_t i = 0; i < n; ++i) out[i] += acc[p * n + i];
}

// ------------------------------------------------------------------------------------------------
// Ops
// ------------------------------------------------------------------------------------------------
// Spark FFN for one token. Returns (y (d_out,) in x's dtype, number of selected neurons (int64 scalar)).
// `act`: the activation of the selected neurons' predictor margins, act(s - theta) ("gelu_tanh" | "silu").
std::tuple<Tensor, Tensor> spark_ffn_decode(const Tensor& x, const Tensor& k1, const Tensor& k2, const Tensor& v,
                                            double fraction, const std::optional<Tensor>& workspace,
                                            const std::string& act) {
  const int act_id = act_code(act);
  TORCH_CHECK(x.dim() == 1 && k1.dim() == 2 && k2.dim() == 2 && v.dim() == 2,
              "spark_ffn_decode: expected x (d,), k1 (d_ff, r), k2 (d_ff, d - r), v (d_ff, d_out)");
  const bool bf16 = weight_is_bf16(k1, "k1");
  weight_is_bf16(k2, "k2");
  weight_is_bf16(v, "v");
  same_dtype(k1, k2, "k1, k2 and v");
  same_dtype(k1, v, "k1, k2 and v");
  const int64_t d_ff = k1.size(0), r = k1.size(1), n2 = k2.size(1), dv = v.size(1);
  TORCH_CHECK(k2.size(0) == d_ff && v.size(0) == d_ff, "spark_ffn_decode: k1, k2, v must have d_ff rows");
  TORCH_CHECK(x.size(0) == r + n2, "spark_ffn_decode: len(x) = ", x.size(0), " but k1, k2 have ", r, " + ", n2, " columns");
  TORCH_CHECK(d_ff < std::numeric_limits<int32_t>::max(), "spark_ffn_decode: d_ff too large");
  TORCH_CHECK(fraction > 0.0 && fraction < 1.0, "spark_ffn_decode: fraction must be in (0, 1), got ", fraction);
  const Tensor xf = as_f32(x);
  const float* xp = xf.data_ptr<float>();
  const spk::Kernels* kern = K();
  const int64_t P = n_threads();

  float* ws = scratch(workspace, 3 * d_ff + P * dv);
  float* s = ws;
  int32_t* idx = reinterpret_cast<int32_t*>(ws + d_ff);
  float* a = ws + 2 * d_ff;
  float* acc = ws + 3 * d_ff;

  // 1. predictor s = K1 x1 (all of K1, streamed; rows split across threads)
  at::parallel_for(0, d_ff, 64, [&](int64_t b, int64_t e) {
    kern->matvec(k1.data_ptr(), bf16, k1.stride(0), r, xp, s + b, b, e);
  });
  // 2. statistical threshold, 3. selection (branch-free compaction) and activation
  const float theta = stat_threshold(s, d_ff, fraction);
  const int64_t cnt = kern->compact_gt(s, d_ff, theta, idx);
  for (int64_t t = 0; t < cnt; ++t) a[t] = s[idx[t]] - theta;
  kern->activate(a, cnt, act_id);
  // 4. selected rows of K2 and V; each thread a slice of the list with its own accumulator
  Tensor y = at::empty({dv}, xf.options());
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(P, cnt / 8));
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t t0 = cnt * p / parts, t1 = cnt * (p + 1) / parts;
      float* ap = acc + p * dv;
      std::fill(ap, ap + dv, 0.0f);
      kern->ffn_gather(idx + t0, a + t0, t1 - t0, k2.data_ptr(), k2.stride(0), n2, xp + r, v.data_ptr(), v.stride(0),
                       dv, bf16, ap);
    }
  });
  reduce_parts(acc, parts, dv, y.data_ptr<float>());
  return {y.to(x.scalar_type()), at::scalar_tensor(cnt, at::kLong)};
}

// Spark FFN prefill: T tokens at once in the sparse form, not the dense training form. Per token the
// same selection as decode (statistical threshold over its predictor scores p[t], gelu_tanh(p - theta)
// on the survivors); then per block of `block` tokens the selection is transposed (counting sort by
// neuron) and each selected neuron's K2 and V rows are applied to all the block's tokens that chose it,
// so a row is read once per block rather than once per token, and unselected neurons cost nothing
// (~8% of the dense FLOPs past the predictor). Blocks are independent (disjoint rows of y): threads take
// whole blocks.
std::tuple<Tensor, Tensor> spark_ffn_prefill(const Tensor& x2, const Tensor& p, const Tensor& k2, const Tensor& v,
                                             double fraction, int64_t block) {
  TORCH_CHECK(x2.dim() == 2 && p.dim() == 2 && k2.dim() == 2 && v.dim() == 2,
              "spark_ffn_prefill: expected x2 (T, d - r), p (T, d_ff), k2 (d_ff, d - r), v (d_ff, d_out)");
  const bool bf16 = weight_is_bf16(k2, "k2");
  weight_is_bf16(v, "v");
  same_dtype(k2, v, "k2 and v");
  const int64_t T = x2.size(0), n2 = x2.size(1), d_ff = p.size(1), dv = v.size(1);
  TORCH_CHECK(p.size(0) == T, "spark_ffn_prefill: x2 has ", T, " rows but p has ", p.size(0));
  TORCH_CHECK(k2.size(0) == d_ff && v.size(0) == d_ff, "spark_ffn_prefill: k2 and v must have d_ff = ", d_ff,
              " rows (the columns of p)");
  TORCH_CHECK(k2.size(1) == n2, "spark_ffn_prefill: k2 has ", k2.size(1), " columns but x2 has ", n2);
  TORCH_CHECK(d_ff < std::numeric_limits<int32_t>::max() && T < std::numeric_limits<int32_t>::max(),
              "spark_ffn_prefill: too large");
  TORCH_CHECK(fraction > 0.0 && fraction < 1.0, "spark_ffn_prefill: fraction must be in (0, 1), got ", fraction);
  TORCH_CHECK(block >= 1, "spark_ffn_prefill: block must be >= 1, got ", block);
  const Tensor xf = as_f32(x2).contiguous();
  const Tensor pf = as_f32(p).contiguous();
  const float* xp = xf.data_ptr<float>();
  const float* pp = pf.data_ptr<float>();
  const char* k2p = static_cast<const char*>(k2.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  const int64_t k2row = k2.stride(0) * k2.element_size(), vrow = v.stride(0) * v.element_size();
  Tensor y = at::zeros({T, dv}, xf.options());
  Tensor counts = at::empty({T}, at::kLong);
  float* yp = y.data_ptr<float>();
  int64_t* cp = counts.data_ptr<int64_t>();
  const spk::Kernels* kern = K();
  const int64_t nblk = (T + block - 1) / block;
  at::parallel_for(0, nblk, 1, [&](int64_t b, int64_t e) {
    std::vector<int32_t> idx(d_ff), off(d_ff + 1), pos(d_ff), ptok, pneu, tok;
    std::vector<float> act(d_ff), pa, aval;
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t t0 = blk * block, t1 = std::min(T, t0 + block);
      ptok.clear();
      pneu.clear();
      pa.clear();
      std::fill(off.begin(), off.end(), 0);
      for (int64_t t = t0; t < t1; ++t) {  // selection, as decode does it
        const float* row = pp + t * d_ff;
        const float theta = stat_threshold(row, d_ff, fraction);
        const int64_t cnt = kern->compact_gt(row, d_ff, theta, idx.data());
        for (int64_t i = 0; i < cnt; ++i) act[i] = row[idx[i]] - theta;
        kern->gelu_tanh(act.data(), cnt);
        cp[t] = cnt;
        for (int64_t i = 0; i < cnt; ++i) {
          ptok.push_back(int32_t(t - t0));
          pneu.push_back(idx[i]);
          pa.push_back(act[i]);
          ++off[idx[i] + 1];
        }
      }
      for (int64_t j = 0; j < d_ff; ++j) off[j + 1] += off[j];  // neuron-major order (counting sort)
      const int64_t npairs = int64_t(ptok.size());
      tok.resize(npairs);
      aval.resize(npairs);
      std::copy(off.begin(), off.end() - 1, pos.begin());
      for (int64_t q = 0; q < npairs; ++q) {
        const int32_t o = pos[pneu[q]]++;
        tok[o] = ptok[q];
        aval[o] = pa[q];
      }
      for (int64_t j = 0; j < d_ff; ++j) {
        const int64_t c = off[j + 1] - off[j];
        if (c == 0) continue;
        kern->ffn_neuron(k2p + j * k2row, n2, vp + j * vrow, dv, bf16, tok.data() + off[j], aval.data() + off[j], c,
                         xp + t0 * n2, n2, yp + t0 * dv, dv);
      }
    }
  });
  return {y, counts};
}

// Dense gated FFN for one token: y = W_down (act(W_gate x) * (W_up x)), act gelu_tanh (GeGLU) or silu (SwiGLU),
// with W_down given transposed (w_down_t: (m, d_out), one row per neuron) so every weight read streams row by row.
Tensor geglu_decode(const Tensor& x, const Tensor& w_gate, const Tensor& w_up, const Tensor& w_down_t,
                    const std::optional<Tensor>& workspace, const std::string& act) {
  const int act_id = act_code(act);
  TORCH_CHECK(x.dim() == 1 && w_gate.dim() == 2 && w_up.dim() == 2 && w_down_t.dim() == 2,
              "geglu_decode: expected x (d,), w_gate (m, d), w_up (m, d), w_down_t (m, d_out)");
  const bool bf16 = weight_is_bf16(w_gate, "w_gate");
  weight_is_bf16(w_up, "w_up");
  weight_is_bf16(w_down_t, "w_down_t");
  same_dtype(w_gate, w_up, "w_gate, w_up and w_down_t");
  same_dtype(w_gate, w_down_t, "w_gate, w_up and w_down_t");
  const int64_t m = w_gate.size(0), d = w_gate.size(1), dout = w_down_t.size(1);
  TORCH_CHECK(w_up.size(0) == m && w_down_t.size(0) == m && w_up.size(1) == d && x.size(0) == d,
              "geglu_decode: shape mismatch");
  const Tensor xf = as_f32(x);
  const spk::Kernels* kern = K();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(n_threads(), m / 8));
  float* acc = scratch(workspace, parts * dout + 2 * m);
  float* hs = acc + parts * dout;
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      float* ap = acc + p * dout;
      std::fill(ap, ap + dout, 0.0f);
      const int64_t j0 = m * p / parts, j1 = m * (p + 1) / parts;
      kern->geglu_rows(w_gate.data_ptr(), w_gate.stride(0), w_up.data_ptr(), w_up.stride(0), w_down_t.data_ptr(),
                       w_down_t.stride(0), d, dout, bf16, xf.data_ptr<float>(), ap, j0, j1, hs + 2 * j0, act_id);
    }
  });
  Tensor y = at::empty({dout}, xf.options());
  reduce_parts(acc, parts, dout, y.data_ptr<float>());
  return y.to(x.scalar_type());
}

// y = w x for one vector, w (n_out, n_in) fp32 or bf16, fp32 accumulation; result in x's dtype.
Tensor matvec(const Tensor& w, const Tensor& x) {
  TORCH_CHECK(w.dim() == 2 && x.dim() == 1 && w.size(1) == x.size(0), "matvec: expected w (n_out, n_in), x (n_in,)");
  const bool bf16 = weight_is_bf16(w, "w");
  const Tensor xf = as_f32(x);
  Tensor y = at::empty({w.size(0)}, xf.options());
  const spk::Kernels* kern = K();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, w.size(0), 64, [&](int64_t b, int64_t e) {
    kern->matvec(w.data_ptr(), bf16, w.stride(0), w.size(1), xf.data_ptr<float>(), yp + b, b, e);
  });
  return y.to(x.scalar_type());
}

struct AttnShape {
  int64_t H, nkv, G, lo, n;
};

AttnShape attn_shape(const Tensor& q, int64_t nkv, int64_t lmax, int64_t length, std::optional<int64_t> window) {
  AttnShape s;
  s.H = q.size(0);
  s.nkv = nkv;
  TORCH_CHECK(nkv > 0 && s.H % nkv == 0, "sparkformer attention: ", s.H, " query heads do not split over ", nkv,
              " kv heads");
  s.G = s.H / nkv;
  TORCH_CHECK(length >= 0 && length <= lmax, "sparkformer attention: length ", length, " outside the cache (", lmax, ")");
  if (window.has_value()) TORCH_CHECK(*window > 0, "sparkformer attention: window must be positive");
  s.lo = window.has_value() ? std::max<int64_t>(0, length - *window) : 0;
  s.n = length - s.lo;
  return s;
}

// Tiles of (kv head, key chunk) so both threads have work even with few kv heads.
int64_t chunks_per_head(int64_t nkv, int64_t n) {
  int64_t P = n_threads();
  int64_t c = (P + nkv - 1) / nkv;
  return std::max<int64_t>(1, std::min<int64_t>(c, n / 256));
}

// Spark attention for one query position. Returns (out (H, dv) in q's dtype, kept (H,) int64,
// capped (H,) bool: whether the hard cap cut more than k survivors down to k).
std::tuple<Tensor, Tensor, Tensor> spark_attn_decode(const Tensor& q, const Tensor& kp, const Tensor& kr,
                                                     const Tensor& v, int64_t length, int64_t k, double scale,
                                                     std::optional<int64_t> window, std::optional<double> softcap,
                                                     const std::optional<Tensor>& workspace) {
  TORCH_CHECK(q.dim() == 2 && (kp.dim() == 3 || kp.dim() == 4) && kr.dim() == 3 && v.dim() == 3,
              "spark_attn_decode: expected q (H, D), kp (n_kv, r, L_max) or (n_kv, L_max / B, r, B), "
              "kr (n_kv, L_max, D - r), v (n_kv, L_max, dv)");
  const bool bf16 = weight_is_bf16(kp, "kp");
  weight_is_bf16(kr, "kr");
  weight_is_bf16(v, "v");
  same_dtype(kp, kr, "kp, kr and v");
  same_dtype(kp, v, "kp, kr and v");
  const bool blocked = kp.dim() == 4;
  const int64_t nkv = kp.size(0), r = kp.size(blocked ? 2 : 1), B = blocked ? kp.size(3) : 0;
  const int64_t lmax = blocked ? kp.size(1) * B : kp.size(2), D = q.size(1), dr = D - r, dv = v.size(2);
  TORCH_CHECK(!blocked || B % 64 == 0, "spark_attn_decode: the key block size must be a multiple of 64, got ", B);
  TORCH_CHECK(kr.size(0) == nkv && v.size(0) == nkv && kr.size(1) == lmax && v.size(1) == lmax && kr.size(2) == dr,
              "spark_attn_decode: cache shapes disagree (kp ", kp.sizes(), ", kr ", kr.sizes(), ", v ", v.sizes(), ")");
  TORCH_CHECK(k > 0, "spark_attn_decode: k must be positive");
  TORCH_CHECK(lmax < std::numeric_limits<int32_t>::max(), "spark_attn_decode: cache too long");
  TORCH_CHECK(!softcap.has_value() || *softcap > 0.0, "spark_attn_decode: softcap must be positive");
  const AttnShape sh = attn_shape(q, nkv, lmax, length, window);
  const int64_t H = sh.H, G = sh.G, n = sh.n, lo = sh.lo;
  const Tensor qf = as_f32(q);
  // at::empty + our own fills: at::zeros costs a dispatcher round trip per tensor (~1 us each)
  Tensor out = at::empty({H, dv}, qf.options());
  Tensor kept = at::empty({H}, at::kLong);
  Tensor capped = at::empty({H}, at::kBool);
  std::fill_n(out.data_ptr<float>(), H * dv, 0.0f);
  std::fill_n(kept.data_ptr<int64_t>(), H, int64_t(0));
  std::fill_n(capped.data_ptr<bool>(), H, false);
  if (n == 0) return {out.to(q.scalar_type()), kept, capped};

  const spk::Kernels* kern = K();
  float* ws = scratch(workspace, H * D + 3 * H * n + 4 * H + 2);
  float* qp = ws;            // H x r, scaled predictor halves
  float* qr = ws + H * r;    // H x dr, scaled other halves
  float* scores = ws + H * D;
  int32_t* idx = reinterpret_cast<int32_t*>(scores + H * n);
  float* wts = scores + 2 * H * n;
  double* stats = reinterpret_cast<double*>(ws + ((H * D + 3 * H * n + 1) / 2) * 2);  // 2 x H, 8-byte aligned
  const float* qsrc = qf.data_ptr<float>();
  const float fs = float(scale);
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t c = 0; c < r; ++c) qp[h * r + c] = fs * qsrc[h * D + c];
    for (int64_t c = 0; c < dr; ++c) qr[h * dr + c] = fs * qsrc[h * D + r + c];
  }

  float* outp = out.data_ptr<float>();
  int64_t* keptp = kept.data_ptr<int64_t>();
  bool* cappedp = capped.data_ptr<bool>();

  // Predictor logits of keys [j0, j1) for the G query heads of kv head g: one streaming pass over the
  // feature-major half of the keys. With the blocked layout and the whole key range, the soft-cap and
  // the heads' sums for the statistics are done in the same pass (fused = true), on values in registers.
  const float cap = softcap.has_value() ? float(*softcap) : 0.0f;
  auto score = [&](int64_t g, int64_t j0, int64_t j1, bool fused) {
    if (blocked) {
      double* st = fused ? stats + 2 * g * G : nullptr;
      if (st) std::fill(st, st + 2 * G, 0.0);
      kern->scores_blk(at_elem(kp, g * kp.stride(0)), bf16, kp.stride(1), kp.stride(2), B, r, qp + g * G * r, G,
                       lo + j0, lo + j1, scores + g * G * n + j0, n, fused ? cap : 0.0f, st);
    } else {
      kern->scores_fm(at_elem(kp, g * kp.stride(0) + lo), bf16, kp.stride(1), r, qp + g * G * r, G, j0, j1,
                      scores + g * G * n + j0, n);
    }
  };
  // Selection for query head h: keys to keep (id) and their softmax weights (w). `fused`: scores already
  // soft-capped and summed into stats by `score`.
  auto select = [&](int64_t h, bool fused) {
    float* p = scores + h * n;
    int32_t* id = idx + h * n;
    float* w = wts + h * n;
    if (!fused && softcap.has_value()) kern->softcap(p, n, cap);
    int64_t cnt = 0;
    bool cap_fired = false;
    if (n <= k) {
      for (int64_t j = 0; j < n; ++j) id[j] = int32_t(j);
      cnt = n;
    } else {
      const double f = double(k) / double(n);
      const float theta = fused ? threshold_from_sums(stats[2 * h], stats[2 * h + 1], n, f) : stat_threshold(p, n, f);
      cnt = kern->compact_gt(p, n, theta, id);
      if (cnt == 0) {  // degenerate scores (e.g. all equal): keep the k best, ties to the most recent
        for (int64_t j = 0; j < n; ++j) id[j] = int32_t(j);
        cnt = keep_top(p, id, n, k, w);
      } else if (cnt > k) {  // hard cap
        cnt = keep_top(p, id, cnt, k, w);
        cap_fired = true;
      }
    }
    for (int64_t t = 0; t < cnt; ++t) w[t] = p[id[t]];
    const float m = kern->max(w, cnt);
    const float inv = 1.0f / kern->exp_sub(w, cnt, m, w);
    for (int64_t t = 0; t < cnt; ++t) w[t] *= inv;
    keptp[h] = cnt;
    cappedp[h] = cap_fired;
  };
  // Kept keys [t0, t1) of head h: read their other half and values, accumulate into out[h].
  auto gather = [&](int64_t h, int64_t t0, int64_t t1) {
    const int64_t g = h / G;
    kern->attn_gather(idx + h * n + t0, wts + h * n + t0, t1 - t0, at_elem(kr, g * kr.stride(0) + lo * kr.stride(1)),
                      kr.stride(1), dr, qr + h * dr, at_elem(v, g * v.stride(0) + lo * v.stride(1)), v.stride(1), dv,
                      bf16, outp + h * dv);
  };

  const int64_t P = n_threads();
  if (nkv % P == 0 || nkv >= 2 * P) {
    // Enough kv heads to share out whole: one parallel region; each thread scores a kv head, then selects
    // and gathers for its query heads while their scores are still in cache. (Interleaving the gathers
    // with the next kv head's scoring pass was tried: no gain, both are limited by the core's misses.)
    at::parallel_for(0, nkv, 1, [&](int64_t b, int64_t e) {
      for (int64_t g = b; g < e; ++g) {
        score(g, 0, n, blocked);
        for (int64_t h = g * G; h < (g + 1) * G; ++h) select(h, blocked);
        for (int64_t h = g * G; h < (g + 1) * G; ++h) gather(h, 0, keptp[h]);
      }
    });
  } else {
    // Few kv heads: split the scoring pass by key chunks too, then the heads.
    const int64_t nch = chunks_per_head(nkv, n);
    at::parallel_for(0, nkv * nch, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) score(t / nch, n * (t % nch) / nch, n * (t % nch + 1) / nch, false);
    });
    at::parallel_for(0, H, 1, [&](int64_t b, int64_t e) {
      for (int64_t h = b; h < e; ++h) {
        select(h, false);
        gather(h, 0, keptp[h]);
      }
    });
  }
  return {out.to(q.scalar_type()), kept, capped};
}

// Dense attention for one query position: softmax(scale * q K^T (soft-capped)) V over the valid keys.
// Keys split into (kv head, chunk) tiles, each with its own running max / sum, merged at the end.
Tensor dense_attn_decode(const Tensor& q, const Tensor& kc, const Tensor& vc, int64_t length, double scale,
                         std::optional<int64_t> window, std::optional<double> softcap,
                         const std::optional<Tensor>& workspace) {
  TORCH_CHECK(q.dim() == 2 && (kc.dim() == 3 || kc.dim() == 4) && vc.dim() == 3,
              "dense_attn_decode: expected q (H, D), k (n_kv, L_max, D) or blocked (n_kv, L_max / B, D, B), "
              "v (n_kv, L_max, dv)");
  const bool bf16 = weight_is_bf16(kc, "k");
  weight_is_bf16(vc, "v");
  same_dtype(kc, vc, "k and v");
  const bool blocked = kc.dim() == 4;
  const int64_t B = blocked ? kc.size(3) : 0, nkv = kc.size(0), D = q.size(1), dv = vc.size(2);
  const int64_t lmax = blocked ? kc.size(1) * B : kc.size(1);
  TORCH_CHECK(!blocked || B % 64 == 0, "dense_attn_decode: the key block size must be a multiple of 64, got ", B);
  TORCH_CHECK(kc.size(2) == D && vc.size(0) == nkv && vc.size(1) == lmax,
              "dense_attn_decode: cache shapes disagree (k ", kc.sizes(), ", v ", vc.sizes(), ")");
  TORCH_CHECK(!softcap.has_value() || *softcap > 0.0, "dense_attn_decode: softcap must be positive");
  const AttnShape sh = attn_shape(q, nkv, lmax, length, window);
  const int64_t H = sh.H, G = sh.G, n = sh.n, lo = sh.lo;
  const Tensor qf = as_f32(q);
  Tensor out = at::empty({H, dv}, qf.options());
  std::fill_n(out.data_ptr<float>(), H * dv, 0.0f);
  if (n == 0) return out.to(q.scalar_type());

  const spk::Kernels* kern = K();
  const int64_t nch = chunks_per_head(nkv, n), tiles = nkv * nch;
  float* ws = scratch(workspace, H * D + H * n + tiles * G * (dv + 2));
  float* qs = ws;
  float* scores = ws + H * D;
  float* part = scores + H * n;  // per tile: G x dv partial outputs, then G maxima, then G sums
  const float* qsrc = qf.data_ptr<float>();
  for (int64_t i = 0; i < H * D; ++i) qs[i] = float(scale) * qsrc[i];

  at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t g = t / nch, c = t % nch, j0 = n * c / nch, j1 = n * (c + 1) / nch, len = j1 - j0;
      float* sc = scores + g * G * n + j0;
      float* po = part + t * G * (dv + 2);
      float* pm = po + G * dv;
      float* pl = pm + G;
      std::fill(po, po + G * dv, 0.0f);
      const float cap = softcap.has_value() ? float(*softcap) : 0.0f;
      if (blocked)  // soft-cap applied in registers by the scoring pass
        kern->scores_blk(at_elem(kc, g * kc.stride(0)), bf16, kc.stride(1), kc.stride(2), B, D, qs + g * G * D, G,
                         lo + j0, lo + j1, sc, n, cap, nullptr);
      else
        kern->scores_rm(at_elem(kc, g * kc.stride(0) + lo * kc.stride(1)), bf16, kc.stride(1), D, qs + g * G * D, G,
                        j0, j1, sc, n);
      for (int64_t h = 0; h < G; ++h) {
        float* s = sc + h * n;
        if (!blocked && softcap.has_value()) kern->softcap(s, len, cap);
        pm[h] = kern->max(s, len);
        pl[h] = kern->exp_sub(s, len, pm[h], s);
      }
      kern->values_rm(at_elem(vc, g * vc.stride(0) + lo * vc.stride(1)), bf16, vc.stride(1), dv, sc, n, G, j0, j1, po);
    }
  });
  float* outp = out.data_ptr<float>();
  for (int64_t h = 0; h < H; ++h) {
    const int64_t g = h / G, hl = h % G;
    float M = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < nch; ++c) M = std::max(M, part[(g * nch + c) * G * (dv + 2) + G * dv + hl]);
    double denom = 0.0;
    for (int64_t c = 0; c < nch; ++c) {
      const float* po = part + (g * nch + c) * G * (dv + 2);
      const float f = std::exp(po[G * dv + hl] - M);
      denom += double(f) * po[G * dv + G + hl];
      for (int64_t i = 0; i < dv; ++i) outp[h * dv + i] += f * po[hl * dv + i];
    }
    const float inv = float(1.0 / denom);
    for (int64_t i = 0; i < dv; ++i) outp[h * dv + i] *= inv;
  }
  return out.to(q.scalar_type());
}

double ndtri_op(double p) { return ndtri(p); }

// Test hook: the kernels' threshold over a 1-D fp32 tensor, two-pass (stat_threshold) or one-pass from the sums
// (threshold_from_sums, the blocked attention path's formula), for comparison with stat_topk.stat_threshold.
double stat_threshold_op(const Tensor& p, double fraction, bool one_pass) {
  TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat && p.dim() == 1 && p.is_contiguous(),
              "sparkformer._stat_threshold: p must be a contiguous 1-D float32 CPU tensor");
  const int64_t n = p.numel();
  const float* x = p.data_ptr<float>();
  if (!one_pass || n == 0 || fraction <= 0.0 || fraction >= 1.0) return stat_threshold(x, n, fraction);
  double s, ss;
  K()->sum_sumsq(x, n, 0.0, &s, &ss);
  return threshold_from_sums(s, ss, n, fraction);
}



}  // namespace

TORCH_LIBRARY(sparkformer, m) {
  m.def(
      "spark_ffn_decode(Tensor x, Tensor k1, Tensor k2, Tensor v, float fraction, Tensor(a!)? workspace=None,"
      " str act=\"gelu_tanh\") -> (Tensor, Tensor)");
  m.def(
      "spark_attn_decode(Tensor q, Tensor kp, Tensor kr, Tensor v, int length, int k, float scale,"
      " int? window=None, float? softcap=None, Tensor(a!)? workspace=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "spark_ffn_prefill(Tensor x2, Tensor p, Tensor k2, Tensor v, float fraction, int block=256)"
      " -> (Tensor, Tensor)");
  m.def(
      "geglu_decode(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down_t, Tensor(a!)? workspace=None,"
      " str act=\"gelu_tanh\") -> Tensor");
  m.def(
      "dense_attn_decode(Tensor q, Tensor k, Tensor v, int length, float scale, int? window=None,"
      " float? softcap=None, Tensor(a!)? workspace=None) -> Tensor");
  m.def("matvec(Tensor w, Tensor x) -> Tensor");
  m.def("_set_isa(str name) -> str", &spk::set_isa);  // test hook: pick the kernel ISA ("" reports it)
  m.def("_ndtri(float p) -> float", &ndtri_op);  // test hook: the inverse normal CDF used above
  m.def("_stat_threshold(Tensor p, float fraction, bool one_pass=False) -> float", &stat_threshold_op);  // test hook
}

TORCH_LIBRARY_IMPL(sparkformer, CPU, m) {
  m.impl("spark_ffn_decode", &spark_ffn_decode);
  m.impl("spark_ffn_prefill", &spark_ffn_prefill);
  m.impl("spark_attn_decode", &spark_attn_decode);
  m.impl("geglu_decode", &geglu_decode);
  m.impl("dense_attn_decode", &dense_attn_decode);
  m.impl("matvec", &matvec);
}
