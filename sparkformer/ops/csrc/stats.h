// Statistics of the ops: the inverse normal CDF, the statistical top-k threshold (two passes about the mean,
// or one from the sums the scoring pass accumulated) and the hard cap's best-k of the candidates.
// The definition they implement, and are tested against (tests/test_stat_topk.py, every ISA), is
// sparkformer/ops/stat_topk.py: stat_threshold. Included by the ops files (ops, sparse, quant_sparse, step).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "dispatch.h"

namespace spk {

// ------------------------------------------------------------------------------------------------
// Statistics
// ------------------------------------------------------------------------------------------------
// Inverse standard-normal CDF: Acklam's rational approximation (relative error 1e-9), then one
// Halley step on erfc, which brings it to double precision.
inline double ndtri(double p) {
  if (!(p > 0.0)) return -std::numeric_limits<double>::infinity();
  if (!(p < 1.0)) return std::numeric_limits<double>::infinity();
  static const double a[] = {-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
                             1.383577518672690e+02, -3.066479806614716e+01, 2.506628277459239e+00};
  static const double b[] = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                             6.680131188771972e+01, -1.328068155288572e+01};
  static const double c[] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
                             -2.549732539343734e+00, 4.374664141464968e+00, 2.938163982698783e+00};
  static const double d[] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
                             3.754408661907416e+00};
  const double plow = 0.02425;
  double x;
  if (p < plow) {
    double q = std::sqrt(-2.0 * std::log(p));
    x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
        ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0);
  } else if (p <= 1.0 - plow) {
    double q = p - 0.5, r = q * q;
    x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1.0);
  } else {
    double q = std::sqrt(-2.0 * std::log1p(-p));
    x = -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
        ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0);
  }
  // Halley step. Written on the smaller tail so erfc does not lose the digits.
  if (x < 0.0) {
    double e = 0.5 * std::erfc(-x / std::sqrt(2.0)) - p;
    double u = e * std::sqrt(2.0 * M_PI) * std::exp(0.5 * x * x);
    x = x - u / (1.0 + 0.5 * x * u);
  } else {
    double e = 0.5 * std::erfc(x / std::sqrt(2.0)) - (1.0 - p);  // upper tail
    double u = -e * std::sqrt(2.0 * M_PI) * std::exp(0.5 * x * x);
    x = x - u / (1.0 + 0.5 * x * u);
  }
  return x;
}

// Statistical top-k threshold over p[0:n] for target fraction f: mean + std * ndtri(1 - f),
// population std, statistics in double. f >= 1 keeps everything (-inf), f <= 0 nothing (+inf).
inline float stat_threshold(const float* p, int64_t n, double f) {
  const float inf = std::numeric_limits<float>::infinity();
  if (n <= 0 || f <= 0.0) return inf;
  if (f >= 1.0) return -inf;
  double s, ss;
  K()->sum_sumsq(p, n, 0.0, &s, &ss);
  double mean = s / double(n);
  K()->sum_sumsq(p, n, mean, &s, &ss);  // second pass about the mean, for accuracy
  double dm = s / double(n);
  double var = std::max(0.0, ss / double(n) - dm * dm);
  mean += dm;
  double sd = std::sqrt(var);
  return float(sd > 0.0 ? mean + sd * ndtri(1.0 - f) : mean);
}

// The same threshold from the sum and sum of squares of the n scores (accumulated by the scoring pass;
// one pass, no shift: like the training op, exact enough unless |mean| / std is beyond ~1e3).
inline float threshold_from_sums(double sum, double sumsq, int64_t n, double f) {
  const double mean = sum / double(n);
  const double sd = std::sqrt(std::max(0.0, sumsq / double(n) - mean * mean));
  return float(sd > 0.0 ? mean + sd * ndtri(1.0 - f) : mean);
}

// id[0:cnt]: candidate positions in ascending order. Keep the k best by (score desc, position desc),
// still in ascending order; returns k. tmp: cnt floats of scratch. O(cnt): one nth_element on the
// values, then a pass from the end that gives the ties at the k-th value to the most recent keys.
inline int64_t keep_top(const float* p, int32_t* id, int64_t cnt, int64_t k, float* tmp) {
  for (int64_t t = 0; t < cnt; ++t) tmp[t] = p[id[t]];
  std::nth_element(tmp, tmp + (cnt - k), tmp + cnt);
  const float kth = tmp[cnt - k];
  int64_t ties = k;  // how many keys equal to kth may be kept
  for (int64_t t = 0; t < cnt; ++t) ties -= p[id[t]] > kth;
  for (int64_t t = cnt - 1; t >= 0; --t) {  // mark (in tmp) the kept ones, latest ties first
    const float x = p[id[t]];
    bool keep = x > kth;
    if (!keep && x == kth && ties > 0) {
      keep = true;
      --ties;
    }
    tmp[t] = keep ? 1.0f : 0.0f;
  }
  int64_t out = 0;
  for (int64_t t = 0; t < cnt; ++t) {
    id[out] = id[t];
    out += tmp[t] != 0.0f;
  }
  return out;
}

// The routed FFN's threshold (sparse_ops.cpp, quant_sparse_ops.cpp): sparkformer.ops.stat_topk.stat_threshold(s, f)
// over s[0:n]: mean + std * ndtri(1 - f), 1 - f clamped to
// [1e-12, 1 - 1e-12] as stat_z does, population std over the finite entries, two passes about the mean in double;
// f >= 1 keeps everything (-inf). The vector sums where every entry is finite (and no square overflows fp32),
// else one scalar pass over the finite entries.
inline float routed_threshold(const float* s, int64_t n, double f) {
  const float inf = std::numeric_limits<float>::infinity();
  if (f >= 1.0) return -inf;
  const double z = ndtri(std::min(std::max(1.0 - f, 1e-12), 1.0 - 1e-12));
  double sum = 0.0, ss = 0.0, mean = 0.0, var = 0.0;
  K()->sum_sumsq(s, n, 0.0, &sum, &ss);
  if (std::isfinite(sum) && std::isfinite(ss) && n > 0) {
    mean = sum / double(n);
    K()->sum_sumsq(s, n, mean, &sum, &ss);  // second pass about the mean
    const double dm = sum / double(n);
    var = std::max(0.0, ss / double(n) - dm * dm);
    mean += dm;
  } else {
    int64_t cnt = 0;
    sum = 0.0;
    for (int64_t i = 0; i < n; ++i)
      if (std::isfinite(s[i])) {
        sum += s[i];
        ++cnt;
      }
    if (cnt == 0) return std::numeric_limits<float>::max();  // only non-finite scores: keep the +inf ones
    mean = sum / double(cnt);
    double c = 0.0;
    ss = 0.0;
    for (int64_t i = 0; i < n; ++i)
      if (std::isfinite(s[i])) {
        const double e = double(s[i]) - mean;
        c += e;
        ss += e * e;
      }
    var = std::max(0.0, ss / double(cnt) - (c / double(cnt)) * (c / double(cnt)));
    mean += c / double(cnt);
  }
  const double sd = std::sqrt(var);
  return float(sd > 0.0 ? mean + sd * z : mean);
}

}  // namespace spk
