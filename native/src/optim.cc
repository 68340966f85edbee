// Fused optimizer kernels over the CPU backend's Float32Arrays (trainers/optim/native.ts):
// AdamW, 8-bit blockwise AdamW, the EMA update, the finite/max-abs check and a sum of squares.
// One threaded pass each instead of the TF-ops path's many full-size passes.
//
// Results equal the TF-ops path's bit for bit: every operation is the same float32 operation
// in the same order (the stock kernels compute a·b, a+b, a/b, √a in float64 and round to
// float32, which gives the correctly rounded float32 result, as the float32 instructions do).
// So contraction into FMA must be off: it would round once instead of twice.
#pragma GCC optimize("fp-contract=off")
#include "optim.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "napi_args.h"
#include "pool.h"
#include "variant.h"

ST_BEGIN_NAMESPACE
namespace {

// Elements per pool task: big enough to amortise the hand-out, small enough to balance.
constexpr long kChunk = 1L << 16;

// AdamW's float32 constants (trainers/optim/native.ts adamwConstants).
struct AdamK {
  float decay, b1, omb1, b2, omb2, bc2s, eps, step;
};

// trainers/optim/adamw.ts update() element by element, in its op order. restrict: no output
// overlaps an input, so the loop vectorises (vsqrtps/vdivps round correctly too).
void adamw_range(const float* __restrict__ p, const float* __restrict__ g, const float* __restrict__ m,
                 const float* __restrict__ v, float* __restrict__ po, float* __restrict__ mo, float* __restrict__ vo, long n,
                 const AdamK& k) {
  const float decay = k.decay, b1 = k.b1, omb1 = k.omb1, b2 = k.b2, omb2 = k.omb2, bc2s = k.bc2s, eps = k.eps, step = k.step;
  for (long i = 0; i < n; i++) {
    const float gi = g[i];
    const float mi = m[i] * b1 + gi * omb1;
    const float vi = v[i] * b2 + (gi * gi) * omb2;
    const float denom = std::sqrt(vi) / bc2s + eps;
    po[i] = p[i] * decay + (mi / denom) * step;
    mo[i] = mi;
    vo[i] = vi;
  }
}

// A code book and its midpoints shifted by one (tab[c] = mids[c − 1], tab[0] unused), so the
// binary search of adamw8bit.ts nearestCode reads tab[cand] for cand in 1..255.
#if defined(__AVX512F__)
struct Levels;
#endif
struct Book {
  const float* code;
  float tab[256];
#if defined(__AVX512F__)
  const Levels* levels;
#endif
};

// adamw8bit.ts nearestCode: idx = 0; for s = 128…1: cand = idx + s; idx = x > mids[cand−1] ? cand : idx.
inline int nearest(const Book& b, float x) {
  int idx = 0;
  for (int s = 128; s >= 1; s >>= 1) idx = x > b.tab[idx + s] ? idx + s : idx;
  return idx;
}

#if defined(__AVX512F__)
// The thresholds the search reads at each of its 8 levels: level L (s = 128 >> L) compares with
// tab[idx + s] where idx is a multiple of 2s, so with lv[L][j] = tab[2s·j + s], j = idx >> (8 − L).
// 1…16 entries fit one register (vpermps), 32 two (vpermt2ps), 64 and 128 are 2 and 4 such pairs
// blended on the index bits: 16 lanes of the search with shuffles instead of memory gathers.
struct Levels {
  alignas(64) float t[8][128];
};

void build_levels(const Book& b, Levels& lv) {
  std::memset(&lv, 0, sizeof lv);
  for (int L = 0; L < 8; L++) {
    const int s = 128 >> L;
    for (int j = 0; j < (1 << L); j++) lv.t[L][j] = b.tab[2 * s * j + s];
  }
}

inline __m512 pair(const float* t, __m512i j) {
  return _mm512_permutex2var_ps(_mm512_load_ps(t), j, _mm512_load_ps(t + 16));
}

long quantize_avx512(const Levels& lv, const float* x, float div, long n, uint8_t* out) {
  const __m512 d = _mm512_set1_ps(div);
  const __m512i bit5 = _mm512_set1_epi32(32), bit6 = _mm512_set1_epi32(64);
  long i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_div_ps(_mm512_loadu_ps(x + i), d);
    __m512i idx = _mm512_setzero_si512();
    for (int L = 0; L < 8; L++) {
      const __m512i j = _mm512_srli_epi32(idx, 8 - L);
      __m512 mid;
      if (L <= 4) {
        mid = _mm512_permutexvar_ps(j, _mm512_load_ps(lv.t[L]));
      } else if (L == 5) {
        mid = pair(lv.t[5], j);
      } else if (L == 6) {
        mid = _mm512_mask_blend_ps(_mm512_test_epi32_mask(j, bit5), pair(lv.t[6], j), pair(lv.t[6] + 32, j));
      } else {
        const __mmask16 b5 = _mm512_test_epi32_mask(j, bit5);
        const __m512 lo = _mm512_mask_blend_ps(b5, pair(lv.t[7], j), pair(lv.t[7] + 32, j));
        const __m512 hi = _mm512_mask_blend_ps(b5, pair(lv.t[7] + 64, j), pair(lv.t[7] + 96, j));
        mid = _mm512_mask_blend_ps(_mm512_test_epi32_mask(j, bit6), lo, hi);
      }
      const __mmask16 gt = _mm512_cmp_ps_mask(v, mid, _CMP_GT_OQ);
      idx = _mm512_mask_add_epi32(idx, gt, idx, _mm512_set1_epi32(128 >> L));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(idx));
  }
  return i;
}
#endif

