// The bf16 micro-kernels of bf16.h and their run-time dispatch. The x86 kernels are compiled
// with per-function target attributes, so the addon builds with any -march (and on non-x86)
// and runs a kernel only after CPUID, XGETBV (and for AMX the kernel's permission) say the
// CPU and OS support it; anything that fails falls back to the next kernel down.
#include "bf16.h"

#include <cstdio>
#include <cstring>
#include <string>

// Only the avx512 variant (variant.h) has the x86 kernels: a lower variant runs because the CPU
// lacks AVX-512 or because SIDETRAIN_CPU_ISA asked for it, and then none of them may run either.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__AVX512F__) && !defined(ST_NO_X86)
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#define ST_X86 1
// AMX intrinsics arrived in GCC 11 and clang 12
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define ST_AMX 1
#endif
#endif

ST_BEGIN_NAMESPACE

namespace {

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Merges a computed tile into C's rows.
inline void merge(const float* tile, int ld, float* const* rows, int nrows, int ncols, bool acc) {
  for (int r = 0; r < nrows; r++) {
    const float* t = tile + r * ld;
    float* c = rows[r];
    if (acc)
      for (int j = 0; j < ncols; j++) c[j] += t[j];
    else
      for (int j = 0; j < ncols; j++) c[j] = t[j];
  }
}

// ---- portable: float32 arithmetic on the upconverted bf16 values ----------------------------
constexpr int MRP = 12;

void tile_portable(long kpad, const uint16_t* a, const uint16_t* b, float* const* rows, int nrows, int ncols, bool acc) {
  alignas(64) float c[MRP * NRB] = {};
  for (long kp = 0; kp < kpad / 2; kp++) {
    const uint16_t* ak = a + kp * 2 * MRP;
    const uint16_t* bk = b + kp * 2 * NRB;
    float b0[NRB], b1[NRB];
    for (int j = 0; j < NRB; j++) b0[j] = bf16_to_float(bk[2 * j]), b1[j] = bf16_to_float(bk[2 * j + 1]);
    for (int r = 0; r < MRP; r++) {
      const float a0 = bf16_to_float(ak[2 * r]), a1 = bf16_to_float(ak[2 * r + 1]);
      float* cr = c + r * NRB;
      // odd element first, as vdpbf16ps; each product is exact in float32
      for (int j = 0; j < NRB; j++) cr[j] = (cr[j] + a1 * b1[j]) + a0 * b0[j];
    }
  }
  merge(c, NRB, rows, nrows, ncols, acc);
}

#if defined(ST_X86)
// XCR0 (the state components the OS saves), read with inline asm: _xgetbv needs -mxsave.
unsigned long long xcr0() {
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

// Merges a register tile (rows r < nrows: columns 0-15 in c0[r], 16-31 in c1[r]) into C's rows,
// masked to ncols columns.
__attribute__((target("avx512f")))
inline void merge_zmm(const __m512* c0, const __m512* c1, float* const* rows, int nrows, int ncols, bool acc) {
  const __mmask16 m0 = ncols >= 16 ? 0xffff : static_cast<__mmask16>((1u << ncols) - 1);
  const __mmask16 m1 = ncols >= 32 ? 0xffff : ncols <= 16 ? 0 : static_cast<__mmask16>((1u << (ncols - 16)) - 1);
  for (int r = 0; r < nrows; r++) {
    float* c = rows[r];
    __m512 v0 = c0[r], v1 = c1[r];
    if (acc) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, c));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, c + 16));
    }
    _mm512_mask_storeu_ps(c, m0, v0);
    _mm512_mask_storeu_ps(c + 16, m1, v1);
  }
}

