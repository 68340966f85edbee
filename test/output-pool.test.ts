/**
 * @file The native kernels' output arrays are recycled (trainers/backend/native/output.ts): a
 * disposed output's array is the next output of its length, but never while another tensor holds
 * it (a contiguous slice is a view), never once its values were read out, and never while a
 * caller made it a tensor again; idle arrays give way to new lengths. Outputs are NaN-poisoned
 * here, so a recycled array a kernel does not fully overwrite fails the comparisons.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { initBackend, tf, type Tensor } from '../trainers/backend/index.ts';
import { nativeStatus } from '../trainers/backend/native/index.ts';
import { outputPoolStats, poisonOutputs, recycleOutputArrays, releaseIdleOutputs } from '../trainers/backend/native/output.ts';
import { nativeSkip } from './helpers/native.ts';

poisonOutputs(true);

const status = nativeStatus();
const skip = nativeSkip(status.available ? false : status.reason);

/** The CPU backend's own array of t (no readSync: reading out would exclude it from recycling). */
const own = (t: Tensor) => (tf.backend() as unknown as { data: { get(id: object): { values: Float32Array } } }).data.get(t.dataId).values;

const input = (n: number, seed: number, shape = [n]) => tf.tensor(Float32Array.from({ length: n }, (_, i) => Math.sin(i * 0.37 + seed)), shape);
const expOf = (x: Tensor) => Float32Array.from(x.dataSync(), Math.exp);

function assertNear(actual: ArrayLike<number>, expected: ArrayLike<number>, label: string) {
  assert.equal(actual.length, expected.length, `${label}: length`);
  for (let i = 0; i < expected.length; i++) {
    assert.ok(Math.abs(actual[i]! - expected[i]!) <= 1e-6 * Math.abs(expected[i]!), `${label}: [${i}] ${actual[i]} vs ${expected[i]}`);
  }
}

test('a disposed output is the next output of its length, fully rewritten', { skip }, async () => {
  await initBackend('cpu-native');
  releaseIdleOutputs();
  const a = input(96, 1), b = input(96, 2);
  const y = tf.exp(a);
  const buffer = own(y).buffer;
  y.dispose();
  assert.equal(outputPoolStats().idleBytes, 96 * 4);
  const z = tf.exp(b);
  assert.equal(own(z).buffer, buffer, 'the idle array was taken');
  assertNear(z.dataSync(), expOf(b), 'exp of the second input');
  tf.dispose([a, b, z]);
});

test('an array a view still holds is not recycled', { skip }, async () => {
  await initBackend('cpu-native');
  releaseIdleOutputs();
  const a = input(64, 3, [4, 16]), b = input(64, 4);
  const expected = expOf(a).slice(0, 32);
  const y = tf.exp(a);
  const view = y.slice([0, 0], [2, 16]); // contiguous: the stock Slice returns a view of y's array
  const buffer = own(y).buffer;
  y.dispose();
  const z = tf.exp(b);
  assert.notEqual(own(z).buffer, buffer);
  assertNear(view.dataSync(), expected, 'the view after its source was disposed');
  tf.dispose([a, b, view, z]);
});

test('an array whose values were read out is never recycled', { skip }, async () => {
  await initBackend('cpu-native');
  releaseIdleOutputs();
  const a = input(80, 5), b = input(80, 6);
  const y = tf.exp(a);
  const values = y.dataSync(), copy = Float32Array.from(values);
  const buffer = own(y).buffer;
  y.dispose();
  assert.equal(outputPoolStats().idleBytes, 0);
  const z = tf.exp(b);
  assert.notEqual(own(z).buffer, buffer);
  assert.deepEqual(values, copy, 'the read-out array kept its values');
  tf.dispose([a, b, z]);
});

test('an idle array made a tensor again is not handed out', { skip }, async () => {
  await initBackend('cpu-native');
  releaseIdleOutputs();
  const a = input(48, 7), b = input(48, 8);
  const y = tf.exp(a);
  const kept = own(y), expected = Float32Array.from(kept);
  y.dispose();
  const again = tf.tensor(kept, [48]); // a caller that kept the array past its tensor
  const z = tf.exp(b);
  assert.deepEqual(own(again), expected, 'the re-made tensor kept its values');
  assertNear(z.dataSync(), expOf(b), 'the new output');
  tf.dispose([a, b, again, z]);
});

test('an output of a new length drops as many idle bytes first; release and off empty the list', { skip }, async () => {
  await initBackend('cpu-native');
  releaseIdleOutputs();
  const a = input(256, 9), b = input(100, 10);
  tf.exp(a).dispose();
  assert.equal(outputPoolStats().idleBytes, 256 * 4);
  const dropped = outputPoolStats().dropped;
  const z = tf.exp(b); // 400 bytes, no idle array of that length: the 1024 idle bytes go
  assert.equal(outputPoolStats().idleBytes, 0);
  assert.equal(outputPoolStats().dropped, dropped + 1);
  z.dispose();
  assert.equal(outputPoolStats().idleBytes, 100 * 4);
  releaseIdleOutputs();
  assert.equal(outputPoolStats().idleBytes, 0);
  const was = recycleOutputArrays(false);
  tf.exp(a).dispose();
  assert.equal(outputPoolStats().idleBytes, 0, 'recycling off');
  recycleOutputArrays(was);
  a.dispose();
  b.dispose();
});

test('repeated gradient steps give identical results with recycling, and leak nothing', { skip }, async () => {
  await initBackend('cpu-native');
  releaseIdleOutputs();
  const x = tf.randomNormal([2, 12, 12, 8], 0, 1, 'float32', 1);
  const w = tf.variable(tf.randomNormal([3, 3, 8, 16], 0, 0.2, 'float32', 2));
  const m = tf.variable(tf.randomNormal([16, 24], 0, 0.2, 'float32', 3));
  const step = () => {
    const { value, grads } = tf.variableGrads(() =>
      tf.conv2d(x as tf.Tensor4D, w as tf.Tensor4D, 1, 'same').relu().reshape([-1, 16]).matMul(m).exp().mean() as tf.Scalar, [w, m]);
    const out = [value.dataSync()[0]!, ...grads[w.name]!.dataSync(), ...grads[m.name]!.dataSync()];
    tf.dispose([value, ...Object.values(grads)]);
    return out;
  };
  const before = tf.memory().numTensors;
  const first = step();
  const reused = outputPoolStats().reused;
  for (let i = 0; i < 3; i++) assert.deepEqual(step(), first, `step ${i + 2}`);
  assert.ok(outputPoolStats().reused > reused, 'later steps took recycled arrays');
  assert.equal(tf.memory().numTensors, before);
  tf.dispose([x, w, m]);
});
