// Convolutions as implicit-im2col GEMMs: the A packer gathers the receptive field of each
// output pixel straight into the packed panel, so no im2col matrix is ever allocated.
//  - forward:         rows = output pixels, k = (tap, ci),  B = w[tap] as [ci, co]
//  - backprop input:  per stride phase (py, px), rows = input pixels of that phase,
//                     k = (tap of the phase, co), B = w[tap] as [co, ci] (the taps that reach
//                     the phase; a transposed conv without the zero-dilated input)
//  - backprop filter: rows = (tap, ci), k = output pixels, B = dy as [pixels, co]
#include <cstring>
#include <vector>

#include "bf16.h"
#include "gemm.h"
#include "kernels.h"
#include "variant.h"

ST_BEGIN_NAMESPACE
namespace {

struct Tap {
  long dy, dx;   // source offset added to (u*rowMul, v*colMul)
  long wBase;    // offset of this tap's [in, out] slice in w
};

// A[m][k] with m = (b, u, v) over [batch, U, V] and k = t*C + c:
// src[b, u*rowMul + tap.dy, v*colMul + tap.dx, c], zero outside the source.
struct GatherA {
  const float* src;
  long H, W, C, U, V, rowMul, colMul;
  const Tap* taps;

  void pack(float* dst, long m, int rows, long k0, long kc) const {
    for (int r = 0; r < MR; r++) {
      if (r >= rows) {
        for (long k = 0; k < kc; k++) dst[k * MR + r] = 0.f;
        continue;
      }
      const long mm = m + r, v = mm % V, u = (mm / V) % U, b = mm / (U * V);
      long t = k0 / C, c = k0 % C;
      for (long k = 0; k < kc; t++, c = 0) {
        const long run = std::min(C - c, kc - k);
        const long y = u * rowMul + taps[t].dy, x = v * colMul + taps[t].dx;
        if (y >= 0 && y < H && x >= 0 && x < W) {
          const float* p = src + ((b * H + y) * W + x) * C + c;
          for (long i = 0; i < run; i++) dst[(k + i) * MR + r] = p[i];
        } else {
          for (long i = 0; i < run; i++) dst[(k + i) * MR + r] = 0.f;
        }
        k += run;
      }
    }
  }
};

// B[k][n] with k = t*C + c: w[tap.wBase + c*kStride + n*nStride].
struct TapB {
  const float* w;
  long C, kStride, nStride;
  const Tap* taps;
  bool rowMajor;  // every tap, in order: B[k][n] = w[k*kStride + n] (the forward filter [fH, fW, C, N])

  DirectB direct() const { return rowMajor ? DirectB{w, kStride} : DirectB{nullptr, 0}; }

  void pack(float* dst, long n, int cols, long k0, long kc) const {
    long t = k0 / C, c = k0 % C;
    if (kStride == 1) {
      // the input gradient's B, w[tap][n][k] (k contiguous): per tap, the transposing pack of a
      // strided operand (16×16 register transposes), not a gather of one float per page
      for (long k = 0; k < kc; t++, c = 0) {
        const long run = std::min(C - c, kc - k);
        Strided{w + taps[t].wBase, nStride, 1}.pack_t<NR>(dst + k * NR, n, cols, c, run);
        k += run;
      }
      return;
    }
    for (long k = 0; k < kc; k++) {
      const float* p = w + taps[t].wBase + c * kStride + n * nStride;
      float* d = dst + k * NR;
      if (nStride == 1) {
        std::memcpy(d, p, sizeof(float) * cols);
      } else {
        for (int j = 0; j < cols; j++) d[j] = p[j * nStride];
      }
      for (int j = cols; j < NR; j++) d[j] = 0.f;
      if (++c == C) c = 0, t++;
    }
  }
};

// A[m][k] for the filter gradient: m = t*C + c (tap, input channel), k = output pixel
// (b, oy, ox): x[b, oy*sH + tap.dy, ox*sW + tap.dx, c].
struct GatherAT {
  const float* x;
  long H, W, C, OH, OW, sH, sW;
  const Tap* taps;

  void pack(float* dst, long m, int rows, long k0, long kc) const {
    long ty[MR], tx[MR], ch[MR];
    bool oneTap = true;
    for (int r = 0; r < MR; r++) {
      const long mm = m + (r < rows ? r : 0), t = mm / C;
      ty[r] = taps[t].dy, tx[r] = taps[t].dx, ch[r] = mm % C;
      if (r < rows && t != m / C) oneTap = false;
    }
    long ox = k0 % OW, oy = (k0 / OW) % OH, b = k0 / (OW * OH);
    for (long k = 0; k < kc; k++) {
      float* d = dst + k * MR;
      const float* row = x + b * H * W * C;
      if (oneTap) {
        const long y = oy * sH + ty[0], xx = ox * sW + tx[0];
        if (y >= 0 && y < H && xx >= 0 && xx < W) {
          const float* p = row + (y * W + xx) * C + ch[0];
          for (int r = 0; r < MR; r++) d[r] = r < rows ? p[r] : 0.f;
        } else {
          for (int r = 0; r < MR; r++) d[r] = 0.f;
        }
      } else {
        for (int r = 0; r < MR; r++) {
          const long y = oy * sH + ty[r], xx = ox * sW + tx[r];
          d[r] = (r < rows && y >= 0 && y < H && xx >= 0 && xx < W) ? row[(y * W + xx) * C + ch[r]] : 0.f;
        }
      }
      if (++ox == OW) {
        ox = 0;
        if (++oy == OH) oy = 0, b++;
      }
    }
  }
};

struct RowPtr {
  float* base;
  long stride;
  float* operator()(long m) const { return base + m * stride; }
};

// Output row of a stride phase: dx[b, py + s*u, px + s*v, :].
struct PhaseRow {
  float* dx;
  long U, V, H, W, C, py, px, sH, sW;
  float* operator()(long m) const {
    const long v = m % V, u = (m / V) % U, b = m / (U * V);
    return dx + ((b * H + py + sH * u) * W + px + sW * v) * C;
  }
};

template <class A, class B, class C>
struct Problem {
  A a;
  B b;
  C c;
};

}  // namespace

