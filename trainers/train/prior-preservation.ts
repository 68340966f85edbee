/**
 * @file Prior preservation (Ruiz et al. 2022; diffusers examples/dreambooth/train_dreambooth.py
 * `with_prior_preservation`), shared by Dreambooth (full weights or LoRA) and `train lora`:
 * class images generated before training from the base model with sidetrain's own sampler (or
 * the user's folder, topped up), cached on disk by (model hash, class prompt) and reused by later
 * jobs; each micro-batch gets a class half of the instance half's size; and the loss is
 * instance loss + priorWeight × class loss, each the mean over its half, as diffusers computes
 * it (`torch.chunk(model_pred, 2)`, `loss + args.prior_loss_weight * prior_loss`). The two parts
 * of every micro-batch go to `<runDir>/prior-loss.csv` (the loop's CSV has their weighted sum).
 */
import { existsSync } from 'node:fs';
import { appendFile, mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { basename, dirname, extname, join, resolve } from 'node:path';
import { tf, type Tensor } from '../backend/tf.ts';
import { Dataset } from '../data/dataset.ts';
import type { ImageFit, LatentSampling } from '../data/dataset.ts';
import { instanceTemplates, type CaptionMode } from './instance-prompts.ts';
import type { ClipTokenizer } from '../text/tokenizer.ts';
import { paddingFor, scaleFactorOf, type SdModel } from '../nets/sd.ts';
import { encodeSdxlText, type SizeCond } from '../nets/sdxl-conditioner.ts';
import { xlIds, xlSampling } from './sdxl-sampling.ts';
import { disposeParams, type Params } from '../nets/params.ts';
import { unetForward } from '../nets/unet.ts';
import { loadVae, type VaeConfig } from '../nets/vae.ts';
import { encodeText } from '../nets/clip.ts';
import { LatentCache, seededNoise } from './latent-cache.ts';
import { Rng } from '../random.ts';
import { sampleImage, savePreviewPng, type SamplerName } from './sample.ts';
import { diffusionLoss } from '../nets/noise-schedule.ts';
import type { Denoiser, DiffusionBatch } from './diffusion-loss.ts';
import type { JobContext } from '../job.ts';

/** The prior-preservation options (schemas/dreambooth.json and schemas/lora.json share them). */
export interface PriorSpec {
  model: string;
  name: string;
  logDir: string;
  width: number;
  height: number;
  seed: number;
  gradAccum: number;
  latentSampling: LatentSampling;
  classPrompt?: string;
  classImages: number;
  classImagesDir?: string;
  priorWeight: number;
  classSampler: SamplerName;
  classSteps: number;
  classCfgScale: number;
}

/** Prior preservation is on when there is a class prompt and at least one class image. */
export const priorOn = (spec: Pick<PriorSpec, 'classPrompt' | 'classImages'>): boolean => !!spec.classPrompt && spec.classImages > 0;

const IMAGE_EXT = new Set(['.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif', '.tiff', '.tif', '.avif']);
export const sha10 = (s: string) => createHash('sha256').update(s).digest('hex').slice(0, 10);

/** The class-image folder: the user's, or `<logDir>/class-images/<modelHash>-<prompt hash>/`. */
export function classImageDir(spec: Pick<PriorSpec, 'classImagesDir' | 'logDir' | 'classPrompt'>, hash: string): string {
  return resolve(spec.classImagesDir ?? join(spec.logDir, 'class-images', `${hash}-${sha10(spec.classPrompt ?? '')}`));
}

/** `--dry-run`'s line about where the class images come from. */
export function describePrior(spec: PriorSpec): string {
  if (!priorOn(spec)) return 'prior preservation: off (no classPrompt or classImages 0)';
  const from = spec.classImagesDir ?? join(spec.logDir, 'class-images', `<model hash>-${sha10(spec.classPrompt!)}`);
  return `prior preservation: ${spec.classImages} class images of '${spec.classPrompt}' from ${from} (missing ones generated), weight ${spec.priorWeight}`;
}

type Generator = Pick<SdModel, 'source' | 'overrides' | 'family' | 'schedule' | 'prediction' | 'text' | 'textXl'> & Required<Pick<SdModel, 'unet'>>;

/**
 * Top the folder up to `spec.classImages` images; seeds derive from the prompt and index, so any
 * job makes the same image. The VAE decoder loads only when an image is missing.
 */
export async function ensureClassImages(spec: PriorSpec, model: Generator, tokenizer: ClipTokenizer, dir: string, ctx: JobContext): Promise<number> {
  await mkdir(dir, { recursive: true });
  let count = (await readdir(dir)).filter((f) => IMAGE_EXT.has(extname(f).toLowerCase())).length;
  const missing = Math.max(0, spec.classImages - count);
  if (!missing) return 0;
  ctx.emit({ type: 'log', level: 'info', message: `generating ${missing} class images for '${spec.classPrompt}' in ${dir}` });
  const { unet, schedule, prediction } = model;
  const vae = await loadVae(model.source, { parts: ['decoder'], scaleFactor: scaleFactorOf(model) });
  const { denoise, context, uncondContext: uncond, dispose } = classSampling(model, tokenizer, spec);
  try {
    for (let i = 0; count < spec.classImages && !ctx.signal.aborted; i++) {
      const path = join(dir, `class-${String(i).padStart(5, '0')}.png`);
      if (existsSync(path)) continue;
      const seed = Rng.derive(0, 'class-image', sha10(spec.classPrompt!), i).nextUint32();
      const opts = { sampler: spec.classSampler, steps: spec.classSteps, cfgScale: spec.classCfgScale, seed, width: spec.width, height: spec.height, parameterization: prediction };
      const image = await sampleImage({ denoise, schedule, vae, context, uncondContext: uncond }, opts);
      const info = `${spec.classPrompt}\nSteps: ${spec.classSteps}, Sampler: ${spec.classSampler}, CFG scale: ${spec.classCfgScale}, Seed: ${seed}, Size: ${spec.width}x${spec.height}, Model: ${basename(spec.model)}`;
      await savePreviewPng(path, image.rgb, image.width, image.height, info);
      count++;
    }
  } finally {
    dispose();
    disposeParams(vae.params);
  }
  if (ctx.signal.aborted) throw new Error('cancelled while generating class images (the ones written are kept for the next run)');
  return missing;
}

/** The sampler's inputs for the class prompt: SD1/SD2 contexts, or SDXL's with the size conditioning (train/sdxl-sampling.ts). */
function classSampling(model: Generator, tokenizer: ClipTokenizer, spec: PriorSpec) {
  const { text, textXl, unet } = model;
  if (textXl) {
    const { idsL, idsG } = xlIds([tokenizer.encode(spec.classPrompt!, 'zero')]);
    const size = { original: [spec.height, spec.width], crop: [0, 0], target: [spec.height, spec.width] } as SizeCond;
    return xlSampling(textXl, unet, encodeSdxlText(textXl, idsL, idsG), tokenizer, size);
  }
  if (!text) throw new Error('class images: the model has no text encoder loaded');
  const context = encodeText(text.params, text.cfg, [tokenizer.encode(spec.classPrompt!, paddingFor(model.family))]);
  const uncondContext = encodeText(text.params, text.cfg, [tokenizer.encode('', paddingFor(model.family))]);
  const denoise = (x: Tensor, t: number, c: Tensor) => unetForward(unet.params, unet.cfg, x, new Array(x.shape[0]).fill(t), c);
  return { denoise, context, uncondContext, dispose: () => tf.dispose([context, uncondContext]) };
}

/** A folder whose every image has `prompt` ([filewords] = its caption), images with a caption file as `captionMode` says. */
export async function loadPromptSet(
  spec: PriorSpec, dir: string, prompt: string, batchSize: number, ctx: JobContext, captionMode: CaptionMode = 'ignore', fit: ImageFit = 'stretch',
): Promise<Dataset> {
  return Dataset.load({
    dir, width: spec.width, height: spec.height, name: spec.name, ...instanceTemplates(prompt, captionMode), latentSampling: spec.latentSampling, fit,
    // one fixed prompt per image: class and instance prompts are not tag lists
    shuffleTags: false, tagDropOut: 0, doNotResize: false, useWeight: false, filenameWordRegex: '', filenameJoinString: ' ',
    batchSize, gradAccum: spec.gradAccum, seed: spec.seed, onWarning: (message) => ctx.emit({ type: 'log', level: 'warn', message }),
  });
}

/** The class images, their cached latents and the folder they live in. */
export interface ClassSet {
  dataset: Dataset;
  latents: LatentCache;
  dir: string;
}

/**
 * Generate what is missing and cache the class latents (batches the instance set's size).
 * `encoder`: the VAE encoder if the caller still holds it; else it is loaded here and released.
 */
export async function prepareClassSet(
  spec: PriorSpec, model: Generator, tokenizer: ClipTokenizer, hash: string, batchSize: number, ctx: JobContext,
  encoder?: { params: Params; cfg: VaeConfig },
): Promise<ClassSet | undefined> {
  if (!priorOn(spec)) return undefined;
  const dir = classImageDir(spec, hash);
  await ensureClassImages(spec, model, tokenizer, dir, ctx);
  const dataset = await loadPromptSet(spec, dir, spec.classPrompt!, batchSize, ctx);
  const vae = encoder ?? (await loadVae(model.source, { parts: ['encoder'], scaleFactor: scaleFactorOf(model) }));
  try {
    const latents = await LatentCache.build(dataset, vae, spec.seed);
    dataset.releasePixels();
    return { dataset, latents, dir };
  } finally {
    if (!encoder) disposeParams(vae.params);
  }
}

/** An instance micro-batch with its prompts' token ids; `classRows` class rows follow the instance rows. */
export type PriorBatch = DiffusionBatch & { ids: number[][]; classRows: number };

/**
 * Append the class half to an instance micro-batch (tensors of `inst` are disposed): the class
 * batch at the same linear position (step, micro) of the class set, its own seeded noise and timesteps.
 */
export function withClassRows<B extends DiffusionBatch & { ids: number[][] }>(
  inst: B, classes: ClassSet | undefined, spec: Pick<PriorSpec, 'seed'>, at: { step: number; micro: number; gradAccum: number },
  model: { tokenizer: ClipTokenizer; family: SdModel['family']; timesteps: number },
): B & { classRows: number } {
  if (!classes) return { ...inst, classRows: 0 };
  const { step, micro } = at;
  const set = classes.dataset;
  const k = (step - 1) * at.gradAccum + micro;
  const b = set.batchAt(Math.floor(k / set.gradAccum), k % set.gradAccum);
  const latents = classes.latents.latents(b.items, step, micro);
  const noise = seededNoise(latents.shape, spec.seed, 'class-noise', step, micro);
  const rng = Rng.derive(spec.seed, 'class-timesteps', step, micro);
  const padding = paddingFor(model.family);
  const batch = {
    ...inst, latents: tf.concat([inst.latents, latents]), noise: tf.concat([inst.noise, noise]),
    timesteps: [...inst.timesteps, ...b.items.map(() => rng.int(model.timesteps))],
    ids: [...inst.ids, ...b.prompts.map((p) => model.tokenizer.encode(p, padding))], classRows: b.items.length,
  };
  tf.dispose([inst.latents, inst.noise, latents, noise]);
  return batch;
}

/** The loss and its parts: instance mean, class mean (absent without class rows). */
export type PriorLoss = {
  loss: tf.Scalar;
  instance: tf.Scalar;
  prior?: tf.Scalar;
};

/** One UNet pass over both halves; loss = mean over instance rows + priorWeight × mean over class rows. */
export function priorPreservationLoss(m: Denoiser, batch: DiffusionBatch & { classRows: number }, context: Tensor, priorWeight: number): PriorLoss {
  return tf.tidy(() => {
    const noisy = m.schedule.qSample(batch.latents, batch.noise, batch.timesteps);
    const pred = unetForward(m.unet.params, m.unet.cfg, noisy, batch.timesteps, context, { memory: m.unet.memory }); // [B, h, w, 4]
    const target = m.schedule.targetFor(m.prediction, batch.latents, batch.noise, batch.timesteps);
    const n = batch.timesteps.length - batch.classRows;
    if (!batch.classRows) {
      const loss = diffusionLoss(pred, target) as tf.Scalar;
      return { loss, instance: loss.clone() }; // its own tensor: the log disposes it
    }
    const instance = diffusionLoss(pred.slice(0, n), target.slice(0, n)) as tf.Scalar;
    const prior = diffusionLoss(pred.slice(n), target.slice(n)) as tf.Scalar;
    return { loss: instance.add(prior.mul(priorWeight)) as tf.Scalar, instance, prior };
  });
}

/** Per-sample losses → instance mean (+ priorWeight × class mean over the last `classRows` rows). */
export function splitPriorLoss(perSample: Tensor, classRows: number, priorWeight: number): PriorLoss {
  return tf.tidy(() => {
    if (!classRows) {
      const loss = perSample.mean() as tf.Scalar;
      return { loss, instance: loss.clone() }; // its own tensor: the log disposes it
    }
    const n = perSample.shape[0]! - classRows;
    const instance = perSample.slice(0, n).mean() as tf.Scalar;
    const prior = perSample.slice(n).mean() as tf.Scalar;
    return { loss: instance.add(prior.mul(priorWeight)) as tf.Scalar, instance, prior };
  });
}

/** `session` with `log` flushed after each step (before the session's own afterStep) and before each save. */
export function flushingPriorLog<T extends { afterStep?(step: number): unknown; save(step: number, final: boolean): Promise<string[]> }>(log: PriorLossLog, session: T): T {
  return {
    ...session,
    afterStep: async (step: number) => {
      await log.flush();
      await session.afterStep?.(step);
    },
    save: async (step: number, final: boolean) => {
      await log.flush();
      return session.save(step, final);
    },
  };
}

/**
 * `<runDir>/prior-loss.csv`: instance and class loss of each micro-batch. `record` keeps the
 * scalars (called in the loss); `flush` reads them (async) at the next batch or save.
 */
export class PriorLossLog {
  private parts: { step: number; instance: Tensor; prior?: Tensor }[] = [];
  constructor(readonly path: string) {}

  record(step: number, parts: PriorLoss): void {
    this.parts.push({ step, instance: tf.keep(parts.instance), prior: parts.prior && tf.keep(parts.prior) });
  }

  async flush(): Promise<void> {
    for (const p of this.parts) {
      const [instance, prior] = await Promise.all([p.instance, p.prior].map(async (t) => (t ? (await t.data())[0]! : undefined)));
      tf.dispose([p.instance, ...(p.prior ? [p.prior] : [])]);
      await this.append(p.step, instance!, prior);
    }
    this.parts = [];
  }

  /** Keep the rows of steps ≤ `step` (a resumed run rewrites what followed its start). */
  async truncate(step: number): Promise<void> {
    if (!existsSync(this.path)) return;
    const [header, ...rows] = (await readFile(this.path, 'utf8')).split('\n').filter((l) => l.trim());
    await writeFile(this.path, [header, ...rows.filter((r) => Number(r.split(',')[0]) <= step)].map((l) => `${l}\n`).join(''));
  }

  private async append(step: number, instance: number, prior?: number): Promise<void> {
    if (!existsSync(this.path)) {
      await mkdir(dirname(this.path), { recursive: true });
      await appendFile(this.path, 'step,instance_loss,class_loss\n');
    }
    await appendFile(this.path, `${step},${instance},${prior ?? ''}\n`);
  }
}