// Codes of x[0..n) / div into out (the same search: 16 lanes with AVX-512 shuffles, 8 with AVX2 gathers).
void quantize_range(const Book& b, const float* x, float div, long n, uint8_t* out) {
  long i = 0;
#if defined(__AVX512F__)
  i = quantize_avx512(*b.levels, x, div, n, out);
#elif defined(__AVX2__)
  const __m256 d = _mm256_set1_ps(div);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_div_ps(_mm256_loadu_ps(x + i), d);
    __m256i idx = _mm256_setzero_si256();
    for (int s = 128; s >= 1; s >>= 1) {
      const __m256i cand = _mm256_add_epi32(idx, _mm256_set1_epi32(s));
      const __m256 mid = _mm256_i32gather_ps(b.tab, cand, 4);
      idx = _mm256_blendv_epi8(idx, cand, _mm256_castps_si256(_mm256_cmp_ps(v, mid, _CMP_GT_OQ)));
    }
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), idx);
    for (int j = 0; j < 8; j++) out[i + j] = static_cast<uint8_t>(lanes[j]);
  }
#endif
  for (; i < n; i++) out[i] = static_cast<uint8_t>(nearest(b, x[i] / div));
}

// max |x| as the stock Max kernel finds it: NaN as soon as one value is NaN.
float absmax_of(const float* x, long n) {
  float mx = 0;
  bool nan = false;
  for (long i = 0; i < n; i++) {
    const float a = std::fabs(x[i]);
    nan |= a != a;
    mx = a > mx ? a : mx;
  }
  return nan ? NAN : mx;
}

// out[i − a] = code[byte i of the packed codes] · scale for i in [a, e): dequantizeBlockwise.
void dequantize_range(const Book& b, const float* packed, long a, long e, float scale, float* out) {
  long w = a / 3;
  int r = static_cast<int>(a % 3);
  uint32_t word = static_cast<uint32_t>(packed[w]);
  for (long i = a; i < e; i++) {
    out[i - a] = b.code[(word >> (8 * r)) & 255u] * scale;
    if (++r == 3 && i + 1 < e) {
      r = 0;
      word = static_cast<uint32_t>(packed[++w]);
    }
  }
}

struct Quant {
  const float* packed;
  const float* absmax;
  float* absmaxOut;
  std::vector<uint8_t> codes;  // blocks·blockSize rounded up to 3, the padding codes 0
};