// ---- avx512-bf16: vdpbf16ps, 12 rows × 32 columns in 24 zmm accumulators ----------------------
constexpr int MRZ = 12;

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void tile_avx512bf16(long kpad, const uint16_t* a, const uint16_t* b, float* const* rows, int nrows, int ncols, bool acc) {
  __m512 c0[MRZ], c1[MRZ];
#pragma GCC unroll 12
  for (int r = 0; r < MRZ; r++) c0[r] = c1[r] = _mm512_setzero_ps();
  const uint32_t* a32 = reinterpret_cast<const uint32_t*>(a);
  for (long kp = 0; kp < kpad / 2; kp++) {
    const __m512i b0 = _mm512_load_si512(b + kp * 2 * NRB), b1 = _mm512_load_si512(b + kp * 2 * NRB + 32);
#pragma GCC unroll 12
    for (int r = 0; r < MRZ; r++) {
      const __m512i av = _mm512_set1_epi32(static_cast<int>(a32[kp * MRZ + r]));
      c0[r] = _mm512_dpbf16_ps(c0[r], (__m512bh)av, (__m512bh)b0);
      c1[r] = _mm512_dpbf16_ps(c1[r], (__m512bh)av, (__m512bh)b1);
    }
  }
  merge_zmm(c0, c1, rows, nrows, ncols, acc);
}

bool cpu_has_avx512bf16() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(1, 0, &a, &b, &c, &d) || !(c & bit_OSXSAVE)) return false;
  // the OS saves the opmask and zmm state (XCR0 bits 1, 2, 5, 6, 7)
  if ((xcr0() & 0xe6) != 0xe6) return false;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(b & (1u << 16)) || !(b & (1u << 30))) return false;  // avx512f, avx512bw
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  return (a & (1u << 5)) != 0;  // avx512_bf16
}

// ---- avx512-fma: float32 FMA on the widened values, 12 rows × 32 columns ------------------------
// The A panel is already float32 ([kpad][12], broadcast from memory); a B pair row (32 columns ×
// 2 k) is 2 zmm of bf16 pairs, widened in registers: the odd k is the pair with its low half
// cleared, the even k the pair shifted up 16 bits. Odd k first, as portable and vdpbf16ps.
constexpr int MRF = 12;

__attribute__((target("avx512f")))
void tile_avx512fma(long kpad, const uint16_t* a16, const uint16_t* b, float* const* rows, int nrows, int ncols, bool acc) {
  const float* a = reinterpret_cast<const float*>(a16);
  __m512 c0[MRF], c1[MRF];
#pragma GCC unroll 12
  for (int r = 0; r < MRF; r++) c0[r] = c1[r] = _mm512_setzero_ps();
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (long kp = 0; kp < kpad / 2; kp++) {
    const __m512i b0 = _mm512_load_si512(b + kp * 2 * NRB), b1 = _mm512_load_si512(b + kp * 2 * NRB + 32);
    const __m512 b0o = _mm512_castsi512_ps(_mm512_and_si512(b0, hi)), b0e = _mm512_castsi512_ps(_mm512_slli_epi32(b0, 16));
    const __m512 b1o = _mm512_castsi512_ps(_mm512_and_si512(b1, hi)), b1e = _mm512_castsi512_ps(_mm512_slli_epi32(b1, 16));
    const float* ak = a + kp * 2 * MRF;  // rows of k = 2kp, then of 2kp + 1
#pragma GCC unroll 12
    for (int r = 0; r < MRF; r++) {
      const __m512 ao = _mm512_set1_ps(ak[MRF + r]), ae = _mm512_set1_ps(ak[r]);
      c0[r] = _mm512_fmadd_ps(ae, b0e, _mm512_fmadd_ps(ao, b0o, c0[r]));
      c1[r] = _mm512_fmadd_ps(ae, b1e, _mm512_fmadd_ps(ao, b1o, c1[r]));
    }
  }
  merge_zmm(c0, c1, rows, nrows, ncols, acc);
}

bool cpu_has_avx512f() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(1, 0, &a, &b, &c, &d) || !(c & bit_OSXSAVE)) return false;
  if ((xcr0() & 0xe6) != 0xe6) return false;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 16));
}
#endif

#if defined(ST_AMX)
// ---- amx: 32 × 32 output tiles (C in tmm0-3) from two A tiles (tmm4-5) and two B tiles ------
// (tmm6-7); each tdpbf16ps is 16×16 outputs × 32 k. A is row-major [32][kpad], B the VNNI
// panel [kpad/2][32][2] (a 16-column B tile is 16 k-pair rows of 64 bytes at a 128-byte stride).
constexpr int MRA = 32;

