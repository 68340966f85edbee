// Elementwise kernels where the stock pure-JS ones dominate attention: softmax over the last
// axis (one pass per row instead of five kernels), and broadcasting float32 binary ops.
// Binary ops on float32 are exact in either precision, so results equal the stock kernels'.
#include <cmath>
#include <cstring>

#include "kernels.h"
#include "parallel_rows.h"
#include "pool.h"
#include "vexp.h"
#include "variant.h"

ST_BEGIN_NAMESPACE

typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

static inline v8f exp8(v8f x) { return vexp<v8f, v8i>(x); }

void softmax(const float* x, float* y, long rows, long n) {
  const long chunk = std::max(1L, 16384 / std::max(1L, n));
  const long tasks = (rows + chunk - 1) / chunk;
  parallel_for(static_cast<int>(tasks), [&](int t) {
    for (long r = t * chunk; r < std::min(rows, (t + 1) * chunk); r++) {
      const float* xr = x + r * n;
      float* yr = y + r * n;
      v8f mx8 = v8f{} - INFINITY;
      long i0 = 0;
      for (; i0 + 8 <= n; i0 += 8) {
        v8f v;
        std::memcpy(&v, xr + i0, sizeof v);
        mx8 = v > mx8 ? v : mx8;
      }
      float mx = -INFINITY;
      for (int j = 0; j < 8; j++) mx = std::max(mx, mx8[j]);
      for (; i0 < n; i0++) mx = std::max(mx, xr[i0]);
      double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // double: the row sum is the one long reduction
      long i = 0;
      for (; i + 8 <= n; i += 8) {
        v8f v;
        std::memcpy(&v, xr + i, sizeof v);
        v = exp8(v - mx);
        std::memcpy(yr + i, &v, sizeof v);
        for (int j = 0; j < 8; j++) part[j] += v[j];
      }
      double sum = 0;
      for (; i < n; i++) {
        yr[i] = std::exp(xr[i] - mx);
        sum += yr[i];
      }
      for (int j = 0; j < 8; j++) sum += part[j];
      const float inv = static_cast<float>(1.0 / sum);
      for (long i = 0; i < n; i++) yr[i] *= inv;
    }
  });
}

template <int Op>
static inline float apply(float a, float b) {
  return Op == 0 ? a + b : Op == 1 ? a - b : Op == 2 ? a * b : a / b;
}

template <int Op>
static void binary_t(const float* a, const float* b, float* out, int rank, const long* shape,
                     const long* as, const long* bs) {
  const long n = shape[rank - 1], sa = as[rank - 1], sb = bs[rank - 1];
  long outer = 1;
  for (int d = 0; d < rank - 1; d++) outer *= shape[d];
  parallel_rows(outer, n, 32768, [&](long o, long i0, long i1) {
    long rem = o, ao = 0, bo = 0;
    for (int d = rank - 2; d >= 0; d--) {
      const long i = rem % shape[d];
      rem /= shape[d];
      ao += i * as[d];
      bo += i * bs[d];
    }
    const float* pa = a + ao;
    const float* pb = b + bo;
    float* po = out + o * n;
    if (sa == 1 && sb == 1) {
      for (long i = i0; i < i1; i++) po[i] = apply<Op>(pa[i], pb[i]);
    } else if (sa == 1) {
      const float vb = pb[0];
      for (long i = i0; i < i1; i++) po[i] = apply<Op>(pa[i], vb);
    } else if (sb == 1) {
      const float va = pa[0];
      for (long i = i0; i < i1; i++) po[i] = apply<Op>(va, pb[i]);
    } else {
      for (long i = i0; i < i1; i++) po[i] = apply<Op>(pa[i * sa], pb[i * sb]);
    }
  });
}

void binary(int op, const float* a, const float* b, float* out, int rank, const long* shape,
            const long* aStrides, const long* bStrides) {
  switch (op) {
    case 0: return binary_t<0>(a, b, out, rank, shape, aStrides, bStrides);
    case 1: return binary_t<1>(a, b, out, rank, shape, aStrides, bStrides);
    case 2: return binary_t<2>(a, b, out, rank, shape, aStrides, bStrides);
    default: return binary_t<3>(a, b, out, rank, shape, aStrides, bStrides);
  }
}

ST_END_NAMESPACE  // st::ST_ISA