// One block of the 8-bit step: dequantise, update, requantise (codes into q.codes).
// tmp: 4 buffers of bs floats (old m, old v, new m, new v).
void adamw8bit_block(long b, long bs, long n, const float* p, const float* g, float* po, Quant& qm, Quant& qv, const Book& sm,
                     const Book& sv, const AdamK& k, float* tmp) {
  const long a = b * bs, e = std::min(n, a + bs);
  float *mOld = tmp, *vOld = tmp + bs, *mTmp = tmp + 2 * bs, *vTmp = tmp + 3 * bs;
  const float mScale = qm.absmax[b], vScale = qv.absmax[b];
  dequantize_range(sm, qm.packed, a, e, mScale, mOld);
  dequantize_range(sv, qv.packed, a, e, vScale, vOld);
  adamw_range(p + a, g + a, mOld, vOld, po + a, mTmp, vTmp, e - a, k);
  // the padding of the last block quantises zeros, as quantizeBlockwise pads with zeros
  std::fill(mTmp + (e - a), mTmp + bs, 0.0f);
  std::fill(vTmp + (e - a), vTmp + bs, 0.0f);
  const float mMax = absmax_of(mTmp, bs), vMax = absmax_of(vTmp, bs);
  qm.absmaxOut[b] = mMax;
  qv.absmaxOut[b] = vMax;
  quantize_range(sm, mTmp, mMax > 0 ? mMax : 1.0f, bs, qm.codes.data() + a);
  quantize_range(sv, vTmp, vMax > 0 ? vMax : 1.0f, bs, qv.codes.data() + a);
}

void pack_codes(const std::vector<uint8_t>& codes, float* packed, long words) {
  const long tasks = (words + kChunk - 1) / kChunk;
  parallel_for(static_cast<int>(tasks), [&](int t) {
    for (long w = t * kChunk; w < std::min(words, (t + 1) * kChunk); w++) {
      const uint32_t word = codes[3 * w] | (codes[3 * w + 1] << 8) | (codes[3 * w + 2] << 16);
      packed[w] = static_cast<float>(word);
    }
  });
}

AdamK adam_constants(NapiArgs& a, size_t i) {
  AdamK k{};
  const float* c = a.f32_exact(i, 8, "k");
  if (c) std::memcpy(&k, c, sizeof k);
  return k;
}

// adamwStep(p, g, m, v, pOut, mOut, vOut, k)
napi_value AdamwStep(napi_env env, napi_callback_info info) {
  NapiArgs a(env, info, "adamwStep", 8);
  const long n = static_cast<long>(a.length(0));
  const float* p = a.f32(0, 0, "p");
  const float *g = a.f32_exact(1, n, "g"), *m = a.f32_exact(2, n, "m"), *v = a.f32_exact(3, n, "v");
  float *po = a.f32_exact(4, n, "pOut"), *mo = a.f32_exact(5, n, "mOut"), *vo = a.f32_exact(6, n, "vOut");
  const AdamK k = adam_constants(a, 7);
  if (!a.ok()) return nullptr;
  const long tasks = (n + kChunk - 1) / kChunk;
  parallel_for(static_cast<int>(tasks), [&](int t) {
    const long s = t * kChunk, e = std::min(n, s + kChunk);
    adamw_range(p + s, g + s, m + s, v + s, po + s, mo + s, vo + s, e - s, k);
  });
  return nullptr;
}

Book make_book(const float* code, const float* mids) {
  Book b{};
  b.code = code;
  b.tab[0] = -INFINITY;
  std::memcpy(b.tab + 1, mids, 255 * sizeof(float));
  return b;
}

