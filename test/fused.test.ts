/**
 * @file The fused norm/activation ops (trainers/nets/fused.ts) on the cpu-native backend against
 * their TF-ops versions: outputs and the gradients of every input (x, weight, bias), odd shapes
 * (channels that are not a multiple of the 8-lane vectors), batch 2, non-zero means; no leaked
 * tensors. Skipped, with the reason, when the addon is not built.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { initBackend, tf, type Tensor } from '../trainers/backend/index.ts';
import { nativeStatus } from '../trainers/backend/native/index.ts';
import { nativeSkip } from './helpers/native.ts';
import { poisonOutputs } from '../trainers/backend/native/output.ts';

poisonOutputs(true); // outputs start as NaN: an element a kernel leaves unwritten fails a comparison
import { geluFused, groupNormFused, layerNormFused, setFusedKernels, siluFused } from '../trainers/nets/fused.ts';

const status = nativeStatus();
const skip = nativeSkip(status.available ? false : status.reason);

/** Deterministic uniform [lo, hi) values (a small LCG, so failures reproduce). */
function rand(shape: number[], seed: number, lo = -1, hi = 1): Tensor {
  let s = seed >>> 0;
  const n = shape.reduce((a, b) => a * b, 1);
  const v = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    v[i] = lo + (s / 2 ** 32) * (hi - lo);
  }
  return tf.tensor(v, shape);
}

/** Output and the gradients of Σ f(xs)·dy for every input, with the fused kernels on or off. */
async function run(fused: boolean, f: (...xs: Tensor[]) => Tensor, xs: Tensor[], dy: Tensor): Promise<Float32Array[]> {
  const was = setFusedKernels(fused);
  try {
    const outs = tf.tidy(() => [f(...xs), ...tf.grads((...a: Tensor[]) => f(...a))(xs, dy)]);
    const vals = await Promise.all(outs.map(async (t) => (await t.data()) as Float32Array));
    tf.dispose(outs);
    return vals;
  } finally {
    setFusedKernels(was);
  }
}

/** Fused vs TF ops: every value within 1e-5 (plus 1e-5 relative, for the summed weight gradients). */
async function check(label: string, f: (...xs: Tensor[]) => Tensor, xs: Tensor[]): Promise<void> {
  const dy = tf.tidy(() => rand(f(...xs).shape, 99));
  const before = tf.memory().numTensors;
  const fused = await run(true, f, xs, dy);
  assert.equal(tf.memory().numTensors, before, `${label}: leaked tensors`);
  const ref = await run(false, f, xs, dy);
  const names = ['y', ...xs.map((_, i) => `grad ${i}`)];
  fused.forEach((v, i) => {
    const r = ref[i]!;
    assert.equal(v.length, r.length, `${label} ${names[i]}: length`);
    let worst = 0;
    for (let j = 0; j < v.length; j++) worst = Math.max(worst, Math.abs(v[j]! - r[j]!) - 1e-5 * Math.abs(r[j]!));
    assert.ok(worst <= 1e-5, `${label} ${names[i]}: max excess error ${worst}`);
  });
  tf.dispose([dy, ...xs]);
}

test('fused ops match the TF-ops versions (values and gradients)', { skip }, async (t) => {
  await initBackend('cpu-native');
  const gn = (groups: number, eps: number, silu: boolean) => (x: Tensor, w: Tensor, b: Tensor) => groupNormFused(x, w, b, groups, eps, silu);
  for (const silu of [false, true]) {
    await t.test(`groupNorm${silu ? ' + SiLU' : ''}`, async () => {
      await check('gn [2,5,7,12] G4', gn(4, 1e-5, silu), [rand([2, 5, 7, 12], 1, 1, 4), rand([12], 2), rand([12], 3)]);
      await check('gn [2,3,4,64] G32', gn(32, 1e-6, silu), [rand([2, 3, 4, 64], 4, -3, 2), rand([64], 5, 0.5, 1.5), rand([64], 6)]);
      await check('gn [1,1,1,6] G2', gn(2, 1e-5, silu), [rand([1, 1, 1, 6], 7), rand([6], 8), rand([6], 9)]);
    });
  }
  await t.test('layerNorm', async () => {
    const ln = (x: Tensor, w: Tensor, b: Tensor) => layerNormFused(x, w, b, 1e-5);
    await check('ln [2,7,13]', ln, [rand([2, 7, 13], 10, -2, 3), rand([13], 11), rand([13], 12)]);
    await check('ln [2,5,40]', ln, [rand([2, 5, 40], 13), rand([40], 14), rand([40], 15)]);
    await check('ln [3,77]', ln, [rand([3, 77], 16, 0, 5), rand([77], 17), rand([77], 18)]);
  });
  await t.test('SiLU and GELU', async () => {
    await check('silu [2,3,37]', (x) => siluFused(x), [rand([2, 3, 37], 19, -8, 8)]);
    await check('gelu [2,3,37]', (x) => geluFused(x), [rand([2, 3, 37], 20, -6, 6)]);
  });
});

test('fused ops without gradients: forward only, nothing saved or leaked', { skip }, async () => {
  await initBackend('cpu-native');
  const x = rand([2, 4, 4, 8], 21), w = rand([8], 22), b = rand([8], 23);
  const before = tf.memory().numTensors;
  const y = groupNormFused(x, w, b, 4, 1e-5, true);
  assert.equal(tf.memory().numTensors, before + 1);
  assert.deepEqual(y.shape, [2, 4, 4, 8]);
  tf.dispose([x, w, b, y]);
});
