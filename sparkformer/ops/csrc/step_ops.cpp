// A whole batch-1 decode step in one call: embedding row -> every layer -> final norm -> LM head logits.
//
// The per-token Python loop of sparkformer/decode/cpu.py issues ~15 small torch ops per layer (norms, RoPE, cache
// writes, residual adds) around the fused kernels; at SmolLM2's size (30 layers, 0.27 GB in bf16) those cost a third
// of the token. Here the glue is plain loops over float vectors and the heavy parts call the same ops the Python
// step calls (matvec, quant_matvec, geglu_decode, spark_ffn_decode, quant_ffn_gather, dense_attn_decode,
// spark_attn_decode), redispatched straight to their CPU kernels. The Python step (CpuEngine.step with the plan
// off) is the reference this is tested against; sparkformer/decode/fused.py builds the plan and documents its
// encoding.
//
//   plan = torch.classes.sparkformer.DecodePlan(tensors, ints, floats)
//   logits, counts = plan.step(token, pos)      # counts: (ffn neurons run, keys kept, hard caps fired)
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "dispatch.h"
#include "quant.h"
#include "stats.h"

namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

// The ops a step calls, looked up once; called with the CPU key so no autograd or other layer runs in between.
struct Ops {
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&)> matvec;
  c10::TypedOperatorHandle<Tensor(const Tensor&, int64_t, int64_t, const Tensor&)> quant_matvec;
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptT&,
                                  const std::string&)>
      geglu;
  c10::TypedOperatorHandle<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                      double, const OptT&, const std::string&)>
      spark_ffn;
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, int64_t,
                                  const Tensor&)>
      quant_gather;
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, double,
                                  std::optional<int64_t>, std::optional<double>, const OptT&)>
      dense_attn;
  c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                              const Tensor&, int64_t, int64_t, double,
                                                              std::optional<int64_t>, std::optional<double>,
                                                              const OptT&)>
      spark_attn;
};

const Ops& ops() {
  static const Ops o = [] {
    auto& d = c10::Dispatcher::singleton();
    auto find = [&](const char* name) { return d.findSchemaOrThrow(name, ""); };
    return Ops{find("sparkformer::matvec").typed<Tensor(const Tensor&, const Tensor&)>(),
               find("sparkformer::quant_matvec").typed<Tensor(const Tensor&, int64_t, int64_t, const Tensor&)>(),
               find("sparkformer::geglu_decode")
                   .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptT&,
                                 const std::string&)>(),
               find("sparkformer::spark_ffn_decode")
                   .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                     double, const OptT&, const std::string&)>(),
               find("sparkformer::quant_ffn_gather")
                   .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, int64_t,
                                 const Tensor&)>(),
               find("sparkformer::dense_attn_decode")
                   .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, double,
                                 std::optional<int64_t>, std::optional<double>, const OptT&)>(),
               find("sparkformer::spark_attn_decode")
                   .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                             const Tensor&, int64_t, int64_t, double,
                                                             std::optional<int64_t>, std::optional<double>,
                                                             const OptT&)>()};
  }();
  return o;
}

const c10::DispatchKeySet kCpu(c10::DispatchKey::CPU);

// Encoding (sparkformer/decode/fused.py writes it): ints = header, then kLayerInts per layer; tensors = embed,
// head, final_norm, (cos, sin, perm) per RoPE table, then kLayerTensors per layer; floats = eps, attn_scale,
// attn_softcap (<= 0: none), final_softcap (<= 0: none), embed_scale, spark_ffn_fraction.
enum Header { kLayers, kRopes, kHeads, kKvHeads, kHeadDim, kRank, kDModel, kVocab, kPost, kAct, kFmtEmbed,
              kFmtHead, kTopk, kHeaderInts };
enum LayerInt { kAttn, kFfn, kWindow, kRope, kFmtQkv, kFmtO, kFmtA, kFmtB, kP0, kP1, kP2, kLayerInts };
enum FfnKind { kGegluFloat, kSparkFloat, kGatedQuant, kSparkQuant };
constexpr int kLayerTensors = 10;  // w_qkv, w_o, norms, qk_norms, ffn x3, cache x3 (empty tensors fill gaps)

struct Layer {
  int64_t i[kLayerInts];
  Tensor w_qkv, w_o, norms, qk_norms, f[3], c[3];
};

float act_value(int act, float x) {  // the FFN activations of sparkformer.ops.activations
  if (act == 1) return x / (1.0f + std::exp(-x));
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * x * (1.0f + std::tanh(k * (x + 0.044715f * x * x * x)));
}

// y = x * rsqrt(mean(x^2) + eps) * w (F.rms_norm), in place when y == x
void rms(const float* x, const float* w, int64_t n, double eps, float* y) {
  double ss = 0.0;
  for (int64_t j = 0; j < n; ++j) ss += double(x[j]) * x[j];
  const float inv = float(1.0 / std::sqrt(ss / double(n) + eps));
  for (int64_t j = 0; j < n; ++j) y[j] = x[j] * inv * w[j];
}

