// Thread pool for the native kernels: hardware_concurrency() threads (the caller is one of
// them), overridable with SIDETRAIN_THREADS. Workers sleep on a condition variable between
// kernels; tasks are handed out with an atomic counter so uneven tasks balance themselves.
#pragma once
#include <functional>

namespace st {

int pool_threads();
// Runs f(0..n-1) on the pool and returns when all are done. Not re-entrant.
void parallel_for(int n, const std::function<void(int)>& f);

}  // namespace st
