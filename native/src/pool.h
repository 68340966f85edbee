// Thread pool for the native kernels: hardware_concurrency() threads (the caller is one of
// them), overridable with SIDETRAIN_THREADS. Workers sleep on a condition variable between
// kernels; tasks are handed out with an atomic counter so uneven tasks balance themselves.
#pragma once
#include <cstddef>
#include <functional>

namespace st {

int pool_threads();
// Runs f(0..n-1) on the pool and returns when all are done. Not re-entrant.
void parallel_for(int n, const std::function<void(int)>& f);
// A 64-byte aligned buffer kept between calls (grown when a call needs more) so that big
// kernels do not pay first-touch page faults each time; slot 0 float32 packed B, 1 bf16 (bf16.h),
// 2 float32 packed A of a call with few rows (gemm.h).
// Shared by the ISA variants (variant.h): calls are synchronous, one kernel at a time.
void* kept_buffer(int slot, size_t bytes);

}  // namespace st
