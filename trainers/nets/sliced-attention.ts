/**
 * @file Attention computed a slice of query rows at a time, with a custom gradient that recomputes
 * each slice's scores in the backward pass (the memory-efficient attention of Rabe & Staats 2021
 * and diffusers' sliced attention, without the online softmax: a slice holds its full rows). The
 * [B·heads, Tq, Tk] scores never exist at once, in the forward or in the backward, and the tape
 * keeps only q, k, v and the output.
 *
 * Backward of o = softmax(s)·v with s = q·kᵀ·scale, per slice (p the recomputed probabilities):
 *   dv += pᵀ·do;  dp = do·vᵀ;  ds = p ⊙ (dp − D) with D = rowsum(do ⊙ o);  dq = ds·k·scale;  dk += dsᵀ·q·scale.
 *
 * On the cpu-native backend the whole core is two native kernels instead (native/src/attention.cc:
 * a block of query rows at a time, multi-threaded, with the same backward formulas and the
 * per-row log-sum-exp saved by the forward), so `rows` does not matter there: nothing bigger
 * than a block's scores is ever allocated. `nativeAttention` runs them straight on [B, T, heads·d]
 * (no head split/merge transposes); under --precision bf16 their products take bf16 operands
 * (float32 accumulation and softmax statistics). Every other backend, or SIDETRAIN_NATIVE_ATTENTION=0, runs
 * the TF-ops slices below, which are also the tests' reference.
 */
import { currentBackend, tf, type Tensor } from '../backend/tf.ts';
import { loadAddon, type NativeAddon } from '../backend/native/addon.ts';
import { outputArray } from '../backend/native/output.ts';
import type { CpuBackend } from '../backend/native/kernels.ts';
import { computePrecision } from '../backend/precision.ts';
import { reuseInRecompute } from './recompute.ts';

type AttentionAddon = { [K in 'attentionForward' | 'attentionBackward']-?: NonNullable<NativeAddon[K]> };

const enabled = process.env.SIDETRAIN_NATIVE_ATTENTION !== '0';
let registered: AttentionAddon | undefined;

/**
 * Whether attention cores run as sidetrain's kernels here: the native ones (cpu-native backend,
 * addon with the attention kernels) or the WGSL ones (webgpu backend); not when turned off.
 */
export function hasNativeAttention(): boolean {
  if (!enabled) return false;
  // the webgpu backend registers the same two kernels as tiled WGSL shaders (backend/webgpu/attention.ts)
  if (currentBackend()?.name === 'webgpu') return tf.getBackend() === 'webgpu' && tf.getKernel('SidetrainAttention', 'webgpu') !== undefined;
  if (currentBackend()?.name !== 'cpu-native' || tf.getBackend() !== 'cpu') return false;
  if (registered) return true;
  let addon: NativeAddon;
  try {
    addon = loadAddon();
  } catch {
    return false;
  }
  if (!addon.attentionForward || !addon.attentionBackward) return false;
  registered = addon as AttentionAddon;
  registerKernels(registered);
  return true;
}

const f32 = (backend: CpuBackend, t: tf.TensorInfo): Float32Array => {
  const v = backend.data.get(t.dataId).values;
  if (!(v instanceof Float32Array)) throw new Error('attention: float32 CPU tensors expected');
  return v;
};

interface AttentionAttrs { heads: number; scale: number }

/** Sizes of q [B, Tq, heads·d] and k [B, Tk, heads·d]. */
function dims(q: tf.TensorInfo, k: tf.TensorInfo, { heads, scale }: AttentionAttrs) {
  const [b, tq, c] = q.shape as [number, number, number];
  return { b, heads, tq, tk: k.shape[1]!, d: c / heads, scale };
}

