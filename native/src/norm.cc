// Normalisation and activation kernels that replace chains of TF.js ops (trainers/nets/fused.ts):
// GroupNorm on NHWC (optionally followed by SiLU, as in every ldm ResBlock and the UNet/VAE
// heads), LayerNorm over the last axis, and SiLU / exact GELU, each forward and backward. The
// op chains they replace cost one full pass over the activation per op (forward and again in
// the autodiff backward); these take two. Sums are accumulated in double, so the statistics
// are at least as exact as torch's; the outputs are float32.
//
// Formulas (torch.nn.GroupNorm / LayerNorm; xhat = (x − mean)·rstd, rstd = 1/sqrt(var + eps),
// var biased; N = elements per group or row; dz = the gradient at the affine output):
//   dbias = Σ dz, dweight = Σ dz·xhat,
//   dx = rstd·(w·dz − mean_N(w·dz) − xhat·mean_N(w·dz·xhat)).
#include "norm.h"
#include "denormals.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "napi_args.h"
#include "pool.h"
#include "vexp.h"
#include "variant.h"

ST_BEGIN_NAMESPACE
namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }

inline v8f exp8(v8f x) { return vexp<v8f, v8i>(x); }
inline v8f sigmoid8(v8f z) { return 1.0f / (1.0f + exp8(-z)); }
inline float sigmoid1(float z) { return 1.0f / (1.0f + std::exp(-z)); }

// erf as the TF.js CPU kernel computes it (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7), so
// the GELU matches the op chain it replaces.
constexpr float kErfP = 0.3275911f, kA1 = 0.254829592f, kA2 = -0.284496736f, kA3 = 1.421413741f,
                kA4 = -1.453152027f, kA5 = 1.061405429f;
inline v8f erf8(v8f x) {
  const v8f ax = x < 0.0f ? -x : x;
  const v8f t = 1.0f / (1.0f + kErfP * ax);
  const v8f poly = ((((kA5 * t + kA4) * t + kA3) * t + kA2) * t + kA1) * t;
  const v8f r = 1.0f - poly * exp8(-ax * ax);
  return x < 0.0f ? -r : r;
}
inline float erf1(float x) {
  const float ax = std::fabs(x), t = 1.0f / (1.0f + kErfP * ax);
  const float r = 1.0f - ((((kA5 * t + kA4) * t + kA3) * t + kA2) * t + kA1) * t * std::exp(-ax * ax);
  return x < 0 ? -r : r;
}

// Rows per task: ~16K elements each, but at least 4 tasks per thread when there are rows enough.
long rows_per_task(long rows, long width) {
  const long byWork = std::max(1L, 16384 / std::max(1L, width));
  const long byThreads = (rows + 4L * pool_threads() - 1) / (4L * pool_threads());
  return std::max(1L, std::min(byWork, byThreads));
}

struct Tiles {
  long chunk, perB, tasks;
  Tiles(long B, long rows, long width) {
    chunk = std::max(1L, std::min(rows, rows_per_task(B * rows, width)));
    perB = (rows + chunk - 1) / chunk;
    tasks = B * perB;
  }
};

// ---- GroupNorm on [B, HW, C], G groups ------------------------------------------------------

// z = x·scale + shift over one row of C channels, then SiLU when silu; written to y.
void affine_row(const float* x, const float* scale, const float* shift, float* y, long C, bool silu) {
  long c = 0;
  for (; c + 8 <= C; c += 8) {
    v8f z = load8(x + c) * load8(scale + c) + load8(shift + c);
    if (silu) z = z * sigmoid8(z);
    store8(y + c, z);
  }
  for (; c < C; c++) {
    const float z = x[c] * scale[c] + shift[c];
    y[c] = silu ? z * sigmoid1(z) : z;
  }
}

