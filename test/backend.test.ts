import { test } from 'node:test';
import assert from 'node:assert/strict';
import { initBackend, currentBackend, BACKEND_ORDER, tf } from '../trainers/backend/index.ts';

test('initBackend picks a backend, says which, and explains the ones it skipped', async () => {
  const choice = await initBackend();
  assert.ok(BACKEND_ORDER.includes(choice.name));
  assert.equal(currentBackend(), choice);
  for (const line of choice.skipped) assert.match(line, /^[a-z-]+: .+/);
  // gradients are registered (tfjs-core alone registers none in Node)
  const g = tf.grad((x: tf.Tensor) => x.square().sum())(tf.tensor([1, 2, 3]));
  assert.deepEqual(Array.from(await g.data()), [2, 4, 6]);
});

test('comparisons have zero gradients (tf.where(greater(…)) trains, e.g. mish/softplus hypernetworks)', async () => {
  await initBackend();
  const f = (x: tf.Tensor) => tf.where(tf.greater(x, 0), x.square(), tf.where(tf.less(x, -5), x.mul(0), x.mul(2))).sum();
  const g = tf.grad(f)(tf.tensor([-1, 2, -6]));
  assert.deepEqual(Array.from(await g.data()), [2, 4, 0]);
});
