// The kernels the addon exports, on raw float32 buffers (NHWC activations, [kh,kw,in,out]
// filters, as in TF.js). Outputs are fully written (callers may pass uninitialised memory).
#pragma once
#include "variant.h"

ST_BEGIN_NAMESPACE

struct ConvShape {
  long batch, inH, inW, inC, outH, outW, outC, fH, fW, sH, sW, dH, dW, padT, padL;
};

// y[b,oy,ox,co] = Σ x[b, oy*sH+kh*dH-padT, ox*sW+kw*dW-padL, ci] · w[kh,kw,ci,co]
// bf16: operands rounded to bfloat16, float32 accumulation (bf16.h).
void conv2d(const float* x, const float* w, float* y, const ConvShape& s, bool bf16 = false);
// dx = the input gradient of conv2d for dy (dilation 1).
void conv2d_backprop_input(const float* dy, const float* w, float* dx, const ConvShape& s, bool bf16 = false);
// dw = the filter gradient of conv2d for x and dy.
void conv2d_backprop_filter(const float* x, const float* dy, float* dw, const ConvShape& s);

// out[i] = op(a[aOff[i]])·op(b[bOff[i]]) for i < count; a is [M,K] (or [K,M] if transA),
// b is [K,N] (or [N,K] if transB), out is count×[M,N].
void matmul(const float* a, const float* b, float* out, long count, const double* aOff,
            const double* bOff, long M, long N, long K, bool transA, bool transB, bool bf16 = false);

// y[r,:] = softmax(x[r,:]) for rows × n.
void softmax(const float* x, float* y, long rows, long n);
// out = a op b (op 0 add, 1 sub, 2 mul, 3 div) over `shape` (rank ≥ 1), with per-dimension
// element strides of a and b (0 where that operand is broadcast).
void binary(int op, const float* a, const float* b, float* out, int rank, const long* shape,
            const long* aStrides, const long* bStrides);

// dst[ds·i] = src[ss·i] for every index i of `shape` (element strides; rank ≥ 1).
void strided_copy(const float* src, float* dst, int rank, const long* shape, const long* ss,
                  const long* ds);
// out = Σ float(x / divisor) over the groups with reduced[g], x contiguous over G groups.
void reduce_sum(const float* x, float* out, int G, const long* size, const bool* reduced,
                float divisor);
// y = op(x): 0 neg, 1 exp, 2 sigmoid, 3 erf, 4 square, 5 sqrt.
void unary(int op, const float* x, float* y, long n);

ST_END_NAMESPACE  // st::ST_ISA