// dz = dy · silu'(z) for z = x·scale + shift over one row.
void silu_grad_row(const float* dy, const float* x, const float* scale, const float* shift, float* dz, long C) {
  long c = 0;
  for (; c + 8 <= C; c += 8) {
    const v8f z = load8(x + c) * load8(scale + c) + load8(shift + c), s = sigmoid8(z);
    store8(dz + c, load8(dy + c) * s * (1.0f + z * (1.0f - s)));
  }
  for (; c < C; c++) {
    const float z = x[c] * scale[c] + shift[c], s = sigmoid1(z);
    dz[c] = dy[c] * s * (1.0f + z * (1.0f - s));
  }
}

struct GnShape {
  long B, HW, C, G;
};

// Per-b scale[c] = rstd·w, shift[c] = bias − mean·rstd·w (the affine form of the normalisation).
void gn_affine(const GnShape& s, const float* w, const float* bias, const float* mean, const float* rstd,
               std::vector<float>& scale, std::vector<float>& shift) {
  const long Cg = s.C / s.G;
  scale.resize(s.B * s.C);
  shift.resize(s.B * s.C);
  for (long b = 0; b < s.B; b++)
    for (long c = 0; c < s.C; c++) {
      const long bg = b * s.G + c / Cg;
      const double sc = static_cast<double>(rstd[bg]) * w[c];
      scale[b * s.C + c] = static_cast<float>(sc);
      shift[b * s.C + c] = static_cast<float>(bias[c] - mean[bg] * sc);
    }
}

void group_norm_forward(const float* x, const float* w, const float* bias, float* y, float* mean, float* rstd,
                        const GnShape& s, double eps, bool silu) {
  const Tiles t(s.B, s.HW, s.C);
  std::vector<double> sums(2 * t.tasks * s.C, 0.0);  // per task: Σx [C], Σx² [C]
  parallel_for(static_cast<int>(t.tasks), [&](int task) {
    const long b = task / t.perB, r0 = (task % t.perB) * t.chunk, r1 = std::min(s.HW, r0 + t.chunk);
    double* s1 = &sums[2 * task * s.C];
    double* s2 = s1 + s.C;
    for (long r = r0; r < r1; r++) {
      const float* xr = x + (b * s.HW + r) * s.C;
      for (long c = 0; c < s.C; c++) {
        const double v = xr[c];
        s1[c] += v;
        s2[c] += v * v;
      }
    }
  });
  const long Cg = s.C / s.G;
  const double n = static_cast<double>(s.HW * Cg);
  for (long b = 0; b < s.B; b++)
    for (long g = 0; g < s.G; g++) {
      double a = 0, q = 0;
      for (long task = b * t.perB; task < (b + 1) * t.perB; task++)
        for (long c = g * Cg; c < (g + 1) * Cg; c++) a += sums[2 * task * s.C + c], q += sums[(2 * task + 1) * s.C + c];
      const double m = a / n, var = std::max(0.0, q / n - m * m);
      mean[b * s.G + g] = static_cast<float>(m);
      rstd[b * s.G + g] = static_cast<float>(1.0 / std::sqrt(var + eps));
    }
  std::vector<float> scale, shift;
  gn_affine(s, w, bias, mean, rstd, scale, shift);
  parallel_for(static_cast<int>(t.tasks), [&](int task) {
    const long b = task / t.perB, r0 = (task % t.perB) * t.chunk, r1 = std::min(s.HW, r0 + t.chunk);
    for (long r = r0; r < r1; r++) {
      const long o = (b * s.HW + r) * s.C;
      affine_row(x + o, &scale[b * s.C], &shift[b * s.C], y + o, s.C, silu);
    }
  });
}

