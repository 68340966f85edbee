// Fused scaled dot-product attention, out = softmax(q·kᵀ·scale)·v per (batch·head), forward and
// backward, a block of query rows at a time so the [Tq, Tk] scores never exist whole (the
// memory-efficient attention of Rabe & Staats 2021 / FlashAttention, Dao et al. 2022).
//
// Forward, per task (bh, block of kRows query rows): S = Q_blk·Kᵀ over the full key range (one
// block's rows of scores, kRows·Tk floats, stay in L2), then x = S·scale, m = rowmax(x),
// p = exp(x − m), l = Σp (softmax with the row max subtracted, as torch and TF.js do, not an
// online softmax), out = (p·v)/l, lse = m + log l. The backward recomputes the probabilities
// from lse, tile by tile (kBackRows × kCols, no full rows needed):
//   P = exp(S·scale − lse);  dv += Pᵀ·dout;  dP = dout·vᵀ;  dS = P ⊙ (dP − D)·scale,
//   D = rowsum(dout ⊙ out);  dq = dS·k;  dk += dSᵀ·q.
// The score GEMMs (inner dimension d) use gemm.h's MR×NR micro-kernel on k/v packed once per
// call; the products with a d-wide result (p·v, dS·k, Pᵀ·dout, dSᵀ·q) use a kernel here whose
// register tile is R rows × the whole padded head width. dk/dv are accumulated per task (one
// task = one bh and a run of row blocks, so no two threads share an accumulator) and summed at
// the end. Accumulation is float32 with FMA, except the softmax row sum and D (double).
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "bf16.h"
#include "denormals.h"
#include "gemm.h"
#include "napi_args.h"
#include "pool.h"
#include "vexp.h"
#include "variant.h"

