/**
 * @file Dreambooth (Ruiz et al. 2022; diffusers examples/dreambooth/train_dreambooth.py): the
 * whole UNet (optionally the text encoder, with its own rate and step limit) is fine-tuned on a
 * few instance images with the instance prompt. Prior preservation: class images generated
 * before training from the base model with sidetrain's own sampler (or the user's folder, topped
 * up) — each micro-batch has an instance half and a class half, and
 * loss = instance loss + priorWeight × class loss, each the mean over its half, as diffusers.
 * Output: a full checkpoint in the input's LDM key layout (io/checkpoint-write.ts). Snapshots go
 * to `<logDir>/<name>/checkpoints/`, each step's optimizer state beside them
 * (`<name>-<step>.optim.safetensors`), so a cancelled run resumes with its moments.
 * With `lora`, the trained weights are LoRA adapters instead (base frozen): the job is a LoRA
 * job with prior preservation (lora.ts, same writer and ss_* metadata); class images, the class
 * half of each batch and the two-part loss come from prior-preservation.ts in both cases.
 */
import { existsSync } from 'node:fs';
import { mkdir, readdir } from 'node:fs/promises';
import { basename, dirname, extname, join, resolve } from 'node:path';
import { tf, initJobBackend, type Tensor } from '../backend/index.ts';
import { checkName, checkReadableDir, checkReadableFile } from '../io/paths.ts';
import { datasetReport, formatDatasetReport } from '../data/dataset.ts';
import { ClipTokenizer } from '../text/tokenizer.ts';
import { loadSdModel, paddingFor, type SdModel } from '../nets/sd.ts';
import { chooseUNetMemory } from '../memory/choice.ts';
import { disposeParams, paramFromTorch, type Params } from '../nets/params.ts';
import { loadVae } from '../nets/vae.ts';
import { encodeText, type ClipTextConfig } from '../nets/clip.ts';
import { encodeFrozenText, releaseTextCache } from '../train/context-cache.ts';
import { modelHash, openCheckpoint, openTensorFile } from '../io/checkpoint.ts';
import { writeCheckpoint } from '../nets/checkpoint-write.ts';
import { LatentCache } from '../train/latent-cache.ts';
import type { Denoiser, DiffusionBatch } from '../train/diffusion-loss.ts';
import {
  describePrior, loadPromptSet, prepareClassSet, priorOn, priorPreservationLoss, PriorLossLog, withClassRows,
  type ClassSet, type PriorLoss, type PriorSpec,
} from '../train/prior-preservation.ts';
import { loraDryRun, runLora, type LoraSpec } from './lora/lora.ts';
import { captionOverrideWarning, type CaptionMode } from '../train/instance-prompts.ts';
import type { JobContext, JobResult } from '../job.ts';
import type { TrainMethod } from '../train/loop.ts';
import { parseLrSchedule, type LrSchedule } from '../optim/lr.ts';
import { DbOptimizer, makeGroupOptimizer, readOptimizerState, writeOptimizerState } from '../optim/trainable.ts';
import { useBf16Weights } from '../optim/bf16-round.ts';
import { diffusionBatch, renderPreview, trainAndSave, previewPromptText, type CommonSpec, type PreparedRun, type RunPaths } from '../train/run.ts';
import { tokenizeWithEmbeddings } from '../text/tokenizer.ts';

/** The job's options (schemas/dreambooth.json). */
export interface DbSpec extends CommonSpec, Omit<PriorSpec, 'classPrompt'> {
  instancePrompt: string;
  /** How an image's caption file and the instance prompt combine (train/instance-prompts.ts; default ignore). */
  captionMode: CaptionMode;
  classPrompt: string;
  trainTextEncoder: boolean;
  textEncoderLr: string;
  textEncoderSteps: number;
  optimizer: 'adamw' | 'adamw8bit' | 'adafactor';
  half: boolean;
  /** Trained weights at bfloat16 precision, updates rounded stochastically (optim/bf16-round.ts). */
  bf16Weights?: boolean;
  checkpointDir: string;
  /** Train LoRA adapters (base frozen) and write `<loraDir>/<name>.safetensors` instead of a checkpoint. */
  lora: boolean;
  rank: number;
  alpha: number;
  loraDir: string;
}