// adamw8bitStep(p, g, mPacked, mAbsmax, vPacked, vAbsmax, pOut, mPackedOut, mAbsmaxOut,
//               vPackedOut, vAbsmaxOut, books, k, blockSize)
napi_value Adamw8bitStep(napi_env env, napi_callback_info info) {
  NapiArgs a(env, info, "adamw8bitStep", 14);
  const long n = static_cast<long>(a.length(0));
  const float* p = a.f32(0, 0, "p");
  const float* g = a.f32_exact(1, n, "g");
  const long bs = a.integer(13, "blockSize");
  if (a.ok() && bs < 1) a.range_error("blockSize: must be ≥ 1");
  const long blocks = a.ok() ? (n + bs - 1) / bs : 0, words = (blocks * bs + 2) / 3;
  Quant qm{a.f32_exact(2, words, "mPacked"), a.f32_exact(3, blocks, "mAbsmax"), a.f32_exact(8, blocks, "mAbsmaxOut"), {}};
  Quant qv{a.f32_exact(4, words, "vPacked"), a.f32_exact(5, blocks, "vAbsmax"), a.f32_exact(10, blocks, "vAbsmaxOut"), {}};
  float *po = a.f32_exact(6, n, "pOut"), *mPackedOut = a.f32_exact(7, words, "mPackedOut"),
        *vPackedOut = a.f32_exact(9, words, "vPackedOut");
  const float* books = a.f32_exact(11, 1022, "books");
  const AdamK k = adam_constants(a, 12);
  if (!a.ok()) return nullptr;
  Book sm = make_book(books, books + 256), sv = make_book(books + 511, books + 767);
#if defined(__AVX512F__)
  Levels smLevels, svLevels;
  build_levels(sm, smLevels);
  build_levels(sv, svLevels);
  sm.levels = &smLevels;
  sv.levels = &svLevels;
#endif
  qm.codes.assign(static_cast<size_t>(words * 3), 0);
  qv.codes.assign(static_cast<size_t>(words * 3), 0);
  const long perTask = std::max(1L, kChunk / bs);
  const long tasks = (blocks + perTask - 1) / perTask;
  parallel_for(static_cast<int>(tasks), [&](int t) {
    std::vector<float> tmp(static_cast<size_t>(4 * bs));
    for (long b = t * perTask; b < std::min(blocks, (t + 1) * perTask); b++)
      adamw8bit_block(b, bs, n, p, g, po, qm, qv, sm, sv, k, tmp.data());
  });
  pack_codes(qm.codes, mPackedOut, words);
  pack_codes(qv.codes, vPackedOut, words);
  return nullptr;
}

// emaUpdate(shadow, param, out, decay): out = float32(d·shadow + (1 − d)·param) in float64,
// trainers/optim/ema.ts's JS expression.
napi_value EmaUpdate(napi_env env, napi_callback_info info) {
  NapiArgs a(env, info, "emaUpdate", 4);
  const long n = static_cast<long>(a.length(0));
  const float* s = a.f32(0, 0, "shadow");
  const float* p = a.f32_exact(1, n, "param");
  float* o = a.f32_exact(2, n, "out");
  const double d = a.number(3, "decay"), c = 1 - d;
  if (!a.ok()) return nullptr;
  const long tasks = (n + kChunk - 1) / kChunk;
  parallel_for(static_cast<int>(tasks), [&](int t) {
    for (long i = t * kChunk; i < std::min(n, (t + 1) * kChunk); i++)
      o[i] = static_cast<float>(d * static_cast<double>(s[i]) + c * static_cast<double>(p[i]));
  });
  return nullptr;
}

// finiteWithin(x, maxAbs): every |x| ≤ float32(maxAbs) and finite (the loop's check compares
// in float32 against the rounded limit; NaN fails every comparison).
napi_value FiniteWithin(napi_env env, napi_callback_info info) {
  NapiArgs a(env, info, "finiteWithin", 2);
  const long n = static_cast<long>(a.length(0));
  const float* x = a.f32(0, 0, "x");
  const float lim = std::min(static_cast<float>(a.number(1, "maxAbs")), FLT_MAX);
  if (!a.ok()) return nullptr;
  const long tasks = (n + kChunk - 1) / kChunk;
  std::vector<char> bad(static_cast<size_t>(tasks), 0);
  parallel_for(static_cast<int>(tasks), [&](int t) {
    int nBad = 0;
    for (long i = t * kChunk; i < std::min(n, (t + 1) * kChunk); i++) nBad += !(std::fabs(x[i]) <= lim);
    bad[t] = nBad != 0;
  });
  bool all = true;
  for (char b : bad) all = all && !b;
  napi_value out;
  napi_get_boolean(env, all, &out);
  return out;
}

