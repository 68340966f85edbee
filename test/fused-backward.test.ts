/**
 * @file Fused backward (train/loop.ts `fused`, nets/recompute.ts `onGrad`): each gradient applied
 * as the backward pass completes it gives bit-identical weights to the unfused step after N steps
 * (same float32 operations on the same gradient values: a block's weight gradient is handed over
 * exactly when the unfused path would have finished summing it) — for AdamW, 8-bit AdamW and
 * Adafactor, with a variable shared by two blocks and one read outside every block; block-local
 * gradients are applied inside the backward pass; the combinations it cannot do are refused with
 * the option named. Then a Dreambooth run on the tiny SD1 fixture, UNet and text encoder trained.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend, tf, type Tensor } from '../trainers/backend/index.ts';
import { checkpointed, lossAndGrads } from '../trainers/nets/recompute.ts';
import { trainLoop, type LoopOptions, type TrainMethod } from '../trainers/train/loop.ts';
import { TrainableOptimizer, makeGroupOptimizer, type OptimizerName } from '../trainers/optim/trainable.ts';
import { makeClipper } from '../trainers/optim/clip-grad.ts';
import { unetMemoryFor } from '../trainers/memory/options.ts';
import { validate } from '../schemas/index.ts';
import { dreamboothSpec, runDreambooth, type DbSpec } from '../trainers/methods/dreambooth.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import type { JobContext } from '../trainers/job.ts';
import { onGradBackend } from './helpers/golden.ts';

let tmp: string;
before(async () => {
  await initBackend();
  tmp = mkdtempSync(join(tmpdir(), 'sidetrain-fused-'));
});
after(() => rmSync(tmp, { recursive: true, force: true }));

const ctx = (): JobContext => ({ emit: () => {}, signal: new AbortController().signal });

/** A toy net: two checkpointed blocks (w1, w2, `big` (8-bit moments: over 4096 values) in one; `shared` in both) and `u` on the tape (the smallest: the anchor's). */
function toy(seed: number) {
  const v = (shape: number[], i: number) => tf.variable(tf.randomNormal(shape, 0, 0.5, 'float32', seed + i), true);
  const vars = new Map([['w1', v([24, 24], 1)], ['w2', v([24, 24], 2)], ['shared', v([24], 3)], ['u', v([1], 4)], ['big', v([3, 3, 24, 24], 5)]]);
  const p = (k: string) => vars.get(k)!;
  const block1 = (h: Tensor) => tf.tanh(tf.matMul(h, p('w1')).add(p('shared')));
  const block2 = (h: Tensor) => tf.conv2d(tf.tanh(tf.matMul(h, p('w2')).add(p('shared'))).reshape([1, 2, 2, 24]) as tf.Tensor4D, p('big') as tf.Tensor4D, 1, 'same').reshape([4, 24]);
  const loss = (x: Tensor) => checkpointed(block2, [checkpointed(block1, [x.mul(p('u'))])]).square().mean() as tf.Scalar;
  return { vars, loss };
}

async function train(name: OptimizerName, fused: boolean, steps: number, clip?: LoopOptions['clip']) {
  const { vars, loss } = toy(10);
  const optimizer = new TrainableOptimizer(makeGroupOptimizer(name, vars));
  const parts: string[][] = [];
  const step = optimizer.stepPart.bind(optimizer);
  optimizer.stepPart = (grads, lr) => { parts.push([...grads.keys()]); step(grads, lr); };
  const method: TrainMethod<Tensor> = {
    trainable: vars, nextBatch: (s) => tf.randomNormal([4, 24], 0, 1, 'float32', 100 + s), loss, save: async () => [], disposeBatch: (b) => b.dispose(),
  };
  await trainLoop(method, { startStep: 0, steps, gradAccum: 1, learnRate: (d) => 0.01 / (1 + d), optimizer, saveEvery: 0, previewEvery: 0, stepsPerEpoch: 1, fused, clip }, ctx());
  const out = new Map(await Promise.all([...vars].map(async ([k, t]) => [k, await t.data()] as const)));
  optimizer.dispose();
  vars.forEach((t) => t.dispose());
  return { out, parts };
}

for (const name of ['adamw', 'adamw8bit', 'adafactor'] as const) {
  test(`fused backward, ${name}: 5 steps give bit-identical weights to the unfused step`, async () => {
    const plain = await train(name, false, 5);
    const fused = await train(name, true, 5);
    for (const [k, want] of plain.out) assert.deepEqual(fused.out.get(k), want, k);
    // block-local weights go one by one inside the backward pass (block2's first); the shared one
    // after its second block, u (read outside the blocks) with the rest at the end
    assert.deepEqual(fused.parts.slice(0, 5), [['w2'], ['big'], ['w1'], ['shared'], ['u']]);
    assert.equal(fused.parts.length, 5 * 5, 'per step: four parts inside the backward pass and one at the end');
  });
}

