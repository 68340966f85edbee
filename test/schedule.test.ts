/**
 * @file Noise schedule goldens (from the checkpoint buffers and computed), q_sample and the loss
 * target on every fixture's training batch, the loss, the optional helpers, a leak check, and the
 * preview sampler built on the schedule (DDIM/Euler with a stub model, PNG infotext).
 */
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { initBackend, tf, type Tensor } from '../trainers/backend/index.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import type { TensorSource } from '../trainers/io/types.ts';
import { disposeParams } from '../trainers/nets/params.ts';
import { loadVae, vaeConfigFromKeys } from '../trainers/nets/vae.ts';
import { ddimTimesteps, eulerSigmas, sampleImage, sampleLatents, savePreviewPng, type Denoiser } from '../trainers/train/sample.ts';
import { seededNormal } from '../trainers/random.ts';
import {
  computeSchedule, diffusionLoss, loadSchedule, offsetNoise, weightedDiffusionLoss, type Parameterization, type ScheduleConfig,
} from '../trainers/nets/noise-schedule.ts';

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

// ---------------------------------------------------------------- preview sampler

test('preview sampler: DDIM and Euler, eps and v, with guidance: finite, right size, deterministic, no leaks; PNG with infotext', async () => {
  const model = await openSafetensors('test/fixtures/sd-tiny/model.safetensors');
  const vae = await loadVae(model, { parts: ['decoder'] });
  const schedule = await loadSchedule(model);
  const context = tf.randomNormal([1, 77, 32], 0, 1, 'float32', 1);
  const uncondContext = tf.zeros([1, 77, 32]);
  // a stub model that depends on latents, timestep and context, so guidance and steps matter
  const denoise: Denoiser = (x, t, ctx) =>
    tf.tidy(() => x.mul(0.5).add(ctx.mean([1, 2]).reshape([-1, 1, 1, 1]).mul(t / 1000)));
  const inputs = { denoise, schedule, vae, context, uncondContext };
  const dir = await mkdtemp(join(tmpdir(), 'sidetrain-sample-'));
  for (const sampler of ['ddim', 'euler'] as const) {
    for (const parameterization of ['eps', 'v'] as const) {
      const opts = { sampler, parameterization, steps: 2, cfgScale: 7, seed: 42, width: 64, height: 48 };
      await sampleImage(inputs, opts); // burn-in
      const before = tf.memory().numTensors;
      const a = await sampleImage(inputs, opts);
      assert.equal(tf.memory().numTensors, before, `${sampler}/${parameterization} leaks tensors`);
      const b = await sampleImage(inputs, opts);
      const c = await sampleImage(inputs, { ...opts, seed: 43 });
      assert.equal(a.rgb.length, 64 * 48 * 3);
      assert.deepEqual(a.rgb, b.rgb, 'same seed, same image');
      assert.notDeepEqual(a.rgb, c.rgb, 'another seed, another image');
      const latents = sampleLatents(inputs, opts);
      assert.deepEqual(latents.shape, [1, 6, 8, 4]);
      assert.ok((await latents.data()).every(Number.isFinite));
      latents.dispose();
    }
  }
  const { rgb, width, height } = await sampleImage(inputs, { parameterization: 'eps', steps: 2, seed: 1, width: 64, height: 64 });
  const path = join(dir, 'preview.png');
  const infotext = 'a photo of pallas_cat — ünïcode\nSteps: 2, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64';
  await savePreviewPng(path, rgb, width, height, infotext);
  const meta = await sharp(path).metadata();
  assert.deepEqual([meta.width, meta.height, meta.channels], [64, 64, 3]);
  assert.deepEqual(meta.comments, [{ keyword: 'parameters', text: infotext }]);
  const back = await sharp(path).raw().toBuffer();
  assert.deepEqual(new Uint8Array(back), rgb);
  await savePreviewPng(path, rgb, width, height, 'Steps: 2, Seed: 1'); // Latin-1 → tEXt; overwrites
  assert.deepEqual((await sharp(path).metadata()).comments, [{ keyword: 'parameters', text: 'Steps: 2, Seed: 1' }]);
  assert.throws(() => sampleLatents(inputs, { parameterization: 'eps', seed: 1, width: 60, height: 64 }), /multiples of 8/);
  assert.throws(() => sampleLatents({ ...inputs, uncondContext: undefined }, { parameterization: 'eps', seed: 1, width: 64, height: 64 }), /uncondContext/);
  assert.deepEqual(ddimTimesteps(20, 1000).slice(0, 3), [1, 51, 101]);
  assert.equal(eulerSigmas(schedule.alphasCumprod, 20).sigmas.length, 21);
  tf.dispose([context, uncondContext]);
  disposeParams(vae.params);
  await model.close();
  await rm(dir, { recursive: true });
});

async function maxDiff(a: Tensor, b: Tensor): Promise<number> {
  const d = tf.tidy(() => tf.abs(a.sub(b)).max());
  const v = (await d.data())[0]!;
  d.dispose();
  return v;
}

test('preview sampler math: an oracle model that knows the clean latent leads DDIM and Euler to it (eps and v)', async () => {
  const schedule = await loadSchedule(undefined);
  const acp = schedule.alphasCumprod;
  const cfg = { ...vaeConfigFromKeys(new Map(Object.entries(JSON.parse(readFileSync('test/fixtures/sd-tiny/keys-sd15.json', 'utf8')) as Record<string, number[]>))) };
  const vae = { params: new Map(), cfg };
  const shape = [1, 2, 4, 4]; // 16×32 px
  const clean = tf.randomNormal(shape, 0, 1, 'float32', 7); // the latent the oracle "knows"
  const oracle = (parameterization: Parameterization): Denoiser => (x, t, _ctx) =>
    tf.tidy(() => {
      assert.ok(Number.isInteger(t), `integer timesteps expected here, got ${t}`);
      const a = acp[t]!;
      const eps = x.sub(clean.mul(Math.sqrt(a))).div(Math.sqrt(1 - a));
      return parameterization === 'eps' ? eps : eps.mul(Math.sqrt(a)).sub(clean.mul(Math.sqrt(1 - a)));
    });
  const noise = tf.tensor(seededNormal(5, 32), shape);
  for (const parameterization of ['eps', 'v'] as const) {
    const inputs = { denoise: oracle(parameterization), schedule, vae, context: tf.zeros([1, 1, 1]) };
    const base = { parameterization, cfgScale: 1, seed: 5, width: 32, height: 16 };
    // Euler ends at sigma 0, i.e. on the denoised latent; 999/3 keeps the timesteps integer
    const euler = sampleLatents(inputs, { ...base, sampler: 'euler', steps: 4 });
    assert.ok((await maxDiff(euler, clean)) < 1e-4, `euler/${parameterization}`);
    // DDIM (eta 0) keeps the first eps estimate and ends at alphas_prev[0] = acp[0]
    const ddim = sampleLatents(inputs, { ...base, sampler: 'ddim', steps: 20 });
    const epsT = noise.sub(clean.mul(Math.sqrt(acp[951]!))).div(Math.sqrt(1 - acp[951]!));
    const expected = clean.mul(Math.sqrt(acp[0]!)).add(epsT.mul(Math.sqrt(1 - acp[0]!)));
    assert.ok((await maxDiff(ddim, expected)) < 1e-4, `ddim/${parameterization}`);
    tf.dispose([euler, ddim, epsT, expected, inputs.context]);
  }
  tf.dispose([clean, noise]);
});