/** What the schema does not have (dataset options the webui methods use), fixed for Dreambooth. */
const FIXED: Partial<DbSpec> = {
  template: 'none', shuffleTags: false, tagDropOut: 0, doNotResize: false, useWeight: false, filenameWordRegex: '',
  filenameJoinString: ' ', latentSampling: 'once', clipGrad: 'disabled', clipGradValue: '0.1', previewSampler: 'ddim',
  previewSteps: 20, previewCfgScale: 7, classSampler: 'ddim', classSteps: 20, classCfgScale: 7, batchSize: 1, gradAccum: 1,
  captionMode: 'ignore', classPrompt: '', classImages: 100, priorWeight: 1, trainTextEncoder: false,
  textEncoderLr: '5e-6', textEncoderSteps: 0, optimizer: 'adamw', half: false, lora: false, rank: 16, alpha: 8, lr: '5e-6', steps: 800, saveEvery: 0,
  previewEvery: 0, seed: 0, width: 512, height: 512, resume: false, overwrite: false,
};

// ---------------------------------------------------------------------------------------------
// The loss (the trainer's own path; the golden test runs it)

export interface DbModel extends Denoiser {
  text: { params: Params; cfg: ClipTextConfig };
}

/** Instance rows first, then `classRows` class rows; `context` precomputed when the text encoder is frozen. */
export interface DbBatch extends DiffusionBatch {
  ids: number[][];
  classRows: number;
  context?: Tensor;
}

/** The text encoder's context (unless precomputed), then prior-preservation.ts's two-part loss. */
export function dreamboothLoss(m: DbModel, batch: DbBatch, priorWeight: number): PriorLoss {
  return tf.tidy(() => {
    const context = batch.context ?? encodeText(m.text.params, m.text.cfg, batch.ids); // [B, 77, W]
    return priorPreservationLoss(m, batch, context, priorWeight);
  });
}

// ---------------------------------------------------------------------------------------------
// Preparation: datasets, cached latents, the model with every trained weight a variable

export interface DbRun extends PreparedRun {
  classes?: ClassSet;
  /** The input checkpoint, opened raw: keys and dtypes of the output. */
  raw: Awaited<ReturnType<typeof openTensorFile>>;
}

/** Model, class images, both datasets' latents (the VAE encoder is released). */
export async function prepareDreambooth(spec: DbSpec, ctx: JobContext): Promise<DbRun> {
  const model = (await loadSdModel(spec.model, ['text', 'unet', 'vae-encoder'], {}, { what: 'dreambooth (full UNet)', prediction: spec.prediction })) as PreparedRun['model'] & SdModel;
  model.unet.memory = await chooseUNetMemory('dreambooth', spec, ctx);
  const tokenizer = await ClipTokenizer.load();
  const hash = await modelHash(spec.model);
  const dataset = await loadPromptSet(spec, spec.images, spec.instancePrompt, spec.batchSize, ctx, spec.captionMode);
  const override = captionOverrideWarning(dataset, spec.captionMode, spec.instancePrompt);
  if (override) ctx.emit({ type: 'log', level: 'warn', message: override });
  const classes = await prepareClassSet(spec, model, tokenizer, hash, dataset.batchSize, ctx, model.vae);
  const latents = await LatentCache.build(dataset, model.vae!, spec.seed);
  dataset.releasePixels();
  disposeParams(model.vae!.params);
  delete model.vae;
  const decoder = spec.previewEvery > 0 ? await loadVae(model.source, { parts: ['decoder'], scaleFactor: model.overrides.scaleFactor }) : undefined;
  return {
    dataset, model, latents, decoder, tokenizer, modelHash: hash, modelName: basename(spec.model, extname(spec.model)),
    classes, raw: await openTensorFile(spec.model),
  };
}

/** Every UNet (and text-encoder) weight becomes a trainable variable, in place in the model. */
function makeVariables(params: Params): Map<string, tf.Variable> {
  const vars = new Map<string, tf.Variable>();
  for (const [key, t] of params) {
    const v = tf.variable(t, true);
    t.dispose();
    params.set(key, v);
    vars.set(key, v);
  }
  return vars;
}

// ---------------------------------------------------------------------------------------------
// State, save, resume

export interface DbState {
  unet: Map<string, tf.Variable>;
  text: Map<string, tf.Variable>;
  step: number;
  optimizer: DbOptimizer;
}

export function dreamboothPaths(spec: DbSpec): RunPaths {
  const runDir = resolve(spec.logDir, spec.name);
  return { output: resolve(spec.checkpointDir, `${spec.name}.safetensors`), runDir, snapshots: join(runDir, 'checkpoints'), images: join(runDir, 'images'), csv: join(runDir, 'loss.csv') };
}