test('fused backward: clipping by value is per element (identical), by norm is refused', async () => {
  const byValue = makeClipper('value', () => 0.01)!;
  const plain = await train('adamw', false, 3, byValue);
  const fused = await train('adamw', true, 3, byValue);
  for (const [k, want] of plain.out) assert.deepEqual(fused.out.get(k), want, k);
  await assert.rejects(train('adamw', true, 1, makeClipper('norm', () => 1)), /fusedBackward cannot clip by the global gradient norm/);
});

test('fused backward: gradient accumulation and checkpointing off are refused, naming the options', async () => {
  const { vars, loss } = toy(1);
  const method: TrainMethod<Tensor> = { trainable: vars, nextBatch: () => tf.ones([4, 24]), loss, save: async () => [] };
  const optimizer = new TrainableOptimizer(makeGroupOptimizer('adamw', vars));
  await assert.rejects(
    trainLoop(method, { startStep: 0, steps: 1, gradAccum: 2, learnRate: () => 0.1, optimizer, saveEvery: 0, previewEvery: 0, stepsPerEpoch: 1, fused: true }, ctx()),
    /cannot sum 2 micro-batches \(gradAccum\)/,
  );
  optimizer.dispose();
  vars.forEach((t) => t.dispose());
  assert.throws(() => unetMemoryFor({ gradientCheckpointing: 'off', fusedBackward: true }, true), /fusedBackward needs gradient checkpointing/);
  assert.equal(unetMemoryFor({ gradientCheckpointing: 'auto', fusedBackward: true }, true).checkpointing, true);
});

test('lossAndGrads with onGrad: nothing leaks, and the handed-over gradients equal the plain ones', async () => {
  const { vars, loss } = toy(20);
  const x = tf.randomNormal([4, 24], 0, 1, 'float32', 7);
  const plain = lossAndGrads(() => loss(x), vars);
  const before = tf.memory().numTensors;
  const got = new Map<string, Float32Array>();
  const fused = lossAndGrads(() => loss(x), vars, (name, g) => got.set(name, g.dataSync() as Float32Array));
  for (const [k, g] of Object.entries(fused.grads)) got.set(k, g.dataSync() as Float32Array);
  tf.dispose([fused.value, ...Object.values(fused.grads)]);
  assert.equal(tf.memory().numTensors, before, 'no tensor left behind');
  for (const [k, g] of Object.entries(plain.grads)) assert.deepEqual(got.get(k), g.dataSync(), k);
  tf.dispose([plain.value, ...Object.values(plain.grads), x]);
  vars.forEach((t) => t.dispose());
});

test('Dreambooth on sd-tiny (UNet + text encoder, Adafactor): fusedBackward writes the same checkpoint as the unfused run', async () => {
  const images = join(tmp, 'images');
  mkdirSync(images);
  for (const f of ['01-orange cat.png', 'green_triangle.png']) copyFileSync(join('test/fixtures/images', f), join(images, f));
  const specFor = (name: string, extra: Record<string, unknown>): DbSpec => {
    const raw: Record<string, unknown> = {
      model: 'test/fixtures/sd-tiny/model.safetensors', images, name, instancePrompt: 'a photo of sks cat', width: 64, height: 64, steps: 3, lr: '0.001',
      seed: 5, logDir: join(tmp, 'logs'), checkpointDir: join(tmp, 'ckpt'), gradientCheckpointing: 'on', trainTextEncoder: true, textEncoderLr: '0.0005',
      optimizer: 'adafactor', saveEvery: 0, previewEvery: 0, ...extra,
    };
    assert.deepEqual(validate('dreambooth', raw), []);
    return dreamboothSpec(raw as unknown as DbSpec);
  };
  await onGradBackend(async () => {
    const a = await runDreambooth(specFor('plain', {}), ctx());
    const b = await runDreambooth(specFor('fused', { fusedBackward: true }), ctx());
    const fa = await openSafetensors(a.output);
    const fb = await openSafetensors(b.output);
    try {
      assert.deepEqual(fb.keys().sort(), fa.keys().sort());
      for (const k of fa.keys()) assert.deepEqual(await fb.read(k), await fa.read(k), k);
    } finally {
      await fa.close();
      await fb.close();
    }
  });
});
