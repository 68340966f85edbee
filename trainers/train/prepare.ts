/**
 * @file What the methods that train on the webui's dataset share (webui train_embedding /
 * train_hypernetwork, and Dreambooth/LoRA on top): the dataset, cached latents (the VAE encoder
 * is released before training), per-step batches with seeded noise and timesteps, previews from
 * sidetrain's own sampler, and the spec fields those methods have in common. The run itself
 * (events, settings, resume, snapshots, final save) is train/run.ts.
 */
import { computePrecision } from '../backend/precision.ts';
import { mkdir } from 'node:fs/promises';
import { basename, extname, join } from 'node:path';
import { tf, type Tensor } from '../backend/tf.ts';
import { Dataset, datasetReport, formatDatasetReport, type ImageFit } from '../data/dataset.ts';
import { loadTemplate, type Template } from '../text/templates.ts';
import { ClipTokenizer, tokenizeWithEmbeddings, type TokenizedPrompt } from '../text/tokenizer.ts';
import { loadSdParts, openSdModel, paddingFor, scaleFactorOf, type SdModel } from '../nets/sd.ts';
import { loadVae, type VaeConfig } from '../nets/vae.ts';
import { disposeParams, type Params } from '../nets/params.ts';
import { unetForward, type UNetHooks } from '../nets/unet.ts';
import { encodeText, type TextSplice } from '../nets/clip.ts';
import { headerFamily, modelHash } from '../io/checkpoint.ts';
import { withNativeSize, type Sized } from './run.ts';
import { priorOn, type PriorSpec } from './prior-preservation.ts';
import { LatentCache, seededNoise } from './latent-cache.ts';
import { Rng } from '../random.ts';
import { sampleImage, savePreviewPng } from './sample.ts';
import type { DiffusionBatch } from './diffusion-loss.ts';
import type { JobContext } from '../job.ts';
import { chooseUNetMemory } from '../memory/choice.ts';
import { releaseTextCache } from './context-cache.ts';
import type { TextualInversionJob } from '../../schemas/types.ts';

/**
 * The dataset, preview and memory options of the methods that train on the webui dataset (TI and
 * hypernetwork; Dreambooth and LoRA on top): schemas/textual-inversion.json's, which
 * schemas/hypernetwork.json shares, with the log folder set.
 */
export type CommonSpec = Omit<TextualInversionJob, 'initText' | 'vectors' | 'embeddingsDir' | 'dryRun' | 'logDir' | keyof Sized> & Sized & {
  logDir: string;
  fusedBackward?: boolean;
};

/**
 * What the dataset is read with: the common options, the size perhaps left to the model family
 * (a dry run's spec); without a template (LoRA), prompts are the captions.
 */
export type DatasetSpec = Omit<CommonSpec, 'logDir' | 'template' | keyof Sized> & Partial<Sized> & { template?: string };

export interface PreparedRun {
  dataset: Dataset;
  model: SdModel & Required<Pick<SdModel, 'text' | 'unet'>>;
  latents: LatentCache;
  tokenizer: ClipTokenizer;
  /** The VAE decoder, only when previews are on. */
  decoder?: { params: Params; cfg: VaeConfig };
  /** First 10 hex of the model file's sha256 (webui `sd_checkpoint`) and its stem. */
  modelHash: string;
  modelName: string;
}

