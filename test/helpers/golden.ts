/** @file Small helpers the network tests share: tensor comparison, key-list files, gradient backend. */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { tf, type Tensor } from '../../trainers/backend/tf.ts';

/** max |a − b| over all elements (shapes must match). */
export async function maxAbsDiff(a: Tensor, b: Tensor): Promise<number> {
  assert.deepEqual(a.shape, b.shape);
  const d = tf.tidy(() => tf.abs(tf.sub(a, b)).max());
  const v = (await d.data())[0]!;
  d.dispose();
  return v;
}

/** A `{key: shape}` file (keys-sd15.json, keys-sd21.json) as a map. */
export function keyShapes(path: string): Map<string, number[]> {
  return new Map(Object.entries(JSON.parse(readFileSync(path, 'utf8')) as Record<string, number[]>));
}

/** Run `fn` on a backend that has the conv weight-gradient kernel (the CPU backend if the current lacks it). */
export async function onGradBackend(fn: () => Promise<void>): Promise<void> {
  const original = tf.getBackend();
  const switchTo = tf.getKernel('Conv2DBackpropFilter', original) ? undefined : 'cpu';
  if (switchTo) await tf.setBackend(switchTo);
  try {
    await fn();
  } finally {
    if (switchTo) await tf.setBackend(original);
  }
}
