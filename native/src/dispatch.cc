// The module's entry point: picks the ISA variant of the kernels (variant.h) once, at load —
// the best one that CPUID says the CPU has and XCR0 says the OS saves the registers of,
// capped by SIDETRAIN_CPU_ISA=avx512|avx2|portable — and exports its kernels. The addon is
// compiled for the baseline ISA with the vector code only in the variants, so one build runs on
// any CPU of its architecture (a node_modules copied from an AVX-512 box to an AVX2 one no
// longer dies of SIGILL). This file and pool.cc are the baseline code every variant shares.
#include <node_api.h>

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#if defined(ST_X86_VARIANTS)
#include <cpuid.h>
#endif

namespace st {
inline namespace isa_portable {
napi_value init_exports(napi_env env, napi_value exports);
}
#if defined(ST_X86_VARIANTS)
inline namespace isa_avx2 {
napi_value init_exports(napi_env env, napi_value exports);
}
inline namespace isa_avx512 {
napi_value init_exports(napi_env env, napi_value exports);
}
#endif
}  // namespace st

namespace {

#if defined(ST_X86_VARIANTS)
// XCR0: the register state the OS saves on a context switch (xgetbv inline: no -mxsave here).
unsigned long long xcr0() {
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

bool bits(unsigned reg, std::initializer_list<int> which) {
  for (int b : which)
    if (!((reg >> b) & 1)) return false;
  return true;
}

// Everything the avx2 variant's flags (binding.gyp) let the compiler emit: SSE3, SSSE3, FMA,
// SSE4.1/4.2, MOVBE, POPCNT, AVX, F16C (leaf 1), BMI1, AVX2, BMI2 (leaf 7), LZCNT, and an OS
// that saves the ymm state (OSXSAVE, XCR0 bits 1-2). The same checks as __builtin_cpu_supports,
// done here so that every flag is covered on every compiler.
bool cpu_runs_avx2() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !bits(c, {0, 9, 12, 19, 20, 22, 23, 27, 28, 29})) return false;
  if ((xcr0() & 0x6) != 0x6) return false;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !bits(b, {3, 5, 8})) return false;
  return __get_cpuid(0x80000001, &a, &b, &c, &d) && bits(c, {5});
}

// avx2's set plus AVX-512 F, DQ, CD, BW, VL, with the opmask and zmm state saved (XCR0 bits 5-7).
bool cpu_runs_avx512() {
  unsigned a, b, c, d;
  if (!cpu_runs_avx2() || (xcr0() & 0xe6) != 0xe6) return false;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && bits(b, {16, 17, 28, 30, 31});
}
#endif

bool always() { return true; }

struct Variant {
  const char* name;
  napi_value (*init)(napi_env, napi_value);
  bool (*runs)();
};

// best first
const Variant kVariants[] = {
#if defined(ST_X86_VARIANTS)
    {"avx512", st::isa_avx512::init_exports, cpu_runs_avx512},
    {"avx2", st::isa_avx2::init_exports, cpu_runs_avx2},
#endif
    {"portable", st::isa_portable::init_exports, always},
};
constexpr const char* kNames = "avx512, avx2 or portable";

// Whether the CPU runs variant v (asked once per variant).
bool runs(const Variant& v) {
  static int known[sizeof(kVariants) / sizeof(kVariants[0])] = {};  // 0 unknown, 1 yes, 2 no
  int& k = known[&v - kVariants];
  if (!k) k = v.runs() ? 1 : 2;
  return k == 1;
}

// Rank of a variant name: 0 avx512, 1 avx2, 2 portable, -1 unknown (a cap may name a variant
// that this build or architecture lacks: it caps all the same).
int rank(const std::string& name) {
  return name == "avx512" ? 0 : name == "avx2" ? 1 : name == "portable" ? 2 : -1;
}

// The variant to use under `cap` ("" = none): the best one the CPU runs at or below it.
const Variant* choose(const std::string& cap) {
  const int top = cap.empty() ? 0 : rank(cap);
  for (const Variant& v : kVariants)
    if (rank(v.name) >= top && runs(v)) return &v;
  return nullptr;
}

napi_value string(napi_env env, const char* s) {
  napi_value v;
  napi_create_string_utf8(env, s, NAPI_AUTO_LENGTH, &v);
  return v;
}

// variant(name) -> that variant's kernels as a new exports object (tests compare the variants
// in one process); throws when the name is unknown or the CPU does not run it.
napi_value VariantExports(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value arg;
  napi_get_cb_info(env, info, &argc, &arg, nullptr, nullptr);
  char buf[32] = {};
  size_t len = 0;
  if (argc < 1 || napi_get_value_string_utf8(env, arg, buf, sizeof(buf), &len) != napi_ok) {
    napi_throw_type_error(env, nullptr, (std::string("variant: name must be ") + kNames).c_str());
    return nullptr;
  }
  for (const Variant& v : kVariants) {
    if (std::strcmp(v.name, buf) != 0) continue;
    if (!runs(v)) break;
    napi_value obj;
    napi_create_object(env, &obj);
    return v.init(env, obj);
  }
  const std::string why = rank(buf) < 0 ? std::string(" is not ") + kNames : " is not built or this CPU lacks it";
  napi_throw_error(env, nullptr, (std::string("variant: '") + buf + "'" + why).c_str());
  return nullptr;
}

// Keep freed memory in the process instead of returning it to the OS (what PyTorch gets from
// jemalloc in the issue-10 setup): tensors' buffers come from calloc, and glibc serves big ones
// with fresh mmaps, so every new activation paid first-touch page faults, which are expensive
// in VMs (a 64 MB elementwise op spent most of its time faulting). SIDETRAIN_MALLOC_KEEP=0
// turns this off.
void keep_freed_memory() {
#if defined(__GLIBC__)
  const char* env = std::getenv("SIDETRAIN_MALLOC_KEEP");
  if (env && env[0] == '0') return;
  mallopt(M_MMAP_MAX, 0);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  mallopt(M_TOP_PAD, 64 << 20);
#endif
}

napi_value Init(napi_env env, napi_value exports) {
  const char* env_cap = std::getenv("SIDETRAIN_CPU_ISA");
  const std::string cap = env_cap ? env_cap : "";
  if (!cap.empty() && rank(cap) < 0) {
    napi_throw_error(env, nullptr, ("SIDETRAIN_CPU_ISA='" + cap + "' is not " + kNames).c_str());
    return nullptr;
  }
  keep_freed_memory();
  const Variant* chosen = choose(cap);
  chosen->init(env, exports);
  // the variants this CPU runs, best first, and the cap in force
  napi_value list;
  napi_create_array(env, &list);
  uint32_t n = 0;
  for (const Variant& v : kVariants)
    if (runs(v)) napi_set_element(env, list, n++, string(env, v.name));
  napi_set_named_property(env, exports, "isaVariants", list);
  if (!cap.empty()) napi_set_named_property(env, exports, "isaCap", string(env, cap.c_str()));
  napi_property_descriptor variant = {"variant", nullptr, VariantExports, nullptr, nullptr, nullptr, napi_default, nullptr};
  napi_define_properties(env, exports, 1, &variant);
  return exports;
}

}  // namespace

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