// One position's `width` values into a cache tensor: blocked (KV, L / B, width, B), row-major (KV, L, width) or,
// feature_major, (KV, width, L); fp32 or bf16 (rounded to nearest even, as Tensor.to does).
void store(const Tensor& t, int64_t g, int64_t pos, const float* src, int64_t width, bool feature_major) {
  int64_t off, step;
  if (t.dim() == 4) {
    const int64_t B = t.size(3);
    off = g * t.stride(0) + (pos / B) * t.stride(1) + (pos % B) * t.stride(3);
    step = t.stride(2);
  } else if (feature_major) {
    off = g * t.stride(0) + pos * t.stride(2);
    step = t.stride(1);
  } else {
    off = g * t.stride(0) + pos * t.stride(1);
    step = t.stride(2);
  }
  if (t.scalar_type() == at::kBFloat16) {
    auto* p = t.data_ptr<c10::BFloat16>() + off;
    for (int64_t j = 0; j < width; ++j) p[j * step] = c10::BFloat16(src[j]);
  } else {
    float* p = t.data_ptr<float>() + off;
    for (int64_t j = 0; j < width; ++j) p[j * step] = src[j];
  }
}

// One row of a (vocab, d) float or quantized table, as fp32 times `scale`.
void table_row(const Tensor& t, int fmt, int64_t row, int64_t d, float scale, float* out) {
  if (fmt < 0) {
    if (t.scalar_type() == at::kBFloat16) {
      const auto* p = t.data_ptr<c10::BFloat16>() + row * t.stride(0);
      for (int64_t j = 0; j < d; ++j) out[j] = float(p[j]) * scale;
    } else {
      const float* p = t.data_ptr<float>() + row * t.stride(0);
      for (int64_t j = 0; j < d; ++j) out[j] = p[j] * scale;
    }
    return;
  }
  const uint8_t* r = t.data_ptr<uint8_t>() + row * t.stride(0);
  const int64_t nb = d / spk::kQBlock;
  const auto* scales = reinterpret_cast<const c10::Half*>(r);
  const auto* mins = scales + nb;  // q4_1
  const uint8_t* q = r + spk::q_scale_bytes(fmt, d);
  for (int64_t b = 0; b < nb; ++b) {
    const float s = float(scales[b]);
    float* o = out + b * spk::kQBlock;
    if (fmt == spk::kQ8_0) {
      for (int j = 0; j < 32; ++j) o[j] = s * float(int8_t(q[b * 32 + j])) * scale;
    } else if (fmt == spk::kQ4_1) {  // w = d q + m, q4_0's nibbles without the offset
      const float m = float(mins[b]);
      for (int j = 0; j < 16; ++j) {
        o[j] = (s * float(q[b * 16 + j] & 0x0F) + m) * scale;
        o[j + 16] = (s * float(q[b * 16 + j] >> 4) + m) * scale;
      }
    } else {
      for (int j = 0; j < 16; ++j) {
        o[j] = s * float(int(q[b * 16 + j] & 0x0F) - 8) * scale;
        o[j + 16] = s * float(int(q[b * 16 + j] >> 4) - 8) * scale;
      }
    }
  }
}

struct DecodePlan : torch::CustomClassHolder {
  std::vector<int64_t> hdr;
  double eps, attn_scale, attn_cap, final_cap, embed_scale, fraction;
  Tensor embed, head, final_norm;
  std::vector<Tensor> cos, sin, perm;
  std::vector<Layer> layers;
  std::string act_name;

  DecodePlan(std::vector<Tensor> t, std::vector<int64_t> ints, std::vector<double> fl) {
    TORCH_CHECK(ints.size() >= kHeaderInts && fl.size() == 6, "DecodePlan: malformed plan (header)");
    hdr.assign(ints.begin(), ints.begin() + kHeaderInts);
    const int64_t L = hdr[kLayers], R = hdr[kRopes];
    TORCH_CHECK(int64_t(ints.size()) == kHeaderInts + L * kLayerInts &&
                    int64_t(t.size()) == 3 + 3 * R + L * kLayerTensors,
                "DecodePlan: malformed plan (", L, " layers, ", R, " RoPE tables)");
    eps = fl[0], attn_scale = fl[1], attn_cap = fl[2], final_cap = fl[3], embed_scale = fl[4], fraction = fl[5];
    embed = t[0], head = t[1], final_norm = t[2].contiguous();
    for (int64_t j = 0; j < R; ++j) {
      cos.push_back(t[3 + 3 * j].contiguous());
      sin.push_back(t[4 + 3 * j].contiguous());
      perm.push_back(t[5 + 3 * j].to(at::kLong).contiguous());
    }
    act_name = hdr[kAct] == 1 ? "silu" : "gelu_tanh";
    for (int64_t l = 0; l < L; ++l) {
      Layer ly;
      std::copy(ints.begin() + kHeaderInts + l * kLayerInts, ints.begin() + kHeaderInts + (l + 1) * kLayerInts, ly.i);
      const Tensor* s = t.data() + 3 + 3 * R + l * kLayerTensors;
      ly.w_qkv = s[0], ly.w_o = s[1], ly.norms = s[2].contiguous(), ly.qk_norms = s[3].contiguous();
      for (int k = 0; k < 3; ++k) ly.f[k] = s[4 + k], ly.c[k] = s[7 + k];
      TORCH_CHECK(ly.i[kRope] >= 0 && ly.i[kRope] < R, "DecodePlan: layer ", l, " names RoPE table ", ly.i[kRope]);
      layers.push_back(std::move(ly));
    }
  }