ST_BEGIN_NAMESPACE
namespace {

#if defined(__AVX512F__)
constexpr int kRegs = 32;
#else
constexpr int kRegs = 16;
#endif
constexpr long kRows = 2 * MR;      // query rows per forward block
constexpr long kBackRows = 8 * MR;  // query rows per backward block
constexpr long kSumRows = 2 * MR;   // rows of each dk/dv partial sum added to the accumulators
constexpr long kCols = 4 * NR;      // key columns per backward tile
// Backward blocks of 96 rows ran the head-width-40 backward (4096 tokens) 10–15% faster than 24
// (each k/v panel serves more row tiles; the P and dS tiles, 2 × 48 KB, stay in L2). dk and dv
// still take their partial sums 24 rows at a time, and the tasks split the rows at multiples of 24,
// so every sum runs in the order it did with 24-row blocks: fp32 results are bit-for-bit the same.
constexpr int kMaxNV = 8;       // vectors per register-tile row (wider heads run in column chunks)

typedef int via __attribute__((vector_size(VW * 4)));

inline vfa vexp(vfa x) { return st::vexp<vfa, via>(x); }
inline vfa load(const float* p) {
  vfa v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vfa v) { std::memcpy(p, &v, sizeof v); }

// Inputs [batch, T, heads·d] (heads interleaved in the channels, as the Linear layers give them):
// head b = (batch, h) starts at (b / heads)·T·ld + (b % heads)·d, rows ld = heads·d apart.
struct Shape {
  long bh, heads, tq, tk, d;
  long ld;      // row stride of q, k, v, out, dout (heads·d)
  long nv, dp;  // vectors per padded row, padded head width (nv·VW)
  long tkp;     // Tk padded to NR
  Shape(long batch, long heads_, long tq_, long tk_, long d_)
      : bh(batch * heads_), heads(heads_), tq(tq_), tk(tk_), d(d_), ld(heads_ * d_), nv((d_ + VW - 1) / VW),
        dp(nv * VW), tkp((tk_ + NR - 1) / NR * NR) {}
  long qoff(long b) const { return (b / heads) * tq * ld + (b % heads) * d; }
  long koff(long b) const { return (b / heads) * tk * ld + (b % heads) * d; }
};

// x[0..n) rounded to bf16 in place (bf16 mode: the float32 kernels then multiply bf16 values,
// whose products are exact in float32).
void round_bf16(float* x, long n) {
  for (long i = 0; i < n; i++) x[i] = bf16_round(x[i]);
}

// X [T, d] (rows ld apart) → NR-column panels for micro_kernel's B (element (c, j) = X[j][c]), zero past T.
void pack_panels(const float* x, long ld, long t, long d, long tp, float* dst, bool bf16) {
  for (long j0 = 0; j0 < tp; j0 += NR) {
    float* p = dst + j0 * d;
    for (long c = 0; c < d; c++)
      for (long j = 0; j < NR; j++) p[c * NR + j] = j0 + j < t ? x[(j0 + j) * ld + c] : 0.0f;
  }
  if (bf16) round_bf16(dst, tp * d);
}
// X [rows, d] (rows ld apart) → MR-row panels for micro_kernel's A (element (r, c) at c·MR + r), zero past rows.
void pack_rows(const float* x, long ld, long rows, long d, float* dst, bool bf16) {
  for (long r0 = 0; r0 < rows; r0 += MR) {
    float* p = dst + r0 * d;
    for (long c = 0; c < d; c++)
      for (long r = 0; r < MR; r++) p[c * MR + r] = r0 + r < rows ? x[(r0 + r) * ld + c] : 0.0f;
  }
  if (bf16) round_bf16(dst, (rows + MR - 1) / MR * MR * d);
}
// X [T, d] (rows ld apart) → rows padded to dp floats (zeros past d).
void pad_rows(const float* x, long ld, long t, long d, long dp, float* dst, bool bf16) {
  for (long j = 0; j < t; j++) {
    std::memcpy(dst + j * dp, x + j * ld, sizeof(float) * d);
    std::memset(dst + j * dp + d, 0, sizeof(float) * (dp - d));
  }
  if (bf16) round_bf16(dst, t * dp);
}

// out[r][0..NV·VW) (=|+=) Σ_k a(r, k)·b[k·ldb ..], a(r, k) = a[r·ars + k·aks], r < R.
// Rows past `rows` are computed from row 0 and not stored.
template <int R, int NV>
void wide_kernel(long K, const float* a, long ars, long aks, const float* b, long ldb, float* out, long ldo,
                 int rows, bool acc) {
  vfa c[R][NV];
#pragma GCC unroll 64
  for (int r = 0; r < R; r++)
#pragma GCC unroll 16
    for (int v = 0; v < NV; v++) c[r][v] = vfa{};
  const float* ar[R];
  for (int r = 0; r < R; r++) ar[r] = a + (r < rows ? r : 0) * ars;
  for (long k = 0; k < K; k++) {
    vfa bv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; v++) bv[v] = *reinterpret_cast<const vfu*>(b + k * ldb + v * VW);
#pragma GCC unroll 64
    for (int r = 0; r < R; r++) {
      const float av = ar[r][k * aks];
#pragma GCC unroll 16
      for (int v = 0; v < NV; v++) c[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < rows; r++)
    for (int v = 0; v < NV; v++) {
      vfu* p = reinterpret_cast<vfu*>(out + r * ldo + v * VW);
      *p = acc ? *p + c[r][v] : c[r][v];
    }
}

template <int NV>
constexpr int rows_for() {
  return std::max(1, std::min(8, (kRegs - NV - 2) / NV));
}

template <int NV>
void wide_rows(long M, long K, const float* a, long ars, long aks, const float* b, long ldb, float* out, long ldo,
               bool acc) {
  constexpr int R = rows_for<NV>();
  for (long m = 0; m < M; m += R)
    wide_kernel<R, NV>(K, a + m * ars, ars, aks, b, ldb, out + m * ldo, ldo, static_cast<int>(std::min<long>(R, M - m)), acc);
}

// out[M, nv·VW] (=|+=) A[M, K]·B[K, nv·VW], A(m, k) = a[m·ars + k·aks], B rows ldb apart.
void wide_gemm(long M, long K, long nv, const float* a, long ars, long aks, const float* b, long ldb, float* out,
               long ldo, bool acc) {
  for (long v0 = 0; v0 < nv; v0 += kMaxNV) {
    const long n = std::min<long>(kMaxNV, nv - v0);
    const float* bb = b + v0 * VW;
    float* oo = out + v0 * VW;
    switch (n) {
      case 1: wide_rows<1>(M, K, a, ars, aks, bb, ldb, oo, ldo, acc); break;
      case 2: wide_rows<2>(M, K, a, ars, aks, bb, ldb, oo, ldo, acc); break;
      case 3: wide_rows<3>(M, K, a, ars, aks, bb, ldb, oo, ldo, acc); break;
      case 4: wide_rows<4>(M, K, a, ars, aks, bb, ldb, oo, ldo, acc); break;
      case 5: wide_rows<5>(M, K, a, ars, aks, bb, ldb, oo, ldo, acc); break;
      case 6: wide_rows<6>(M, K, a, ars, aks, bb, ldb, oo, ldo, acc); break;
      case 7: wide_rows<7>(M, K, a, ars, aks, bb, ldb, oo, ldo, acc); break;
      default: wide_rows<8>(M, K, a, ars, aks, bb, ldb, oo, ldo, acc); break;
    }
  }
}

// S[rows (padded to MR), cols] = A panels · B panels over kc = d, S rows ld apart.
void score_tile(const float* apanels, long rows, const float* bpanels, long cols, long d, float* s, long ld) {
  for (long j = 0; j < cols; j += NR) {
    const float* b = bpanels + j * d;
    for (long r = 0; r < rows; r += MR) {
      float* ptr[MR];
      for (int i = 0; i < MR; i++) ptr[i] = s + (r + i) * ld + j;
      micro_kernel(d, apanels + r * d, b, NR, ptr, false);
    }
  }
}

// A 64-byte aligned float buffer (micro_kernel loads packed B panels with aligned vector loads).
struct Buf {
  float* p = nullptr;
  size_t n = 0;
  Buf() = default;
  explicit Buf(size_t count, bool zero = false) { grow(count, zero); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { std::free(p); }
  void grow(size_t count, bool zero = false) {
    if (count > n) {
      std::free(p);
      n = count;
      p = static_cast<float*>(std::aligned_alloc(64, (count * sizeof(float) + 63) / 64 * 64));
    }
    if (zero) std::memset(p, 0, count * sizeof(float));
  }
  float* data() const { return p; }
};

// Per-thread scratch that grows and is kept between calls (no page faults per call).
Buf& tls(int which, size_t n) {
  thread_local Buf bufs[3];
  bufs[which].grow(n);
  return bufs[which];
}

inline float row_max(const float* x, long n) {
  vfa m8 = vfa{} - INFINITY;
  long j = 0;
  for (; j + VW <= n; j += VW) {
    const vfa v = load(x + j);
    m8 = v > m8 ? v : m8;
  }
  float m = -INFINITY;
  for (int i = 0; i < VW; i++) m = std::max(m, m8[i]);
  for (; j < n; j++) m = std::max(m, x[j]);
  return m;
}

// One forward task: rows [r0, r0 + rows) of one head (q, out at the head's start, lse at its row 0).
void forward_block(const Shape& s, float scale, const float* q, const float* kp, const float* vpad, float* out,
                   float* lse, long r0, long rows, bool bf16) {
  const long rowsP = (rows + MR - 1) / MR * MR;
  float* qa = tls(0, rowsP * s.d).data();
  float* sc = tls(1, rowsP * s.tkp).data();
  float* o = tls(2, rows * s.dp).data();
  pack_rows(q + r0 * s.ld, s.ld, rows, s.d, qa, bf16);
  score_tile(qa, rows, kp, s.tkp, s.d, sc, s.tkp);
  float inv[kRows];
  for (long r = 0; r < rows; r++) {
    float* x = sc + r * s.tkp;
    const float m = row_max(x, s.tk) * scale;  // = max(x·scale): rounding is monotonic, scale > 0
    double sum = 0;
    long j = 0;
    while (j + VW <= s.tk) {  // float lanes over ≤ 16 vectors, then into the double sum
      vfa part = vfa{};
      for (const long end = std::min(s.tk, j + 16 * VW); j + VW <= end; j += VW) {
        const vfa p = vexp(load(x + j) * scale - m);
        store(x + j, p);
        part += p;
      }
      for (int i = 0; i < VW; i++) sum += part[i];
    }
    for (; j < s.tk; j++) {
      x[j] = std::exp(x[j] * scale - m);
      sum += x[j];
    }
    inv[r] = static_cast<float>(1.0 / sum);
    lse[r0 + r] = m + static_cast<float>(std::log(sum));
    if (bf16) round_bf16(x, s.tk);  // the probabilities as p·v's operand (the sum above stays exact)
  }
  wide_gemm(rows, s.tk, s.nv, sc, s.tkp, 1, vpad, s.dp, o, s.dp, false);
  for (long r = 0; r < rows; r++)
    for (long c = 0; c < s.d; c++) out[(r0 + r) * s.ld + c] = o[r * s.dp + c] * inv[r];
}

long blocks_of(long n) { return (n + kRows - 1) / kRows; }

}  // namespace

void attention_forward(const float* q, const float* k, const float* v, float* out, float* lse, long batch, long heads,
                       long tq, long tk, long d, float scale, bool bf16) {
  const Shape s(batch, heads, tq, tk, d);
  const long bh = s.bh;
  Buf kp(bh * s.tkp * d), vpad(bh * tk * s.dp);
  parallel_for(static_cast<int>(bh), [&](int b) {
    pack_panels(k + s.koff(b), s.ld, tk, d, s.tkp, kp.data() + b * s.tkp * d, bf16);
    pad_rows(v + s.koff(b), s.ld, tk, d, s.dp, vpad.data() + b * tk * s.dp, bf16);
  });
  const long nb = blocks_of(tq);
  parallel_for(static_cast<int>(bh * nb), [&](int task) {
    const long b = task / nb, r0 = (task % nb) * kRows;
    forward_block(s, scale, q + s.qoff(b), kp.data() + b * s.tkp * d, vpad.data() + b * tk * s.dp, out + s.qoff(b),
                  lse + b * tq, r0, std::min(kRows, tq - r0), bf16);
  });
}

namespace {

struct Backward {
  Shape s;
  float scale;
  const float *q, *lse, *dout, *out;
  const float *kp, *vp, *kpad;  // per bh: k panels, v panels, k rows padded
  float *dq, *dkAcc, *dvAcc;    // dkAcc/dvAcc: this task's [Tk, dp] accumulators
  bool bf16;

  // Rows [r0, r0 + rows) of one head (pointers already offset to the head).
  void block(long r0, long rows) const {
    const long rowsP = (rows + MR - 1) / MR * MR, dp = s.dp;
    float* qa = tls(0, rowsP * s.d).data();
    float* da = tls(1, rowsP * s.d).data();
    float* tiles = tls(2, 2 * rowsP * kCols + 3 * rowsP * dp).data();
    float *pt = tiles, *dst = pt + rowsP * kCols, *qr = dst + rowsP * kCols, *dor = qr + rowsP * dp,
          *dqa = dor + rowsP * dp;
    const float *qb = q + r0 * s.ld, *db = dout + r0 * s.ld, *ob = out + r0 * s.ld;
    pack_rows(qb, s.ld, rows, s.d, qa, bf16);
    pack_rows(db, s.ld, rows, s.d, da, bf16);
    pad_rows(qb, s.ld, rows, s.d, dp, qr, bf16);
    pad_rows(db, s.ld, rows, s.d, dp, dor, bf16);
    float rowD[kBackRows], rowL[kBackRows];
    for (long r = 0; r < rows; r++) {
      double acc = 0;
      for (long c = 0; c < s.d; c++) acc += db[r * s.ld + c] * ob[r * s.ld + c];
      rowD[r] = static_cast<float>(acc);
      rowL[r] = lse[r0 + r];
    }
    for (long j0 = 0; j0 < s.tk; j0 += kCols) {
      const long cols = std::min(kCols, s.tk - j0), colsP = (cols + NR - 1) / NR * NR;
      score_tile(qa, rows, kp + j0 * s.d, colsP, s.d, pt, kCols);
      score_tile(da, rows, vp + j0 * s.d, colsP, s.d, dst, kCols);
      for (long r = 0; r < rows; r++) {
        float *p = pt + r * kCols, *ds = dst + r * kCols;
        long j = 0;
        for (; j + VW <= cols; j += VW) {
          const vfa pv = vexp(load(p + j) * scale - rowL[r]);
          store(p + j, pv);
          store(ds + j, pv * (load(ds + j) - rowD[r]) * scale);
        }
        for (; j < cols; j++) {
          p[j] = std::exp(p[j] * scale - rowL[r]);
          ds[j] = p[j] * (ds[j] - rowD[r]) * scale;
        }
        if (bf16) round_bf16(p, cols), round_bf16(ds, cols);  // operands of the three products below
      }
      // dq += dS·k;  dv += Pᵀ·dout;  dk += dSᵀ·q
      wide_gemm(rows, cols, s.nv, dst, kCols, 1, kpad + j0 * dp, dp, dqa, dp, j0 > 0);
      for (long g = 0; g < rows; g += kSumRows) {
        const long n = std::min(kSumRows, rows - g);
        wide_gemm(cols, n, s.nv, pt + g * kCols, 1, kCols, dor + g * dp, dp, dvAcc + j0 * dp, dp, true);
        wide_gemm(cols, n, s.nv, dst + g * kCols, 1, kCols, qr + g * dp, dp, dkAcc + j0 * dp, dp, true);
      }
    }
    for (long r = 0; r < rows; r++) std::memcpy(dq + (r0 + r) * s.ld, dqa + r * dp, sizeof(float) * s.d);
  }
};

}  // namespace

void attention_backward(const float* q, const float* k, const float* v, const float* out, const float* dout,
                        const float* lse, float* dq, float* dk, float* dv, long batch, long heads, long tq, long tk,
                        long d, float scale, bool bf16) {
  const Shape s(batch, heads, tq, tk, d);
  const long bh = s.bh;
  Buf kp(bh * s.tkp * d), vp(bh * s.tkp * d), kpad(bh * tk * s.dp);
  parallel_for(static_cast<int>(bh), [&](int b) {
    pack_panels(k + s.koff(b), s.ld, tk, d, s.tkp, kp.data() + b * s.tkp * d, bf16);
    pack_panels(v + s.koff(b), s.ld, tk, d, s.tkp, vp.data() + b * s.tkp * d, bf16);
    pad_rows(k + s.koff(b), s.ld, tk, d, s.dp, kpad.data() + b * tk * s.dp, bf16);
  });
  // Each head's row blocks split into `chunks` runs: ≥ 4 tasks per thread, so that a thread the OS
  // deschedules (a shared machine) does not hold the others up for long.
  // (in units of kSumRows rows; at most 64 MB of dk/dv partials: with few heads and many threads, fewer chunks)
  const long nb = (tq + kSumRows - 1) / kSumRows;
  const long perAcc = 2 * tk * s.dp, cap = std::max(1L, (16L << 20) / std::max(1L, bh * perAcc));
  const long chunks = std::max(1L, std::min({nb, cap, (4L * pool_threads() + bh - 1) / bh}));
  const long perChunk = (nb + chunks - 1) / chunks * kSumRows;
  Buf acc(static_cast<size_t>(bh * chunks * 2 * tk * s.dp), true);
  parallel_for(static_cast<int>(bh * chunks), [&](int task) {
    const long b = task / chunks, c = task % chunks;
    float* dkAcc = acc.data() + task * 2 * tk * s.dp;
    const Backward w{s, scale, q + s.qoff(b), lse + b * tq, dout + s.qoff(b), out + s.qoff(b),
                     kp.data() + b * s.tkp * d, vp.data() + b * s.tkp * d, kpad.data() + b * tk * s.dp,
                     dq + s.qoff(b), dkAcc, dkAcc + tk * s.dp, bf16};
    const long end = std::min(tq, (c + 1) * perChunk);
    for (long r0 = c * perChunk; r0 < end; r0 += kBackRows) w.block(r0, std::min(kBackRows, end - r0));
  });
  // dk, dv = Σ over the head's chunks
  parallel_for(static_cast<int>(bh), [&](int b) {
    for (long j = 0; j < tk; j++)
      for (long c = 0; c < d; c++) {
        float sk = 0, sv = 0;
        for (long ch = 0; ch < chunks; ch++) {
          const float* base = acc.data() + (b * chunks + ch) * 2 * tk * s.dp;
          sk += base[j * s.dp + c];
          sv += base[tk * s.dp + j * s.dp + c];
        }
        dk[s.koff(b) + j * s.ld + c] = sk;
        dv[s.koff(b) + j * s.ld + c] = sv;
      }
  });
}

namespace {

struct Dims {
  long batch, heads, tq, tk, d;
  float scale;
  long bh() const { return batch * heads; }
};

// Arguments i..i+5: batch, heads, tq, tk, d, scale; false (and thrown) when invalid.
bool dims(NapiArgs& a, size_t i, Dims* out) {
  const char* const names[5] = {"batch", "heads", "tq", "tk", "d"};
  long x[5];
  for (int j = 0; j < 5; j++) x[j] = a.integer(i + j, names[j]);
  const double scale = a.number(i + 5, "scale");
  if (!a.ok()) return false;
  *out = Dims{x[0], x[1], x[2], x[3], x[4], static_cast<float>(scale)};
  if (out->batch < 0 || out->heads < 1 || out->tq < 0 || out->tk < 1 || out->d < 1 || !(out->scale > 0))
    a.range_error("needs batch, tq ≥ 0, heads, tk, d ≥ 1 and scale > 0");
  return a.ok();
}

// The first n arguments, each a Float32Array with at least need[i] elements.
bool arrays(NapiArgs& a, int n, const size_t* need, const char* const* names, float** p) {
  for (int i = 0; i < n; i++) p[i] = a.f32(i, need[i], names[i]);
  return a.ok();
}

// (q, k, v, out, lse, batch, heads, tq, tk, d, scale, bf16?)
napi_value Forward(napi_env env, napi_callback_info info) {
  const DenormalsAsZero daz;
  NapiArgs a(env, info, "attentionForward", 11);
  Dims m;
  const bool bf16 = a.optional_boolean(11, "bf16");
  if (!dims(a, 5, &m)) return nullptr;
  const size_t nq = m.bh() * m.tq * m.d, nk = m.bh() * m.tk * m.d;
  const size_t need[5] = {nq, nk, nk, nq, static_cast<size_t>(m.bh() * m.tq)};
  const char* const names[5] = {"q", "k", "v", "out", "lse"};
  float* p[5];
  if (arrays(a, 5, need, names, p) && nq > 0)
    attention_forward(p[0], p[1], p[2], p[3], p[4], m.batch, m.heads, m.tq, m.tk, m.d, m.scale, bf16);
  return nullptr;
}

// (q, k, v, out, dout, lse, dq, dk, dv, batch, heads, tq, tk, d, scale, bf16?)
napi_value Backward(napi_env env, napi_callback_info info) {
  const DenormalsAsZero daz;
  NapiArgs a(env, info, "attentionBackward", 15);
  Dims m;
  const bool bf16 = a.optional_boolean(15, "bf16");
  if (!dims(a, 9, &m)) return nullptr;
  const size_t nq = m.bh() * m.tq * m.d, nk = m.bh() * m.tk * m.d;
  const size_t need[9] = {nq, nk, nk, nq, nq, static_cast<size_t>(m.bh() * m.tq), nq, nk, nk};
  const char* const names[9] = {"q", "k", "v", "out", "dout", "lse", "dq", "dk", "dv"};
  float* p[9];
  if (!arrays(a, 9, need, names, p)) return nullptr;
  if (nq == 0) {
    std::fill(p[7], p[7] + nk, 0.0f);
    std::fill(p[8], p[8] + nk, 0.0f);
    return nullptr;
  }
  attention_backward(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], m.batch, m.heads, m.tq, m.tk, m.d, m.scale, bf16);
  return nullptr;
}

}  // namespace

void define_attention(napi_env env, napi_value exports) {
  const napi_property_descriptor props[] = {
      {"attentionForward", nullptr, Forward, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"attentionBackward", nullptr, Backward, nullptr, nullptr, nullptr, napi_default, nullptr},
  };
  napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props);
}

ST_END_NAMESPACE  // st::ST_ISA