// sumSquares(x): Σ x² in float64 (per-task partial sums, added in task order).
napi_value SumSquares(napi_env env, napi_callback_info info) {
  NapiArgs a(env, info, "sumSquares", 1);
  const long n = static_cast<long>(a.length(0));
  const float* x = a.f32(0, 0, "x");
  if (!a.ok()) return nullptr;
  const long tasks = (n + kChunk - 1) / kChunk;
  std::vector<double> part(static_cast<size_t>(tasks), 0.0);
  parallel_for(static_cast<int>(tasks), [&](int t) {
    double s = 0;
    for (long i = t * kChunk; i < std::min(n, (t + 1) * kChunk); i++) s += static_cast<double>(x[i]) * x[i];
    part[t] = s;
  });
  double total = 0;
  for (double s : part) total += s;
  napi_value out;
  napi_create_double(env, total, &out);
  return out;
}


// ---- Adafactor (trainers/optim/adafactor.ts) ----

// Its float32 scalars: β2t, 1 − β2t, eps1, clipThreshold, eps2, lr, β1, 1 − β1, weightDecay.
struct AfK {
  float b2, omb2, eps1, clip, eps2, lr, b1, omb1, wd;
};

// The parameter viewed in torch layout as [d0, d1, R, C] (1-D: [1, 1, N, 1], unfactored) with
// the element strides of those dims in p/g (TF layout: conv filters are [kh,kw,in,out] there).
// Work is handed out as items of whole rows of one (i0, i1) batch, so column partial sums stay per item.
struct AfShape {
  long d0, d1, R, C, s0, s1, sR, sC;
  long B, N, rowsPerItem, itemsPerB, items;
};

AfShape af_shape(const double* dims, const double* strides) {
  AfShape s{};
  s.d0 = static_cast<long>(dims[0]), s.d1 = static_cast<long>(dims[1]), s.R = static_cast<long>(dims[2]), s.C = static_cast<long>(dims[3]);
  s.s0 = static_cast<long>(strides[0]), s.s1 = static_cast<long>(strides[1]), s.sR = static_cast<long>(strides[2]), s.sC = static_cast<long>(strides[3]);
  s.B = s.d0 * s.d1;
  s.N = s.B * s.R * s.C;
  s.rowsPerItem = std::max(1L, std::min(s.R, kChunk / std::max(1L, s.C)));
  s.itemsPerB = (s.R + s.rowsPerItem - 1) / std::max(1L, s.rowsPerItem);
  s.items = s.B * s.itemsPerB;
  return s;
}

// f(item, b, r, off0) for every row r of every item, tasks of ~kChunk elements; off0 = offset of (b, r, 0) in p/g.
template <typename F>
void af_rows(const AfShape& s, F&& f) {
  const long perTask = std::max(1L, kChunk / std::max(1L, s.rowsPerItem * s.C));
  const long tasks = (s.items + perTask - 1) / perTask;
  parallel_for(static_cast<int>(tasks), [&](int t) {
    for (long w = t * perTask; w < std::min(s.items, (t + 1) * perTask); w++) {
      // visit the batch dim with the smaller stride fastest (conv filters: out, stride 1), so
      // neighbouring batches share cache lines; b stays the torch-layout batch index
      const long q = w / s.itemsPerB, j = w % s.itemsPerB;
      const long i0 = s.s0 < s.s1 ? q % s.d0 : q / s.d1, i1 = s.s0 < s.s1 ? q / s.d0 : q % s.d1;
      const long b = i0 * s.d1 + i1, it = b * s.itemsPerB + j;
      const long r0 = j * s.rowsPerItem, r1 = std::min(s.R, r0 + s.rowsPerItem);
      const long base = i0 * s.s0 + i1 * s.s1;
      for (long r = r0; r < r1; r++) f(t, it, b, r, base + r * s.sR);
    }
  });
}

