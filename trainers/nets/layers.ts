/**
 * @file The layers Stable Diffusion's networks are made of, as functions of (params, key, x).
 * Activations are NHWC for images and [B, T, C] for sequences; weights follow params.ts.
 * Every function is differentiable with the gradients TF.js registers (no stridedSlice,
 * gatherND or einsum in trained paths).
 */
import { tf, type Tensor } from '../backend/tf.ts';
import { param, type Params } from './params.ts';
import { geluFused, groupNormFused, layerNormFused, siluFused } from './fused.ts';

/** torch.nn.Linear: y = x·Wᵀ + b over the last axis; W is [out, in]. */
export function linear(p: Params, name: string, x: Tensor, bias = true): Tensor {
  const w = param(p, `${name}.weight`); // [out, in]
  const inDim = x.shape[x.rank - 1]!;
  const lead = x.shape.slice(0, -1);
  const x2 = x.reshape([-1, inDim]); // [N, in]
  let y = tf.matMul(x2, w, false, true); // [N, out]
  if (bias && p.has(`${name}.bias`)) y = y.add(param(p, `${name}.bias`));
  return y.reshape([...lead, w.shape[0]!]);
}

export interface ConvOptions {
  stride?: number;
  /**
   * Padding: a number pads all sides (ldm `padding=1`); 'vae-down' pads only right and bottom
   * by 1 (ldm model.py Downsample: `pad = (0, 1, 0, 1)` then a stride-2 conv with no padding).
   */
  pad?: number | 'vae-down';
}

/** torch.nn.Conv2d on NHWC input; the filter is stored as [kh, kw, in, out]. */
export function conv2d(p: Params, name: string, x: Tensor, opts: ConvOptions = {}): Tensor {
  const w = param(p, `${name}.weight`) as tf.Tensor4D;
  const stride = opts.stride ?? 1;
  const k = w.shape[0];
  const pad = opts.pad ?? (k - 1) / 2;
  const padding: [[number, number], [number, number], [number, number], [number, number]] =
    pad === 'vae-down'
      ? [[0, 0], [0, 1], [0, 1], [0, 0]]
      : [[0, 0], [pad, pad], [pad, pad], [0, 0]];
  const explicit = padding.every(([a, b]) => a === 0 && b === 0) ? 'valid' : padding;
  let y: Tensor = tf.conv2d(x as tf.Tensor4D, w, stride, explicit);
  if (p.has(`${name}.bias`)) y = y.add(param(p, `${name}.bias`));
  return y;
}

/**
 * torch.nn.GroupNorm on NHWC input (ldm always uses 32 groups; eps differs by block). One native
 * kernel on cpu-native, TF ops elsewhere (fused.ts).
 */
export function groupNorm(p: Params, name: string, x: Tensor, eps: number, groups = 32): Tensor {
  return groupNormFused(x, param(p, `${name}.weight`), param(p, `${name}.bias`), groups, eps);
}

/** silu(groupNorm(x)) as one op (ldm ResBlock in_layers/out_layers and the UNet/VAE heads). */
export function groupNormSilu(p: Params, name: string, x: Tensor, eps: number, groups = 32): Tensor {
  return groupNormFused(x, param(p, `${name}.weight`), param(p, `${name}.bias`), groups, eps, true);
}

/** torch.nn.LayerNorm over the last axis (eps 1e-5 everywhere in SD's text and UNet blocks). */
export function layerNorm(p: Params, name: string, x: Tensor, eps = 1e-5): Tensor {
  return layerNormFused(x, param(p, `${name}.weight`), param(p, `${name}.bias`), eps);
}

export const silu = (x: Tensor): Tensor => siluFused(x);
/** Exact GELU x·Φ(x) with erf (torch default; GEGLU and open_clip use it). */
export const gelu = (x: Tensor): Tensor => geluFused(x);
/** openai CLIP QuickGELU: x·sigmoid(1.702x). */
export const quickGelu = (x: Tensor): Tensor => x.mul(tf.sigmoid(x.mul(1.702)));

/**
 * Multi-head scaled dot-product attention. q [B, Tq, C], k and v [B, Tk, C]; channels split as
 * (head, d_head). `mask` is added to the scores (e.g. CLIP's causal mask, [Tq, Tk]).
 */
export function attention(q: Tensor, k: Tensor, v: Tensor, heads: number, mask?: Tensor): Tensor {
  return headsAttention(q, k, v, heads, (qh, kh, vh) => {
    let scores = tf.matMul(qh, kh, false, true).mul(qh.shape[2]! ** -0.5); // [B·h, Tq, Tk]
    if (mask) scores = scores.add(mask);
    return tf.matMul(tf.softmax(scores), vh); // [B·h, Tq, d]
  });
}

/**
 * Splits q [B, Tq, C], k and v [B, Tk, C] into heads ([B·h, T, d], channels as (head, d)), runs
 * `core` on them and merges its [B·h, Tq, d] result back to [B, Tq, C].
 */
export function headsAttention(q: Tensor, k: Tensor, v: Tensor, heads: number, core: (qh: Tensor, kh: Tensor, vh: Tensor) => Tensor): Tensor {
  const [b, tq, c] = q.shape as [number, number, number];
  const d = c / heads;
  const split = (t: Tensor) => t.reshape([b, t.shape[1]!, heads, d]).transpose([0, 2, 1, 3]).reshape([b * heads, t.shape[1]!, d]);
  const out = core(split(q), split(k), split(v)); // [B·h, Tq, d]
  return out.reshape([b, heads, tq, d]).transpose([0, 2, 1, 3]).reshape([b, tq, c]);
}

/**
 * F.interpolate(scale_factor=2, mode='nearest') on NHWC, built from stack+reshape because
 * tf.image.resizeNearestNeighbor's gradient is wrong on the tfjs CPU backend (4.22: a directional
 * finite-difference check disagrees) and broadcastTo/tile have no rank-6 gradient.
 */
export function upsampleNearest2x(x: Tensor): Tensor {
  const [b, h, w, c] = x.shape as [number, number, number, number];
  const rows = tf.stack([x, x], 2).reshape([b, 2 * h, w, c]); // each row twice
  return tf.stack([rows, rows], 3).reshape([b, 2 * h, 2 * w, c]); // each column twice
}
