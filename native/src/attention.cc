// Attention kernels (none yet): see attention.h.
#include "attention.h"

namespace st {

void define_attention(napi_env, napi_value) {}

}  // namespace st