void group_norm_backward(const float* dy, const float* x, const float* mean, const float* rstd, const float* w,
                         const float* bias, float* dx, float* dw, float* db, const GnShape& s, bool silu) {
  const Tiles t(s.B, s.HW, s.C);
  std::vector<float> scale, shift;
  if (silu) gn_affine(s, w, bias, mean, rstd, scale, shift);
  // Pass 1: dz (into dx when the SiLU is fused) and per task Σdz [C], Σdz·x [C].
  std::vector<double> sums(2 * t.tasks * s.C, 0.0);
  const float* dz = silu ? dx : dy;
  parallel_for(static_cast<int>(t.tasks), [&](int task) {
    const long b = task / t.perB, r0 = (task % t.perB) * t.chunk, r1 = std::min(s.HW, r0 + t.chunk);
    double* sa = &sums[2 * task * s.C];
    double* sb = sa + s.C;
    for (long r = r0; r < r1; r++) {
      const long o = (b * s.HW + r) * s.C;
      if (silu) silu_grad_row(dy + o, x + o, &scale[b * s.C], &shift[b * s.C], dx + o, s.C);
      for (long c = 0; c < s.C; c++) {
        const double d = dz[o + c];
        sa[c] += d;
        sb[c] += d * x[o + c];
      }
    }
  });
  // Per b: Σdz and Σdz·xhat per channel give dbias, dweight and the two group means of dx.
  const long Cg = s.C / s.G;
  const double n = static_cast<double>(s.HW * Cg);
  std::vector<double> dwAcc(s.C, 0.0), dbAcc(s.C, 0.0);
  std::vector<float> ca(s.B * s.C), ck(s.B * s.C), ce(s.B * s.C), cm(s.B * s.C);
  std::vector<double> A(s.C), Bx(s.C);
  for (long b = 0; b < s.B; b++) {
    std::fill(A.begin(), A.end(), 0.0);
    std::fill(Bx.begin(), Bx.end(), 0.0);
    for (long task = b * t.perB; task < (b + 1) * t.perB; task++)
      for (long c = 0; c < s.C; c++) A[c] += sums[2 * task * s.C + c], Bx[c] += sums[(2 * task + 1) * s.C + c];
    for (long g = 0; g < s.G; g++) {
      const double m = mean[b * s.G + g], rs = rstd[b * s.G + g];
      double s1 = 0, s2 = 0;
      for (long c = g * Cg; c < (g + 1) * Cg; c++) {
        const double dzXhat = rs * (Bx[c] - m * A[c]);  // Σ dz·xhat
        dbAcc[c] += A[c];
        dwAcc[c] += dzXhat;
        s1 += w[c] * A[c];
        s2 += w[c] * dzXhat;
      }
      const double m1 = s1 / n, m2 = s2 / n;
      for (long c = g * Cg; c < (g + 1) * Cg; c++) {
        // dx = rstd·w·dz − rstd·m1 − rstd²·m2·(x − mean)
        ca[b * s.C + c] = static_cast<float>(rs * w[c]);
        ck[b * s.C + c] = static_cast<float>(-rs * rs * m2);
        ce[b * s.C + c] = static_cast<float>(-rs * m1);
        cm[b * s.C + c] = static_cast<float>(m);
      }
    }
  }
  for (long c = 0; c < s.C; c++) dw[c] = static_cast<float>(dwAcc[c]), db[c] = static_cast<float>(dbAcc[c]);
  // Pass 2: dx.
  parallel_for(static_cast<int>(t.tasks), [&](int task) {
    const long b = task / t.perB, r0 = (task % t.perB) * t.chunk, r1 = std::min(s.HW, r0 + t.chunk);
    const float *a = &ca[b * s.C], *k = &ck[b * s.C], *e = &ce[b * s.C], *mm = &cm[b * s.C];
    for (long r = r0; r < r1; r++) {
      const long o = (b * s.HW + r) * s.C;
      for (long c = 0; c < s.C; c++) dx[o + c] = a[c] * dz[o + c] + k[c] * (x[o + c] - mm[c]) + e[c];
    }
  });
}

// ---- LayerNorm over the last axis of [rows, n] ----------------------------------------------

