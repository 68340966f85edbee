/**
 * @file Fine-tune (EveryDream2 / the text-to-pokemon fine-tunes, diffusers train_text_to_image.py):
 * every UNet weight (and optionally the text encoder) trains on a captioned data set, each image
 * at its own aspect-ratio bucket, with an optional EMA of the weights; the result is a full
 * checkpoint `<checkpointDir>/<name>.safetensors` the webui loads.
 * - data: trainers/data/captioned.ts (tree, captions, repeats, tags, validation split) and
 *   trainers/data/buckets.ts (one bucket per batch); latents come from trainers/latent-disk-cache.ts,
 *   so the VAE is loaded only when some latent is missing. The cache (`<latentCacheDir or logDir>/
 *   latent-cache/`) is shared by every run: entries are keyed by content, so runs reuse each
 *   other's. Crops are centred (a random crop would make every cached latent a different one);
 * - loss: p_losses, optionally min-SNR-γ weighted (schedule.ts minSnrWeights) and with offset
 *   noise (schedule.ts offsetNoise); latents are sampled from the cached posterior per use;
 * - validation: the held-out images at fixed seeded noise and timesteps, so the numbers compare
 *   across steps; every `validateEvery` steps and at the end, into `<logDir>/<name>/validation.csv`;
 * - snapshots every `saveEvery` steps and on cancel, in `<logDir>/<name>/snapshots/`: the trained
 *   weights (TF layout, our own file), the optimizer state (dreambooth-optim.ts) and the EMA state;
 *   `resume` continues the newest one exactly (batches, noise and captions are functions of the step);
 * - sample images of `samplePrompts` every `sampleEvery` steps (sidetrain's sampler, square at
 *   the resolution), in `<logDir>/<name>/images/`;
 * - EMA (trainers/optim/ema.ts) is updated after optimizer steps (at the next step's first batch,
 *   where the loop lets a method run async code, and before saving); `save` picks EMA, raw or both
 *   (both: `<name>.safetensors` raw and `<name>-ema.safetensors`).
 */
