/**
 * @file The native attention core (native/src/attention.cc via trainers/nets/sliced-attention.ts)
 * against the whole attention in TF ops, softmax(q·kᵀ·d^-0.5)·v: the output and all three
 * gradients within 1e-5, for sizes that are not multiples of the kernel's row and column blocks,
 * head widths 8, 40, 64 and 160, more heads than threads; the multi-head form on [B, T, heads·d]
 * (no head split) against layers.ts `attention`; the TF-ops slices agree too; no leaked tensors;
 * under bf16 precision, within the bf16 rule of the float32 attention of the bf16-rounded inputs. Skipped, with the reason, when the backend is not cpu-native or the addon lacks it.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { initBackend, setComputePrecision, tf, type Tensor } from '../trainers/backend/index.ts';
import { bf16BitsToFloat, floatToBf16Bits } from '../trainers/io/half.ts';
import { attention } from '../trainers/nets/layers.ts';
import { nativeSkip } from './helpers/native.ts';
import { poisonOutputs } from '../trainers/backend/native/output.ts';

poisonOutputs(true); // outputs start as NaN: an element a kernel leaves unwritten fails a comparison
import { hasNativeAttention, nativeAttention, nativeAttentionCore, slicedAttentionCore, slicedAttentionOps } from '../trainers/nets/sliced-attention.ts';

await initBackend();
const skip = nativeSkip(hasNativeAttention() ? false : 'native attention kernels not available on this backend');

/** Deterministic uniform [-1, 1) values (a small LCG, so failures reproduce). */
function rand(shape: number[], seed: number): Tensor {
  let s = seed >>> 0;
  const v = new Float32Array(shape.reduce((a, b) => a * b, 1));
  for (let i = 0; i < v.length; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    v[i] = s / 2 ** 31 - 1;
  }
  return tf.tensor(v, shape);
}

type Core = (q: Tensor, k: Tensor, v: Tensor) => Tensor;
const wholeOps: Core = (q, k, v) => tf.matMul(tf.softmax(tf.matMul(q, k, false, true).mul(q.shape[2]! ** -0.5)), v);

/** [out, dq, dk, dv] of core for a fixed upstream gradient. */
async function outAndGrads(core: Core, q: Tensor, k: Tensor, v: Tensor, dy: Tensor): Promise<Float32Array[]> {
  const ts = tf.tidy(() => {
    const { value, grads } = tf.valueAndGrads((a: Tensor, b: Tensor, c: Tensor) => core(a, b, c))([q, k, v], dy);
    return [value, ...grads];
  });
  const vals = await Promise.all(ts.map(async (t) => (await t.data()) as Float32Array));
  tf.dispose(ts);
  return vals;
}

function maxDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

// [BH, Tq, Tk, d]: the kernel's blocks are 2·MR query rows (12 or 24) forward, 8·MR backward
// (summed 2·MR at a time), and 4·NR keys (64 or 128); [2, 500, 64, 40] splits each head's rows
// between tasks at multiples of 2·MR, into full and partial backward blocks
const shapes: Array<[number, number, number, number]> = [
  [3, 29, 53, 8],
  [5, 31, 77, 40],
  [2, 61, 150, 64],
  [1, 7, 200, 160],
  [3, 1, 1, 40],
  [2, 500, 64, 40],
];

test('native attention core = whole TF-ops attention (output, dq, dk, dv within 1e-5)', { skip }, async () => {
  for (const [bh, tq, tk, d] of shapes) {
    const [q, k, v, dy] = [rand([bh, tq, d], 1), rand([bh, tk, d], 2), rand([bh, tk, d], 3), rand([bh, tq, d], 4)];
    const native = await outAndGrads(nativeAttentionCore, q, k, v, dy);
    const ref = await outAndGrads(wholeOps, q, k, v, dy);
    ['out', 'dq', 'dk', 'dv'].forEach((name, i) => {
      const diff = maxDiff(native[i]!, ref[i]!);
      assert.ok(diff <= 1e-5, `${[bh, tq, tk, d]} ${name}: max abs diff ${diff}`);
    });
    tf.dispose([q, k, v, dy]);
  }
});

const cosine = (a: Float32Array, b: Float32Array) => {
  let ab = 0, aa = 0, bb = 0;
  for (let i = 0; i < a.length; i++) ab += a[i]! * b[i]!, aa += a[i]! ** 2, bb += b[i]! ** 2;
  return ab / Math.sqrt(aa * bb);
};