void layer_norm_forward(const float* x, const float* w, const float* bias, float* y, float* mean, float* rstd,
                        long rows, long n, double eps) {
  const Tiles t(1, rows, n);
  parallel_for(static_cast<int>(t.tasks), [&](int task) {
    for (long r = task * t.chunk; r < std::min(rows, (task + 1) * t.chunk); r++) {
      const float* xr = x + r * n;
      double a[8] = {0, 0, 0, 0, 0, 0, 0, 0}, q[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      long i = 0;
      for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) {
          const double v = xr[i + j];
          a[j] += v;
          q[j] += v * v;
        }
      for (; i < n; i++) a[0] += xr[i], q[0] += static_cast<double>(xr[i]) * xr[i];
      double sa = 0, sq = 0;
      for (int j = 0; j < 8; j++) sa += a[j], sq += q[j];
      const double m = sa / n, rs = 1.0 / std::sqrt(std::max(0.0, sq / n - m * m) + eps);
      mean[r] = static_cast<float>(m);
      rstd[r] = static_cast<float>(rs);
      const float mf = static_cast<float>(m), rf = static_cast<float>(rs);
      float* yr = y + r * n;
      for (long c = 0; c < n; c++) yr[c] = (xr[c] - mf) * rf * w[c] + bias[c];
    }
  });
}

void layer_norm_backward(const float* dy, const float* x, const float* mean, const float* rstd, const float* w,
                         float* dx, float* dw, float* db, long rows, long n) {
  const Tiles t(1, rows, n);
  std::vector<double> sums(2 * t.tasks * n, 0.0);  // per task: Σdy·xhat [n], Σdy [n]
  parallel_for(static_cast<int>(t.tasks), [&](int task) {
    double* sw = &sums[2 * task * n];
    double* sb = sw + n;
    for (long r = task * t.chunk; r < std::min(rows, (task + 1) * t.chunk); r++) {
      const float *xr = x + r * n, *dyr = dy + r * n;
      const float m = mean[r], rs = rstd[r];
      double p1[8] = {0, 0, 0, 0, 0, 0, 0, 0}, p2[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      long i = 0;
      for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) {
          const float xh = (xr[i + j] - m) * rs, g = dyr[i + j] * w[i + j];
          p1[j] += g;
          p2[j] += static_cast<double>(g) * xh;
        }
      for (; i < n; i++) {
        const float xh = (xr[i] - m) * rs, g = dyr[i] * w[i];
        p1[0] += g;
        p2[0] += static_cast<double>(g) * xh;
      }
      double s1 = 0, s2 = 0;
      for (int j = 0; j < 8; j++) s1 += p1[j], s2 += p2[j];
      const float m1 = static_cast<float>(s1 / n), m2 = static_cast<float>(s2 / n);
      float* dxr = dx + r * n;
      for (long c = 0; c < n; c++) {
        const float xh = (xr[c] - m) * rs;
        dxr[c] = rs * (dyr[c] * w[c] - m1 - xh * m2);
        sw[c] += static_cast<double>(dyr[c]) * xh;
        sb[c] += dyr[c];
      }
    }
  });
  for (long c = 0; c < n; c++) {
    double a = 0, b = 0;
    for (long task = 0; task < t.tasks; task++) a += sums[2 * task * n + c], b += sums[(2 * task + 1) * n + c];
    dw[c] = static_cast<float>(a);
    db[c] = static_cast<float>(b);
  }
}

// ---- SiLU and exact GELU --------------------------------------------------------------------

constexpr float kInvSqrt2 = 0.70710678118654752f, kInvSqrt2Pi = 0.39894228040143268f;

template <int Op>
inline v8f act8(v8f x) {
  return Op == 0 ? x * sigmoid8(x) : 0.5f * x * (1.0f + erf8(x * kInvSqrt2));
}
template <int Op>
inline float act1(float x) {
  return Op == 0 ? x * sigmoid1(x) : 0.5f * x * (1.0f + erf1(x * kInvSqrt2));
}
// act'(x): SiLU s·(1 + x·(1 − s)); GELU Φ(x) + x·φ(x) (the erf op's registered gradient is exact).
template <int Op>
inline v8f grad8(v8f x) {
  if (Op == 0) {
    const v8f s = sigmoid8(x);
    return s * (1.0f + x * (1.0f - s));
  }
  return 0.5f * (1.0f + erf8(x * kInvSqrt2)) + x * kInvSqrt2Pi * exp8(-0.5f * x * x);
}
template <int Op>
inline float grad1(float x) {
  if (Op == 0) {
    const float s = sigmoid1(x);
    return s * (1.0f + x * (1.0f - s));
  }
  return 0.5f * (1.0f + erf1(x * kInvSqrt2)) + x * kInvSqrt2Pi * std::exp(-0.5f * x * x);
}