/** The CPU-backend kernels the native core's customGrad runs (names that clash with no TF.js kernel). */
function registerKernels(addon: AttentionAddon): void {
  const kernels: Record<string, tf.KernelFunc> = {
    SidetrainAttention: ({ inputs, backend, attrs }) => {
      const be = backend as CpuBackend, { q, k, v } = inputs as Record<string, tf.TensorInfo>;
      const { b, heads, tq, tk, d, scale } = dims(q!, k!, attrs as unknown as AttentionAttrs);
      const out = outputArray(b * tq * heads * d), lse = outputArray(b * heads * tq);
      addon.attentionForward(f32(be, q!), f32(be, k!), f32(be, v!), out, lse, b, heads, tq, tk, d, scale, computePrecision() === 'bf16');
      return [be.makeTensorInfo(q!.shape, 'float32', out), be.makeTensorInfo([b * heads, tq], 'float32', lse)];
    },
    SidetrainAttentionGrad: ({ inputs, backend, attrs }) => {
      const be = backend as CpuBackend, { q, k, v, out, dout, lse } = inputs as Record<string, tf.TensorInfo>;
      const { b, heads, tq, tk, d, scale } = dims(q!, k!, attrs as unknown as AttentionAttrs);
      const dq = outputArray(b * tq * heads * d), dk = outputArray(b * tk * heads * d), dv = outputArray(b * tk * heads * d);
      const arrays = [q, k, v, out, dout, lse].map((t) => f32(be, t!)) as [Float32Array, Float32Array, Float32Array, Float32Array, Float32Array, Float32Array];
      addon.attentionBackward(...arrays, dq, dk, dv, b, heads, tq, tk, d, scale, computePrecision() === 'bf16');
      return [be.makeTensorInfo(q!.shape, 'float32', dq), be.makeTensorInfo(k!.shape, 'float32', dk), be.makeTensorInfo(v!.shape, 'float32', dv)];
    },
  };
  for (const [kernelName, kernelFunc] of Object.entries(kernels)) {
    if (!tf.getKernel(kernelName, 'cpu')) tf.registerKernel({ kernelName, backendName: 'cpu', kernelFunc });
  }
}

const runKernel = (name: string, inputs: Record<string, Tensor>, attrs: AttentionAttrs) =>
  tf.engine().runKernel(name, inputs as unknown as tf.NamedTensorMap, attrs as unknown as tf.NamedAttrMap) as Tensor[];

/**
 * Multi-head softmax(q·kᵀ·d^-0.5)·v in the native kernels, straight on q [B, Tq, C], k and v
 * [B, Tk, C] (channels as (head, d), like layers.ts `attention`) → [B, Tq, C]: no head
 * split/merge transposes. Only where hasNativeAttention(); the tape keeps q, k, v, the output
 * and the log-sum-exp [B·heads, Tq].
 */
export function nativeAttention(q: Tensor, k: Tensor, v: Tensor, heads: number): Tensor {
  if (!hasNativeAttention()) throw new Error('nativeAttention: native attention kernels are not available on this backend');
  const [b, , c] = q.shape, ok = (t: Tensor) => t.rank === 3 && t.dtype === 'float32' && t.shape[0] === b && t.shape[2] === c;
  tf.util.assert(ok(q) && ok(k) && ok(v) && k.shape[1] === v.shape[1] && c! % heads === 0,
    () => `nativeAttention: float32 q [B, Tq, C], k and v [B, Tk, C] with C divisible by ${heads} heads expected, got ${q.shape}, ${k.shape}, ${v.shape}`);
  const attrs = { heads, scale: (q.shape[2]! / heads) ** -0.5 };
  const run = tf.customGrad((qi, ki, vi, save) => {
    const inputs = { q: qi as Tensor, k: ki as Tensor, v: vi as Tensor };
    // a checkpointed block's recompute takes the forward's output and log-sum-exp (recompute.ts)
    const [out, lse] = reuseInRecompute([inputs.q, inputs.k, inputs.v], () => runKernel('SidetrainAttention', inputs, attrs)) as [Tensor, Tensor];
    (save as tf.GradSaveFunc)([inputs.q, inputs.k, inputs.v, out, lse]);
    return {
      value: out,
      gradFunc: (dy, [qs, ks, vs, os, ls]) =>
        runKernel('SidetrainAttentionGrad', { q: qs!, k: ks!, v: vs!, out: os!, dout: dy as Tensor, lse: ls! }, attrs),
    };
  });
  return run(q, k, v);
}

/** The same on heads already split: qh [BH, Tq, d], kh and vh [BH, Tk, d] → [BH, Tq, d]. */
export const nativeAttentionCore = (qh: Tensor, kh: Tensor, vh: Tensor): Tensor => nativeAttention(qh, kh, vh, 1);