test('native attention core in bf16: within 1% of max |value| (cosine ≥ 0.999) of float32 attention on bf16-rounded inputs', { skip }, async () => {
  const round = (t: Tensor) => tf.tensor((t.dataSync() as Float32Array).map((x) => bf16BitsToFloat(floatToBf16Bits(x))), t.shape);
  for (const [bh, tq, tk, d] of shapes.slice(0, 4)) {
    const [q, k, v, dy] = [rand([bh, tq, d], 31), rand([bh, tk, d], 32), rand([bh, tk, d], 33), rand([bh, tq, d], 34)];
    setComputePrecision('bf16');
    let mixed: Float32Array[];
    try {
      mixed = await outAndGrads(nativeAttentionCore, q, k, v, dy);
    } finally {
      setComputePrecision('fp32');
    }
    const plain = await outAndGrads(nativeAttentionCore, q, k, v, dy);
    const rounded = [q, k, v, dy].map(round);
    const ref = await outAndGrads(wholeOps, rounded[0]!, rounded[1]!, rounded[2]!, rounded[3]!);
    ['out', 'dq', 'dk', 'dv'].forEach((name, i) => {
      const max = ref[i]!.reduce((m, x) => Math.max(m, Math.abs(x)), 0);
      const diff = maxDiff(mixed[i]!, ref[i]!), cos = cosine(mixed[i]!, ref[i]!);
      assert.ok(diff <= 0.01 * max && cos >= 0.999, `${[bh, tq, tk, d]} ${name}: max abs diff ${diff} (max |value| ${max}), cosine ${cos}`);
    });
    assert.notDeepEqual(mixed[0], plain[0], 'the bf16 path ran');
    tf.dispose([q, k, v, dy, ...rounded]);
  }
});

test('nativeAttention on [B, T, heads·d] = layers.ts attention (heads split by transposes)', { skip }, async () => {
  for (const [b, heads, tq, tk, d] of [[2, 3, 29, 77, 40], [3, 2, 50, 13, 8]] as const) {
    const [q, k, v, dy] = [rand([b, tq, heads * d], 21), rand([b, tk, heads * d], 22), rand([b, tk, heads * d], 23), rand([b, tq, heads * d], 24)];
    const native = await outAndGrads((x, y, z) => nativeAttention(x, y, z, heads), q, k, v, dy);
    const ref = await outAndGrads((x, y, z) => attention(x, y, z, heads), q, k, v, dy);
    ['out', 'dq', 'dk', 'dv'].forEach((name, i) => {
      const diff = maxDiff(native[i]!, ref[i]!);
      assert.ok(diff <= 1e-5, `${[b, heads, tq, tk, d]} ${name}: max abs diff ${diff}`);
    });
    tf.dispose([q, k, v, dy]);
  }
});

test('slicedAttentionCore takes the native core; the TF-ops slices give the same numbers', { skip }, async () => {
  const [bh, tq, tk, d] = [4, 45, 45, 40];
  const [q, k, v, dy] = [rand([bh, tq, d], 5), rand([bh, tk, d], 6), rand([bh, tk, d], 7), rand([bh, tq, d], 8)];
  const native = await outAndGrads((a, b, c) => slicedAttentionCore(a, b, c, 7), q, k, v, dy);
  const ops = await outAndGrads((a, b, c) => slicedAttentionOps(a, b, c, 7), q, k, v, dy);
  ['out', 'dq', 'dk', 'dv'].forEach((name, i) => assert.ok(maxDiff(native[i]!, ops[i]!) <= 1e-5, name));
  const profile = await tf.profile(() => tf.tidy(() => tf.grads((a: Tensor, b: Tensor, c: Tensor) => slicedAttentionCore(a, b, c, 7))([q, k, v], dy)));
  tf.dispose(profile.result as Tensor[]);
  const kernels = profile.kernels.map((kernel) => kernel.name);
  assert.ok(kernels.includes('SidetrainAttention') && kernels.includes('SidetrainAttentionGrad'), kernels.join(','));
  assert.ok(!kernels.includes('Softmax'), 'no TF-ops softmax on the native path');
  tf.dispose([q, k, v, dy]);
});

test('native attention core leaks no tensors', { skip }, async () => {
  const [q, k, v, dy] = [rand([2, 30, 8], 9), rand([2, 20, 8], 10), rand([2, 20, 8], 11), rand([2, 30, 8], 12)];
  await outAndGrads(nativeAttentionCore, q, k, v, dy); // warm-up (kernel registration)
  const before = tf.memory().numTensors;
  await outAndGrads(nativeAttentionCore, q, k, v, dy);
  assert.equal(tf.memory().numTensors, before);
  tf.dispose([q, k, v, dy]);
});