template <int Op>
void activation(const float* dy, const float* x, float* out, long n) {
  constexpr long kChunk = 1L << 15;
  const long tasks = (n + kChunk - 1) / kChunk;
  parallel_for(static_cast<int>(tasks), [&](int task) {
    const long a = task * kChunk, e = std::min(n, a + kChunk);
    long i = a;
    if (dy) {
      for (; i + 8 <= e; i += 8) store8(out + i, load8(dy + i) * grad8<Op>(load8(x + i)));
      for (; i < e; i++) out[i] = dy[i] * grad1<Op>(x[i]);
    } else {
      for (; i + 8 <= e; i += 8) store8(out + i, act8<Op>(load8(x + i)));
      for (; i < e; i++) out[i] = act1<Op>(x[i]);
    }
  });
}

// ---- N-API ----------------------------------------------------------------------------------

// dims: Float64Array [B, HW, C, G] with G dividing C.
bool gn_shape(NapiArgs& a, size_t i, GnShape& s) {
  const double* d = a.f64(i, 4, "dims");
  if (!d) return false;
  s = {static_cast<long>(d[0]), static_cast<long>(d[1]), static_cast<long>(d[2]), static_cast<long>(d[3])};
  if (s.B < 1 || s.HW < 1 || s.C < 1 || s.G < 1 || s.C % s.G != 0) a.range_error("dims: need B, HW, C, G ≥ 1 with G dividing C");
  return a.ok();
}

// (x, weight, bias, y, mean, rstd, dims, eps, silu)
napi_value GroupNormForward(napi_env env, napi_callback_info info) {
  const DenormalsAsZero daz;
  NapiArgs a(env, info, "groupNormForward");
  GnShape s;
  if (!gn_shape(a, 6, s)) return nullptr;
  const size_t n = s.B * s.HW * s.C, bg = s.B * s.G;
  const float *x = a.f32(0, n, "x"), *w = a.f32(1, s.C, "weight"), *b = a.f32(2, s.C, "bias");
  float *y = a.f32(3, n, "y"), *mean = a.f32(4, bg, "mean"), *rstd = a.f32(5, bg, "rstd");
  const double eps = a.number(7, "eps");
  const bool silu = a.boolean(8, "silu");
  if (a.ok()) group_norm_forward(x, w, b, y, mean, rstd, s, eps, silu);
  return nullptr;
}

// (dy, x, mean, rstd, weight, bias, dx, dweight, dbias, dims, silu)
napi_value GroupNormBackward(napi_env env, napi_callback_info info) {
  const DenormalsAsZero daz;
  NapiArgs a(env, info, "groupNormBackward");
  GnShape s;
  if (!gn_shape(a, 9, s)) return nullptr;
  const size_t n = s.B * s.HW * s.C, bg = s.B * s.G;
  const float *dy = a.f32(0, n, "dy"), *x = a.f32(1, n, "x"), *mean = a.f32(2, bg, "mean"), *rstd = a.f32(3, bg, "rstd");
  const float *w = a.f32(4, s.C, "weight"), *b = a.f32(5, s.C, "bias");
  float *dx = a.f32(6, n, "dx"), *dw = a.f32(7, s.C, "dweight"), *db = a.f32(8, s.C, "dbias");
  const bool silu = a.boolean(10, "silu");
  if (a.ok()) group_norm_backward(dy, x, mean, rstd, w, b, dx, dw, db, s, silu);
  return nullptr;
}

bool ln_dims(NapiArgs& a, size_t i, long& rows, long& n) {
  rows = static_cast<long>(a.number(i, "rows"));
  n = static_cast<long>(a.number(i + 1, "n"));
  if (a.ok() && (rows < 0 || n < 1)) a.range_error("rows ≥ 0 and n ≥ 1 expected");
  return a.ok();
}

