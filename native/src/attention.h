// The addon's attention kernels (attention.cc): fused scaled dot-product attention, forward and
// backward, a block of query rows at a time. define_attention() adds their N-API entry points
// (attentionForward, attentionBackward) to the exports (addon.cc Init).
#pragma once
#include <node_api.h>
#include "variant.h"

ST_BEGIN_NAMESPACE

// Per head: out = softmax(q·kᵀ·scale)·v, lse = per-row log-sum-exp of q·kᵀ·scale. q/out
// [batch, tq, heads·d], k/v [batch, tk, heads·d] (head h in channels h·d..h·d+d: no head
// split/merge transposes needed; heads = 1 is the plain [bh, t, d] layout), lse [batch·heads, tq];
// scale > 0. bf16: every product's operands rounded to bf16 (q, k, v, the probabilities; in the
// backward also dout and the score gradient), float32 accumulation — torch.autocast's bf16 bmm;
// the softmax statistics (max, sum, lse, rowsum(dout ⊙ out)) stay float32 / double.
void attention_forward(const float* q, const float* k, const float* v, float* out, float* lse, long batch, long heads,
                       long tq, long tk, long d, float scale, bool bf16 = false);
// dq, dk, dv (layouts of q, k, v) of the forward for dout, from its out and lse.
void attention_backward(const float* q, const float* k, const float* v, const float* out, const float* dout,
                        const float* lse, float* dq, float* dk, float* dv, long batch, long heads, long tq, long tk,
                        long d, float scale, bool bf16 = false);

void define_attention(napi_env env, napi_value exports);

ST_END_NAMESPACE  // st::ST_ISA
