// Norm kernels (none yet): see norm.h.
#include "norm.h"

namespace st {

void define_norm(napi_env, napi_value) {}

}  // namespace st
