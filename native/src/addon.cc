// N-API bindings of one ISA variant (variant.h): init_exports() fills an exports object with
// this variant's kernels; dispatch.cc (the module's entry point) calls the chosen variant's.
// Every function takes the inputs' and the output's Float32Arrays (the CPU backend's own
// buffers; the output is allocated by the caller) plus an Int32Array or Float64Array of sizes,
// checks lengths, and runs synchronously on the calling thread plus the pool.
#include <node_api.h>

#include <string>
#include <thread>

#include "bf16.h"
#include "gemm.h"
#include "attention.h"
#include "half.h"
#include "norm.h"
#include "optim.h"
#include "kernels.h"
#include "napi_args.h"
#include "denormals.h"

ST_BEGIN_NAMESPACE
namespace {

using st::NapiArgs;

// (x|dy, w|dy, out, Int32Array[15] ConvShape, bf16?: boolean — forward and input gradient)
template <int Which>
napi_value Conv(napi_env env, napi_callback_info info) {
  const st::DenormalsAsZero daz;
  NapiArgs args(env, info, Which == 0 ? "conv2d" : Which == 1 ? "conv2dBackpropInput" : "conv2dBackpropFilter");
  const bool bf16 = args.optional_boolean(4, "bf16");
  const int* p = args.i32(3, 15, "shape");
  if (!p) return nullptr;
  st::ConvShape s{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], p[12], p[13], p[14]};
  const size_t nx = s.batch * s.inH * s.inW * s.inC, ny = s.batch * s.outH * s.outW * s.outC,
               nw = s.fH * s.fW * s.inC * s.outC;
  if (Which == 0) {
    const float* x = args.f32(0, nx, "x");
    const float* w = args.f32(1, nw, "filter");
    float* y = args.f32(2, ny, "y");
    if (args.ok()) st::conv2d(x, w, y, s, bf16);
  } else if (Which == 1) {
    const float* dy = args.f32(0, ny, "dy");
    const float* w = args.f32(1, nw, "filter");
    float* dx = args.f32(2, nx, "dx");
    if (args.ok()) st::conv2d_backprop_input(dy, w, dx, s, bf16);
  } else {
    const float* x = args.f32(0, nx, "x");
    const float* dy = args.f32(1, ny, "dy");
    float* dw = args.f32(2, nw, "dw");
    if (args.ok()) st::conv2d_backprop_filter(x, dy, dw, s);
  }
  return nullptr;
}

// (a, b, out, aOffsets: Float64Array, bOffsets: Float64Array, M, N, K, transA, transB, bf16?)
napi_value MatMul(napi_env env, napi_callback_info info) {
  const st::DenormalsAsZero daz;
  NapiArgs args(env, info, "matmul");
  const long M = args.integer(5, "M"), N = args.integer(6, "N"), K = args.integer(7, "K");
  const bool ta = args.boolean(8, "transA"), tb = args.boolean(9, "transB");
  const bool bf16 = args.optional_boolean(10, "bf16");
  const size_t count = args.length(3);
  const float* a = args.f32(0, 0, "a");
  const float* b = args.f32(1, 0, "b");
  const double* ao = args.f64(3, count, "aOffsets");
  const double* bo = args.f64(4, count, "bOffsets");
  float* out = args.f32(2, count * M * N, "out");
  if (!args.ok()) return nullptr;
  const size_t na = args.length(0), nb = args.length(1);
  for (size_t i = 0; i < count; i++) {
    if (ao[i] < 0 || ao[i] + M * K > na || bo[i] < 0 || bo[i] + K * N > nb) {
      args.range_error("batch offset out of range");
      return nullptr;
    }
  }
  st::matmul(a, b, out, static_cast<long>(count), ao, bo, M, N, K, ta, tb, bf16);
  return nullptr;
}

// (x, y, rows, n)
napi_value Softmax(napi_env env, napi_callback_info info) {
  NapiArgs args(env, info, "softmax");
  const long rows = args.integer(2, "rows"), n = args.integer(3, "n");
  const float* x = args.f32(0, rows * n, "x");
  float* y = args.f32(1, rows * n, "y");
  if (args.ok() && rows > 0 && n > 0) st::softmax(x, y, rows, n);
  return nullptr;
}