/** Rows per slice so one slice's scores stay within `maxBytes` (at least 1 row). */
export function sliceRows(batchHeads: number, tq: number, tk: number, maxBytes: number): number {
  return Math.max(1, Math.min(tq, Math.floor(maxBytes / (batchHeads * tk * 4))));
}

/** The slices [start, size) covering `n` rows. */
function slices(n: number, rows: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (let start = 0; start < n; start += rows) out.push([start, Math.min(rows, n - start)]);
  return out;
}

const rowsOf = (t: Tensor, start: number, size: number) => t.slice([0, start, 0], [-1, size, -1]);

/** softmax(q·kᵀ·scale)·v of one slice of q: q [BH, n, d], k and v [BH, Tk, d] → probabilities [BH, n, Tk]. */
const probabilities = (q: Tensor, k: Tensor, scale: number) => tf.softmax(tf.matMul(q, k, false, true).mul(scale));

/** Adds `next` into the accumulator slot, disposing the old sum. */
function addInto(acc: Tensor | undefined, next: Tensor): Tensor {
  if (!acc) return next;
  const sum = acc.add(next);
  acc.dispose();
  next.dispose();
  return sum;
}

/**
 * Scaled dot-product attention on heads already split: qh [BH, Tq, d], kh and vh [BH, Tk, d] →
 * [BH, Tq, d], `rows` query rows at a time (the native core when present). Same numbers as the
 * whole computation.
 */
export function slicedAttentionCore(qh: Tensor, kh: Tensor, vh: Tensor, rows: number): Tensor {
  const float32 = qh.dtype === 'float32' && kh.dtype === 'float32' && vh.dtype === 'float32';
  return float32 && hasNativeAttention() ? nativeAttentionCore(qh, kh, vh) : slicedAttentionOps(qh, kh, vh, rows);
}

/** slicedAttentionCore in TF ops (every backend; the reference for the native core). */
export function slicedAttentionOps(qh: Tensor, kh: Tensor, vh: Tensor, rows: number): Tensor {
  const scale = qh.shape[2]! ** -0.5;
  const parts = slices(qh.shape[1]!, rows);
  const run = tf.customGrad((q, k, v, save) => {
    const outParts = parts.map(([s, n]) => tf.tidy(() => tf.matMul(probabilities(rowsOf(q as Tensor, s, n), k as Tensor, scale), v as Tensor)));
    const out = outParts.length === 1 ? outParts[0]! : tf.concat(outParts, 1); // [BH, Tq, d]
    if (outParts.length > 1) tf.dispose(outParts);
    (save as tf.GradSaveFunc)([q as Tensor, k as Tensor, v as Tensor, out]);
    return { value: out, gradFunc: (dy, saved) => backward(dy as Tensor, saved, parts, scale) };
  });
  return run(qh, kh, vh);
}

function backward(dOut: Tensor, saved: Tensor[], parts: Array<[number, number]>, scale: number): Tensor[] {
  const [q, k, v, out] = saved as [Tensor, Tensor, Tensor, Tensor];
  const rowDot = tf.tidy(() => dOut.mul(out).sum(-1, true)); // D [BH, Tq, 1]
  let dk: Tensor | undefined;
  let dv: Tensor | undefined;
  const dq: Tensor[] = [];
  for (const [s, n] of parts) {
    const [dqPart, dkPart, dvPart] = tf.tidy(() => {
      const qPart = rowsOf(q, s, n);
      const doPart = rowsOf(dOut, s, n); // [BH, n, d]
      const p = probabilities(qPart, k, scale); // [BH, n, Tk]
      const dp = tf.matMul(doPart, v, false, true); // [BH, n, Tk]
      const ds = p.mul(dp.sub(rowsOf(rowDot, s, n))).mul(scale);
      return [tf.matMul(ds, k), tf.matMul(ds, qPart, true, false), tf.matMul(p, doPart, true, false)];
    });
    dq.push(dqPart!);
    dk = addInto(dk, dkPart!);
    dv = addInto(dv, dvPart!);
  }
  rowDot.dispose();
  const dqAll = dq.length === 1 ? dq[0]! : tf.concat(dq, 1);
  if (dq.length > 1) tf.dispose(dq);
  return [dqAll, dk!, dv!];
}
