/**
 * @file Fine-tune (EveryDream2 / the text-to-pokemon fine-tunes, diffusers train_text_to_image.py):
 * every UNet weight (and optionally the text encoder) trains on a captioned data set, each image
 * at its own aspect-ratio bucket, with an optional EMA of the weights; the result is a full
 * checkpoint `<checkpointDir>/<name>.safetensors` the webui loads. This file is the method's
 * definition for the one run (train/run.ts); the parts live beside it:
 * - data.ts: data set, buckets (table printed), centre/random crops, latents from the
 *   disk cache (`<latentCacheDir or logDir>/latent-cache/`, shared by runs: keyed by content,
 *   bucket, crop and VAE; the VAE is loaded only when some latent is missing), batches;
 * - loss.ts: p_losses (min-SNR-γ, offset noise), validation loss every `validateEvery`
 *   steps and at the end into `<logDir>/<name>/validation.csv`, the EMA update (trainers/optim/ema.ts)
 *   after each optimizer step (the run's afterStep hook);
 * - optim.ts: the UNet and text-encoder groups, each at its own peak rate;
 * - save.ts: the checkpoint(s) (EMA, raw or both: `<name>.safetensors` raw and
 *   `<name>-ema.safetensors`), snapshots every `saveEvery` steps and on cancel (the run writes one:
 *   the output does not continue a run) with optimizer and EMA state, exact `resume` (batches,
 *   noise and captions are functions of the step), and the
 *   sample images of `samplePrompts` every `sampleEvery` steps in `<logDir>/<name>/images/`.
 */
import { mkdir } from 'node:fs/promises';
import { resolve } from 'node:path';
import { tf } from '../../backend/tf.ts';
import { expandRepeats, makeCaption } from '../../data/captioned.ts';
import { loadSdParts, openSdModel, scaleFactorOf } from '../../nets/sd.ts';
import { closing } from '../../train/prepare.ts';
import { checkTextEncoder2Lr, encodersOf, makeXlTextVariables, xlText2Keys } from '../full-xl.ts';
import { chooseUNetMemory } from '../../memory/choice.ts';
import { loadVae } from '../../nets/vae.ts';
import { disposeParams } from '../../nets/params.ts';
import { ClipTokenizer } from '../../text/tokenizer.ts';
import { Rng } from '../../random.ts';
import { makeTrainable, type TrainableOptimizer } from '../../optim/trainable.ts';
import { Ema } from '../../optim/ema.ts';
import { runMethod, withFolders, type MethodDefinition, type OutputLayout, type Session } from '../../train/run.ts';
import type { FinetuneJob } from '../../../schemas/types.ts';
import type { JobContext, JobResult } from '../../job.ts';
import { batchItems, cachedLatents, makeBatch, prepareData } from './data.ts';
import { afterStep, finalValidation, finetuneLoss, logValidation } from './loss.ts';
import { finetuneLrSchedule, makeFinetuneOptimizer } from './optim.ts';
import { renderSamples, resume, saveCheckpoints, saveSnapshot } from './save.ts';
import type { BucketedImage, FinetuneSpec, FtBatch, FtRun, Sample } from './types.ts';

export type { FinetuneSpec } from './types.ts';
export { finetuneLoss, validationLoss } from './loss.ts';

function ftSession(run: FtRun, optimizer: TrainableOptimizer, startStep: number, ctx: JobContext): Session<FtBatch> {
  const { spec } = run;
  return {
    startStep,
    optimizer,
    gradAccum: spec.gradAccum,
    stepsPerEpoch: Math.max(1, Math.ceil(run.items.length / spec.batchSize / spec.gradAccum)),
    previewEvery: spec.sampleEvery,
    settings: {},
    begin: async () => {
      if (startStep === 0) await logValidation(run, 0, ctx);
    },
    trainable: run.trainable,
    nextBatch: (step, micro) => {
      const samples = batchItems(run, step, micro).map((i) => run.train[i]!);
      const caption = (s: Sample, k: number) => makeCaption(s.image.caption, spec, Rng.derive(spec.seed, 'caption', step, micro, k));
      return makeBatch(run, samples, [step, micro], caption);
    },
    loss: (batch) => finetuneLoss(run, batch),
    afterStep: (step) => afterStep(run, step, ctx),
    disposeBatch: (b) => tf.dispose([b.latents, b.noise]),
    save: async (step, final) => {
      if (!final) return saveSnapshot(run, optimizer, step);
      await finalValidation(run, step, ctx);
      return saveCheckpoints(run, step);
    },
    preview: run.decoder ? (step) => renderSamples(run, step) : undefined,
  };
}