const optimPath = (paths: RunPaths, name: string, step: number) => join(paths.snapshots, `${name}-${step}.optim.safetensors`);

/** The output if it exists, else the newest `<name>-<step>.safetensors` snapshot. */
export async function dreamboothResumeSource(paths: RunPaths, name: string): Promise<string | undefined> {
  if (existsSync(paths.output)) return paths.output;
  if (!existsSync(paths.snapshots)) return undefined;
  const re = new RegExp(`^${name.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}-(\\d+)\\.safetensors$`);
  const steps = (await readdir(paths.snapshots)).map((f) => re.exec(f)?.[1]).filter((s): s is string => !!s).map(Number);
  return steps.length ? join(paths.snapshots, `${name}-${Math.max(...steps)}.safetensors`) : undefined;
}

/** Trainable variables (from the resumed checkpoint when resuming) and the optimizer (with its saved state). */
export async function initDreamboothState(run: DbRun, spec: DbSpec, paths: RunPaths, ctx: JobContext): Promise<DbState> {
  const unet = makeVariables(run.model.unet.params);
  const text = makeVariables(run.model.text.params);
  for (const v of text.values()) v.trainable = spec.trainTextEncoder;
  let step = 0;
  const from = spec.resume ? await dreamboothResumeSource(paths, spec.name) : undefined;
  if (spec.resume && !from) ctx.emit({ type: 'log', level: 'warn', message: `nothing to resume for '${spec.name}': starting from ${spec.model}` });
  if (from) {
    const { source } = await openCheckpoint(from);
    try {
      step = Number(source.metadata().sidetrain_step ?? 0);
      for (const [key, v] of [...unet, ...text]) {
        if (!source.has(key)) continue;
        const t = paramFromTorch(await source.read(key), source.info(key).shape);
        v.assign(t);
        t.dispose();
      }
    } finally {
      await source.close();
    }
  }
  const optimizer = new DbOptimizer(
    makeGroupOptimizer(spec.optimizer, unet),
    spec.trainTextEncoder ? makeGroupOptimizer(spec.optimizer, text) : undefined,
    new Set(text.keys()),
  );
  if (spec.bf16Weights) useBf16Weights(optimizer, new Map([...unet, ...(spec.trainTextEncoder ? text : [])]), spec.seed);
  if (from) await restoreOptimizer(optimizer, optimPath(paths, spec.name, step), ctx);
  ctx.emit({ type: 'log', level: 'info', message: from ? `continuing ${from} from step ${step}` : `training ${unet.size + (spec.trainTextEncoder ? text.size : 0)} tensors with ${spec.optimizer}` });
  return { unet, text, step, optimizer };
}

async function restoreOptimizer(optimizer: DbOptimizer, path: string, ctx: JobContext): Promise<void> {
  const warn = (message: string) => ctx.emit({ type: 'log', level: 'warn', message });
  if (!existsSync(path)) return warn(`no optimizer state ${path}: the optimizer starts afresh`);
  try {
    optimizer.importGroups(await readOptimizerState(path));
    ctx.emit({ type: 'log', level: 'info', message: `optimizer state restored from ${path}` });
  } catch (err) {
    warn(`cannot resume from the saved optimizer state ${path} (${(err as Error).message}): starting it afresh`);
  }
}

function checkpointMetadata(run: DbRun, spec: DbSpec, step: number): Record<string, unknown> {
  return {
    sidetrain_method: 'dreambooth', sidetrain_step: String(step), sidetrain_base_model: run.modelName, sidetrain_base_model_hash: run.modelHash,
    sidetrain_instance_prompt: spec.instancePrompt, sidetrain_class_prompt: spec.classPrompt, sidetrain_class_images: String(run.classes ? spec.classImages : 0),
    sidetrain_prior_weight: String(spec.priorWeight), sidetrain_lr: spec.lr, sidetrain_optimizer: spec.optimizer, sidetrain_resolution: `${spec.width}x${spec.height}`,
    sidetrain_train_text_encoder: String(spec.trainTextEncoder), sidetrain_text_encoder_lr: spec.textEncoderLr, sidetrain_seed: String(spec.seed),
    sidetrain_batch_size: String(run.dataset.batchSize), sidetrain_grad_accum: String(run.dataset.gradAccum), sidetrain_images: String(run.dataset.items.length),
  };
}

