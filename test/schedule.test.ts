/**
 * @file Noise schedule goldens (from the checkpoint buffers and computed), q_sample and the loss
 * target on every fixture's training batch, the loss, the optional helpers, and a leak check.
 */
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { initBackend, tf, type Tensor } from '../trainers/tf.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import type { TensorSource } from '../trainers/io/types.ts';
import {
  computeSchedule, diffusionLoss, loadSchedule, offsetNoise, weightedDiffusionLoss, type Parameterization, type ScheduleConfig,
} from '../trainers/schedule.ts';

const FIXTURES = ['test/fixtures/sd-tiny', 'test/fixtures/sd2-tiny'];

interface GoldenJson {
  tensors: Record<string, { atol?: number }>;
  schedule: { linear_start: number; linear_end: number; timesteps: number };
  train_batch: { x0: string; noise: string; timesteps: number[]; parameterization: Parameterization };
}

function readJson(dir: string): GoldenJson {
  return JSON.parse(readFileSync(`${dir}/golden.json`, 'utf8')) as GoldenJson;
}

function scheduleConfig(g: GoldenJson): ScheduleConfig {
  return { linearStart: g.schedule.linear_start, linearEnd: g.schedule.linear_end, timesteps: g.schedule.timesteps };
}

function atolOf(g: GoldenJson, name: string): number {
  const a = g.tensors[name]?.atol;
  if (a === undefined) throw new Error(`no atol for ${name}`);
  return a;
}

function maxAbs(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

/** A golden NCHW tensor as NHWC. */
async function nhwc(file: TensorSource, name: string): Promise<Tensor> {
  const { shape } = file.info(name);
  const values = await file.read(name);
  return tf.tidy(() => tf.tensor(values, shape, 'float32').transpose([0, 2, 3, 1]));
}

/** A source that hides the schedule buffers, like checkpoints that lack them. */
function withoutBuffers(src: TensorSource): TensorSource {
  return { ...src, path: src.path, keys: () => [], has: () => false, info: src.info.bind(src), read: src.read.bind(src), metadata: () => ({}), close: async () => {} };
}

const SCHEDULE_FIELDS = [
  ['schedule.betas', 'betas'],
  ['schedule.alphas_cumprod', 'alphasCumprod'],
  ['schedule.sqrt_alphas_cumprod', 'sqrtAlphasCumprod'],
  ['schedule.sqrt_one_minus_alphas_cumprod', 'sqrtOneMinusAlphasCumprod'],
] as const;

before(async () => {
  await initBackend();
});

for (const dir of FIXTURES) {
  test(`schedule goldens, from the checkpoint buffers and computed: ${dir}`, async () => {
    const g = readJson(dir);
    const golden = await openSafetensors(`${dir}/golden.safetensors`);
    const model = await openSafetensors(`${dir}/model.safetensors`);
    const fromFile = await loadSchedule(model, scheduleConfig(g));
    const computed = await loadSchedule(withoutBuffers(model), scheduleConfig(g));
    for (const [name, field] of SCHEDULE_FIELDS) {
      const want = await golden.read(name);
      for (const [how, s] of [['file', fromFile], ['computed', computed]] as const) {
        const d = maxAbs(s[field], want);
        assert.ok(d <= atolOf(g, name), `${dir} ${name} (${how}): ${d} > ${atolOf(g, name)}`);
      }
      // the file's buffers are used as they are
      assert.deepEqual(fromFile[field], await model.read(name.slice('schedule.'.length)));
    }
    await model.close();
    await golden.close();
  });

  test(`q_sample and the training target on the training batch: ${dir}`, async () => {
    const g = readJson(dir);
    const golden = await openSafetensors(`${dir}/golden.safetensors`);
    const model = await openSafetensors(`${dir}/model.safetensors`);
    const schedule = await loadSchedule(model, scheduleConfig(g));
    const x0 = await nhwc(golden, g.train_batch.x0);
    const noise = await nhwc(golden, g.train_batch.noise);
    const ts = g.train_batch.timesteps;
    const xNoisy = schedule.qSample(x0, noise, ts);
    const target = schedule.targetFor(g.train_batch.parameterization, x0, noise, ts);
    for (const [name, ours] of [['train.x_noisy', xNoisy], ['train.target', target]] as const) {
      const want = await nhwc(golden, name);
      const d = maxAbs(await ours.data(), await want.data());
      assert.ok(d <= atolOf(g, name), `${dir} ${name}: ${d} > ${atolOf(g, name)}`);
      want.dispose();
    }
    tf.dispose([x0, noise, xNoisy, target]);
    await model.close();
    await golden.close();
  });
}

test('v target, loss, Min-SNR weights, noise offset; no tensors left behind', async () => {
  const s = await loadSchedule(undefined);
  const x0 = tf.randomNormal([2, 4, 4, 4]);
  const noise = tf.randomNormal([2, 4, 4, 4]);
  const ts = [0, 999];
  const before = tf.memory().numTensors;
  const v = s.targetFor('v', x0, noise, ts);
  // v = sqrt(acp)·noise − sqrt(1−acp)·x0, checked element-wise for sample 1
  const [x0v, nv, vv] = await Promise.all([x0.data(), noise.data(), v.data()]);
  const half = x0v.length / 2;
  const a = s.sqrtAlphasCumprod[999]!;
  const b = s.sqrtOneMinusAlphasCumprod[999]!;
  for (let i = half; i < half + 8; i++) assert.ok(Math.abs(vv[i]! - (a * nv[i]! - b * x0v[i]!)) < 1e-6);
  const loss = diffusionLoss(v, noise);
  const mse = Array.from(vv).reduce((acc, x, i) => acc + (x - nv[i]!) ** 2, 0) / vv.length;
  assert.ok(Math.abs((await loss.data())[0]! - mse) < 1e-5);
  const w = s.minSnrWeights(ts, 5, 'eps');
  assert.ok(w[0]! < 1 && Math.abs(w[1]! - 1) < 1e-12); // high SNR at t=0 is clipped, low SNR at 999 is not
  const weighted = weightedDiffusionLoss(v, noise, [1, 1]);
  assert.ok(Math.abs((await weighted.data())[0]! - mse) < 1e-5);
  const perChannel = tf.ones([2, 1, 1, 4]);
  const off = offsetNoise(noise, 0.1, perChannel);
  const shift = tf.tidy(() => off.sub(noise).mean());
  assert.ok(Math.abs((await shift.data())[0]! - 0.1) < 1e-6);
  tf.dispose([v, loss, weighted, perChannel, off, shift]);
  assert.equal(tf.memory().numTensors, before);
  assert.throws(() => s.qSample(x0, noise, [1000, 0]), /timestep 1000 outside 0\.\.999/);
  assert.throws(() => s.targetFor('x0' as Parameterization, x0, noise, ts), /unknown 'x0'/);
  assert.equal(computeSchedule().betas.length, 1000);
  tf.dispose([x0, noise]);
});