/** The fine-tune as the one run (train/run.ts) drives it: data, latents, model, train, validate, save the checkpoint(s). */
export const finetune: MethodDefinition<FinetuneSpec, FtBatch> = {
  kind: 'checkpoint',
  usage: (spec) => spec.name,
  // the output holds EMA or raw weights without optimizer state: runs continue from snapshots
  layout: (spec): OutputLayout => ({ dir: resolve(spec.checkpointDir), ext: '.safetensors', snapshots: 'snapshots', snapshotSuffix: '.weights.safetensors', outputResumes: false }),
  schedule: (spec) => finetuneLrSchedule(spec, spec.lr),
  freshStart: () => 'starting from the model',
  preflight: (spec) => checkTextEncoder2Lr(spec),
  async load({ spec, paths, from, backend, onRelease }, ctx) {
    const data = await prepareData(spec, ctx);
    let optimizer: TrainableOptimizer | undefined;
    // runs after the weights are freed: a bf16 weight store (optim/bf16-round.ts) then refills nothing
    onRelease(() => optimizer?.dispose());
    // the latents first, with the VAE encoder alone, then the weights (train/prepare.ts encodeFirst)
    const opened = await openSdModel(spec.model, { xl: true });
    const latents = await cachedLatents(spec, opened, [...data.train, ...data.validation], ctx).catch(closing(opened));
    const model = (await loadSdParts(opened, ['text', 'unet'], {}, { prediction: spec.prediction }).catch(closing(opened))) as FtRun['model'];
    onRelease(async () => {
      disposeParams(model.unet.params);
      disposeParams((model.text ?? model.textXl!).params);
      await model.source.close();
    });
    const sample = (s: BucketedImage, i: number): Sample[] => (latents[i] ? [{ ...s, latent: latents[i] }] : []);
    const trainSamples = data.train.flatMap(sample);
    if (trainSamples.length === 0) throw new Error(`${spec.images}: none of the training images could be decoded`);
    const trainable = makeTrainable(model.unet.params);
    model.unet.memory = await chooseUNetMemory('finetune', spec, backend, ctx);
    // SDXL: the chosen encoders' weights that reach the loss (full-xl.ts); SD1/SD2: the whole encoder
    const textVars = !spec.trainTextEncoder ? new Map() : model.textXl ? makeXlTextVariables(model.textXl, encodersOf(spec)) : makeTrainable(model.text.params);
    for (const [k, v] of textVars) trainable.set(k, v);
    const samples = spec.sampleEvery > 0 && spec.samplePrompts.length > 0;
    const decoder = samples ? await loadVae(model.source, { parts: ['decoder'], scaleFactor: scaleFactorOf(model) }) : undefined;
    if (decoder) onRelease(() => disposeParams(decoder.params));
    await mkdir(paths.runDir, { recursive: true });
    const run: FtRun = {
      spec, model, tokenizer: await ClipTokenizer.load(), train: trainSamples, validation: data.validation.flatMap((s, i) => sample(s, data.train.length + i)),
      items: expandRepeats(trainSamples.map((s) => s.image)),
      trainable, ema: spec.ema ? await Ema.fromParams(trainable, { decay: spec.emaDecay, every: spec.emaEvery }) : undefined, runDir: paths.runDir, decoder,
    };
    optimizer = makeFinetuneOptimizer(spec, run.trainable, new Set(textVars.keys()), model.textXl ? xlText2Keys(model.textXl) : undefined);
    const startStep = from?.step ? await resume(run, optimizer, from.step, ctx) : 0;
    return ftSession(run, optimizer, startStep, ctx);
  },
};

/** The fine-tune job. */
export function runFinetune(job: FinetuneJob, ctx: JobContext): Promise<JobResult> {
  return runMethod(finetune, withFolders(job, ['logDir', 'checkpointDir']), ctx);
}
