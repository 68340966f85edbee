// Blocked single-precision GEMM, C[M,N] (=|+=) A[M,K]·B[K,N], in the BLIS loop order:
// B is packed into KC×NR panels (kept in L1 across a column of micro-tiles), A into MC×KC
// blocks of MR-row panels (L2), and an MR×NR register-tile micro-kernel does the FMAs.
// A and B are "packers" so that convolutions gather their im2col rows straight into the
// packed panels (no im2col matrix); C is addressed through a row-pointer functor so that
// strided output rows (the stride phases of a transposed conv) need no scatter pass.
// Accumulation is float32 with FMA, in k order within each KC block.
#pragma once
#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "pool.h"
#include "variant.h"

ST_BEGIN_NAMESPACE

#if defined(__AVX512F__)
constexpr int VW = 16, MR = 12;
#elif defined(__AVX__)
constexpr int VW = 8, MR = 6;
#else
constexpr int VW = 4, MR = 6;
#endif
constexpr int NR = 2 * VW;
constexpr long KC = 256, MC = MR * 8;
constexpr long PREFETCH_ROWS = 16;  // how far ahead the micro-kernel fetches the rows of an in-place B

typedef float vfa __attribute__((vector_size(VW * 4)));                 // aligned (packed B)
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));     // unaligned (C rows)

