// Optim kernels (none yet): see optim.h.
#include "optim.h"

namespace st {

void define_optim(napi_env, napi_value) {}

}  // namespace st