/** The checkpoint (output or snapshot) and the optimizer state of its step beside the snapshots. */
async function saveDreambooth(run: DbRun, spec: DbSpec, s: DbState, paths: RunPaths, step: number, final: boolean): Promise<string[]> {
  const path = final ? paths.output : join(paths.snapshots, `${spec.name}-${step}.safetensors`);
  const trained = new Map<string, Tensor>([...s.unet, ...(spec.trainTextEncoder ? s.text : [])]);
  await writeCheckpoint({
    dir: dirname(path), name: basename(path, '.safetensors'), source: run.raw, trained, half: spec.half, overwrite: true,
    metadata: checkpointMetadata(run, spec, step),
  });
  await mkdir(paths.snapshots, { recursive: true });
  const optim = optimPath(paths, spec.name, step);
  await writeOptimizerState(optim, await s.optimizer.exportGroups(), { sidetrain_step: String(step), optimizer: spec.optimizer });
  return [path, optim];
}

// ---------------------------------------------------------------------------------------------
// The method

/** Instance half from the instance set; class half (same size) from the class set at the same linear position. */
export function nextDbBatch(run: DbRun, spec: DbSpec, step: number, micro: number, encodeFrozen: boolean): DbBatch {
  const { prompts, ...inst } = diffusionBatch(run, spec, step, micro, new Map());
  const at = { step, micro, gradAccum: run.dataset.gradAccum };
  const model = { tokenizer: run.tokenizer, family: run.model.family, timesteps: run.model.schedule.timesteps };
  const batch: DbBatch = withClassRows({ ...inst, ids: prompts.map((p) => p.ids) }, run.classes, spec, at, model);
  if (encodeFrozen) batch.context = encodeFrozenText(run.model.text.params, run.model.text.cfg, batch.ids);
  return batch;
}

export function dreamboothMethod(run: DbRun, spec: DbSpec, s: DbState, paths: RunPaths): TrainMethod<DbBatch> {
  const trainable = new Map<string, tf.Variable>([...s.unet, ...(spec.trainTextEncoder ? s.text : [])]);
  const model: DbModel = { ...run.model };
  const previewPrompt = tokenizeWithEmbeddings(run.tokenizer, spec.previewPrompt || previewPromptText(run, spec), new Map(), paddingFor(run.model.family));
  const log = new PriorLossLog(join(paths.runDir, 'prior-loss.csv'));
  let current = 0;
  return {
    trainable,
    nextBatch: async (step, micro) => {
      await log.flush();
      current = step;
      const textTrains = s.optimizer.textActive(step - 1);
      // past the text encoder's step limit its weights stop being trained (and differentiated)
      if (!textTrains) for (const k of s.text.keys()) trainable.delete(k);
      return nextDbBatch(run, spec, step, micro, !textTrains);
    },
    loss: (batch) => {
      const parts = dreamboothLoss(model, batch, spec.priorWeight);
      log.record(current, parts);
      return parts.loss;
    },
    disposeBatch: (b) => tf.dispose([b.latents, b.noise, ...(b.context ? [b.context] : [])]),
    save: async (step, final) => {
      await log.flush();
      return saveDreambooth(run, spec, s, paths, step, final);
    },
    preview: (step) => renderPreview(run, spec, join(paths.images, `${spec.name}-${step}.png`), previewPrompt, {}),
  };
}

/** `--dry-run`: the instance dataset report (prompts = the instance prompt) and where class images come from. */
export async function dreamboothDryRun(raw: Partial<DbSpec>): Promise<string> {
  const spec = dreamboothSpec(raw);
  const quiet = { emit: () => {}, signal: new AbortController().signal };
  if (spec.lora) return loraDryRun(loraSpecOf(spec, quiet));
  const set = await loadPromptSet(spec, spec.images, spec.instancePrompt, spec.batchSize, quiet, spec.captionMode);
  const report = datasetReport(set);
  report.template = `instance prompt ${JSON.stringify(spec.instancePrompt)}, captions: ${spec.captionMode}`;
  const override = captionOverrideWarning(set, spec.captionMode, spec.instancePrompt);
  if (override) report.warnings.push(override);
  const paths = dreamboothPaths(spec);
  return [
    formatDatasetReport(report), describePrior(spec), `learn rate ${spec.lr}${spec.trainTextEncoder ? `, text encoder ${spec.textEncoderLr}` : ''}`,
    `output: ${paths.output} (pick '${spec.name}' in the webui's checkpoint list)`, `snapshots, previews, loss CSV: ${paths.runDir}`,
  ].join('\n');
}

