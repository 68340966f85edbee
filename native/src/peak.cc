// Peak probes for the bench: register-resident loops of independent multiply-adds, so that the
// kernels' GFLOP/s can be shown as a share of what one core of this machine can do. Timed with
// the thread's CPU clock (a shared machine's other load does not count against it).
#include <time.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "bf16.h"

// the AVX-512 probes in the avx512 variant only, as the bf16 kernels (bf16.cc)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__AVX512F__)
#include <immintrin.h>
#define ST_X86 1
#endif

ST_BEGIN_NAMESPACE
namespace {

double thread_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// float32 FMA on the build's vector width: 12 independent accumulators (enough to hide the FMA
// latency at two per cycle), 2·VW flops each.
typedef float vf __attribute__((vector_size(VW * 4)));
double probe_fma(long iters) {
  vf acc[12];
  for (int i = 0; i < 12; i++) acc[i] = vf{} + 1.0f * i;
  vf m = vf{} + 0.999999f, a = vf{} + 1e-7f;
  for (long it = 0; it < iters; it++) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++) acc[i] = acc[i] * m + a;
    __asm__ volatile("" : "+x"(m));  // keep the loop from being folded
  }
  float s = 0;
  for (int i = 0; i < 12; i++) s += acc[i][0];
  __asm__ volatile("" ::"x"(s));
  return 12.0 * 2 * VW * iters;
}

#if defined(ST_X86)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
double probe_dpbf16(long iters) {
  __m512 acc[12];
  for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  __m512i a = _mm512_set1_epi32(0x3f803f80), b = _mm512_set1_epi32(0x33803380);
  for (long it = 0; it < iters; it++) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)a, (__m512bh)b);
    __asm__ volatile("" : "+v"(a));
  }
  __m512 s = acc[0];
  for (int i = 1; i < 12; i++) s = _mm512_add_ps(s, acc[i]);
  __asm__ volatile("" ::"v"(s));
  return 12.0 * 64 * iters;  // 16 lanes × 2 pairs × 2 flops
}

__attribute__((target("avx512f")))
double probe_fma512(long iters) {
  __m512 acc[12];
  for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  __m512 m = _mm512_set1_ps(0.999999f), a = _mm512_set1_ps(1e-7f);
  for (long it = 0; it < iters; it++) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++) acc[i] = _mm512_fmadd_ps(acc[i], m, a);
    __asm__ volatile("" : "+v"(m));
  }
  __m512 s = acc[0];
  for (int i = 1; i < 12; i++) s = _mm512_add_ps(s, acc[i]);
  __asm__ volatile("" ::"v"(s));
  return 12.0 * 32 * iters;
}
#endif

// GFLOP/s of `probe` over about `seconds` of this thread's CPU time.
double rate(double (*probe)(long), double seconds) {
  probe(1000);  // warm up (frequency licence, page in)
  double flops = 0;
  const double t0 = thread_seconds();
  while (thread_seconds() - t0 < seconds) flops += probe(1 << 14);
  return flops / (thread_seconds() - t0) / 1e9;
}

}  // namespace

double bf16_dot_fma_ratio() {
#if defined(ST_X86)
  if (!cpu_has("avx512-bf16") || !cpu_has("avx512f")) return 0;
  // interleaved twice, the better of each, so that a burst of other load skews neither
  double dot = 0, fma = 0;
  for (int i = 0; i < 2; i++) {
    dot = std::max(dot, rate(probe_dpbf16, 0.002));
    fma = std::max(fma, rate(probe_fma512, 0.002));
  }
  return fma > 0 ? dot / fma : 0;
#else
  return 0;
#endif
}

// GFLOP/s of one core for `kind` ("fp32-fma", "avx512-bf16", "amx" via a tile GEMM), or -1 when
// this CPU (or build) has no such unit. Runs for about `seconds` of this thread's CPU time.
double peak_probe(const char* kind, double seconds) {
  const std::string k = kind;
  double (*probe)(long) = nullptr;
  if (k == "fp32-fma") probe = probe_fma;
#if defined(ST_X86)
  if (k == "avx512-bf16" && cpu_has("avx512-bf16")) probe = probe_dpbf16;
#endif
  if (k == "amx") {
    // no register-resident form: one thread's tile GEMM on a 32 × 32 × 4096 problem in L1/L2
    const Bf16Kernel& kern = bf16_select("amx");
    const bool have = std::strcmp(kern.name, "amx") == 0;
    double flops = 0, t0 = thread_seconds();
    if (have) {
      const long K = 4096;
      uint16_t* a = static_cast<uint16_t*>(std::aligned_alloc(64, 2 * 32 * K));
      uint16_t* b = static_cast<uint16_t*>(std::aligned_alloc(64, 2 * 32 * K));
      std::memset(a, 0, 2 * 32 * K);
      std::memset(b, 0, 2 * 32 * K);
      alignas(64) float c[32 * 32];
      float* rows[32];
      for (int r = 0; r < 32; r++) rows[r] = c + r * 32;
      while (thread_seconds() - t0 < seconds) {
        for (int rep = 0; rep < 64; rep++) kern.tile(K, a, b, rows, 32, 32, false);
        flops += 64.0 * 2 * 32 * 32 * K;
      }
      std::free(a);
      std::free(b);
    }
    bf16_select(std::getenv("SIDETRAIN_BF16_ISA"));
    return have ? flops / (thread_seconds() - t0) / 1e9 : -1;
  }
  return probe ? rate(probe, seconds) : -1;
}

ST_END_NAMESPACE  // st::ST_ISA
