import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { tf, initBackend } from '../trainers/backend/index.ts';
import { Ema } from '../trainers/optim/ema.ts';

let tmp: string;
before(async () => {
  await initBackend();
  tmp = await mkdtemp(join(tmpdir(), 'ema-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

const close = (a: ArrayLike<number>, b: number[]) => {
  assert.equal(a.length, b.length);
  for (let i = 0; i < b.length; i++) assert.ok(Math.abs(a[i]! - b[i]!) < 1e-6, `[${i}] ${a[i]} vs ${b[i]}`);
};

test('EMA update against a hand-computed example (decay 0.9, every 2 steps)', async () => {
  const w = tf.variable(tf.tensor2d([[1, 2], [3, 4]]));
  const params = new Map([['a.weight', w as tf.Tensor]]);
  const ema = await Ema.fromParams(params, { decay: 0.9, every: 2 });
  // step 1: not due
  w.assign(tf.tensor2d([[2, 2], [2, 2]]));
  assert.equal(ema.due(1), false);
  // step 2: due, param = [[3, 0], [3, 14]] → 0.9·[1,2,3,4] + 0.1·[3,0,3,14] = [1.2, 1.8, 3.0, 5.0]
  w.assign(tf.tensor2d([[3, 0], [3, 14]]));
  assert.equal(ema.due(2), true);
  await ema.update(params);
  close(ema.weights().get('a.weight')!.values, [1.2, 1.8, 3.0, 5.0]);
  // step 4: param = [0, 0, 0, 0] → 0.9·[1.2,1.8,3,5] = [1.08, 1.62, 2.7, 4.5]
  w.assign(tf.zeros([2, 2]));
  await ema.update(params);
  close(ema.weights().get('a.weight')!.values, [1.08, 1.62, 2.7, 4.5]);
  assert.deepEqual(ema.weights().get('a.weight')!.shape, [2, 2]);
  assert.equal(ema.updates, 2);
  w.dispose();
});

test('warm-up decay: min(decay, (1+u)/(10+u))', () => {
  const ema = Ema.fromArrays(new Map([['x', { values: new Float32Array([0]), shape: [1] }]]), { decay: 0.99, warmup: true });
  assert.equal(ema.currentDecay(), 0.1);
  ema.updateArrays(new Map([['x', [10]]])); // 0.1·0 + 0.9·10 = 9
  close(ema.weights().get('x')!.values, [9]);
  assert.equal(ema.currentDecay(), 2 / 11);
  ema.updateArrays(new Map([['x', [0]]])); // (2/11)·9
  close(ema.weights().get('x')!.values, [18 / 11]);
});

test('state saves and loads exactly; the loaded average continues identically', async () => {
  const ema = Ema.fromArrays(new Map([['k', { values: new Float32Array([0.1, 0.2, 0.3]), shape: [3] }]]), { decay: 0.95, every: 3, warmup: true });
  ema.updateArrays(new Map([['k', [1, 2, 3]]]));
  const path = join(tmp, 'ema.safetensors');
  await ema.save(path);
  const back = await Ema.load(path);
  assert.deepEqual(back.options, ema.options);
  assert.equal(back.updates, 1);
  assert.deepEqual(back.weights(), ema.weights());
  ema.updateArrays(new Map([['k', [5, 5, 5]]]));
  back.updateArrays(new Map([['k', [5, 5, 5]]]));
  assert.deepEqual(back.weights(), ema.weights());
  assert.throws(() => Ema.fromArrays(new Map(), { decay: 1 }), /decay/);
  assert.throws(() => ema.updateArrays(new Map()), /no value for 'k'/);
});