// (op, a, b, out, shape: Float64Array, aStrides: Float64Array, bStrides: Float64Array)
napi_value Binary(napi_env env, napi_callback_info info) {
  NapiArgs args(env, info, "binary");
  const int op = static_cast<int>(args.integer(0, "op"));
  const size_t rank = args.length(4);
  const double* shp = args.f64(4, 1, "shape");
  const double* sa = args.f64(5, rank, "aStrides");
  const double* sb = args.f64(6, rank, "bStrides");
  if (!args.ok()) return nullptr;
  if (rank > 8) {
    args.range_error("shape: rank > 8");
    return nullptr;
  }
  long shape[8], as[8], bs[8], total = 1, aMax = 0, bMax = 0;
  for (size_t d = 0; d < rank; d++) {
    shape[d] = static_cast<long>(shp[d]), as[d] = static_cast<long>(sa[d]), bs[d] = static_cast<long>(sb[d]);
    total *= shape[d];
    aMax += (shape[d] - 1) * as[d];
    bMax += (shape[d] - 1) * bs[d];
  }
  const float* a = args.f32(1, total ? aMax + 1 : 0, "a");
  const float* b = args.f32(2, total ? bMax + 1 : 0, "b");
  float* out = args.f32(3, total, "out");
  if (args.ok() && total > 0) st::binary(op, a, b, out, static_cast<int>(rank), shape, as, bs);
  return nullptr;
}

// Reads a Float64Array of 1 to 16 integers into v; returns its length (0 on failure).
size_t longs(NapiArgs& args, size_t i, long* v, const char* name) {
  const size_t n = args.length(i);
  const double* d = args.f64(i, 1, name);
  if (!d) return 0;
  if (n > 16) {
    args.range_error(std::string(name) + ": rank > 16");
    return 0;
  }
  for (size_t k = 0; k < n; k++) v[k] = static_cast<long>(d[k]);
  return n;
}

// (src, dst, shape, srcStrides, dstStrides, srcOffset, dstOffset): all Float64Array / numbers
napi_value Copy(napi_env env, napi_callback_info info) {
  NapiArgs args(env, info, "copy");
  long shape[16], ss[16], ds[16];
  const size_t rank = longs(args, 2, shape, "shape");
  const size_t srank = longs(args, 3, ss, "srcStrides"), drank = longs(args, 4, ds, "dstStrides");
  if (args.ok() && (srank != rank || drank != rank)) args.range_error("srcStrides/dstStrides: rank differs from shape's");
  const long so = args.integer(5, "srcOffset"), dO = args.integer(6, "dstOffset");
  if (!args.ok()) return nullptr;
  long total = 1, sMax = so, dMax = dO;
  for (size_t d = 0; d < rank; d++) {
    total *= shape[d];
    if (shape[d] < 0 || ss[d] < 0 || ds[d] < 0) args.range_error("shape/strides: negative size or stride");
    sMax += (shape[d] - 1) * ss[d], dMax += (shape[d] - 1) * ds[d];
  }
  if (so < 0 || dO < 0) args.range_error("srcOffset/dstOffset: negative offset");
  const float* src = args.f32(0, total ? sMax + 1 : 0, "src");
  float* dst = args.f32(1, total ? dMax + 1 : 0, "dst");
  if (args.ok() && total > 0) st::strided_copy(src + so, dst + dO, static_cast<int>(rank), shape, ss, ds);
  return nullptr;
}

