// N-API bindings. Every function takes the inputs' and the output's Float32Arrays (the CPU
// backend's own buffers; the output is allocated by the caller) plus an Int32Array or
// Float64Array of sizes, checks lengths, and runs synchronously on the calling thread plus
// the pool.
#include <node_api.h>

#include <cstdlib>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <string>
#include <thread>

#include "bf16.h"
#include "gemm.h"
#include "attention.h"
#include "half.h"
#include "norm.h"
#include "optim.h"
#include "kernels.h"

namespace {

struct Args {
  napi_env env;
  napi_value argv[8];
  size_t argc = 8;
  bool failed = false;

  Args(napi_env e, napi_callback_info info) : env(e) { napi_get_cb_info(e, info, &argc, argv, nullptr, nullptr); }

  void fail(const std::string& msg) {
    if (!failed) napi_throw_type_error(env, nullptr, msg.c_str());
    failed = true;
  }
  template <class T>
  T* array(size_t i, napi_typedarray_type want, size_t minLen, const char* name) {
    if (failed) return nullptr;
    bool is = false;
    if (i >= argc || napi_is_typedarray(env, argv[i], &is) != napi_ok || !is) {
      fail(std::string(name) + ": expected a typed array");
      return nullptr;
    }
    napi_typedarray_type type;
    size_t len;
    void* data;
    napi_get_typedarray_info(env, argv[i], &type, &len, &data, nullptr, nullptr);
    if (type != want) {
      fail(std::string(name) + ": wrong typed array type");
      return nullptr;
    }
    if (len < minLen) {
      fail(std::string(name) + ": has " + std::to_string(len) + " elements, needs " + std::to_string(minLen));
      return nullptr;
    }
    return static_cast<T*>(data);
  }
  // optional boolean argument i (absent or undefined = false)
  bool flag(size_t i) {
    bool v = false;
    if (failed || i >= argc) return false;
    napi_valuetype t;
    napi_typeof(env, argv[i], &t);
    if (t == napi_undefined) return false;
    if (napi_get_value_bool(env, argv[i], &v) != napi_ok) fail("expected a boolean");
    return v;
  }
  long num(size_t i) {
    double v = 0;
    if (!failed && (i >= argc || napi_get_value_double(env, argv[i], &v) != napi_ok)) fail("expected a number");
    return static_cast<long>(v);
  }
};

// (x|dy, w|dy, out, Int32Array[15] ConvShape, bf16?: boolean — forward and input gradient)
template <int Which>
napi_value Conv(napi_env env, napi_callback_info info) {
  Args args(env, info);
  const bool bf16 = args.flag(4);
  const int* p = args.array<int>(3, napi_int32_array, 15, "shape");
  if (!p) return nullptr;
  st::ConvShape s{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], p[12], p[13], p[14]};
  const size_t nx = s.batch * s.inH * s.inW * s.inC, ny = s.batch * s.outH * s.outW * s.outC,
               nw = s.fH * s.fW * s.inC * s.outC;
  if (Which == 0) {
    const float* x = args.array<float>(0, napi_float32_array, nx, "x");
    const float* w = args.array<float>(1, napi_float32_array, nw, "filter");
    float* y = args.array<float>(2, napi_float32_array, ny, "y");
    if (!args.failed) st::conv2d(x, w, y, s, bf16);
  } else if (Which == 1) {
    const float* dy = args.array<float>(0, napi_float32_array, ny, "dy");
    const float* w = args.array<float>(1, napi_float32_array, nw, "filter");
    float* dx = args.array<float>(2, napi_float32_array, nx, "dx");
    if (!args.failed) st::conv2d_backprop_input(dy, w, dx, s, bf16);
  } else {
    const float* x = args.array<float>(0, napi_float32_array, nx, "x");
    const float* dy = args.array<float>(1, napi_float32_array, ny, "dy");
    float* dw = args.array<float>(2, napi_float32_array, nw, "dw");
    if (!args.failed) st::conv2d_backprop_filter(x, dy, dw, s);
  }
  return nullptr;
}