/** Dataset, model, cached latents; the VAE encoder is released once the latents exist. */
/** `backend`: the one initBackend chose (the memory estimate depends on it). */
export async function prepareRun(
  spec: CommonSpec, ctx: JobContext, type: string, backend: string, opts: { xl?: boolean; templates?: PromptTemplates } = {},
): Promise<PreparedRun> {
  const dataset = await loadDataset(spec, (message) => ctx.emit({ type: 'log', level: 'warn', message }), opts.templates);
  const memory = await chooseUNetMemory(type, spec, backend, ctx);
  // the UNet never trains here; the text encoder does under TI (its vectors) and a text LoRA, whose tape keeps the upcast weights anyway
  const textTrains = type === 'textual_inversion' || (spec as { trainTextEncoder?: boolean }).trainTextEncoder === true;
  // under bf16 precision the store is bfloat16: the operands the bf16 kernels use anyway
  const half = spec.halfFrozenWeights ? { unet: true, text: !textTrains, format: computePrecision() === 'bf16' ? ('bf16' as const) : ('f16' as const) } : {};
  const opened = await openSdModel(spec.model, { xl: opts.xl, what: type });
  const { latents, scaleFactor } = await encodeFirst(dataset, opened, spec.seed).catch(closing(opened));
  const model = (await loadSdParts(opened, ['text', 'unet'], half, { prediction: spec.prediction }).catch(closing(opened))) as PreparedRun['model'];
  model.unet.memory = memory;
  const decoder = spec.previewEvery > 0 ? await loadVae(model.source, { parts: ['decoder'], scaleFactor }) : undefined;
  return {
    dataset, model, latents, decoder, tokenizer: await ClipTokenizer.load(),
    modelHash: await modelHash(spec.model), modelName: basename(spec.model, extname(spec.model)),
  };
}

/**
 * The dataset's latents, encoded with the VAE encoder alone before the text encoders and the UNet
 * load (and released, with the pixels, before they do): the encoder's activations (~6.5 GB for one
 * 1024 px image) and the model's float32 weights (12.6 GB for SDXL) are never held at once.
 */
export async function encodeFirst(dataset: Dataset, model: SdModel, seed: number): Promise<{ latents: LatentCache; scaleFactor: number }> {
  const vae = await loadVae(model.source, { parts: ['encoder'], scaleFactor: scaleFactorOf(model) });
  try {
    // the family's (SDXL 0.13025) or the config's
    return { latents: await LatentCache.build(dataset, vae, seed), scaleFactor: vae.cfg.scaleFactor };
  } finally {
    disposeParams(vae.params);
    dataset.releasePixels();
  }
}

/** A rejection handler that closes the opened checkpoint, then rethrows. */
export const closing = (model: SdModel) => async (err: unknown): Promise<never> => {
  await model.source.close().catch(() => undefined);
  throw err;
};

/** The prompts of a method that does not take them from `spec.template` (LoRA: the instance prompt and captions). */
export interface PromptTemplates {
  template: Template;
  captionedTemplate?: Template;
}

/**
 * How the images of an SDXL job are cut (the checkpoint's header says the family): to the
 * aspect-ratio bucket nearest each one's shape, as sgm and kohya train SDXL; to width × height
 * itself when class images share every batch (prior preservation: one latent size per batch).
 * SD1/SD2 images are stretched to width × height, as the webui does.
 */
export async function imageFit(spec: { model: string }): Promise<ImageFit> {
  if ((await headerFamily(spec.model)) !== 'sdxl') return 'stretch';
  const prior = spec as Partial<Pick<PriorSpec, 'classPrompt' | 'classImages'>>;
  return priorOn({ classPrompt: prior.classPrompt, classImages: prior.classImages ?? 0 }) ? 'crop' : 'buckets';
}

/** The training images as the job's options describe them (the model's header says how they are cut). */
export async function loadDataset(given: DatasetSpec, onWarning: (message: string) => void, templates?: PromptTemplates): Promise<Dataset> {
  const spec = await withNativeSize(given); // a dry run's spec: the run fills the size in before
  return Dataset.load({
    dir: spec.images, width: spec.width, height: spec.height, doNotResize: spec.doNotResize, fit: await imageFit(spec), name: spec.name,
    // methods whose prompts are not templated by spec.template (LoRA: instance prompt and captions; fine-tune) pass their own
    ...(templates ?? { template: await loadTemplate(spec.template ?? 'none') }),
    shuffleTags: spec.shuffleTags, tagDropOut: spec.tagDropOut,
    latentSampling: spec.latentSampling, batchSize: spec.batchSize, gradAccum: spec.gradAccum, seed: spec.seed,
    useWeight: spec.useWeight, filenameWordRegex: spec.filenameWordRegex, filenameJoinString: spec.filenameJoinString, onWarning,
  });
}

/** `--dry-run`: the dataset report (images used and skipped, sizes, captions, prompts, steps per epoch). */
export async function datasetDryRun(spec: DatasetSpec): Promise<string> {
  return formatDatasetReport(datasetReport(await loadDataset(spec, () => {})));
}

