// bfloat16 × bfloat16 → float32 GEMM (mixed precision): the same BLIS loop order and the same
// packers as gemm.h, but each packed panel is rounded to bf16 (round to nearest even, as
// PyTorch's `.bfloat16()`), and the micro-kernel multiplies bf16 pairs with float32
// accumulation. The micro-kernel is picked at run time (bf16.cc):
//   amx          AMX tiles, tdpbf16ps (Sapphire Rapids and later; needs the kernel's
//                ARCH_REQ_XCOMP_PERM permission for the tile data)
//   avx512-bf16  vdpbf16ps on zmm registers (Cooper Lake, Sapphire Rapids, Zen 4) — chosen
//                only where it runs at least at the float32 FMA rate (a few ms of probe at first
//                use): some cores issue it at half that rate, and there the next kernel is faster
//   avx512-fma   float32 FMA on zmm registers on the upconverted values (A panels widened when
//                packed, B panels kept in bf16 and widened in registers), any AVX-512 CPU
//   portable     the same float32 arithmetic in plain C++, any CPU
// The three lower kernels give the same sums bit for bit: each bf16 product is exact in float32,
// and each pair is added odd element first, as the SDM's VDPBF16PS pseudo-code does.
// SIDETRAIN_BF16_ISA=avx512-bf16|avx512-fma|portable caps the choice (tests and benches force a
// lower path; a cap names the kernel to use when the CPU has it).
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "gemm.h"
#include "variant.h"

ST_BEGIN_NAMESPACE

// bf16 panels: B is [kp][NRB][2] (k pairs interleaved per column — the VNNI layout both
// vdpbf16ps and an AMX B tile read), A is either [kp][mr][2] (register kernels) or [mr][kpad]
// row-major (AMX A tiles).
constexpr int NRB = 32;
constexpr long KCB = 512;

struct Bf16Kernel {
  const char* name;
  int mr;           // rows of one A panel (a multiple of MR is not required)
  int kAlign;       // k of a block padded with zeros to a multiple of this
  bool aRowMajor;   // A panel layout [mr][kpad] instead of [kp][mr][2]
  bool aFloat;      // A panel holds the bf16 values widened to float32, [kpad][mr] as gemm.h packs
  int mcPanels;     // A panels per MC block
  // rows[r][0..ncols) (=|+=) Σ_k A[r][k]·B[k][j] over kpad (a multiple of kAlign) k
  void (*tile)(long kpad, const uint16_t* a, const uint16_t* b, float* const* rows, int nrows, int ncols, bool acc);
};

// The kernel in use (first call detects the CPU and reads SIDETRAIN_BF16_ISA).
const Bf16Kernel& bf16_kernel();
// Caps the kernel at `name` ("amx", "avx512-bf16", "avx512-fma", "portable"; "" = the best
// present) and returns the one now in use.
const Bf16Kernel& bf16_select(const char* name);

// One core's GFLOP/s on a register-resident loop of `kind` (peak.cc), -1 when absent.
double peak_probe(const char* kind, double seconds);
// Whether this CPU (and OS) runs `isa` ("amx", "avx512-bf16", "avx512f"), bf16.cc.
bool cpu_has(const char* isa);
// vdpbf16ps GFLOP/s over float32 zmm FMA GFLOP/s on this core (peak.cc; a few ms), 0 without them.
double bf16_dot_fma_ratio();

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}
// f rounded to bf16 and widened back to float32.
inline float bf16_round(float f) {
  const uint32_t u = static_cast<uint32_t>(float_to_bf16(f)) << 16;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

// Packed bf16 B of every problem, kept between calls like packed_b_buffer (gemm.h).
inline uint16_t* packed_b16_buffer(size_t halves) { return static_cast<uint16_t*>(kept_buffer(1, halves * sizeof(uint16_t))); }

namespace bf16_detail {

struct Scratch16 {
  float* f = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * (KCB + 1) * NR));  // one float32 panel (+1 k row)
  uint16_t* a = static_cast<uint16_t*>(std::aligned_alloc(64, sizeof(uint16_t) * 32 * 8 * (KCB + 32)));
  uint16_t* b = static_cast<uint16_t*>(std::aligned_alloc(64, sizeof(uint16_t) * NRB * (KCB + 32)));  // one B panel (few rows)
};
inline Scratch16& scratch16() {
  thread_local Scratch16 s;
  return s;
}

