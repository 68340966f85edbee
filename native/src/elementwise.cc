// Elementwise kernels where the stock pure-JS ones dominate attention: softmax over the last
// axis (one pass per row instead of five kernels), and broadcasting float32 binary ops.
// Binary ops on float32 are exact in either precision, so results equal the stock kernels'.
#include <cmath>
#include <cstring>

#include "kernels.h"
#include "pool.h"

namespace st {

typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

// exp on 8 lanes: Cephes expf's range reduction and polynomial (≈1 ulp on [-87, 88]; inputs
// are clamped there, so exp(-inf) gives ~1e-38 instead of 0, immaterial next to a softmax
// row sum ≥ 1). Vectorised, unlike libm's expf, which made softmax exp-bound.
static inline v8f exp8(v8f x) {
  const v8f hi = v8f{} + 88.3762626647949f, lo = v8f{} - 87.3365447504f;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const v8f magic = v8f{} + 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
  const v8f t = x * 1.44269504088896341f + magic;
  const v8f n = t - magic;
  const v8i ni = reinterpret_cast<v8i>(t) - reinterpret_cast<v8i>(magic);
  const v8f r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v8f p = v8f{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const v8f e = p * r * r + r + 1.0f;
  return e * reinterpret_cast<v8f>((ni + 127) << 23);
}

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
  const long chunk = std::max(1L, 32768 / std::max(1L, n));
  const long tasks = (outer + chunk - 1) / chunk;
  parallel_for(static_cast<int>(tasks), [&](int t) {
    for (long o = t * chunk; o < std::min(outer, (t + 1) * chunk); o++) {
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
        for (long i = 0; i < n; i++) po[i] = apply<Op>(pa[i], pb[i]);
      } else if (sa == 1) {
        const float vb = pb[0];
        for (long i = 0; i < n; i++) po[i] = apply<Op>(pa[i], vb);
      } else if (sb == 1) {
        const float va = pa[0];
        for (long i = 0; i < n; i++) po[i] = apply<Op>(va, pb[i]);
      } else {
        for (long i = 0; i < n; i++) po[i] = apply<Op>(pa[i * sa], pb[i * sb]);
      }
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

}  // namespace st