  Tensor mv(const Tensor& w, int64_t fmt, const Tensor& x) const {
    if (fmt < 0) return ops().matvec.redispatch(kCpu, w, x);
    return ops().quant_matvec.redispatch(kCpu, w, fmt, x.size(0), x);
  }

  std::tuple<Tensor, Tensor> step(int64_t token, int64_t pos) {
    const int64_t H = hdr[kHeads], KV = hdr[kKvHeads], hd = hdr[kHeadDim], r = hdr[kRank], d = hdr[kDModel];
    TORCH_CHECK(token >= 0 && token < hdr[kVocab], "DecodePlan.step: token ", token, " outside the vocabulary");
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    Tensor h = at::empty({d}, f32), xn = at::empty({d}, f32), qk = at::empty({H + KV, hd}, f32);
    std::vector<float> tmp(static_cast<size_t>(hd));
    float* hp = h.data_ptr<float>();
    float* xp = xn.data_ptr<float>();
    table_row(embed, int(hdr[kFmtEmbed]), token, d, float(embed_scale), hp);
    int64_t neurons = 0, kept = 0, capped = 0;
    const std::optional<double> cap = attn_cap > 0 ? std::optional<double>(attn_cap) : std::nullopt;
    for (Layer& ly : layers) {
      const int64_t* li = ly.i;
      const float* nw = ly.norms.data_ptr<float>();
      rms(hp, nw, d, eps, xp);
      const Tensor qkv = mv(ly.w_qkv, li[kFmtQkv], xn).to(at::kFloat).contiguous();
      const float* qkvp = qkv.data_ptr<float>();
      float* qkp = qk.data_ptr<float>();
      const float* cs = cos[li[kRope]].data_ptr<float>() + pos * hd;
      const float* sn = sin[li[kRope]].data_ptr<float>() + pos * hd;
      const int64_t* pm = perm[li[kRope]].data_ptr<int64_t>();
      for (int64_t row = 0; row < H + KV; ++row) {  // q and k heads: optional per-head RMSNorm (Gemma 3), RoPE
        const float* src = qkvp + row * hd;
        if (ly.qk_norms.numel() > 0) {
          rms(src, ly.qk_norms.data_ptr<float>() + (row < H ? 0 : hd), hd, eps, tmp.data());
          src = tmp.data();
        }
        float* o = qkp + row * hd;
        for (int64_t j = 0; j < hd; ++j) o[j] = src[j] * cs[j] + src[pm[j]] * sn[j];
      }
      const float* kp = qkp + H * hd;
      const float* vp = qkvp + (H + KV) * hd;
      const Tensor q = qk.narrow(0, 0, H);
      const std::optional<int64_t> window = li[kWindow] >= 0 ? std::optional<int64_t>(li[kWindow]) : std::nullopt;
      Tensor out;
      if (li[kAttn] == 1) {  // Spark: predictor half of the key, the rest of it, value
        for (int64_t g = 0; g < KV; ++g) {
          store(ly.c[0], g, pos, kp + g * hd, r, true);
          store(ly.c[1], g, pos, kp + g * hd + r, hd - r, false);
          store(ly.c[2], g, pos, vp + g * hd, hd, false);
        }
        auto res = ops().spark_attn.redispatch(kCpu, q, ly.c[0], ly.c[1], ly.c[2], pos + 1, hdr[kTopk],
                                               attn_scale, window, cap, std::nullopt);
        out = std::get<0>(res);
        kept += std::get<1>(res).sum().item<int64_t>();
        capped += std::get<2>(res).sum().item<int64_t>();
      } else {
        for (int64_t g = 0; g < KV; ++g) {
          store(ly.c[0], g, pos, kp + g * hd, hd, false);
          store(ly.c[1], g, pos, vp + g * hd, hd, false);
        }
        out = ops().dense_attn.redispatch(kCpu, q, ly.c[0], ly.c[1], pos + 1, attn_scale, window, cap,
                                          std::nullopt);
      }
      const Tensor o = mv(ly.w_o, li[kFmtO], out.reshape({-1}).to(at::kFloat)).to(at::kFloat).contiguous();
      residual(hp, o.data_ptr<float>(), d, hdr[kPost] ? nw + d : nullptr);
      rms(hp, nw + 2 * d, d, eps, xp);
      const Tensor y = ffn(ly, xn, &neurons).to(at::kFloat).contiguous();
      residual(hp, y.data_ptr<float>(), d, hdr[kPost] ? nw + 3 * d : nullptr);
    }
    rms(hp, final_norm.data_ptr<float>(), d, eps, xp);
    Tensor logits = mv(head, hdr[kFmtHead], xn).to(at::kFloat).contiguous();
    if (final_cap > 0) {
      float* lp = logits.data_ptr<float>();
      const float c = float(final_cap);
      for (int64_t j = 0; j < logits.numel(); ++j) lp[j] = c * std::tanh(lp[j] / c);
    }
    Tensor counts = at::empty({3}, at::TensorOptions().dtype(at::kLong));
    int64_t* cp = counts.data_ptr<int64_t>();
    cp[0] = neurons, cp[1] = kept, cp[2] = capped;
    return {logits, counts};
  }

