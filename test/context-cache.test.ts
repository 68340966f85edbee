/** @file encodeFrozenText: the same numbers as encodeText, each prompt encoded once, released with the weights. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { tf, initBackend } from '../trainers/backend/index.ts';
import { loadSdModel } from '../trainers/nets/sd.ts';
import { encodeText } from '../trainers/nets/clip.ts';
import { encodeFrozenText, releaseTextCache } from '../trainers/train/context-cache.ts';
import { disposeParams } from '../trainers/nets/params.ts';
import { maxAbsDiff } from './helpers/golden.ts';

await initBackend();

test('encodeFrozenText equals encodeText, reuses rows, and leaves no tensor after release', async () => {
  const model = await loadSdModel('test/fixtures/sd-tiny/model.safetensors', ['text']);
  const { params, cfg } = model.text!;
  const a = Array.from({ length: 77 }, (_, i) => (i === 0 ? 49406 : i < 4 ? 320 + i : 49407));
  const b = Array.from({ length: 77 }, (_, i) => (i === 0 ? 49406 : i < 3 ? 500 + i : 49407));
  const before = tf.memory().numTensors;
  const first = encodeFrozenText(params, cfg, [a, b, a]);
  const want = encodeText(params, cfg, [a, b, a]);
  assert.ok((await maxAbsDiff(first, want)) < 1e-6);
  const cachedTensors = tf.memory().numTensors;
  const again = encodeFrozenText(params, cfg, [b, a]); // both cached: nothing encoded, one new tensor
  assert.equal(tf.memory().numTensors, cachedTensors + 1);
  const swapped = tf.tidy(() => tf.concat([want.slice(1, 1), want.slice(0, 1)]));
  assert.ok((await maxAbsDiff(again, swapped)) < 1e-6);
  tf.dispose([first, want, again, swapped]);
  releaseTextCache(params);
  assert.equal(tf.memory().numTensors, before);
  disposeParams(params);
  await model.source.close();
});