// Per-thread packing buffers, allocated once per thread and reused by every kernel call: the A
// block, and one B panel (the edge panel when B is read in place).
struct Scratch {
  float* a = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * MC * KC));
  float* aFew = nullptr;  // all rows of a call with few (≤ DIRECT_B_MAX_M), allocated on first use
  float* b = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * KC * NR));
};
inline Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// MR×NR tile: rows[r][0..NR) (=|+=) Σ_k A[k*MR+r]·B[k*ldb..]: B is a packed panel (ldb = NR) or,
// read in place, NR columns of a row-major matrix (ldb = its row stride; see gemm_batched).
// With Copy, B's k rows are also stored to `copy` as a packed panel (copy[k*NR..]) for the next tiles.
template <bool Copy = false>
static inline void micro_kernel(long kc, const float* __restrict a, const float* __restrict b, long ldb,
                                float* const* rows, bool acc, float* __restrict copy = nullptr) {
  vfa c0[MR], c1[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; r++) c0[r] = c1[r] = vfa{};
  for (long k = 0; k < kc; k++) {
    if (ldb != NR) {  // rows of an in-place B are a page apart: no hardware prefetcher follows them
      __builtin_prefetch(b + (k + PREFETCH_ROWS) * ldb);
      __builtin_prefetch(b + (k + PREFETCH_ROWS) * ldb + NR - 1);
    }
    const vfa b0 = *reinterpret_cast<const vfu*>(b + k * ldb);
    const vfa b1 = *reinterpret_cast<const vfu*>(b + k * ldb + VW);
    if (Copy) {
      *reinterpret_cast<vfa*>(copy + k * NR) = b0;
      *reinterpret_cast<vfa*>(copy + k * NR + VW) = b1;
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; r++) {
      const float av = a[k * MR + r];
      c0[r] += av * b0;
      c1[r] += av * b1;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; r++) {
    vfu* p = reinterpret_cast<vfu*>(rows[r]);
    if (acc) {
      p[0] += c0[r];
      p[1] += c1[r];
    } else {
      p[0] = c0[r];
      p[1] = c1[r];
    }
  }
}

// Edge tile (fewer than MR rows or NR columns): compute into a local tile, then merge.
static inline void edge_kernel(long kc, const float* a, const float* b, long ldb, float* const* rows,
                               int nrows, int ncols, bool acc) {
  alignas(64) float tile[MR * NR];
  float* trows[MR];
  for (int r = 0; r < MR; r++) trows[r] = tile + r * NR;
  micro_kernel(kc, a, b, ldb, trows, false);
  for (int r = 0; r < nrows; r++)
    for (int j = 0; j < ncols; j++) rows[r][j] = acc ? rows[r][j] + tile[r * NR + j] : tile[r * NR + j];
}

// Packed B of every problem. Layout per problem: for each KC block pc, the NR-column panels of
// that block, panel jr at pc*Npad + jr*kc.
inline float* packed_b_buffer(size_t floats) { return static_cast<float*>(kept_buffer(0, floats * sizeof(float))); }
inline float* packed_a_buffer(size_t floats) { return static_cast<float*>(kept_buffer(2, floats * sizeof(float))); }

// How many N chunks the row blocks of `count` problems are split into: enough tasks (4 per
// thread) to keep every thread busy when the row blocks alone are too few.
inline long n_chunks(long count, long mblocks, long npanels, int threads) {
  long nchunks = 1;
  while (count * mblocks * nchunks < 4L * threads && (npanels / (nchunks * 2)) >= 1) nchunks *= 2;
  return nchunks;
}

// B laid out as a row-major block: B[k][n] = p[k*ld + n] (gemm_batched's `direct`).
struct DirectB {
  const float* p;
  long ld;
};

// Below this many rows of C, B is read in place where its layout allows (a row-major [K, N]
// block: the packer's `direct`), and otherwise packed panel by panel as the tasks use it, not in a
// pass over all of B before the multiply. Packing reads and writes all of B once per call, which
// is the whole cost when M is small: at the 8×8 and 4×4 levels of a UNet a 3×3 conv has 64 or 16
// output pixels against 14.7M weights, and the pack pass took more time than the multiply-adds.
// With many rows the contiguous packed panel pays for itself (B is reread for every row block).
constexpr long DIRECT_B_MAX_M = 4 * MC;
// With few rows split into column chunks, every chunk's task needs all of A: packed once for all
// of them (a conv's A is its im2col gather, 9× its input) while it is at most this many floats.
// Packing it per task cost 10–30% of the 8×8 and 16×16 levels' convs and the 256-row matmuls.
constexpr long SHARED_A_MAX = 16L << 20;

// Multi-threaded GEMM over `count` problems of equal shape; make(i) returns problem i's
// packers and row functor as a struct with members a, b, c.
// PA::pack(dst, m, rows, k0, kc): dst[k*MR + r] = A[m+r][k0+k], zero for r >= rows.
// PB::pack(dst, n, cols, k0, kc): dst[k*NR + j] = B[k0+k][n+j], zero for j >= cols.
// PB::direct(): B as {p, ld} with B[k][n] = p[k*ld + n], or {nullptr, 0} when it is not laid out so.
// CR(m) -> float*: start of row m of C.
// B is packed once (in parallel) and shared, or, when M is small, read in place or packed a panel
// at a time by the task that uses it; then tasks of MC
// rows × an N chunk each pack their own A block and run the micro-kernels. Tasks are many and
// small, so a thread that the OS deschedules does not hold the others up.
template <class Make>
void gemm_batched(long count, long M, long N, long K, bool accumulate, const Make& make) {
  if (count <= 0 || M <= 0 || N <= 0 || K <= 0) return;
  const long npanels = (N + NR - 1) / NR, Npad = npanels * NR, kblocks = (K + KC - 1) / KC;
  // few rows: B in place where it is row-major, else each panel packed by the task that uses it
  // (into an L1-sized buffer, so B is read once and never written back whole)
  const bool few = M <= DIRECT_B_MAX_M, direct = few && make(0).b.direct().p != nullptr;
  float* bp = few ? nullptr : packed_b_buffer(static_cast<size_t>(count) * K * Npad);
  if (!few) {
    const long bTasks = count * kblocks;
    parallel_for(static_cast<int>(bTasks), [&](int task) {
      const long i = task / kblocks, pc = (task % kblocks) * KC, kc = std::min(KC, K - pc);
      const auto prob = make(i);
      float* dst = bp + i * K * Npad + pc * Npad;
      for (long jr = 0; jr < N; jr += NR) prob.b.pack(dst + jr * kc, jr, static_cast<int>(std::min<long>(NR, N - jr)), pc, kc);
    });
  }
  const int threads = pool_threads();
  // with few rows a task takes all of them (its A block stays in L2), so each B panel is read once
  const long mcTask = few ? M : MC, mblocks = (M + mcTask - 1) / mcTask;
  const long nchunks = n_chunks(count, mblocks, npanels, threads);
  const long panelsPerChunk = (npanels + nchunks - 1) / nchunks;
  const long perProblem = mblocks * nchunks;
  // few rows in several column chunks: A packed once, shared (problem i's block pc at i·Mp·K + pc·Mp)
  const long Mp = (M + MR - 1) / MR * MR;
  float* const sharedA = few && nchunks > 1 && count * Mp * K <= SHARED_A_MAX ? packed_a_buffer(count * Mp * K) : nullptr;
  if (sharedA) {
    const long groups = (Mp / MR + 7) / 8;  // tasks of up to 8 row panels
    parallel_for(static_cast<int>(count * kblocks * groups), [&](int task) {
      const long i = task / (kblocks * groups), pc = (task / groups % kblocks) * KC, kc = std::min(KC, K - pc);
      const auto prob = make(i);
      float* dst = sharedA + i * Mp * K + pc * Mp;
      for (long ir = task % groups * 8 * MR; ir < std::min(M, (task % groups + 1) * 8 * MR); ir += MR)
        prob.a.pack(dst + ir * kc, ir, static_cast<int>(std::min<long>(MR, M - ir)), pc, kc);
    });
  }
  parallel_for(static_cast<int>(count * perProblem), [&](int task) {
    const long i = task / perProblem, rest = task % perProblem;
    const long ic = (rest / nchunks) * mcTask, mc = std::min(mcTask, M - ic);
    const long j0 = (rest % nchunks) * panelsPerChunk * NR, j1 = std::min(N, j0 + panelsPerChunk * NR);
    if (j0 >= j1) return;
    const auto prob = make(i);
    const auto db = prob.b.direct();
    Scratch& s = scratch();
    if (few && !sharedA && !s.aFew) s.aFew = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * DIRECT_B_MAX_M * KC));
    float* const own = few ? s.aFew : s.a;
    const float* bi = few ? nullptr : bp + i * K * Npad;
    for (long pc = 0; pc < K; pc += KC) {
      const long kc = std::min(KC, K - pc);
      const bool acc = accumulate || pc > 0;
      const float* ap = sharedA ? sharedA + i * Mp * K + pc * Mp : own;
      if (!sharedA)
        for (long ir = 0; ir < mc; ir += MR)
          prob.a.pack(own + ir * kc, ic + ir, static_cast<int>(std::min<long>(MR, mc - ir)), pc, kc);
      for (long jr = j0; jr < j1; jr += NR) {
        const int ncols = static_cast<int>(std::min<long>(NR, j1 - jr));
        const float* b;
        long ldb = NR;
        if (!few) {
          b = bi + pc * Npad + jr * kc;
        } else if (direct && ncols == NR) {
          b = db.p + pc * db.ld + jr, ldb = db.ld;
        } else {  // packed here (a partial last panel too, so no column past N is read)
          prob.b.pack(s.b, jr, ncols, pc, kc);
          b = s.b;
        }
        for (long ir = 0; ir < mc; ir += MR) {
          const int nrows = static_cast<int>(std::min<long>(MR, mc - ir));
          float* rows[MR];
          for (int r = 0; r < MR; r++) rows[r] = r < nrows ? prob.c(ic + ir + r) + jr : nullptr;
          if (nrows == MR && ncols == NR) {
            // an in-place B panel: the first tile reads it (prefetched) and packs it as it goes, so
            // the other tiles read it from L1 (its rows, ld apart, alias in L1 and stay in L2 only)
            if (ldb != NR && mc > MR) {
              micro_kernel<true>(kc, ap + ir * kc, b, ldb, rows, acc, s.b);
              b = s.b, ldb = NR;
            } else {
              micro_kernel(kc, ap + ir * kc, b, ldb, rows, acc);
            }
          } else {
            edge_kernel(kc, ap + ir * kc, b, ldb, rows, nrows, ncols, acc);
          }
        }
      }
    }
  });
}