// (a, b, out, aOffsets: Float64Array, bOffsets: Float64Array, M, N, K, transA, transB, bf16?)
napi_value MatMul(napi_env env, napi_callback_info info) {
  Args args(env, info);
  args.argc = 8;
  napi_value argv[11];
  size_t argc = 11;
  napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr);
  for (int i = 0; i < 8; i++) args.argv[i] = argv[i];
  args.argc = argc < 8 ? argc : 8;
  const long M = args.num(5), N = args.num(6), K = args.num(7);
  bool ta = false, tb = false;
  if (argc < 10 || napi_get_value_bool(env, argv[8], &ta) != napi_ok || napi_get_value_bool(env, argv[9], &tb) != napi_ok)
    args.fail("transA/transB: expected booleans");
  bool bf16 = false;
  if (argc >= 11 && !args.failed) {
    napi_valuetype vt;
    napi_typeof(env, argv[10], &vt);
    if (vt != napi_undefined && napi_get_value_bool(env, argv[10], &bf16) != napi_ok) args.fail("bf16: expected a boolean");
  }
  const float* a = args.array<float>(0, napi_float32_array, 0, "a");
  const float* b = args.array<float>(1, napi_float32_array, 0, "b");
  size_t count = 0;
  if (!args.failed) {
    napi_typedarray_type t;
    napi_get_typedarray_info(env, argv[3], &t, &count, nullptr, nullptr, nullptr);
  }
  const double* ao = args.array<double>(3, napi_float64_array, count, "aOffsets");
  const double* bo = args.array<double>(4, napi_float64_array, count, "bOffsets");
  float* out = args.array<float>(2, napi_float32_array, count * M * N, "out");
  if (args.failed) return nullptr;
  size_t na, nb;
  napi_typedarray_type t;
  napi_get_typedarray_info(env, argv[0], &t, &na, nullptr, nullptr, nullptr);
  napi_get_typedarray_info(env, argv[1], &t, &nb, nullptr, nullptr, nullptr);
  for (size_t i = 0; i < count; i++) {
    if (ao[i] < 0 || ao[i] + M * K > na || bo[i] < 0 || bo[i] + K * N > nb) {
      args.fail("matmul: batch offset out of range");
      return nullptr;
    }
  }
  st::matmul(a, b, out, static_cast<long>(count), ao, bo, M, N, K, ta, tb, bf16);
  return nullptr;
}

// (x, y, rows, n)
napi_value Softmax(napi_env env, napi_callback_info info) {
  Args args(env, info);
  const long rows = args.num(2), n = args.num(3);
  const float* x = args.array<float>(0, napi_float32_array, rows * n, "x");
  float* y = args.array<float>(1, napi_float32_array, rows * n, "y");
  if (!args.failed && rows > 0 && n > 0) st::softmax(x, y, rows, n);
  return nullptr;
}

// (op, a, b, out, shape: Float64Array, aStrides: Float64Array, bStrides: Float64Array)
napi_value Binary(napi_env env, napi_callback_info info) {
  Args args(env, info);
  const int op = static_cast<int>(args.num(0));
  size_t rank = 0;
  if (!args.failed && args.argc >= 7) {
    napi_typedarray_type t;
    napi_get_typedarray_info(env, args.argv[4], &t, &rank, nullptr, nullptr, nullptr);
  }
  const double* shp = args.array<double>(4, napi_float64_array, 1, "shape");
  const double* sa = args.array<double>(5, napi_float64_array, rank, "aStrides");
  const double* sb = args.array<double>(6, napi_float64_array, rank, "bStrides");
  if (args.failed) return nullptr;
  if (rank > 8) {
    args.fail("binary: rank > 8");
    return nullptr;
  }
  long shape[8], as[8], bs[8], total = 1, aMax = 0, bMax = 0;
  for (size_t d = 0; d < rank; d++) {
    shape[d] = static_cast<long>(shp[d]), as[d] = static_cast<long>(sa[d]), bs[d] = static_cast<long>(sb[d]);
    total *= shape[d];
    aMax += (shape[d] - 1) * as[d];
    bMax += (shape[d] - 1) * bs[d];
  }
  const float* a = args.array<float>(1, napi_float32_array, total ? aMax + 1 : 0, "a");
  const float* b = args.array<float>(2, napi_float32_array, total ? bMax + 1 : 0, "b");
  float* out = args.array<float>(3, napi_float32_array, total, "out");
  if (!args.failed && total > 0) st::binary(op, a, b, out, static_cast<int>(rank), shape, as, bs);
  return nullptr;
}