inline float rsqrt_like_tf(float x) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(x)));  // the stock Rsqrt: 1 / Math.sqrt(x)
}

// Contiguous rows (sC = 1, factored): the same float32 operations, written so they vectorise;
// the float64 sums keep 4 partial sums (float64 sums of float32 values: the order does not
// change the float32 result beyond the last double bit).
double af_row_means(const float* __restrict__ g, long C, float eps1, float fC, float fR, double* __restrict__ cp) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  long c = 0;
  for (; c + 4 <= C; c += 4) {
    float u[4];
    for (int j = 0; j < 4; j++) u[j] = g[c + j] * g[c + j] + eps1;
    s0 += static_cast<double>(u[0] / fC), s1 += static_cast<double>(u[1] / fC);
    s2 += static_cast<double>(u[2] / fC), s3 += static_cast<double>(u[3] / fC);
    for (int j = 0; j < 4; j++) cp[c + j] += static_cast<double>(u[j] / fR);
  }
  for (; c < C; c++) {
    const float u = g[c] * g[c] + eps1;
    s0 += static_cast<double>(u / fC);
    cp[c] += static_cast<double>(u / fR);
  }
  return (s0 + s1) + (s2 + s3);
}

// Σ float((u·u) / N) and Σ float((p·p) / N) over one contiguous row, u = (rF·cF[c])·g[c].
void af_row_sums(const float* __restrict__ g, const float* __restrict__ p, const float* __restrict__ cF, float rF, long C, float fN,
                 bool withP, double& su, double& sp) {
  double a[4] = {0, 0, 0, 0}, b[4] = {0, 0, 0, 0};
  long c = 0;
  for (; c + 4 <= C; c += 4)
    for (int j = 0; j < 4; j++) {
      const float u = (rF * cF[c + j]) * g[c + j];
      a[j] += static_cast<double>((u * u) / fN);
    }
  for (; c < C; c++) {
    const float u = (rF * cF[c]) * g[c];
    a[0] += static_cast<double>((u * u) / fN);
  }
  if (withP) {
    for (c = 0; c + 4 <= C; c += 4)
      for (int j = 0; j < 4; j++) b[j] += static_cast<double>((p[c + j] * p[c + j]) / fN);
    for (; c < C; c++) b[0] += static_cast<double>((p[c] * p[c]) / fN);
  }
  su += (a[0] + a[1]) + (a[2] + a[3]);
  sp += (b[0] + b[1]) + (b[2] + b[3]);
}

// The final update of one contiguous row without first moment.
void af_row_apply(const float* __restrict__ g, const float* __restrict__ p, const float* __restrict__ cF, float* __restrict__ po, float rF,
                  long C, float div, float scale, bool wd, float wdv) {
  if (wd) {
    for (long c = 0; c < C; c++) po[c] = (p[c] - (p[c] * scale) * wdv) - ((rF * cF[c]) * g[c] / div) * scale;
  } else {
    for (long c = 0; c < C; c++) po[c] = p[c] - ((rF * cF[c]) * g[c] / div) * scale;
  }
}

// Pass 1 (factored): mean_{-1}(u) per row and per-item partial Σ float(u / R) per column.
void af_means(const AfShape& s, const float* g, const AfK& k, float* rowMean, std::vector<double>& colPart) {
  const float fC = static_cast<float>(s.C), fR = static_cast<float>(s.R);
  af_rows(s, [&](int, long it, long b, long r, long off) {
    double* cp = colPart.data() + it * s.C;
    if (s.sC == 1) {
      rowMean[b * s.R + r] = static_cast<float>(af_row_means(g + off, s.C, k.eps1, fC, fR, cp));
      return;
    }
    double sum = 0;
    for (long c = 0; c < s.C; c++) {
      const float gi = g[off + c * s.sC];
      const float u = gi * gi + k.eps1;
      sum += static_cast<double>(u / fC);
      cp[c] += static_cast<double>(u / fR);
    }
    rowMean[b * s.R + r] = static_cast<float>(sum);
  });
}