// (x, weight, bias, y, mean, rstd, rows, n, eps)
napi_value LayerNormForward(napi_env env, napi_callback_info info) {
  const DenormalsAsZero daz;
  NapiArgs a(env, info, "layerNormForward");
  long rows, n;
  if (!ln_dims(a, 6, rows, n)) return nullptr;
  const float *x = a.f32(0, rows * n, "x"), *w = a.f32(1, n, "weight"), *b = a.f32(2, n, "bias");
  float *y = a.f32(3, rows * n, "y"), *mean = a.f32(4, rows, "mean"), *rstd = a.f32(5, rows, "rstd");
  const double eps = a.number(8, "eps");
  if (a.ok() && rows > 0) layer_norm_forward(x, w, b, y, mean, rstd, rows, n, eps);
  return nullptr;
}

// (dy, x, mean, rstd, weight, dx, dweight, dbias, rows, n)
napi_value LayerNormBackward(napi_env env, napi_callback_info info) {
  const DenormalsAsZero daz;
  NapiArgs a(env, info, "layerNormBackward");
  long rows, n;
  if (!ln_dims(a, 8, rows, n)) return nullptr;
  const float *dy = a.f32(0, rows * n, "dy"), *x = a.f32(1, rows * n, "x"), *mean = a.f32(2, rows, "mean");
  const float *rstd = a.f32(3, rows, "rstd"), *w = a.f32(4, n, "weight");
  float *dx = a.f32(5, rows * n, "dx"), *dw = a.f32(6, n, "dweight"), *db = a.f32(7, n, "dbias");
  if (!a.ok()) return nullptr;
  if (rows > 0) {
    layer_norm_backward(dy, x, mean, rstd, w, dx, dw, db, rows, n);
  } else {
    std::fill(dw, dw + n, 0.0f);
    std::fill(db, db + n, 0.0f);
  }
  return nullptr;
}

void run_activation(int op, const float* dy, const float* x, float* out, long n) {
  if (op == 0) activation<0>(dy, x, out, n);
  else activation<1>(dy, x, out, n);
}

// (op, x, y)
napi_value ActivationForward(napi_env env, napi_callback_info info) {
  const DenormalsAsZero daz;
  NapiArgs a(env, info, "activationForward");
  const int op = static_cast<int>(a.number(0, "op"));
  const size_t n = a.length(1);
  const float* x = a.f32(1, n, "x");
  float* y = a.f32(2, n, "y");
  if (a.ok() && (op < 0 || op > 1)) a.range_error("op: 0 (SiLU) or 1 (GELU)");
  if (a.ok() && n > 0) run_activation(op, nullptr, x, y, static_cast<long>(n));
  return nullptr;
}

// (op, dy, x, dx)
napi_value ActivationBackward(napi_env env, napi_callback_info info) {
  const DenormalsAsZero daz;
  NapiArgs a(env, info, "activationBackward");
  const int op = static_cast<int>(a.number(0, "op"));
  const size_t n = a.length(2);
  const float *dy = a.f32(1, n, "dy"), *x = a.f32(2, n, "x");
  float* dx = a.f32(3, n, "dx");
  if (a.ok() && (op < 0 || op > 1)) a.range_error("op: 0 (SiLU) or 1 (GELU)");
  if (a.ok() && n > 0) run_activation(op, dy, x, dx, static_cast<long>(n));
  return nullptr;
}

}  // namespace

void define_norm(napi_env env, napi_value exports) {
  const napi_property_descriptor props[] = {
      {"groupNormForward", nullptr, GroupNormForward, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"groupNormBackward", nullptr, GroupNormBackward, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"layerNormForward", nullptr, LayerNormForward, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"layerNormBackward", nullptr, LayerNormBackward, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"activationForward", nullptr, ActivationForward, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"activationBackward", nullptr, ActivationBackward, nullptr, nullptr, nullptr, napi_default, nullptr},
  };
  napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props);
}

ST_END_NAMESPACE  // st::ST_ISA