// Reads a Float64Array of up to 16 integers into v; returns its length (0 on failure).
size_t longs(Args& args, size_t i, long* v, const char* name) {
  if (args.failed || i >= args.argc) return 0;
  napi_typedarray_type t;
  size_t n = 0;
  bool is = false;
  if (napi_is_typedarray(args.env, args.argv[i], &is) == napi_ok && is)
    napi_get_typedarray_info(args.env, args.argv[i], &t, &n, nullptr, nullptr, nullptr);
  const double* d = args.array<double>(i, napi_float64_array, 1, name);
  if (!d) return 0;
  if (n > 16) {
    args.fail(std::string(name) + ": rank > 16");
    return 0;
  }
  for (size_t k = 0; k < n; k++) v[k] = static_cast<long>(d[k]);
  return n;
}

// (src, dst, shape, srcStrides, dstStrides, srcOffset, dstOffset): all Float64Array / numbers
napi_value Copy(napi_env env, napi_callback_info info) {
  Args args(env, info);
  long shape[16], ss[16], ds[16];
  const size_t rank = longs(args, 2, shape, "shape");
  if (longs(args, 3, ss, "srcStrides") != rank || longs(args, 4, ds, "dstStrides") != rank) args.fail("copy: rank mismatch");
  const long so = args.num(5), dO = args.num(6);
  if (args.failed) return nullptr;
  long total = 1, sMax = so, dMax = dO;
  for (size_t d = 0; d < rank; d++) {
    total *= shape[d];
    if (shape[d] < 0 || ss[d] < 0 || ds[d] < 0) args.fail("copy: negative size or stride");
    sMax += (shape[d] - 1) * ss[d], dMax += (shape[d] - 1) * ds[d];
  }
  if (so < 0 || dO < 0) args.fail("copy: negative offset");
  const float* src = args.array<float>(0, napi_float32_array, total ? sMax + 1 : 0, "src");
  float* dst = args.array<float>(1, napi_float32_array, total ? dMax + 1 : 0, "dst");
  if (!args.failed && total > 0) st::strided_copy(src + so, dst + dO, static_cast<int>(rank), shape, ss, ds);
  return nullptr;
}

// (x, out, groupSizes: Float64Array, reduced: Float64Array of 0/1, divisor)
napi_value ReduceSum(napi_env env, napi_callback_info info) {
  Args args(env, info);
  long size[16], red[16];
  const size_t G = longs(args, 2, size, "sizes");
  if (longs(args, 3, red, "reduced") != G || G == 0) args.fail("reduceSum: bad groups");
  double divisor = 1;
  if (!args.failed && napi_get_value_double(env, args.argv[4], &divisor) != napi_ok) args.fail("divisor: expected a number");
  if (args.failed) return nullptr;
  long total = 1, outN = 1;
  bool reduced[16];
  for (size_t g = 0; g < G; g++) {
    total *= size[g];
    reduced[g] = red[g] != 0;
    if (!reduced[g]) outN *= size[g];
  }
  const float* x = args.array<float>(0, napi_float32_array, total, "x");
  float* out = args.array<float>(1, napi_float32_array, outN, "out");
  if (args.failed) return nullptr;
  if (total == 0) {
    for (long i = 0; i < outN; i++) out[i] = 0;
    return nullptr;
  }
  st::reduce_sum(x, out, static_cast<int>(G), size, reduced, static_cast<float>(divisor));
  return nullptr;
}

