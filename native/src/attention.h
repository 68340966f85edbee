// The addon's attention kernels: define_attention() adds their N-API entry points to the exports (addon.cc Init).
#pragma once
#include <node_api.h>

namespace st {

void define_attention(napi_env env, napi_value exports);

}  // namespace st