// (x, out, groupSizes: Float64Array, reduced: Float64Array of 0/1, divisor)
napi_value ReduceSum(napi_env env, napi_callback_info info) {
  NapiArgs args(env, info, "reduceSum");
  long size[16], red[16];
  const size_t G = longs(args, 2, size, "sizes");
  if (longs(args, 3, red, "reduced") != G && args.ok()) args.range_error("reduced: one flag per group expected");
  const double divisor = args.number(4, "divisor");
  if (!args.ok()) return nullptr;
  long total = 1, outN = 1;
  bool reduced[16];
  for (size_t g = 0; g < G; g++) {
    total *= size[g];
    reduced[g] = red[g] != 0;
    if (!reduced[g]) outN *= size[g];
  }
  const float* x = args.f32(0, total, "x");
  float* out = args.f32(1, outN, "out");
  if (!args.ok()) return nullptr;
  if (total == 0) {
    for (long i = 0; i < outN; i++) out[i] = 0;
    return nullptr;
  }
  st::reduce_sum(x, out, static_cast<int>(G), size, reduced, static_cast<float>(divisor));
  return nullptr;
}

// (op, x, y)
napi_value Unary(napi_env env, napi_callback_info info) {
  NapiArgs args(env, info, "unary");
  const int op = static_cast<int>(args.integer(0, "op"));
  const size_t n = args.length(1);
  const float* x = args.f32(1, n, "x");
  float* y = args.f32(2, n, "y");
  if (args.ok() && n > 0) st::unary(op, x, y, static_cast<long>(n));
  return nullptr;
}

// -> { threads, isa, kernels: { class: path } }: the variant's vector ISA and the path each
// kernel class runs (bf16 GEMMs and float16 conversion choose their own at run time)
napi_value Info(napi_env env, napi_callback_info) {
  napi_value obj, kernels, v;
  napi_create_object(env, &obj);
  napi_create_int32(env, st::pool_threads(), &v);
  napi_set_named_property(env, obj, "threads", v);
  napi_create_string_utf8(env, ST_ISA_NAME, NAPI_AUTO_LENGTH, &v);
  napi_set_named_property(env, obj, "isa", v);
  napi_create_object(env, &kernels);
  for (const char* cls : {"gemm", "conv", "attention", "norm", "elementwise", "optim"}) {
    napi_create_string_utf8(env, ST_ISA_NAME, NAPI_AUTO_LENGTH, &v);
    napi_set_named_property(env, kernels, cls, v);
  }
  napi_create_string_utf8(env, st::half_isa(), NAPI_AUTO_LENGTH, &v);
  napi_set_named_property(env, kernels, "half", v);
  napi_create_string_utf8(env, st::bf16_kernel().name, NAPI_AUTO_LENGTH, &v);
  napi_set_named_property(env, kernels, "bf16", v);
  napi_set_named_property(env, obj, "kernels", kernels);
  return obj;
}

// ([cap: "amx" | "avx512-bf16" | "avx512-fma" | "portable" | ""]) -> the bf16 kernel in use; with an argument,
// first caps the choice at that kernel ("" = the best the CPU has).
napi_value Bf16Isa(napi_env env, napi_callback_info info) {
  NapiArgs args(env, info, "bf16Isa");
  if (args.present(0)) {
    const std::string cap = args.string(0, "cap", 32);
    if (!args.ok()) return nullptr;
    if (cap != "" && cap != "amx" && cap != "avx512-bf16" && cap != "avx512-fma" && cap != "portable") {
      args.type_error("'" + cap + "' is not amx, avx512-bf16, avx512-fma, portable or ''");
      return nullptr;
    }
    st::bf16_select(cap.c_str());
  }
  napi_value v;
  napi_create_string_utf8(env, st::bf16_kernel().name, NAPI_AUTO_LENGTH, &v);
  return v;
}

// (kind: "fp32-fma" | "avx512-bf16" | "amx", seconds) -> one core's GFLOP/s, -1 if absent (peak.cc)
napi_value PeakProbe(napi_env env, napi_callback_info info) {
  NapiArgs args(env, info, "peakProbe", 2);
  const std::string kind = args.string(0, "kind", 32);
  const double seconds = args.number(1, "seconds");
  if (!args.ok()) return nullptr;
  napi_value v;
  napi_create_double(env, st::peak_probe(kind.c_str(), seconds), &v);
  return v;
}

}  // namespace

napi_value init_exports(napi_env env, napi_value exports) {
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

ST_END_NAMESPACE  // st::ST_ISA