struct alignas(64) TileConfig {
  uint8_t palette = 1, startRow = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

__attribute__((target("amx-tile,amx-bf16")))
void amx_configure() {
  thread_local bool done = false;
  if (done) return;
  TileConfig cfg;
  for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  done = true;
}

__attribute__((target("amx-tile,amx-bf16")))
void tile_amx(long kpad, const uint16_t* a, const uint16_t* b, float* const* rows, int nrows, int ncols, bool acc) {
  amx_configure();
  alignas(64) float c[MRA * NRB];
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const long aStride = kpad * 2, bStride = NRB * 4;
  for (long k = 0; k < kpad; k += 32) {
    _tile_loadd(4, a + k, aStride);
    _tile_loadd(5, a + 16 * kpad + k, aStride);
    _tile_loadd(6, b + k * NRB, bStride);
    _tile_loadd(7, b + k * NRB + 32, bStride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, NRB * 4);
  _tile_stored(1, c + 16, NRB * 4);
  _tile_stored(2, c + 16 * NRB, NRB * 4);
  _tile_stored(3, c + 16 * NRB + 16, NRB * 4);
  merge(c, NRB, rows, nrows, ncols, acc);
}

bool cpu_has_amx() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!(d & (1u << 22)) || !(d & (1u << 24))) return false;  // amx-bf16, amx-tile
#if defined(__linux__)
  // Linux hands out the 8 KB tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
  // XFEATURE_XTILEDATA); without it the first tile instruction faults.
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return false;
  return (xcr0() & (3ull << 17)) == (3ull << 17);  // XTILECFG and XTILEDATA enabled by the OS
#else
  return false;
#endif
}
#endif

const Bf16Kernel kPortable{"portable", MRP, 2, false, false, 8, tile_portable};
#if defined(ST_X86)
const Bf16Kernel kAvx512{"avx512-bf16", MRZ, 2, false, false, 8, tile_avx512bf16};
const Bf16Kernel kAvx512Fma{"avx512-fma", MRF, 2, false, true, 8, tile_avx512fma};
#endif
#if defined(ST_AMX)
const Bf16Kernel kAmx{"amx", MRA, 32, true, false, 4, tile_amx};
#endif

const Bf16Kernel* current = nullptr;

const Bf16Kernel* best_up_to(const std::string& cap) {
  const bool any = cap.empty();
  (void)any;  // unused where no x86 kernel is compiled
#if defined(ST_AMX)
  static const bool amx = cpu_has_amx();
  if (any || cap == "amx") {
    if (amx) return &kAmx;
  }
#endif
#if defined(ST_X86)
  static const bool dot = cpu_has_avx512bf16(), zmm = cpu_has_avx512f();
  // vdpbf16ps does two multiply-adds per lane, so it pays where it issues at half the FMA rate
  // or more; some cores issue it at a quarter (a Sapphire-Rapids-class Xeon VM here: 92 vs 190
  // GFLOP/s per core), and there widening to float32 FMA is twice as fast — so it is measured
  static const bool dotFaster = dot && (!zmm || bf16_dot_fma_ratio() >= 1.0);
  if (cap == "avx512-bf16" && dot) return &kAvx512;
  if ((any || cap == "amx") && dotFaster) return &kAvx512;
  if ((any || cap == "amx" || cap == "avx512-bf16" || cap == "avx512-fma") && zmm) return &kAvx512Fma;
#endif
  return &kPortable;
}

}  // namespace

const Bf16Kernel& bf16_select(const char* name) {
  std::string cap = name ? name : "";
  if (cap != "" && cap != "amx" && cap != "avx512-bf16" && cap != "avx512-fma" && cap != "portable") {
    std::fprintf(stderr, "sidetrain: SIDETRAIN_BF16_ISA='%s' is not amx, avx512-bf16, avx512-fma or portable; using the best present\n", name);
    cap = "";
  }
  current = best_up_to(cap);
  return *current;
}

bool cpu_has(const char* isa) {
  const std::string k = isa;
#if defined(ST_AMX)
  if (k == "amx") {
    static const bool amx = cpu_has_amx();
    return amx;
  }
#endif
#if defined(ST_X86)
  if (k == "avx512-bf16") return cpu_has_avx512bf16();
  if (k == "avx512f") return cpu_has_avx512f();
#endif
  return false;
}

const Bf16Kernel& bf16_kernel() {
  if (!current) bf16_select(std::getenv("SIDETRAIN_BF16_ISA"));
  return *current;
}

ST_END_NAMESPACE  // st::ST_ISA