#if defined(__AVX512F__)
// dst[k*W + g + r] = src[r*rs + k] for r < n (≤ 16), k < 16: one 16×16 transpose in registers
// (unpack, shuffle, two 128-bit lane shuffles) instead of 256 scalar loads and stores — the
// transposing pack of a row-major A (or a transposed B) was ~15% of a linear layer's time.
template <int W>
inline void transpose16(const float* src, long rs, int n, float* dst, int g) {
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; i++) r[i] = i < n ? _mm512_loadu_ps(src + i * rs) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; i++) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // r[4i + j] holds, in each 128-bit lane L, rows 4i..4i+3 of column 4L + j
#pragma GCC unroll 4
  for (int j = 0; j < 4; j++) {
    t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);       // lanes: (0,2) of rows 0-3, (0,2) of 4-7
    t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xdd);   // (1,3), (1,3)
    t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
  }
  constexpr int w = W - 16 < 0 ? W : 16;  // lanes stored per column (W = 12: rows 0-11)
  const __mmask16 m = static_cast<__mmask16>((1u << w) - 1);
#pragma GCC unroll 4
  for (int j = 0; j < 4; j++) {
    // column c = 4L + j for L = 0..3: rows 0-15 from t[j] / t[4 + j] and t[8 + j] / t[12 + j]
    const __m512 c0 = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88), c2 = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
    const __m512 c1 = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88), c3 = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xdd);
    _mm512_mask_storeu_ps(dst + (0 + j) * W + g, m, c0);
    _mm512_mask_storeu_ps(dst + (4 + j) * W + g, m, c1);
    _mm512_mask_storeu_ps(dst + (8 + j) * W + g, m, c2);
    _mm512_mask_storeu_ps(dst + (12 + j) * W + g, m, c3);
  }
}
#endif