import { existsSync } from 'node:fs';
import { appendFile, mkdir, readdir, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { tf, initBackend, type Tensor } from './tf.ts';
import { checkName, checkReadableDir, checkReadableFile } from './io/paths.ts';
import { loadCaptionedSet, expandRepeats, makeCaption, formatSkipped, type CaptionedImage } from './data/captioned.ts';
import { makeBuckets, nearestBucket, bucketBatches, bucketTable, formatBucketTable, loadBucketImage, cropBox, type Bucket } from './data/buckets.ts';
import { LatentDiskCache, vaeHash, vaeLatentEncoder, type EncodedLatent } from './latent-disk-cache.ts';
import { loadSdModel, paddingFor, type SdModel } from './nets/sd.ts';
import { chooseUNetMemory } from './memory.ts';
import { loadVae, type VaeConfig } from './nets/vae.ts';
import { disposeParams, type Params } from './nets/params.ts';
import { unetForward } from './nets/unet.ts';
import { encodeText } from './nets/clip.ts';
import { ClipTokenizer } from './text/tokenizer.ts';
import { openTensorFile } from './io/checkpoint.ts';
import { writeCheckpoint } from './io/checkpoint-write.ts';
import { seededNoise } from './latent-cache.ts';
import { sampleImage, savePreviewPng, type SamplerName } from './sample.ts';
import { diffusionLoss, offsetNoise, weightedDiffusionLoss } from './schedule.ts';
import { Rng } from './random.ts';
import { openSafetensors, writeSafetensors } from './io/safetensors.ts';
import { DbOptimizer, makeGroupOptimizer, readOptimizerState, writeOptimizerState } from './dreambooth-optim.ts';
import { constantWithWarmup, cosineWithWarmup } from './optim/lr.ts';
import { Ema } from './optim/ema.ts';
import { trainLoop, type TrainMethod } from './loop.ts';
import type { JobContext, JobResult } from './job.ts';

export interface FinetuneSpec {
  model: string;
  images: string;
  manifest?: string;
  name: string;
  checkpointDir: string;
  logDir: string;
  resolution: number;
  steps: number;
  batchSize: number;
  gradAccum: number;
  lr: number;
  lrScheduler: 'constant' | 'cosine';
  warmupSteps: number;
  optimizer: 'adamw' | 'adamw8bit' | 'adafactor';
  trainTextEncoder: boolean;
  minSnrGamma: number;
  noiseOffset: number;
  ema: boolean;
  emaDecay: number;
  emaEvery: number;
  save: 'ema' | 'raw' | 'both';
  validationSplit: number;
  validateEvery: number;
  shuffleTags: boolean;
  keepTokens: number;
  captionDropout: number;
  latentCacheDir?: string;
  half: boolean;
  overwrite: boolean;
  resume: boolean;
  saveEvery: number;
  samplePrompts: string[];
  sampleEvery: number;
  sampler: SamplerName;
  sampleSteps: number;
  sampleCfgScale: number;
  seed: number;
}

interface Sample {
  image: CaptionedImage;
  bucket: Bucket;
  latent: EncodedLatent;
}

interface FtBatch {
  latents: Tensor;
  noise: Tensor;
  timesteps: number[];
  ids: number[][];
}

interface FtRun {
  spec: FinetuneSpec;
  model: SdModel & Required<Pick<SdModel, 'text' | 'unet'>>;
  tokenizer: ClipTokenizer;
  train: Sample[];
  validation: Sample[];
  /** Training item k (repeats expanded) → sample index. */
  items: number[];
  trainable: Map<string, tf.Variable>;
  ema?: Ema;
  emaStep: number;
  runDir: string;
  /** The VAE decoder, only when sample images are on. */
  decoder?: { params: Params; cfg: VaeConfig };
}

/** Read the data set, assign buckets, print the table, and report undecodable images. */
async function prepareData(spec: FinetuneSpec, ctx: JobContext) {
  const set = await loadCaptionedSet({ root: spec.images, manifest: spec.manifest, validationSplit: spec.validationSplit, seed: spec.seed });
  if (set.skipped.length) ctx.emit({ type: 'log', level: 'warn', message: formatSkipped(set.skipped) });
  if (set.train.length === 0) throw new Error(`${spec.images}: no training images found`);
  const buckets = makeBuckets({ resolution: spec.resolution, step: 64, minSide: Math.min(spec.resolution, Math.max(64, spec.resolution / 2)) });
  const assign = (imgs: CaptionedImage[]) => imgs.map((image) => ({ image, bucket: nearestBucket(buckets, image.width, image.height) }));
  const train = assign(set.train);
  ctx.emit({ type: 'log', level: 'info', message: formatBucketTable(bucketTable(buckets, train.map((t) => t.bucket.index))) });
  return { train, validation: assign(set.validation), skipped: set.skipped };
}

/**
 * Latents from the disk cache; the VAE encoder is loaded only for missing ones, then released.
 * An image whose pixels fail to decode (header fine, data broken) has no latent (undefined).
 */
async function cachedLatents(spec: FinetuneSpec, model: SdModel, samples: { image: CaptionedImage; bucket: Bucket }[], ctx: JobContext): Promise<(EncodedLatent | undefined)[]> {
  const cache = new LatentDiskCache(join(spec.latentCacheDir ?? spec.logDir, 'latent-cache'), await vaeHash(model.source, 'first_stage_model.'));
  let vae: Awaited<ReturnType<typeof loadVae>> | undefined;
  const jobs = samples.map(({ image, bucket }) => {
    const box = cropBox(image.width, image.height, bucket);
    return { path: image.path, variant: `${bucket.width}x${bucket.height}@${box.left},${box.top}`, pixels: () => loadBucketImage(image.path, bucket) };
  });
  const entries = await cache.ensure(jobs, async () => {
    ctx.emit({ type: 'log', level: 'info', message: 'encoding latents (VAE loaded)' });
    vae = await loadVae(model.source, { parts: ['encoder'], scaleFactor: model.overrides.scaleFactor });
    return vaeLatentEncoder(vae);
  });
  if (vae) disposeParams(vae.params);
  const failed = entries.flatMap((e, i) => (e.error ? [{ file: samples[i]!.image.file, reason: e.error }] : []));
  if (failed.length) ctx.emit({ type: 'log', level: 'warn', message: formatSkipped(failed) });
  return Promise.all(entries.map((e) => (e.error ? undefined : cache.read(e.key))));
}

/** Swap trained params for variables (same keys); the replaced tensors are disposed. */
function makeTrainable(params: Params, scope: string, into: Map<string, tf.Variable>): void {
  for (const [key, t] of params) {
    const v = tf.variable(t, true, `ft/${scope}/${key}`);
    t.dispose();
    params.set(key, v);
    into.set(key, v);
  }
}

/** The micro-batch of item indices for (step, micro): epochs of single-bucket batches. */
function batchItems(run: FtRun, step: number, micro: number): number[] {
  const assigned = run.items.map((i) => run.train[i]!.bucket.index);
  const k = (step - 1) * run.spec.gradAccum + micro;
  const perEpoch = bucketBatches(assigned, run.spec.batchSize, run.spec.seed, 0).length;
  const batch = bucketBatches(assigned, run.spec.batchSize, run.spec.seed, Math.floor(k / perEpoch))[k % perEpoch]!;
  return batch.map((i) => run.items[i]!);
}

/** Posterior sample, seeded noise (+ offset), seeded timesteps, captions → ids. */
function makeBatch(run: FtRun, samples: Sample[], labels: (string | number)[], caption: (s: Sample, k: number) => string): FtBatch {
  const { seed, noiseOffset } = run.spec;
  return tf.tidy(() => {
    const latents = tf.concat(samples.map((s, k) => {
      const mean = tf.tensor(s.latent.mean, s.latent.shape);
      return mean.add(tf.tensor(s.latent.std, s.latent.shape).mul(seededNoise(s.latent.shape, seed, 'posterior', ...labels, k)));
    }), 0);
    let noise = seededNoise(latents.shape, seed, 'noise', ...labels);
    if (noiseOffset > 0) noise = offsetNoise(noise, noiseOffset, seededNoise([samples.length, 1, 1, latents.shape[3]!], seed, 'offset', ...labels));
    const rng = Rng.derive(seed, 'timesteps', ...labels);
    const timesteps = samples.map(() => rng.int(run.model.schedule.timesteps));
    const padding = paddingFor(run.model.family);
    return { latents, noise, timesteps, ids: samples.map((s, k) => run.tokenizer.encode(caption(s, k), padding)) } as unknown as tf.TensorContainer;
  }) as unknown as FtBatch;
}

/** p_losses with optional min-SNR-γ weights; the text encoder runs inside (it may be training). */
export function finetuneLoss(run: Pick<FtRun, 'model' | 'spec'>, batch: FtBatch): tf.Scalar {
  const { text, unet, schedule, prediction } = run.model;
  return tf.tidy(() => {
    const encoderHiddenStates = encodeText(text.params, text.cfg, batch.ids); // [B, 77, W]
    const noisyLatents = schedule.qSample(batch.latents, batch.noise, batch.timesteps);
    const modelPred = unetForward(unet.params, unet.cfg, noisyLatents, batch.timesteps, encoderHiddenStates, { memory: unet.memory });
    const target = schedule.targetFor(prediction, batch.latents, batch.noise, batch.timesteps);
    if (!(run.spec.minSnrGamma > 0)) return diffusionLoss(modelPred, target) as tf.Scalar;
    return weightedDiffusionLoss(modelPred, target, schedule.minSnrWeights(batch.timesteps, run.spec.minSnrGamma, prediction)) as tf.Scalar;
  });
}

/** Mean loss over the validation images at fixed noise/timesteps (one image at a time). */
export async function validationLoss(run: FtRun): Promise<number | undefined> {
  if (run.validation.length === 0) return undefined;
  let sum = 0;
  for (const [i, s] of run.validation.entries()) {
    const batch = makeBatch(run, [s], ['validation', i], (v) => v.image.caption);
    const loss = finetuneLoss(run, batch);
    sum += (await loss.data())[0]!;
    tf.dispose([loss, batch.latents, batch.noise]);
  }
  return sum / run.validation.length;
}

/** After optimizer step `done`: EMA update and validation when due (idempotent per step). */
async function afterStep(run: FtRun, done: number, ctx: JobContext, final = false): Promise<void> {
  if (done <= run.emaStep) return;
  run.emaStep = done;
  if (run.ema && run.ema.due(done)) await run.ema.update(run.trainable);
  if (done > 0 && (final || (run.spec.validateEvery > 0 && done % run.spec.validateEvery === 0))) await logValidation(run, done, ctx);
}

async function logValidation(run: FtRun, step: number, ctx: JobContext): Promise<void> {
  const loss = await validationLoss(run);
  if (loss === undefined) return;
  const csv = join(run.runDir, 'validation.csv');
  if (!existsSync(csv)) await writeFile(csv, 'step,validation_loss\n');
  await appendFile(csv, `${step},${loss}\n`);
  ctx.emit({ type: 'log', level: 'info', message: `step ${step}: validation loss ${loss.toFixed(6)}` });
}

function emaParams(ema: Ema): Params {
  return new Map([...ema.weights()].map(([k, w]) => [k, tf.tensor(w.values, w.shape)]));
}

/** The output checkpoint(s): EMA, raw or both, every source key kept (io/checkpoint-write.ts). */
async function saveCheckpoints(run: FtRun, step: number): Promise<string[]> {
  const { spec } = run;
  const source = await openTensorFile(spec.model);
  const metadata = { sidetrain_method: 'finetune', sidetrain_step: step, sidetrain_resolution: spec.resolution, sidetrain_images: run.train.length };
  const write = (name: string, trained: Params, weights: string) =>
    writeCheckpoint({ dir: spec.checkpointDir, name, source, trained, half: spec.half, overwrite: true, metadata: { ...metadata, sidetrain_weights: weights } });
  const outputs: string[] = [];
  try {
    const wantRaw = !run.ema || spec.save !== 'ema';
    if (wantRaw) outputs.push(await write(spec.name, new Map(run.trainable), 'raw'));
    if (run.ema && spec.save !== 'raw') {
      const ema = emaParams(run.ema);
      try {
        outputs.push(await write(spec.save === 'both' ? `${spec.name}-ema` : spec.name, ema, 'ema'));
      } finally {
        tf.dispose([...ema.values()]);
      }
    }
  } finally {
    await source.close();
  }
  return outputs;
}

/** Sample images of the current weights, one per prompt (`<runDir>/images/<name>-<step>-<i>.png`). */
async function renderSamples(run: FtRun, step: number): Promise<string> {
  const { spec, model, tokenizer } = run;
  const { text, unet, schedule, prediction, family } = model;
  const encode = (prompt: string) => encodeText(text.params, text.cfg, [tokenizer.encode(prompt, paddingFor(family))]);
  const denoise = (latents: Tensor, t: number, ctx: Tensor) => unetForward(unet.params, unet.cfg, latents, new Array(latents.shape[0]).fill(t), ctx);
  const paths: string[] = [];
  await mkdir(join(run.runDir, 'images'), { recursive: true });
  for (const [i, prompt] of spec.samplePrompts.entries()) {
    const [context, uncondContext] = [encode(prompt), encode('')];
    const options = { sampler: spec.sampler, steps: spec.sampleSteps, cfgScale: spec.sampleCfgScale, seed: spec.seed + i, width: spec.resolution, height: spec.resolution };
    const image = await sampleImage({ denoise, schedule, vae: run.decoder!, context, uncondContext }, { ...options, parameterization: prediction });
    tf.dispose([context, uncondContext]);
    const path = join(run.runDir, 'images', `${spec.name}-${step}-${i}.png`);
    const infotext = `${prompt}\nSteps: ${options.steps}, Sampler: ${options.sampler}, CFG scale: ${options.cfgScale}, Seed: ${options.seed}, Size: ${options.width}x${options.height}`;
    await savePreviewPng(path, image.rgb, image.width, image.height, infotext);
    paths.push(path);
  }
  return paths[0]!;
}

function ftMethod(run: FtRun, optimizer: DbOptimizer, ctx: JobContext): TrainMethod<FtBatch> {
  const { spec } = run;
  return {
    trainable: run.trainable,
    nextBatch: async (step, micro) => {
      if (micro === 0) await afterStep(run, step - 1, ctx);
      const samples = batchItems(run, step, micro).map((i) => run.train[i]!);
      const caption = (s: Sample, k: number) => makeCaption(s.image.caption, spec, Rng.derive(spec.seed, 'caption', step, micro, k));
      return makeBatch(run, samples, [step, micro], caption);
    },
    loss: (batch) => finetuneLoss(run, batch),
    disposeBatch: (b) => tf.dispose([b.latents, b.noise]),
    save: async (step, final) => {
      await afterStep(run, step, ctx, final);
      return final ? saveCheckpoints(run, step) : saveSnapshot(run, optimizer, step);
    },
    preview: run.decoder ? (step) => renderSamples(run, step) : undefined,
  };
}

/** Checks that fail before anything loads; an existing checkpoint is replaced only with overwrite. */
async function checkSpec(spec: FinetuneSpec): Promise<string> {
  checkName(spec.name);
  await checkReadableFile(spec.model, '/model');
  await checkReadableDir(spec.images, '/images');
  const output = resolve(spec.checkpointDir, `${spec.name}.safetensors`);
  if (existsSync(output) && !spec.overwrite && !spec.resume) throw new Error(`${output} already exists: pass --resume to continue its run or --overwrite to replace it`);
  return output;
}

/** The fine-tune job: data, latents, model, train, validate, save the checkpoint(s). */
export async function runFinetune(spec: FinetuneSpec, ctx: JobContext): Promise<JobResult> {
  const output = await checkSpec(spec);
  const backend = await initBackend();
  const data = await prepareData(spec, ctx);
  const model = (await loadSdModel(spec.model, ['text', 'unet'])) as FtRun['model'];
  const trainable = new Map<string, tf.Variable>();
  let decoder: FtRun['decoder'];
  try {
    const latents = await cachedLatents(spec, model, [...data.train, ...data.validation], ctx);
    const sample = (s: { image: CaptionedImage; bucket: Bucket }, i: number): Sample[] => (latents[i] ? [{ ...s, latent: latents[i] }] : []);
    const trainSamples = data.train.flatMap(sample);
    if (trainSamples.length === 0) throw new Error(`${spec.images}: none of the training images could be decoded`);
    makeTrainable(model.unet.params, 'unet', trainable);
    model.unet.memory = await chooseUNetMemory('finetune', spec, ctx);
    if (spec.trainTextEncoder) makeTrainable(model.text.params, 'text', trainable);
    const samples = spec.sampleEvery > 0 && spec.samplePrompts.length > 0;
    decoder = samples ? await loadVae(model.source, { parts: ['decoder'], scaleFactor: model.overrides.scaleFactor }) : undefined;
    const runDir = resolve(spec.logDir, spec.name);
    await mkdir(runDir, { recursive: true });
    const run: FtRun = {
      spec, model, tokenizer: await ClipTokenizer.load(), train: trainSamples, validation: data.validation.flatMap((s, i) => sample(s, data.train.length + i)),
      items: expandRepeats(trainSamples.map((s) => s.image)),
      trainable, ema: spec.ema ? await Ema.fromParams(trainable, { decay: spec.emaDecay, every: spec.emaEvery }) : undefined, emaStep: 0, runDir, decoder,
    };
    return await trainRun(run, output, backend.name, ctx);
  } finally {
    disposeParams(model.unet.params);
    disposeParams(model.text.params);
    if (decoder) disposeParams(decoder.params);
    await model.source.close();
  }
}

async function trainRun(run: FtRun, output: string, backend: string, ctx: JobContext): Promise<JobResult> {
  const { spec } = run;
  const warm = { lr: spec.lr, warmupSteps: spec.warmupSteps, maxSteps: spec.steps };
  const lr = spec.lrScheduler === 'cosine' ? cosineWithWarmup(warm) : constantWithWarmup(warm);
  const textKeys = new Set(run.model.text.params.keys());
  const unetVars = new Map([...run.trainable].filter(([k]) => !textKeys.has(k)));
  const textVars = new Map([...run.trainable].filter(([k]) => textKeys.has(k)));
  const optimizer = new DbOptimizer(makeGroupOptimizer(spec.optimizer, unetVars), textVars.size ? makeGroupOptimizer(spec.optimizer, textVars) : undefined, textKeys);
  try {
    const startStep = spec.resume ? await resume(run, optimizer, ctx) : 0;
    ctx.emit({ type: 'started', totalSteps: spec.steps, startStep, backend });
    await writeFile(join(run.runDir, 'settings.json'), JSON.stringify(spec, null, 2));
    if (startStep === 0) await logValidation(run, 0, ctx);
    const method = ftMethod(run, optimizer, ctx);
    const result = await trainLoop(method, {
      startStep, steps: spec.steps, gradAccum: spec.gradAccum, learnRate: (d) => lr.getLr(d), optimizer,
      saveEvery: spec.saveEvery, previewEvery: spec.sampleEvery, stepsPerEpoch: Math.max(1, Math.ceil(run.items.length / spec.batchSize / spec.gradAccum)),
      csvPath: join(run.runDir, 'loss.csv'),
    }, ctx);
    const snapshotted = spec.saveEvery > 0 && result.step % spec.saveEvery === 0;
    if (result.cancelled && result.step > startStep && !snapshotted) await method.save(result.step, false);
    const outputs = result.step === startStep ? [] : await method.save(result.step, true);
    return { step: result.step, output, outputs, kind: 'checkpoint', usage: spec.name, cancelled: result.cancelled };
  } finally {
    optimizer.dispose();
  }
}

function snapshotPaths(run: FtRun, step: number) {
  const base = join(run.runDir, 'snapshots', `${run.spec.name}-${step}`);
  return { weights: `${base}.weights.safetensors`, optim: `${base}.optim.safetensors`, ema: `${base}.ema.safetensors` };
}

/** Optimizer and EMA state first, the weights last: a snapshot with weights is complete. */
async function saveSnapshot(run: FtRun, optimizer: DbOptimizer, step: number): Promise<string[]> {
  const paths = snapshotPaths(run, step);
  await mkdir(join(run.runDir, 'snapshots'), { recursive: true });
  await writeOptimizerState(paths.optim, await optimizer.exportGroups(), { step: String(step) });
  if (run.ema) await run.ema.save(paths.ema);
  const tensors = [...run.trainable].map(([name, v]) => ({ name, dtype: 'F32' as const, shape: v.shape, data: async () => (await v.data()) as Float32Array }));
  await writeSafetensors(paths.weights, tensors, { step: String(step) }, { overwrite: true });
  return [paths.weights, paths.optim, ...(run.ema ? [paths.ema] : [])];
}

/** Load the newest complete snapshot into the variables, optimizer and EMA; its step (0 = none). */
async function resume(run: FtRun, optimizer: DbOptimizer, ctx: JobContext): Promise<number> {
  const dir = join(run.runDir, 'snapshots');
  const prefix = `${run.spec.name}-`;
  const steps = existsSync(dir) ? (await readdir(dir)).map((f) => (f.startsWith(prefix) ? /^(\d+)\.weights\.safetensors$/.exec(f.slice(prefix.length))?.[1] : undefined)).filter((x): x is string => !!x).map(Number) : [];
  if (steps.length === 0) {
    ctx.emit({ type: 'log', level: 'warn', message: `nothing to resume for '${run.spec.name}' in ${dir}: starting from the model` });
    return 0;
  }
  const step = Math.max(...steps);
  const paths = snapshotPaths(run, step);
  const file = await openSafetensors(paths.weights);
  try {
    for (const [key, v] of run.trainable) {
      if (!file.has(key)) throw new Error(`${paths.weights}: no '${key}' (was the snapshot made with other options, e.g. trainTextEncoder?)`);
      const values = tf.tensor(await file.read(key), file.info(key).shape);
      v.assign(values);
      values.dispose();
    }
  } finally {
    await file.close();
  }
  optimizer.importGroups(await readOptimizerState(paths.optim));
  optimizer.done = step;
  if (run.ema) run.ema = existsSync(paths.ema) ? await Ema.load(paths.ema) : await Ema.fromParams(run.trainable, { decay: run.spec.emaDecay, every: run.spec.emaEvery });
  run.emaStep = step;
  ctx.emit({ type: 'log', level: 'info', message: `continuing ${paths.weights} from step ${step}` });
  return step;
}
