// The addon's optim kernels: define_optim() adds their N-API entry points to the exports (addon.cc Init).
#pragma once
#include <node_api.h>
#include "variant.h"

ST_BEGIN_NAMESPACE

void define_optim(napi_env env, napi_value exports);

ST_END_NAMESPACE  // st::ST_ISA
