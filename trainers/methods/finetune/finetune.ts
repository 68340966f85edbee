/**
 * @file Fine-tune (EveryDream2 / the text-to-pokemon fine-tunes, diffusers train_text_to_image.py):
 * every UNet weight (and optionally the text encoder) trains on a captioned data set, each image
 * at its own aspect-ratio bucket, with an optional EMA of the weights; the result is a full
 * checkpoint `<checkpointDir>/<name>.safetensors` the webui loads. This file wires the job; the
 * parts live beside it:
 * - finetune-data.ts: data set, buckets (table printed), centre/random crops, latents from the
 *   disk cache (`<latentCacheDir or logDir>/latent-cache/`, shared by runs: keyed by content,
 *   bucket, crop and VAE; the VAE is loaded only when some latent is missing), batches;
 * - finetune-loss.ts: p_losses (min-SNR-γ, offset noise), validation loss every `validateEvery`
 *   steps and at the end into `<logDir>/<name>/validation.csv`, the EMA update (trainers/optim/ema.ts)
 *   after optimizer steps (at the next step's first batch, and before saving);
 * - finetune-optim.ts: the UNet and text-encoder groups, each at its own peak rate;
 * - finetune-save.ts: the checkpoint(s) (EMA, raw or both: `<name>.safetensors` raw and
 *   `<name>-ema.safetensors`), snapshots every `saveEvery` steps and on cancel with optimizer and
 *   EMA state, exact `resume` (batches, noise and captions are functions of the step), and the
 *   sample images of `samplePrompts` every `sampleEvery` steps in `<logDir>/<name>/images/`.
 */
import { existsSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { atomicGroup } from '../../io/atomic.ts';
import { tf, initJobBackend } from '../../backend/index.ts';
import { checkName, checkReadableDir, checkReadableFile } from '../../io/paths.ts';
import { expandRepeats, makeCaption } from '../../data/captioned.ts';
import { loadSdModel } from '../../nets/sd.ts';
import { chooseUNetMemory } from '../../memory/choice.ts';
import { loadVae } from '../../nets/vae.ts';
import { disposeParams, type Params } from '../../nets/params.ts';
import { ClipTokenizer } from '../../text/tokenizer.ts';
import { Rng } from '../../random.ts';
import type { DbOptimizer } from '../../optim/trainable.ts';
import { Ema } from '../../optim/ema.ts';
import { trainLoop, type TrainMethod } from '../../train/loop.ts';
import type { JobContext, JobResult } from '../../job.ts';
import { batchItems, cachedLatents, makeBatch, prepareData } from './data.ts';
import { afterStep, finetuneLoss, logValidation } from './loss.ts';
import { finetuneLrSchedule, makeFinetuneOptimizer } from './optim.ts';
import { renderSamples, resume, saveCheckpoints, saveSnapshot } from './save.ts';
import type { BucketedImage, FinetuneSpec, FtBatch, FtRun, Sample } from './types.ts';

export type { FinetuneSpec } from './types.ts';
export { finetuneLoss, validationLoss } from './loss.ts';

/** Swap trained params for variables (same keys); the replaced tensors are disposed. */
function makeTrainable(params: Params, scope: string, into: Map<string, tf.Variable>): void {
  for (const [key, t] of params) {
    const v = tf.variable(t, true, `ft/${scope}/${key}`);
    t.dispose();
    params.set(key, v);
    into.set(key, v);
  }
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
  spec = { ...spec, crop: spec.crop ?? 'center' };
  const output = await checkSpec(spec);
  const backend = await initJobBackend(spec, ctx);
  const data = await prepareData(spec, ctx);
  const model = (await loadSdModel(spec.model, ['text', 'unet'], {}, { what: 'finetune', prediction: spec.prediction })) as FtRun['model'];
  const trainable = new Map<string, tf.Variable>();
  let decoder: FtRun['decoder'];
  try {
    const latents = await cachedLatents(spec, model, [...data.train, ...data.validation], ctx);
    const sample = (s: BucketedImage, i: number): Sample[] => (latents[i] ? [{ ...s, latent: latents[i] }] : []);
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
  const lr = finetuneLrSchedule(spec, spec.lr);
  const optimizer = makeFinetuneOptimizer(spec, run.trainable, new Set(run.model.text.params.keys()));
  try {
    const startStep = spec.resume ? await resume(run, optimizer, ctx) : 0;
    ctx.emit({ type: 'started', totalSteps: spec.steps, startStep, backend });
    await writeFile(join(run.runDir, 'settings.json'), JSON.stringify(spec, null, 2));
    if (startStep === 0) await logValidation(run, 0, ctx);
    const method = ftMethod(run, optimizer, ctx);
    const result = await trainLoop(method, {
      startStep, steps: spec.steps, gradAccum: spec.gradAccum, learnRate: (d) => lr.getLr(d), optimizer, fused: spec.fusedBackward === true,
      saveEvery: spec.saveEvery, previewEvery: spec.sampleEvery, stepsPerEpoch: Math.max(1, Math.ceil(run.items.length / spec.batchSize / spec.gradAccum)),
      csvPath: join(run.runDir, 'loss.csv'),
    }, ctx);
    const snapshotted = spec.saveEvery > 0 && result.step % spec.saveEvery === 0;
    if (result.cancelled && result.step > startStep && !snapshotted) await atomicGroup(() => method.save(result.step, false), (p) => p[0]);
    const outputs = result.step === startStep ? [] : await atomicGroup(() => method.save(result.step, true), (p) => p[0]);
    return { step: result.step, output, outputs, kind: 'checkpoint', usage: spec.name, cancelled: result.cancelled };
  } finally {
    optimizer.dispose();
  }
}
