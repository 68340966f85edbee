/**
 * @file Preparation in two stages (train/prepare.ts encodeFirst, issue 19 "fit 24 GB"): the
 * latents are encoded with the VAE encoder alone, before the text encoders and the UNet load, so
 * the encoder's activations (~6.5 GB for one SDXL image at 1024 px) never sit on top of the model's
 * float32 weights. Proved by the bytes TF.js holds when the encoding starts: at most the encoder's
 * own weights more than before the job. And the estimate counts the stages, not their sum.
 */
import { test, mock } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { currentBackend, tf } from '../trainers/backend/index.ts';
import { validate } from '../schemas/index.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import { LatentCache } from '../trainers/train/latent-cache.ts';
import { prepareRun, releaseRun } from '../trainers/train/prepare.ts';
import { dreamboothSpec, prepareDreambooth, type DbSpec } from '../trainers/methods/dreambooth.ts';
import { estimateJob } from '../trainers/memory/estimate.ts';
import type { TiSpec } from '../trainers/methods/textual-inversion.ts';
import { ctxFor, jobSuite } from './helpers/job-run.ts';

const SD = 'test/fixtures/sd-tiny/model.safetensors';
const XL = 'test/fixtures/sdxl-tiny/model.safetensors';
const suite = jobSuite('sidetrain-prep-order-');

/** Float32 bytes of the checkpoint's tensors under `prefixes`. */
async function f32Bytes(path: string, prefixes: string[]): Promise<number> {
  const file = await openSafetensors(path);
  try {
    return file.keys().filter((k) => prefixes.some((p) => k.startsWith(p))).reduce((n, k) => n + 4 * file.info(k).shape.reduce((a, b) => a * b, 1), 0);
  } finally {
    await file.close();
  }
}

const ENCODER = ['first_stage_model.encoder.', 'first_stage_model.quant_conv.'];

/** TF.js bytes held (over `before`) each time latents are encoded while `f` runs. */
async function bytesAtEncoding(f: () => Promise<void>): Promise<number[]> {
  const before = tf.memory().numBytes;
  const seen: number[] = [];
  const build = LatentCache.build.bind(LatentCache);
  const spy = mock.method(LatentCache, 'build', (...args: Parameters<typeof LatentCache.build>) => {
    seen.push(tf.memory().numBytes - before);
    return build(...args);
  });
  try {
    await f();
  } finally {
    spy.mock.restore();
  }
  return seen;
}

test('TI: the latents are encoded before the text encoder and the UNet load', async () => {
  const spec = {
    model: SD, images: suite.images, name: 'order_ti', initText: 'cat', vectors: 1, steps: 1, width: 64, height: 64,
    previewEvery: 0, saveEvery: 0, seed: 1, embeddingsDir: join(suite.tmp, 'emb'), logDir: join(suite.tmp, 'log'),
  };
  assert.deepEqual(validate('textual-inversion', spec), []);
  const encoder = await f32Bytes(SD, ENCODER);
  const model = await f32Bytes(SD, ['model.diffusion_model.', 'cond_stage_model.']);
  const seen = await bytesAtEncoding(async () => {
    const run = await prepareRun(spec as unknown as TiSpec, ctxFor([]), 'textual_inversion', currentBackend()!.name);
    releaseRun(run);
    await run.model.source.close();
  });
  assert.equal(seen.length, 1);
  assert.ok(model > encoder, 'the fixture must have a model larger than its encoder for this test to mean anything');
  assert.ok(seen[0]! <= encoder, `${seen[0]} bytes held when encoding; the encoder alone is ${encoder} (the model: ${model})`);
});

test('SDXL Dreambooth: instance latents before the model; class latents (prior preservation) after it, as they must be', async () => {
  const raw: Record<string, unknown> = {
    model: XL, images: suite.images, name: 'order_db', instancePrompt: 'a photo of sks cat', classPrompt: 'a photo of a cat',
    classImages: 1, classSteps: 2, width: 64, height: 64, steps: 1, seed: 3, logDir: join(suite.tmp, 'logs'), checkpointDir: join(suite.tmp, 'ckpt'),
  };
  assert.deepEqual(validate('dreambooth', raw), []);
  const encoder = await f32Bytes(XL, ENCODER);
  const unet = await f32Bytes(XL, ['model.diffusion_model.']);
  const seen = await bytesAtEncoding(async () => {
    const run = await prepareDreambooth(dreamboothSpec(raw as unknown as DbSpec), ctxFor([]), currentBackend()!.name);
    releaseRun(run);
    run.classes?.latents.dispose();
    await run.model.source.close();
  });
  assert.equal(seen.length, 2, 'instance then class latents');
  assert.ok(seen[0]! <= encoder, `instance latents: ${seen[0]} bytes held; the encoder alone is ${encoder}`);
  assert.ok(seen[1]! >= unet, `class latents are encoded with the model loaded (${seen[1]} bytes held, UNet ${unet})`);
});

test('estimate: preparation peaks at its larger stage, not at the encoder and the model together', async () => {
  const spec = { model: XL, images: suite.images, instancePrompt: 'a photo of sks cat', width: 1024, height: 1024, optimizer: 'adafactor', gradientCheckpointing: 'on', fusedBackward: true, bf16Weights: true };
  const e = await estimateJob('dreambooth', spec, { backend: currentBackend()!.name });
  const b = e.breakdown;
  const stages = { encode: b.runtimeBytes + b.weightBytes.vaeEncoder + b.vaeEncodeBytes, model: b.runtimeBytes + b.weightBytes.text + (await f32Bytes(XL, ['model.diffusion_model.'])) };
  assert.ok(Math.abs(b.prepPeakBytes - Math.max(stages.encode, stages.model)) <= 1, `prep peak ${b.prepPeakBytes}, stages ${JSON.stringify(stages)}`);
  assert.ok(b.prepPeakBytes < stages.encode + stages.model - b.runtimeBytes);
});