void conv2d(const float* x, const float* w, float* y, const ConvShape& s, bool bf16) {
  std::vector<Tap> taps;
  for (long kh = 0; kh < s.fH; kh++)
    for (long kw = 0; kw < s.fW; kw++)
      taps.push_back({kh * s.dH - s.padT, kw * s.dW - s.padL, (kh * s.fW + kw) * s.inC * s.outC});
  const GatherA a{x, s.inH, s.inW, s.inC, s.outH, s.outW, s.sH, s.sW, taps.data()};
  const TapB b{w, s.inC, s.outC, 1, taps.data(), true};
  const RowPtr c{y, s.outC};
  const long M = s.batch * s.outH * s.outW, K = s.fH * s.fW * s.inC;
  if (K == 0) {
    std::memset(y, 0, sizeof(float) * M * s.outC);
    return;
  }
  gemm_any(bf16, 1, M, s.outC, K, false, [&](long) { return Problem<GatherA, TapB, RowPtr>{a, b, c}; });
}

void conv2d_backprop_input(const float* dy, const float* w, float* dx, const ConvShape& s, bool bf16) {
  // One GEMM per stride phase (py, px): the dx pixels p with p ≡ (py, px) mod the stride. The
  // taps with (p + pad - k) divisible by the stride reach the phase; the dy row is
  // u + (p + pad - k) / stride. Each GEMM writes all of its phase's pixels, so dx needs zeroing
  // only when some phase has pixels and no tap (a filter smaller than the stride).
  struct Phase {
    long py, px, U, V;
    std::vector<Tap> taps;
  };
  std::vector<Phase> phases;
  bool untouched = false;
  for (long py = 0; py < s.sH && py < s.inH; py++) {
    for (long px = 0; px < s.sW && px < s.inW; px++) {
      Phase ph{py, px, (s.inH - py + s.sH - 1) / s.sH, (s.inW - px + s.sW - 1) / s.sW, {}};
      for (long kh = 0; kh < s.fH; kh++) {
        if ((py + s.padT - kh) % s.sH != 0) continue;
        for (long kw = 0; kw < s.fW; kw++) {
          if ((px + s.padL - kw) % s.sW != 0) continue;
          ph.taps.push_back({(py + s.padT - kh) / s.sH, (px + s.padL - kw) / s.sW, (kh * s.fW + kw) * s.inC * s.outC});
        }
      }
      if (ph.U == 0 || ph.V == 0) continue;
      if (ph.taps.empty() || s.outC == 0) untouched = true;
      else phases.push_back(std::move(ph));
    }
  }
  if (untouched) std::memset(dx, 0, sizeof(float) * s.batch * s.inH * s.inW * s.inC);
  for (const Phase& ph : phases) {
    const GatherA a{dy, s.outH, s.outW, s.outC, ph.U, ph.V, 1, 1, ph.taps.data()};
    const TapB b{w, s.outC, 1, s.outC, ph.taps.data(), false};
    const PhaseRow c{dx, ph.U, ph.V, s.inH, s.inW, s.inC, ph.py, ph.px, s.sH, s.sW};
    const long M = s.batch * ph.U * ph.V, K = static_cast<long>(ph.taps.size()) * s.outC;
    gemm_any(bf16, 1, M, s.inC, K, false, [&](long) { return Problem<GatherA, TapB, PhaseRow>{a, b, c}; });
  }
}

void conv2d_backprop_filter(const float* x, const float* dy, float* dw, const ConvShape& s) {
  std::vector<Tap> taps;
  for (long kh = 0; kh < s.fH; kh++)
    for (long kw = 0; kw < s.fW; kw++) taps.push_back({kh * s.dH - s.padT, kw * s.dW - s.padL, 0});
  const long M = s.fH * s.fW * s.inC, K = s.batch * s.outH * s.outW;
  if (K == 0) {
    std::memset(dw, 0, sizeof(float) * M * s.outC);
    return;
  }
  const GatherAT a{x, s.inH, s.inW, s.inC, s.outH, s.outW, s.sH, s.sW, taps.data()};
  const StridedB b{Strided{dy, 1, s.outC}};
  const RowPtr c{dw, s.outC};
  gemm_batched(1, M, s.outC, K, false, [&](long) { return Problem<GatherAT, StridedB, RowPtr>{a, b, c}; });
}

void matmul(const float* a, const float* b, float* out, long count, const double* aOff,
            const double* bOff, long M, long N, long K, bool transA, bool transB, bool bf16) {
  if (K == 0) {
    std::memset(out, 0, sizeof(float) * count * M * N);
    return;
  }
  gemm_any(bf16, count, M, N, K, false, [&](long i) {
    const float* ai = a + static_cast<long>(aOff[i]);
    const float* bi = b + static_cast<long>(bOff[i]);
    // A(m, k): row-major [M,K] or, transposed, [K,M]; B(k, n): [K,N] or [N,K]
    const Strided sa = transA ? Strided{ai, 1, M} : Strided{ai, K, 1};
    const StridedB sb{transB ? Strided{bi, K, 1} : Strided{bi, 1, N}};
    return Problem<Strided, StridedB, RowPtr>{sa, sb, RowPtr{out + i * M * N, N}};
  });
}

ST_END_NAMESPACE  // st::ST_ISA
