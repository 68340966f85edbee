// float16 <-> float32 for frozen weights kept in half precision (trainers/nets/half-params.ts):
// a 2 GB F16 UNet is upcast one layer at a time on every forward, so this runs over ~860M
// values per pass and must be memory-bound. F16C (VCVTPH2PS / VCVTPS2PH, 8 lanes) in the avx2
// and avx512 variants (variant.h: compiled with -mf16c, picked at load by dispatch.cc), else a
// portable bit-level version with the same results, bit for bit (half_test in
// test/half-params.test.ts checks both against a JS reference on all 65536 halves).
#include "half.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "napi_args.h"
#include "pool.h"
#include "variant.h"

ST_BEGIN_NAMESPACE
namespace {

// Elements per pool task: big enough to amortise the hand-out, small enough to balance.
constexpr long kChunk = 1L << 16;

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The portable conversions (IEEE 754 binary16; the same results as F16C).
inline float h2f(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
  if (exp == 0x1f) return float_of(sign | 0x7f800000 | (frac << 13) | (frac ? 0x400000 : 0));
  if (exp != 0) return float_of(sign | ((exp + 112) << 23) | (frac << 13));
  // zero or subnormal: frac · 2^-24, exact in float32
  const float mag = static_cast<float>(frac) * 5.9604644775390625e-8f;
  return float_of(sign | bits_of(mag));
}

inline uint16_t f2h(float f, long& overflow) {
  const uint32_t x = bits_of(f);
  const uint32_t sign = (x >> 16) & 0x8000;
  const int e32 = (x >> 23) & 0xff;
  const uint32_t mant = x & 0x7fffff;
  if (e32 == 255) return static_cast<uint16_t>(sign | 0x7c00 | (mant ? 0x200 | (mant >> 13) : 0));
  const int e = e32 - 127 + 15;
  if (e >= 31) {
    overflow++;
    return static_cast<uint16_t>(sign | 0x7c00);
  }
  uint32_t h;
  if (e <= 0) {
    if (e < -10) return static_cast<uint16_t>(sign);  // below half the smallest subnormal
    const uint32_t m = mant | 0x800000;
    const int shift = 14 - e;  // 14..24
    h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (h & 1))) h++;
  } else {
    h = (static_cast<uint32_t>(e) << 10) | (mant >> 13);
    const uint32_t rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;  // a carry into the exponent is right
    if ((h & 0x7fff) == 0x7c00) overflow++;               // rounded up to Inf
  }
  return static_cast<uint16_t>(sign | h);
}

void h2f_range(const uint16_t* src, float* dst, long n) {
  long i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; i++) dst[i] = h2f(src[i]);
}

long f2h_range(const float* src, uint16_t* dst, long n) {
  long overflow = 0, i = 0;
#if defined(__F16C__)
  const __m256 absMask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 maxHalf = _mm256_set1_ps(65520.0f);  // 65504 + half an ulp: rounds (ties to even) to Inf
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(src + i);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    // finite and too big: |x| ≥ 65520 and not NaN/Inf (ordered compares are false for NaN)
    const __m256 ax = _mm256_and_ps(x, absMask);
    const int big = _mm256_movemask_ps(_mm256_cmp_ps(ax, maxHalf, _CMP_GE_OQ));
    const int fin = _mm256_movemask_ps(_mm256_cmp_ps(ax, _mm256_set1_ps(INFINITY), _CMP_LT_OQ));
    overflow += __builtin_popcount(big & fin);
  }
#endif
  for (; i < n; i++) dst[i] = f2h(src[i], overflow);
  return overflow;
}

}  // namespace

void half_to_float(const uint16_t* src, float* dst, long n) {
  const long tasks = (n + kChunk - 1) / kChunk;
  parallel_for(static_cast<int>(tasks), [&](int t) {
    const long a = t * kChunk;
    h2f_range(src + a, dst + a, std::min(n, a + kChunk) - a);
  });
}

long float_to_half(const float* src, uint16_t* dst, long n) {
  const long tasks = (n + kChunk - 1) / kChunk;
  std::vector<long> overflow(static_cast<size_t>(tasks), 0);
  parallel_for(static_cast<int>(tasks), [&](int t) {
    const long a = t * kChunk;
    overflow[t] = f2h_range(src + a, dst + a, std::min(n, a + kChunk) - a);
  });
  long total = 0;
  for (long o : overflow) total += o;
  return total;
}

napi_value HalfToFloat(napi_env env, napi_callback_info info) {
  NapiArgs a(env, info, "halfToFloat", 2);
  const size_t n = a.length(0);
  const uint16_t* src = a.u16(0, 0, "src");
  float* dst = a.f32(1, n, "dst");
  if (a.ok() && n > 0) half_to_float(src, dst, static_cast<long>(n));
  return nullptr;
}

napi_value FloatToHalf(napi_env env, napi_callback_info info) {
  NapiArgs a(env, info, "floatToHalf", 2);
  const size_t n = a.length(0);
  const float* src = a.f32(0, 0, "src");
  uint16_t* dst = a.u16(1, n, "dst");
  if (!a.ok()) return nullptr;
  const long overflow = n > 0 ? float_to_half(src, dst, static_cast<long>(n)) : 0;
  napi_value out;
  napi_create_double(env, static_cast<double>(overflow), &out);
  return out;
}

const char* half_isa() {
#if defined(__F16C__)
  return "f16c";
#else
  return "portable";
#endif
}

napi_value HalfIsa(napi_env env, napi_callback_info) {
  napi_value out;
  napi_create_string_utf8(env, half_isa(), NAPI_AUTO_LENGTH, &out);
  return out;
}

ST_END_NAMESPACE  // st::ST_ISA
