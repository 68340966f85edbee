// Denormal floats (|x| < 1.2e-38) make every SSE/AVX multiply or add that touches them take a
// microcode assist on x86, about a hundred times the normal cost. Training makes plenty: the text
// encoder's causal mask leaves 43% of CLIP's attention probabilities denormal (exp of a very
// negative score), and the product of those probabilities with V then took 3.5 ms instead of
// 0.1 ms, 48 times a step. The compute kernels (convolutions, matmuls, attention, norms) therefore
// run with FTZ and DAZ set: denormal inputs read as zero and denormal results are written as zero,
// a change below 1.2e-38 in any value (PyTorch's torch.set_flush_denormal(True)). The flags are set
// for the call only, never left on the JavaScript thread, whose doubles they would change; the
// pool's workers take the calling thread's flags with each job (pool.cc), so optimizer steps and
// the other kernels run with IEEE denormals as before.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define ST_HAS_MXCSR 1
#endif

namespace st {

// The thread's floating-point control word (MXCSR on x86; 0 elsewhere).
inline unsigned fp_control() {
#if defined(ST_HAS_MXCSR)
  return _mm_getcsr();
#else
  return 0;
#endif
}
inline void set_fp_control([[maybe_unused]] unsigned csr) {
#if defined(ST_HAS_MXCSR)
  if (_mm_getcsr() != csr) _mm_setcsr(csr);
#endif
}

// FTZ and DAZ on for this scope (x86; nothing elsewhere), the previous flags restored after.
class DenormalsAsZero {
 public:
  static constexpr unsigned kFtzDaz = 0x8040;  // MXCSR bit 15 flush-to-zero, bit 6 denormals-are-zero
  DenormalsAsZero() : saved_(fp_control()) { set_fp_control(saved_ | kFtzDaz); }
  ~DenormalsAsZero() { set_fp_control(saved_); }
  DenormalsAsZero(const DenormalsAsZero&) = delete;
  DenormalsAsZero& operator=(const DenormalsAsZero&) = delete;

 private:
  unsigned saved_;
};

}  // namespace st
