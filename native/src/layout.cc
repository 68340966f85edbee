// Layout and reduction kernels where the stock pure-JS ones dominate a UNet step: a strided
// block copy (Transpose, SplitV, Unpack, PadV2 are all one copy each), axis sums (Sum, Mean:
// the stock kernels transpose the reduced axes innermost first, then sum), and unary maps.
// Sums accumulate in double like the stock JS loop, so results match it to the last bit but
// for summation order; unary maps evaluate the stock kernels' own double formulas.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "parallel_rows.h"
#include "pool.h"
#include "variant.h"

ST_BEGIN_NAMESPACE

static long offset_of(long idx, int rank, const long* shape, const long* stride) {
  long off = 0;
  for (int d = rank - 1; d >= 0; d--) {
    off += (idx % shape[d]) * stride[d];
    idx /= shape[d];
  }
  return off;
}

void strided_copy(const float* src, float* dst, int rank, const long* shape, const long* ss,
                  const long* ds) {
  const long n = shape[rank - 1], s1 = ss[rank - 1], d1 = ds[rank - 1];
  long outer = 1;
  for (int d = 0; d < rank - 1; d++) outer *= shape[d];
  parallel_rows(outer, n, 65536, [&](long o, long i0, long i1) {
    const float* ps = src + offset_of(o, rank - 1, shape, ss);
    float* pd = dst + offset_of(o, rank - 1, shape, ds);
    if (s1 == 1 && d1 == 1) {
      std::memcpy(pd + i0, ps + i0, (i1 - i0) * sizeof(float));
    } else if (d1 == 1) {
      for (long i = i0; i < i1; i++) pd[i] = ps[i * s1];
    } else {
      for (long i = i0; i < i1; i++) pd[i * d1] = ps[i * s1];
    }
  });
}

// x is contiguous over groups[0..G) (outermost first); reduced[g] says whether group g is
// summed. out[kept index] = Σ float(x / divisor) (divisor 1: plain Sum), in double.
void reduce_sum(const float* x, float* out, int G, const long* size, const bool* reduced,
                float divisor) {
  long stride[16];
  for (int g = G - 1, s = 1; g >= 0; g--) stride[g] = s, s *= size[g];
  long ks[16], kst[16], rs[16], rst[16];
  int nk = 0, nr = 0;
  for (int g = 0; g < G; g++) {
    if (reduced[g]) rs[nr] = size[g], rst[nr++] = stride[g];
    else ks[nk] = size[g], kst[nk++] = stride[g];
  }
  const bool scale = divisor != 1.0f;
  if (reduced[G - 1]) {  // innermost group summed: each output is a sum of contiguous runs
    const long n = size[G - 1];
    long rows = 1, runs = 1;
    for (int i = 0; i < nk; i++) rows *= ks[i];
    for (int i = 0; i < nr - 1; i++) runs *= rs[i];
    const long chunk = std::max(1L, 16384 / std::max(1L, n * runs));
    const long tasks = (rows + chunk - 1) / chunk;
    parallel_for(static_cast<int>(tasks), [&](int t) {
      for (long o = t * chunk; o < std::min(rows, (t + 1) * chunk); o++) {
        const float* base = x + offset_of(o, nk, ks, kst);
        double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 independent chains: not latency-bound
        for (long r = 0; r < runs; r++) {
          const float* p = base + offset_of(r, nr - 1, rs, rst);
          long i = 0;
          if (scale) {
            for (; i + 8 <= n; i += 8)
              for (int j = 0; j < 8; j++) part[j] += static_cast<double>(p[i + j] / divisor);
            for (; i < n; i++) part[0] += static_cast<double>(p[i] / divisor);
          } else {
            for (; i + 8 <= n; i += 8)
              for (int j = 0; j < 8; j++) part[j] += static_cast<double>(p[i + j]);
            for (; i < n; i++) part[0] += static_cast<double>(p[i]);
          }
        }
        double acc = 0;
        for (int j = 0; j < 8; j++) acc += part[j];
        out[o] = static_cast<float>(acc);
      }
    });
    return;
  }
  // innermost group kept (c columns): add contiguous rows of c into double accumulators
  const long c = size[G - 1];
  long rows = 1, runs = 1;
  for (int i = 0; i < nk - 1; i++) rows *= ks[i];
  for (int i = 0; i < nr; i++) runs *= rs[i];
  const long cw = 256, cchunks = (c + cw - 1) / cw;
  parallel_for(static_cast<int>(rows * cchunks), [&](int t) {
    const long row = t / cchunks, c0 = (t % cchunks) * cw, c1 = std::min(c, c0 + cw);
    double acc[256];
    std::fill(acc, acc + (c1 - c0), 0.0);
    const float* base = x + offset_of(row, nk - 1, ks, kst) + c0;
    for (long r = 0; r < runs; r++) {
      const float* p = base + offset_of(r, nr, rs, rst);
      if (scale) for (long i = 0; i < c1 - c0; i++) acc[i] += static_cast<double>(p[i] / divisor);
      else for (long i = 0; i < c1 - c0; i++) acc[i] += static_cast<double>(p[i]);
    }
    float* o = out + row * c + c0;
    for (long i = 0; i < c1 - c0; i++) o[i] = static_cast<float>(acc[i]);
  });
}

// The stock kernels' formulas (tfjs-backend-cpu 4.22 Neg, Exp, Sigmoid, Erf, Square, Sqrt).
template <int Op>
static inline float unary_op(float xf) {
  const double x = xf;
  if (Op == 0) return -xf;
  if (Op == 1) return static_cast<float>(std::exp(x));
  if (Op == 2) return static_cast<float>(1.0 / (1.0 + std::exp(-x)));
  if (Op == 4) return xf * xf;  // exact: a float product rounded once, as the double one is
  if (Op == 5) return std::sqrt(xf);  // correctly rounded either way
  // erf: Abramowitz & Stegun 7.1.26, as backend_util.ERF_* / kernels/Erf.js
  const double p = 0.3275911, a1 = 0.254829592, a2 = -0.284496736, a3 = 1.421413741,
               a4 = -1.453152027, a5 = 1.061405429;
  const double sign = x > 0 ? 1.0 : x < 0 ? -1.0 : 0.0, v = std::fabs(x), t = 1.0 / (1.0 + p * v);
  return static_cast<float>(sign * (1.0 - (((((a5 * t + a4) * t) + a3) * t + a2) * t + a1) * t * std::exp(-v * v)));
}

template <int Op>
static void unary_t(const float* x, float* y, long n) {
  const long chunk = 32768, tasks = (n + chunk - 1) / chunk;
  parallel_for(static_cast<int>(tasks), [&](int t) {
    const long e = std::min(n, (t + 1) * chunk);
    for (long i = t * chunk; i < e; i++) y[i] = unary_op<Op>(x[i]);
  });
}

void unary(int op, const float* x, float* y, long n) {
  switch (op) {
    case 0: return unary_t<0>(x, y, n);
    case 1: return unary_t<1>(x, y, n);
    case 2: return unary_t<2>(x, y, n);
    case 4: return unary_t<4>(x, y, n);
    case 5: return unary_t<5>(x, y, n);
    default: return unary_t<3>(x, y, n);
  }
}

ST_END_NAMESPACE  // st::ST_ISA