// (op, x, y)
napi_value Unary(napi_env env, napi_callback_info info) {
  Args args(env, info);
  const int op = static_cast<int>(args.num(0));
  size_t n = 0;
  if (!args.failed && args.argc >= 3) {
    napi_typedarray_type t;
    bool is = false;
    if (napi_is_typedarray(env, args.argv[1], &is) == napi_ok && is)
      napi_get_typedarray_info(env, args.argv[1], &t, &n, nullptr, nullptr, nullptr);
  }
  const float* x = args.array<float>(1, napi_float32_array, n, "x");
  float* y = args.array<float>(2, napi_float32_array, n, "y");
  if (!args.failed && n > 0) st::unary(op, x, y, static_cast<long>(n));
  return nullptr;
}

napi_value Info(napi_env env, napi_callback_info) {
  napi_value obj, v;
  napi_create_object(env, &obj);
  napi_create_int32(env, st::pool_threads(), &v);
  napi_set_named_property(env, obj, "threads", v);
  const char* isa = st::VW == 16 ? "avx512" : st::VW == 8 ? "avx2" : "generic";
  napi_create_string_utf8(env, isa, NAPI_AUTO_LENGTH, &v);
  napi_set_named_property(env, obj, "isa", v);
  return obj;
}

// ([cap: "amx" | "avx512-bf16" | "portable" | ""]) -> the bf16 kernel in use; with an argument,
// first caps the choice at that kernel ("" = the best the CPU has).
napi_value Bf16Isa(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  size_t argc = 1;
  napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr);
  napi_valuetype t = napi_undefined;
  if (argc >= 1) napi_typeof(env, argv[0], &t);
  if (t == napi_string) {
    char buf[32];
    size_t len = 0;
    napi_get_value_string_utf8(env, argv[0], buf, sizeof(buf), &len);
    const std::string cap(buf, len);
    if (cap != "" && cap != "amx" && cap != "avx512-bf16" && cap != "portable") {
      napi_throw_type_error(env, nullptr, ("bf16Isa: '" + cap + "' is not amx, avx512-bf16, portable or ''").c_str());
      return nullptr;
    }
    st::bf16_select(buf);
  } else if (t != napi_undefined) {
    napi_throw_type_error(env, nullptr, "bf16Isa: expected a string");
    return nullptr;
  }
  napi_value v;
  napi_create_string_utf8(env, st::bf16_kernel().name, NAPI_AUTO_LENGTH, &v);
  return v;
}

// (kind: "fp32-fma" | "avx512-bf16" | "amx", seconds) -> one core's GFLOP/s, -1 if absent (peak.cc)
napi_value PeakProbe(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  size_t argc = 2;
  napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr);
  char kind[32] = {};
  size_t len = 0;
  double seconds = 0;
  if (argc < 2 || napi_get_value_string_utf8(env, argv[0], kind, sizeof(kind), &len) != napi_ok ||
      napi_get_value_double(env, argv[1], &seconds) != napi_ok) {
    napi_throw_type_error(env, nullptr, "peakProbe(kind: string, seconds: number)");
    return nullptr;
  }
  napi_value v;
  napi_create_double(env, st::peak_probe(kind, seconds), &v);
  return v;
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
  keep_freed_memory();
  const napi_property_descriptor props[] = {
      {"conv2d", nullptr, Conv<0>, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"conv2dBackpropInput", nullptr, Conv<1>, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"conv2dBackpropFilter", nullptr, Conv<2>, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"matmul", nullptr, MatMul, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"softmax", nullptr, Softmax, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"binary", nullptr, Binary, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"copy", nullptr, Copy, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"reduceSum", nullptr, ReduceSum, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"unary", nullptr, Unary, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"halfToFloat", nullptr, st::HalfToFloat, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"floatToHalf", nullptr, st::FloatToHalf, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"halfIsa", nullptr, st::HalfIsa, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"bf16Isa", nullptr, Bf16Isa, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"peakProbe", nullptr, PeakProbe, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"info", nullptr, Info, nullptr, nullptr, nullptr, napi_default, nullptr},
  };
  napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props);
  st::define_attention(env, exports);
  st::define_norm(env, exports);
  st::define_optim(env, exports);
  return exports;
}

}  // namespace

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
