// The ISA variant a kernel source is compiled for. binding.gyp compiles every kernel source once
// per variant — portable (the baseline ISA: SSE2 on x86-64, plain C++ elsewhere), avx2 (AVX2 +
// FMA + F16C) and avx512 (AVX-512 F/BW/VL/DQ/CD on top) — each with its own -m flags and its own
// ST_ISA, and dispatch.cc picks one at load from what CPUID and XCR0 say the CPU and OS run.
// Each variant lives in its own namespace (st::isa_portable, st::isa_avx2, st::isa_avx512):
// without it the linker would merge the variants' same-named inline functions and templates,
// and portable code could end up calling an AVX-512 copy. The namespace is inline, so the
// sources keep writing st::name. pool.h/pool.cc (the thread pool) are shared and stay in st.
#pragma once

#ifndef ST_ISA
#define ST_ISA isa_portable
#endif
#define ST_STR2(x) #x
#define ST_STR(x) ST_STR2(x)
// "portable", "avx2" or "avx512": ST_ISA without its "isa_" prefix
#define ST_ISA_NAME (ST_STR(ST_ISA) + 4)

#define ST_BEGIN_NAMESPACE \
  namespace st {           \
  inline namespace ST_ISA {
#define ST_END_NAMESPACE \
  }                      \
  }