// Plain strided operand: element (i, k) at p[i*rs + k*cs]; used as A (i = row) or B (i = col).
struct Strided {
  const float* p;
  long rs, cs;
  // A panel: dst[k*MR + r] = p[(m+r)*rs + (k0+k)*cs]
  void pack(float* dst, long m, int rows, long k0, long kc) const { pack_t<MR>(dst, m, rows, k0, kc); }
  template <int W>
  void pack_t(float* dst, long m, int rows, long k0, long kc) const {
    if (rows < W) std::memset(dst, 0, sizeof(float) * W * kc);
    if (cs == 1) {
#if defined(__AVX512F__)
      if (W == 12 || W % 16 == 0) {
        long k = 0;
        for (; k + 16 <= kc; k += 16)
          for (int g = 0; g < rows; g += 16) transpose16<W>(p + (m + g) * rs + k0 + k, rs, std::min(16, rows - g), dst + k * W, g);
        for (int r = 0; r < rows; r++) {
          const float* src = p + (m + r) * rs + k0;
          for (long kk = k; kk < kc; kk++) dst[kk * W + r] = src[kk];
        }
        return;
      }
#endif
      for (int r = 0; r < rows; r++) {
        const float* src = p + (m + r) * rs + k0;
        for (long k = 0; k < kc; k++) dst[k * W + r] = src[k];
      }
    } else if (rs == 1) {
      for (long k = 0; k < kc; k++) {
        const float* src = p + (k0 + k) * cs + m;
        for (int r = 0; r < rows; r++) dst[k * W + r] = src[r];
      }
    } else {
      for (long k = 0; k < kc; k++)
        for (int r = 0; r < rows; r++) dst[k * W + r] = p[(m + r) * rs + (k0 + k) * cs];
    }
  }
};
// The same operand used as B: element (k, n) at p[n*rs + k*cs] (rs = column stride).
struct StridedB {
  Strided s;
  void pack(float* dst, long n, int cols, long k0, long kc) const { s.pack_t<NR>(dst, n, cols, k0, kc); }
  DirectB direct() const { return s.rs == 1 ? DirectB{s.p, s.cs} : DirectB{nullptr, 0}; }
};

ST_END_NAMESPACE  // st::ST_ISA
