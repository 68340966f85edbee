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

#include "pool.h"

namespace st {

#if defined(__AVX512F__)
constexpr int VW = 16, MR = 12;
#elif defined(__AVX__)
constexpr int VW = 8, MR = 6;
#else
constexpr int VW = 4, MR = 6;
#endif
constexpr int NR = 2 * VW;
constexpr long KC = 256, MC = MR * 12, NC = NR * 32;

typedef float vfa __attribute__((vector_size(VW * 4)));                 // aligned (packed B)
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));     // unaligned (C rows)

// Per-thread packing buffers, allocated once per thread and reused by every kernel call.
struct Scratch {
  float* a = nullptr;
  float* b = nullptr;
  Scratch() {
    a = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * MC * KC));
    b = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * KC * NC));
  }
};
inline Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// MR×NR tile: rows[r][0..NR) (=|+=) Σ_k A[k*MR+r]·B[k*NR..].
static inline void micro_kernel(long kc, const float* __restrict a, const float* __restrict b,
                                float* const* rows, bool acc) {
  vfa c0[MR], c1[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; r++) c0[r] = c1[r] = vfa{};
  for (long k = 0; k < kc; k++) {
    const vfa b0 = *reinterpret_cast<const vfa*>(b + k * NR);
    const vfa b1 = *reinterpret_cast<const vfa*>(b + k * NR + VW);
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
static inline void edge_kernel(long kc, const float* a, const float* b, float* const* rows,
                               int nrows, int ncols, bool acc) {
  alignas(64) float tile[MR * NR];
  float* trows[MR];
  for (int r = 0; r < MR; r++) trows[r] = tile + r * NR;
  micro_kernel(kc, a, b, trows, false);
  for (int r = 0; r < nrows; r++)
    for (int j = 0; j < ncols; j++) rows[r][j] = acc ? rows[r][j] + tile[r * NR + j] : tile[r * NR + j];
}

// One thread's GEMM on the sub-rectangle [m0,m1)×[n0,n1) of C.
// PA::pack(dst, m, rows, k0, kc): dst[k*MR + r] = A[m+r][k0+k], zero for r >= rows.
// PB::pack(dst, n, cols, k0, kc): dst[k*NR + j] = B[k0+k][n+j], zero for j >= cols.
// CR(m) -> float*: start of row m of C.
template <class PA, class PB, class CR>
void gemm_rect(const PA& A, const PB& B, const CR& crow, long m0, long m1, long n0, long n1,
               long K, bool accumulate) {
  Scratch& s = scratch();
  for (long jc = n0; jc < n1; jc += NC) {
    const long nc = std::min(NC, n1 - jc);
    for (long pc = 0; pc < K; pc += KC) {
      const long kc = std::min(KC, K - pc);
      const bool acc = accumulate || pc > 0;
      for (long jr = 0; jr < nc; jr += NR)
        B.pack(s.b + jr * kc, jc + jr, static_cast<int>(std::min<long>(NR, nc - jr)), pc, kc);
      for (long ic = m0; ic < m1; ic += MC) {
        const long mc = std::min(MC, m1 - ic);
        for (long ir = 0; ir < mc; ir += MR)
          A.pack(s.a + ir * kc, ic + ir, static_cast<int>(std::min<long>(MR, mc - ir)), pc, kc);
        for (long jr = 0; jr < nc; jr += NR) {
          const int ncols = static_cast<int>(std::min<long>(NR, nc - jr));
          for (long ir = 0; ir < mc; ir += MR) {
            const int nrows = static_cast<int>(std::min<long>(MR, mc - ir));
            float* rows[MR];
            for (int r = 0; r < MR; r++) rows[r] = r < nrows ? crow(ic + ir + r) + jc + jr : nullptr;
            if (nrows == MR && ncols == NR)
              micro_kernel(kc, s.a + ir * kc, s.b + jr * kc, rows, acc);
            else
              edge_kernel(kc, s.a + ir * kc, s.b + jr * kc, rows, nrows, ncols, acc);
          }
        }
      }
    }
  }
}

// A piece of work: rows [m0,m1) × columns [n0,n1) of one problem.
struct Piece {
  long m0, m1, n0, n1;
};

// Splits an M×N output into about `parts` pieces: along M while there are enough rows
// (each thread then packs only its own A rows), otherwise along N.
inline int split(long M, long N, int parts, Piece* out) {
  if (parts <= 1 || (M < 2 * MR && N < 2 * NR)) {
    out[0] = {0, M, 0, N};
    return 1;
  }
  int n = 0;
  if (M >= static_cast<long>(parts) * MR * 4 || M >= N) {
    const long step = ((M + parts - 1) / parts + MR - 1) / MR * MR;
    for (long m = 0; m < M; m += step) out[n++] = {m, std::min(M, m + step), 0, N};
  } else {
    const long step = ((N + parts - 1) / parts + NR - 1) / NR * NR;
    for (long j = 0; j < N; j += step) out[n++] = {0, M, j, std::min(N, j + step)};
  }
  return n;
}

// Multi-threaded GEMM over `count` problems of equal shape. make(i) returns the packers and
// row functor of problem i as a tuple-like struct with members a, b, c.
template <class Make>
void gemm_batched(long count, long M, long N, long K, bool accumulate, const Make& make) {
  if (count <= 0 || M <= 0 || N <= 0) return;
  const int threads = pool_threads();
  const int per = count >= threads ? 1 : (threads + static_cast<int>(count) - 1) / static_cast<int>(count);
  Piece pieces[64];
  const int np = split(M, N, std::min(per, 64), pieces);
  parallel_for(static_cast<int>(count * np), [&](int task) {
    const long i = task / np;
    const Piece& p = pieces[task % np];
    const auto prob = make(i);
    gemm_rect(prob.a, prob.b, prob.c, p.m0, p.m1, p.n0, p.n1, K, accumulate);
  });
}

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
};

}  // namespace st
