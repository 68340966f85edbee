// exp on a GCC vector of floats (VF) with its same-width int vector (VI): Cephes expf's range
// reduction and degree-6 polynomial (≈1 ulp on [-87, 88]; inputs are clamped there, so very
// negative inputs give ~1e-38 instead of 0, immaterial next to a softmax row sum ≥ 1).
// Vectorised, unlike libm's expf, which made softmax exp-bound. Shared by elementwise.cc,
// norm.cc and attention.cc.
#pragma once
#include "variant.h"

ST_BEGIN_NAMESPACE

template <class VF, class VI>
inline VF vexp(VF x) {
  const VF hi = VF{} + 88.3762626647949f, lo = VF{} - 87.3365447504f;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const VF magic = VF{} + 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
  const VF t = x * 1.44269504088896341f + magic;
  const VF n = t - magic;
  const VI ni = reinterpret_cast<VI>(t) - reinterpret_cast<VI>(magic);
  const VF r = x - n * 0.693359375f + n * 2.12194440e-4f;
  VF p = VF{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const VF e = p * r * r + r + 1.0f;
  return e * reinterpret_cast<VF>((ni + 127) << 23);
}

ST_END_NAMESPACE  // st::ST_ISA