  // h += y, or h += rms(y) * post (Gemma 2's post norms)
  void residual(float* h, const float* y, int64_t d, const float* post) const {
    if (post == nullptr) {
      for (int64_t j = 0; j < d; ++j) h[j] += y[j];
      return;
    }
    std::vector<float> t(static_cast<size_t>(d));
    rms(y, post, d, eps, t.data());
    for (int64_t j = 0; j < d; ++j) h[j] += t[j];
  }

  Tensor ffn(const Layer& ly, const Tensor& xn, int64_t* neurons) const {
    const int64_t* li = ly.i;
    switch (li[kFfn]) {
      case kGegluFloat:
        return ops().geglu.redispatch(kCpu, xn, ly.f[0], ly.f[1], ly.f[2], std::nullopt, act_name);
      case kSparkFloat: {
        auto res = ops().spark_ffn.redispatch(kCpu, xn, ly.f[0], ly.f[1], ly.f[2], fraction, std::nullopt,
                                              act_name);
        *neurons += std::get<1>(res).item<int64_t>();
        return std::get<0>(res);
      }
      case kGatedQuant: {  // [gate; up] rows, act(g) * u, then the down rows (quant.py: geglu_decode_quant)
        const Tensor gu = mv(ly.f[0], li[kFmtA], xn).contiguous();  // a fresh tensor: activated in place
        const int64_t m = gu.size(0) / 2;
        Tensor a = at::empty({m}, gu.options());
        float* g = gu.data_ptr<float>();
        float* ap = a.data_ptr<float>();
        spk::K()->activate(g, m, int(hdr[kAct]));  // the ISA's vectorised activation (as the float FFN kernels)
        for (int64_t j = 0; j < m; ++j) ap[j] = g[j] * g[m + j];
        return mv(ly.f[1], li[kFmtB], a);
      }
      case kSparkQuant: {  // quant.py: spark_ffn_decode_quant; p0 = K1 width r, p1 = K2 width, p2 = V width
        const int64_t rk = li[kP0], n2 = li[kP1], nv = li[kP2];
        const Tensor s = mv(ly.f[0], li[kFmtA], xn.narrow(0, 0, rk)).contiguous();
        const float* sp = s.data_ptr<float>();
        const int64_t n = s.numel();
        const float theta = float(spk::stat_threshold(sp, n, fraction));
        std::vector<int32_t> ids;
        std::vector<float> act;
        for (int64_t j = 0; j < n; ++j)
          if (sp[j] > theta) ids.push_back(int32_t(j)), act.push_back(act_value(int(hdr[kAct]), sp[j] - theta));
        *neurons += int64_t(ids.size());
        const int64_t cnt = int64_t(ids.size());
        Tensor idx = at::empty({cnt}, at::TensorOptions().dtype(at::kInt));
        Tensor av = at::empty({cnt}, at::TensorOptions().dtype(at::kFloat));
        std::copy(ids.begin(), ids.end(), idx.data_ptr<int32_t>());
        std::copy(act.begin(), act.end(), av.data_ptr<float>());
        return ops().quant_gather.redispatch(kCpu, idx, av, ly.f[1], li[kFmtB], n2, nv, xn.narrow(0, rk, n2));
      }
    }
    TORCH_CHECK(false, "DecodePlan: unknown FFN kind ", li[kFfn]);
    return Tensor();
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparkformer, m) {
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<std::vector<Tensor>, std::vector<int64_t>, std::vector<double>>())
      .def("step", &DecodePlan::step);
}