// adafactorStep(p, g, row, col, m, pOut, rowOut, colOut, mOut, dims, strides, k, flags):
// flags bit 0 factored, 1 scaleParameter, 2 first moment (m/mOut, torch layout), 3 weight decay.
// Unfactored: row/rowOut are the full V (col/colOut empty).
napi_value AdafactorStep(napi_env env, napi_callback_info info) {
  NapiArgs a(env, info, "adafactorStep", 13);
  const long n = static_cast<long>(a.length(0));
  const float* p = a.f32(0, 0, "p");
  const float* g = a.f32_exact(1, n, "g");
  const double* dims = a.typed<double>(9, napi_float64_array, 4, "dims", true);
  const double* strides = a.typed<double>(10, napi_float64_array, 4, "strides", true);
  const float* kc = a.f32_exact(11, 9, "k");
  const int flags = static_cast<int>(a.integer(12, "flags"));
  if (!a.ok()) return nullptr;
  const AfShape s = af_shape(dims, strides);
  if (s.N != n) {
    a.range_error("dims: do not match the parameter size");
    return nullptr;
  }
  const bool factored = flags & 1, scaleParam = flags & 2, hasM = flags & 4, hasWd = flags & 8;
  const long rowN = s.B * s.R, colN = factored ? s.B * s.C : 0, mN = hasM ? n : 0;
  const float* row = a.f32_exact(2, rowN, "row");
  const float* col = a.f32_exact(3, colN, "col");
  const float* m = a.f32_exact(4, mN, "m");
  float *po = a.f32_exact(5, n, "pOut"), *rowOut = a.f32_exact(6, rowN, "rowOut"), *colOut = a.f32_exact(7, colN, "colOut"),
        *mo = a.f32_exact(8, mN, "mOut");
  if (!a.ok()) return nullptr;
  AfK k{};
  std::memcpy(&k, kc, sizeof k);

  // factors: rF per row, cF per column (factored); unfactored: V updated in the element pass
  std::vector<float> rF, cF;
  if (factored) {
    std::vector<float> rowMean(static_cast<size_t>(rowN));
    std::vector<double> colPart(static_cast<size_t>(s.items * s.C), 0.0);
    af_means(s, g, k, rowMean.data(), colPart);
    const float fR = static_cast<float>(s.R);
    rF.resize(static_cast<size_t>(rowN));
    cF.resize(static_cast<size_t>(colN));
    const long perTask = std::max(1L, kChunk / (s.R + s.C * s.itemsPerB));
    parallel_for(static_cast<int>((s.B + perTask - 1) / perTask), [&](int t) {
    for (long b = t * perTask; b < std::min(s.B, (t + 1) * perTask); b++) {
      for (long c = 0; c < s.C; c++) {
        double sum = 0;
        for (long j = 0; j < s.itemsPerB; j++) sum += colPart[(b * s.itemsPerB + j) * s.C + c];
        const float cn = col[b * s.C + c] * k.b2 + static_cast<float>(sum) * k.omb2;
        colOut[b * s.C + c] = cn;
      }
      double rsum = 0;
      for (long r = 0; r < s.R; r++) {
        const float rn = row[b * s.R + r] * k.b2 + rowMean[b * s.R + r] * k.omb2;
        rowOut[b * s.R + r] = rn;
        rsum += static_cast<double>(rn / fR);
      }
      const float rmean = static_cast<float>(rsum);
      for (long r = 0; r < s.R; r++) rF[b * s.R + r] = rowOut[b * s.R + r] / rmean;
    }
    // the reciprocal square roots as flat loops over the task's range (they vectorise)
    const long b0 = t * perTask, b1 = std::min(s.B, (t + 1) * perTask);
    for (long i = b0 * s.C; i < b1 * s.C; i++) cF[i] = rsqrt_like_tf(colOut[i]);
    for (long i = b0 * s.R; i < b1 * s.R; i++) rF[i] = rsqrt_like_tf(rF[i]);
    });
  }
  const float fN = static_cast<float>(n);
  const long tasks = (s.items + std::max(1L, kChunk / std::max(1L, s.rowsPerItem * s.C)) - 1) / std::max(1L, kChunk / std::max(1L, s.rowsPerItem * s.C));
  std::vector<double> sumU(static_cast<size_t>(tasks), 0.0), sumP(static_cast<size_t>(tasks), 0.0);
  // the unscaled update of element (b, r, c): (rF·cF)·g, or rsqrt(V)·g
  auto upd = [&](long b, long r, long c, float gi) {
    return factored ? (rF[b * s.R + r] * cF[b * s.C + c]) * gi : rsqrt_like_tf(rowOut[b * s.R + r]) * gi;
  };
  af_rows(s, [&](int t, long, long b, long r, long off) {
    if (!factored) {  // V = V·β2t + u·(1 − β2t), C = 1
      const float gi = g[off];
      rowOut[b * s.R + r] = row[b * s.R + r] * k.b2 + (gi * gi + k.eps1) * k.omb2;
    }
    double su = 0, sp = 0;
    if (factored && s.sC == 1) {
      af_row_sums(g + off, p + off, cF.data() + b * s.C, rF[b * s.R + r], s.C, fN, scaleParam, su, sp);
      sumU[t] += su;
      sumP[t] += sp;
      return;
    }
    for (long c = 0; c < s.C; c++) {
      const long o = off + c * s.sC;
      const float u = upd(b, r, c, g[o]);
      su += static_cast<double>((u * u) / fN);
      if (scaleParam) sp += static_cast<double>((p[o] * p[o]) / fN);
    }
    sumU[t] += su;
    sumP[t] += sp;
  });
  double su = 0, sp = 0;
  for (long t = 0; t < tasks; t++) su += sumU[t], sp += sumP[t];
  const float rmsU = std::sqrt(static_cast<float>(su)), q = rmsU / k.clip;
  const float div = q != q ? q : std::max(q, 1.0f);
  float scale = k.lr;
  if (scaleParam) {
    const float rp = std::sqrt(static_cast<float>(sp));
    scale = (rp != rp ? rp : std::max(rp, k.eps2)) * k.lr;
  }
  af_rows(s, [&](int, long, long b, long r, long off) {
    if (factored && s.sC == 1 && !hasM) {
      af_row_apply(g + off, p + off, cF.data() + b * s.C, po + off, rF[b * s.R + r], s.C, div, scale, hasWd, k.wd);
      return;
    }
    for (long c = 0; c < s.C; c++) {
      const long o = off + c * s.sC, ti = (b * s.R + r) * s.C + c;
      float u = (upd(b, r, c, g[o]) / div) * scale;
      if (hasM) {
        u = m[ti] * k.b1 + u * k.omb1;
        mo[ti] = u;
      }
      float next = p[o];
      if (hasWd) next = next - (p[o] * scale) * k.wd;
      po[o] = next - u;
    }
  });
  return nullptr;
}

}  // namespace

void define_optim(napi_env env, napi_value exports) {
  const napi_property_descriptor props[] = {
      {"adamwStep", nullptr, AdamwStep, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"adamw8bitStep", nullptr, Adamw8bitStep, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"emaUpdate", nullptr, EmaUpdate, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"finiteWithin", nullptr, FiniteWithin, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"sumSquares", nullptr, SumSquares, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"adafactorStep", nullptr, AdafactorStep, nullptr, nullptr, nullptr, napi_default, nullptr},
  };
  napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props);
}

ST_END_NAMESPACE  // st::ST_ISA
