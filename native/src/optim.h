// The addon's optim kernels: define_optim() adds their N-API entry points to the exports (addon.cc Init).
#pragma once
#include <node_api.h>

namespace st {

void define_optim(napi_env env, napi_value exports);

}  // namespace st
