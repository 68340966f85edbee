// The addon's norm kernels: define_norm() adds their N-API entry points to the exports (addon.cc Init).
#pragma once
#include <node_api.h>
#include "variant.h"

ST_BEGIN_NAMESPACE

void define_norm(napi_env env, napi_value exports);

ST_END_NAMESPACE  // st::ST_ISA