/** Everything checked before a model loads or a file is written. */
async function preflight(raw: DbSpec, ctx: JobContext): Promise<{ spec: DbSpec; paths: RunPaths; textLr?: LrSchedule }> {
  const spec = dreamboothSpec(raw);
  checkName(spec.name);
  await checkReadableFile(spec.model, '/model');
  await checkReadableDir(spec.images, '/images');
  if (spec.classImagesDir) await checkReadableDir(spec.classImagesDir, '/classImagesDir');
  const paths = dreamboothPaths(spec);
  if (existsSync(paths.output) && !spec.overwrite && !spec.resume) {
    throw new Error(`${paths.output} already exists: pass --resume to continue training it or --overwrite to replace it`);
  }
  const lr = parseLrSchedule(spec.lr, spec.steps);
  for (const message of lr.warnings) ctx.emit({ type: 'log', level: 'warn', message });
  const textLr = spec.trainTextEncoder ? parseLrSchedule(spec.textEncoderLr, spec.steps, 0, 'text encoder learn rate') : undefined;
  if (spec.classPrompt && !priorOn(spec) && !spec.classImagesDir) {
    ctx.emit({ type: 'log', level: 'warn', message: 'classPrompt given but classImages is 0: training without prior preservation' });
  }
  return { spec, paths, textLr };
}

/** The spec with what the schema leaves out filled in (the dataset options Dreambooth fixes, default folders). */
export function dreamboothSpec(raw: Partial<DbSpec>): DbSpec {
  // the learn rates have no schema default: adapters want LoRA's (schemas/lora.json), the whole model diffusers' 5e-6
  const lr = raw.lr ?? (raw.lora ? LORA_LR : DB_LR);
  return {
    ...(FIXED as DbSpec), ...stripUndefined(raw), template: 'none', logDir: raw.logDir ?? 'textual_inversion',
    checkpointDir: raw.checkpointDir ?? 'checkpoints', loraDir: raw.loraDir ?? 'lora', lr, textEncoderLr: raw.textEncoderLr ?? (raw.lora ? lr : DB_LR),
  };
}

const DB_LR = '5e-6';
const LORA_LR = '1e-4';

function stripUndefined<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}

/** The Dreambooth job: check, generate class images, prepare, train, save the checkpoint. */
export async function runDreambooth(raw: DbSpec, ctx: JobContext): Promise<JobResult> {
  if (raw.lora) return runLora(loraSpecOf(dreamboothSpec(raw), ctx), ctx);
  const { spec, paths, textLr } = await preflight(raw, ctx);
  const backend = await initJobBackend(spec, ctx);
  let run: DbRun | undefined;
  let s: DbState | undefined;
  try {
    run = await prepareDreambooth(spec, ctx);
    s = await initDreamboothState(run, spec, paths, ctx);
    s.optimizer.done = s.step;
    s.optimizer.textLr = textLr;
    s.optimizer.textSteps = spec.textEncoderSteps;
    const method = dreamboothMethod(run, spec, s, paths);
    await new PriorLossLog(join(paths.runDir, 'prior-loss.csv')).truncate(s.step);
    const settings = { classImagesDir: run.classes?.dir, classImagesUsed: run.classes?.dataset.items.length ?? 0, optimizer: spec.optimizer };
    const { step, outputs, cancelled } = await trainAndSave(run, spec, paths, method, s, backend.name, settings, ctx);
    return { step, output: paths.output, outputs, kind: 'checkpoint', usage: spec.name, cancelled };
  } finally {
    s?.optimizer.dispose();
    if (run) await releaseDreambooth(run);
  }
}

export async function releaseDreambooth(run: DbRun): Promise<void> {
  run.latents.dispose();
  run.classes?.latents.dispose();
  releaseTextCache(run.model.text.params);
  disposeParams(run.model.text.params);
  disposeParams(run.model.unet.params);
  if (run.decoder) disposeParams(run.decoder.params);
  await run.raw.close();
  await run.model.source.close();
}

/**
 * `--lora`: the same job as LoRA adapters — a LoRA spec with the instance prompt on every image,
 * the class options, and the text encoder's own rate and step limit; the base stays frozen.
 */
export function loraSpecOf(spec: DbSpec, ctx: JobContext): LoraSpec {
  if (spec.half) ctx.emit({ type: 'log', level: 'warn', message: '--half applies to a checkpoint output; the LoRA is written in float32' });
  const { checkpointDir: _c, half: _h, lora: _l, template: _t, ...rest } = spec;
  return { ...rest, dropout: 0, targets: ['attn'], method: 'dreambooth' };
}