// Two float32 values as one bf16 pair (lo = even k, hi = odd k); written as a plain loop body
// so that the packing loops vectorise.
inline uint32_t bf16_pair(float lo, float hi) {
  return static_cast<uint32_t>(float_to_bf16(lo)) | (static_cast<uint32_t>(float_to_bf16(hi)) << 16);
}

// One bf16 A panel of kern.mr rows from the float32 packer (MR rows at a time), zero beyond
// `rows` and beyond kc up to kpad.
template <class PA>
void pack_a16(const Bf16Kernel& kern, const PA& pa, uint16_t* dst, long m, int rows, long k0, long kc, long kpad) {
  float* f = scratch16().f;
  const int mr = kern.mr;
  if (kern.aFloat && mr == MR) {
    // gemm.h's own panel layout: pack straight into it, then round in place (one pass, vectorised)
    float* d = reinterpret_cast<float*>(dst);
    pa.pack(d, m, rows, k0, kc);
    if (kc < kpad) std::memset(d + kc * MR, 0, sizeof(float) * MR * (kpad - kc));
    for (long i = 0; i < kc * MR; i++) d[i] = bf16_round(d[i]);
    return;
  }
  if (rows < mr || kc < kpad) std::memset(dst, 0, (kern.aFloat ? sizeof(float) : sizeof(uint16_t)) * mr * kpad);
  for (int r0 = 0; r0 < rows; r0 += MR) {
    const int n = std::min(MR, rows - r0);
    pa.pack(f, m + r0, n, k0, kc);
    if (kc & 1) std::memset(f + kc * MR, 0, sizeof(float) * MR);  // the odd k's partner
    if (kern.aFloat) {
      float* d = reinterpret_cast<float*>(dst) + r0;
      for (long k = 0; k < kc; k++)
        for (int r = 0; r < n; r++) d[k * mr + r] = bf16_round(f[k * MR + r]);
    } else if (kern.aRowMajor) {
      for (int r = 0; r < n; r++) {
        uint16_t* d = dst + static_cast<long>(r0 + r) * kpad;
        for (long k = 0; k < kc; k++) d[k] = float_to_bf16(f[k * MR + r]);
      }
    } else {
      uint32_t* d32 = reinterpret_cast<uint32_t*>(dst) + r0;
      for (long k = 0; k < kc; k += 2) {
        const float* f0 = f + k * MR;
        uint32_t* d = d32 + (k >> 1) * mr;
        for (int r = 0; r < n; r++) d[r] = bf16_pair(f0[r], f0[MR + r]);
      }
    }
  }
}

// One bf16 B panel [kpad/2][NRB][2] from the float32 packer (NR columns at a time).
template <class PB>
void pack_b16(const PB& pb, uint16_t* dst, long n, int cols, long k0, long kc, long kpad) {
  float* f = scratch16().f;
  if (cols < NRB || kc < kpad) std::memset(dst, 0, sizeof(uint16_t) * NRB * kpad);
  uint32_t* d32 = reinterpret_cast<uint32_t*>(dst);
  for (int j0 = 0; j0 < cols; j0 += NR) {
    const int w = std::min(NR, cols - j0);
    pb.pack(f, n + j0, w, k0, kc);
    if (kc & 1) std::memset(f + kc * NR, 0, sizeof(float) * NR);
    for (long k = 0; k < kc; k += 2) {
      const float* f0 = f + k * NR;
      uint32_t* d = d32 + (k >> 1) * NRB + j0;
      for (int j = 0; j < w; j++) d[j] = bf16_pair(f0[j], f0[NR + j]);
    }
  }
}

}  // namespace bf16_detail

