// The addon's norm kernels: define_norm() adds their N-API entry points to the exports (addon.cc Init).
#pragma once
#include <node_api.h>

namespace st {

void define_norm(napi_env env, napi_value exports);

}  // namespace st
