// float16 <-> float32 conversion for frozen weights kept in half precision
// (trainers/nets/half-params.ts): the N-API entry points, registered in addon.cc.
#pragma once
#include <node_api.h>

#include <cstdint>
#include "variant.h"

ST_BEGIN_NAMESPACE

// dst[i] = float(src[i]) (exact; a NaN keeps its payload and becomes quiet).
void half_to_float(const uint16_t* src, float* dst, long n);
// dst[i] = half(src[i]), round to nearest even, overflow to ±Inf, NaN stays NaN (quiet, top
// payload bits kept). Returns how many finite inputs overflowed to ±Inf.
long float_to_half(const float* src, uint16_t* dst, long n);

// halfToFloat(src: Uint16Array, dst: Float32Array): void
napi_value HalfToFloat(napi_env env, napi_callback_info info);
// floatToHalf(src: Float32Array, dst: Uint16Array): number of finite values that overflowed
napi_value FloatToHalf(napi_env env, napi_callback_info info);
// 'f16c' or 'portable': how this variant converts
const char* half_isa();
// halfIsa(): half_isa()
napi_value HalfIsa(napi_env env, napi_callback_info info);

ST_END_NAMESPACE  // st::ST_ISA