/** The micro-batch for update `step` (1-based): cached latents, seeded noise and timesteps, prompts. */
export function diffusionBatch(run: PreparedRun, spec: CommonSpec, step: number, micro: number, embeddings: Map<string, number>): DiffusionBatch & { prompts: TokenizedPrompt[] } {
  const b = run.dataset.batchAt(step - 1, micro);
  const latents = run.latents.latents(b.items, step, micro);
  const rng = Rng.derive(spec.seed, 'timesteps', step, micro);
  const timesteps = b.items.map(() => rng.int(run.model.schedule.timesteps));
  const padding = paddingFor(run.model.family);
  return {
    latents, timesteps, noise: seededNoise(latents.shape, spec.seed, 'noise', step, micro),
    prompts: b.prompts.map((p) => tokenizeWithEmbeddings(run.tokenizer, p, embeddings, padding)),
  };
}

/** Render a preview PNG of the current weights: `splices` for TI vectors, `hooks` for hypernetworks. */
export async function renderPreview(
  run: PreparedRun, spec: CommonSpec, path: string, prompt: TokenizedPrompt,
  conditioning: { splices?: (batchRow: number) => TextSplice[]; hooks?: UNetHooks },
): Promise<string> {
  const { text, unet, schedule, prediction, family } = run.model;
  const context = encodeText(text.params, text.cfg, [prompt.ids], { splices: conditioning.splices?.(0) });
  const uncond = encodeText(text.params, text.cfg, [run.tokenizer.encode('', paddingFor(family))]);
  const denoise = (latents: Tensor, t: number, ctx: Tensor) =>
    unetForward(unet.params, unet.cfg, latents, new Array(latents.shape[0]).fill(t), ctx, { hooks: conditioning.hooks });
  const image = await sampleImage(
    { denoise, schedule, vae: run.decoder!, context, uncondContext: uncond },
    { sampler: spec.previewSampler, steps: spec.previewSteps, cfgScale: spec.previewCfgScale, seed: spec.seed, width: spec.width, height: spec.height, parameterization: prediction },
  );
  tf.dispose([context, uncond]);
  await mkdir(join(path, '..'), { recursive: true });
  const infotext = `${spec.previewPrompt ?? ''}\nSteps: ${spec.previewSteps}, Sampler: ${spec.previewSampler}, CFG scale: ${spec.previewCfgScale}, Seed: ${spec.seed}, Size: ${spec.width}x${spec.height}, Model hash: ${run.modelHash}, Model: ${run.modelName}`;
  await savePreviewPng(path, image.rgb, image.width, image.height, infotext);
  return path;
}

/** The preview prompt: the spec's, or the first dataset prompt (the webui's "use prompt from dataset"). */
export function previewPromptText(run: PreparedRun, spec: CommonSpec): string {
  return spec.previewPrompt || run.dataset.batchAt(0, 0).prompts[0]!;
}

/** The session fields a run on a prepared dataset shares (train/run.ts Session); `settings` extra for settings.json. */
export function datasetSession(run: PreparedRun, spec: CommonSpec, settings: object = {}) {
  const { dataset } = run;
  return {
    gradAccum: dataset.gradAccum, stepsPerEpoch: dataset.stepsPerEpoch, previewEvery: spec.previewEvery,
    settings: { modelHash: run.modelHash, stepsPerEpoch: dataset.stepsPerEpoch, images: dataset.items.length, ...settings },
  };
}

/** Release a prepared run's tensors and close its model file (train/run.ts LoadArgs.onRelease). */
export async function closeRun(run: PreparedRun): Promise<void> {
  releaseRun(run);
  await run.model.source.close();
}

export function releaseRun(run: PreparedRun): void {
  run.latents.dispose();
  if (run.model.text) {
    releaseTextCache(run.model.text.params);
    disposeParams(run.model.text.params);
  }
  if (run.model.textXl) disposeParams(run.model.textXl.params);
  disposeParams(run.model.unet.params);
  if (run.decoder) disposeParams(run.decoder.params);
}