// gemm_batched (gemm.h) with bf16 operands and float32 accumulation; same contract.
template <class Make>
void gemm_batched_bf16(long count, long M, long N, long K, bool accumulate, const Make& make) {
  using namespace bf16_detail;
  if (count <= 0 || M <= 0 || N <= 0 || K <= 0) return;
  const Bf16Kernel& kern = bf16_kernel();
  const long al = kern.kAlign, kblocks = (K + KCB - 1) / KCB, aw = kern.aFloat ? 2 : 1;  // A halves per value
  // padded K of every block: KCB is a multiple of every kAlign, so only the last block pads
  const long Kpad = (kblocks - 1) * KCB + ((K - (kblocks - 1) * KCB + al - 1) / al) * al;
  const long npanels = (N + NRB - 1) / NRB, Npad = npanels * NRB;
  // rows of C in one row block: each B panel packed by the one task that uses it (gemm_batched's `few`)
  const long MCB = static_cast<long>(kern.mr) * kern.mcPanels;
  const bool few = M <= MCB;
  uint16_t* bp = few ? nullptr : packed_b16_buffer(static_cast<size_t>(count) * Kpad * Npad);
  if (!few) parallel_for(static_cast<int>(count * kblocks), [&](int task) {
    const long i = task / kblocks, pc = (task % kblocks) * KCB, kc = std::min(KCB, K - pc);
    const long kpad = ((kc + al - 1) / al) * al;
    const auto prob = make(i);
    uint16_t* dst = bp + i * Kpad * Npad + pc * Npad;
    for (long jr = 0; jr < N; jr += NRB)
      pack_b16(prob.b, dst + jr * kpad, jr, static_cast<int>(std::min<long>(NRB, N - jr)), pc, kc, kpad);
  });
  const int threads = pool_threads();
  const long mblocks = (M + MCB - 1) / MCB;
  const long nchunks = n_chunks(count, mblocks, npanels, threads);
  const long panelsPerChunk = (npanels + nchunks - 1) / nchunks, perProblem = mblocks * nchunks;
  parallel_for(static_cast<int>(count * perProblem), [&](int task) {
    const long i = task / perProblem, rest = task % perProblem;
    const long ic = (rest / nchunks) * MCB, mc = std::min(MCB, M - ic);
    const long j0 = (rest % nchunks) * panelsPerChunk * NRB, j1 = std::min(N, j0 + panelsPerChunk * NRB);
    if (j0 >= j1) return;
    const auto prob = make(i);
    uint16_t* ap = scratch16().a;
    const uint16_t* bi = few ? nullptr : bp + i * Kpad * Npad;
    for (long pc = 0; pc < K; pc += KCB) {
      const long kc = std::min(KCB, K - pc), kpad = ((kc + al - 1) / al) * al;
      const bool acc = accumulate || pc > 0;
      for (long ir = 0; ir < mc; ir += kern.mr)
        pack_a16(kern, prob.a, ap + ir * kpad * aw, ic + ir, static_cast<int>(std::min<long>(kern.mr, mc - ir)), pc, kc, kpad);
      for (long jr = j0; jr < j1; jr += NRB) {
        const int ncols = static_cast<int>(std::min<long>(NRB, j1 - jr));
        const uint16_t* b = few ? scratch16().b : bi + pc * Npad + jr * kpad;
        if (few) pack_b16(prob.b, scratch16().b, jr, ncols, pc, kc, kpad);
        for (long ir = 0; ir < mc; ir += kern.mr) {
          const int nrows = static_cast<int>(std::min<long>(kern.mr, mc - ir));
          float* rows[32];
          for (int r = 0; r < nrows; r++) rows[r] = prob.c(ic + ir + r) + jr;
          kern.tile(kpad, ap + ir * kpad * aw, b, rows, nrows, ncols, acc);
        }
      }
    }
  });
}

// gemm_batched or its bf16 twin.
template <class Make>
void gemm_any(bool bf16, long count, long M, long N, long K, bool accumulate, const Make& make) {
  if (bf16)
    gemm_batched_bf16(count, M, N, K, accumulate, make);
  else
    gemm_batched(count, M, N, K, accumulate, make);
}

ST_END_NAMESPACE  // st::ST_ISA
