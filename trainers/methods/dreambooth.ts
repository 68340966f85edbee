/**
 * @file Dreambooth (Ruiz et al. 2022; diffusers examples/dreambooth/train_dreambooth.py): the
 * whole UNet (optionally the text encoder, with its own rate and step limit) is fine-tuned on a
 * few instance images with the instance prompt. Prior preservation: class images generated
 * before training from the base model with sidetrain's own sampler (or the user's folder, topped
 * up) — each micro-batch has an instance half and a class half, and
 * loss = instance loss + priorWeight × class loss, each the mean over its half, as diffusers.
 * Output: a full checkpoint in the input's LDM key layout (nets/checkpoint-write.ts). Snapshots go
 * to `<logDir>/<name>/checkpoints/`, each step's optimizer state beside them
 * (`<name>-<step>.optim.safetensors`), so a cancelled run resumes with its moments.
 * With `lora`, the trained weights are LoRA adapters instead (base frozen): the job is a LoRA
 * job with prior preservation (lora.ts, same writer and ss_* metadata); class images, the class
 * half of each batch and the two-part loss come from prior-preservation.ts in both cases.
 */
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { basename, dirname, extname, join, resolve } from 'node:path';
import { tf, type Tensor } from '../backend/tf.ts';
import { checkReadableDir } from '../io/paths.ts';
import { datasetReport, formatDatasetReport } from '../data/dataset.ts';
import { ClipTokenizer } from '../text/tokenizer.ts';
import { loadSdParts, openSdModel, paddingFor, scaleFactorOf, type SdModel } from '../nets/sd.ts';
import { chooseUNetMemory } from '../memory/choice.ts';
import { paramFromTorch, type Params } from '../nets/params.ts';
import { loadVae } from '../nets/vae.ts';
import { encodeText, type ClipTextConfig } from '../nets/clip.ts';
import { encodeFrozenText, releaseTextCache } from '../train/context-cache.ts';
import { modelHash, openCheckpoint, openTensorFile, peekFamily } from '../io/checkpoint.ts';
import { writeCheckpoint } from '../nets/checkpoint-write.ts';
import type { Denoiser, DiffusionBatch } from '../train/diffusion-loss.ts';
import {
  describePrior, flushingPriorLog, loadPromptSet, prepareClassSet, priorOn, priorPreservationLoss, PriorLossLog, withClassRows,
  type ClassSet, type PriorLoss, type PriorSpec,
} from '../train/prior-preservation.ts';
import { lora, loraDryRun, loraSpec, type LoraSpec } from './lora/lora.ts';
import { captionOverrideWarning, type CaptionMode } from '../train/instance-prompts.ts';
import type { JobContext, JobResult } from '../job.ts';
import { parseLrSchedule } from '../optim/lr.ts';
import { TrainableOptimizer, makeTrainable, makeTrainableOptimizer, readOptimizerState, textLimitedTrainable, writeOptimizerState } from '../optim/trainable.ts';
import { useBf16Weights } from '../optim/bf16-round.ts';
import { closing, datasetSession, diffusionBatch, encodeFirst, imageFit, releaseRun, renderPreview, previewPromptText, type CommonSpec, type PreparedRun } from '../train/prepare.ts';
import { xlDreamboothOps, type DbFamilyOps } from './dreambooth-xl.ts';
import type { XlTextCache } from '../train/sdxl-text-cache.ts';
import { checkTextEncoder2Lr, encodersOf, makeXlTextVariables, xlText2Keys } from './full-xl.ts';
import {
  runMethod, runPaths, snapshotPath, withFolders, withNativeSize, type MethodDefinition, type OutputLayout, type RunPaths, type Session,
  type Sized, type Unsized, type WithFolders,
} from '../train/run.ts';
import type { DreamboothJob } from '../../schemas/types.ts';
import { tokenizeWithEmbeddings } from '../text/tokenizer.ts';

/** The dataset options the webui methods have and Dreambooth fixes: one prompt per image, no tags. */
const DATASET_FIXED = {
  template: 'none', shuffleTags: false, tagDropOut: 0, doNotResize: false, useWeight: false, filenameWordRegex: '', filenameJoinString: ' ',
} as const;

/**
 * The job's options (schemas/dreambooth.json), folders set, the learn rates chosen, with the
 * dataset options it fixes.
 */
export type DbSpec = WithFolders<DreamboothJob, 'logDir' | 'checkpointDir' | 'loraDir'> & { lr: string; textEncoderLr: string } & Sized &
  Pick<CommonSpec, keyof typeof DATASET_FIXED>;

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
  /** SDXL with frozen encoders: every prompt encoded once, the encoders released (dreambooth-xl.ts). */
  textCache?: XlTextCache;
}

/** Model, class images, both datasets' latents (the VAE encoder is released). */
export async function prepareDreambooth(spec: DbSpec, ctx: JobContext, backend: string): Promise<DbRun> {
  const tokenizer = await ClipTokenizer.load();
  const hash = await modelHash(spec.model);
  // SDXL: each image cut to its aspect bucket (to width × height with class images), as LoRA's (train/prepare.ts imageFit)
  const dataset = await loadPromptSet(spec, spec.images, spec.instancePrompt, spec.batchSize, ctx, spec.captionMode, await imageFit(spec));
  const override = captionOverrideWarning(dataset, spec.captionMode, spec.instancePrompt);
  if (override) ctx.emit({ type: 'log', level: 'warn', message: override });
  // the instance latents with the VAE encoder alone, before the model's weights load (train/prepare.ts)
  const opened = await openSdModel(spec.model, { xl: true });
  const { latents } = await encodeFirst(dataset, opened, spec.seed).catch(closing(opened));
  const model = (await loadSdParts(opened, ['text', 'unet'], {}, { prediction: spec.prediction }).catch(closing(opened))) as PreparedRun['model'] & SdModel;
  model.unet.memory = await chooseUNetMemory('dreambooth', spec, backend, ctx);
  // class images need the whole model to be generated; their latents load the encoder again
  const classes = await prepareClassSet(spec, model, tokenizer, hash, dataset.batchSize, ctx);
  const decoder = spec.previewEvery > 0 ? await loadVae(model.source, { parts: ['decoder'], scaleFactor: scaleFactorOf(model) }) : undefined;
  return {
    dataset, model, latents, decoder, tokenizer, modelHash: hash, modelName: basename(spec.model, extname(spec.model)),
    classes, raw: await openTensorFile(spec.model),
  };
}

// ---------------------------------------------------------------------------------------------
// State, save, resume

export interface DbState {
  unet: Map<string, tf.Variable>;
  text: Map<string, tf.Variable>;
  step: number;
  optimizer: TrainableOptimizer;
}

const layout = (spec: DbSpec): OutputLayout => ({ dir: resolve(spec.checkpointDir), ext: '.safetensors', snapshots: 'checkpoints', snapshotSuffix: '.safetensors', outputResumes: true });

export const dreamboothPaths = (spec: DbSpec): RunPaths => runPaths(spec, layout(spec));

const optimPath = (paths: RunPaths, name: string, step: number) => snapshotPath(paths, name, step, { snapshotSuffix: '.optim.safetensors' });

/** Trainable variables (from the resumed checkpoint when resuming) and the optimizer (with its saved state). */
export async function initDreamboothState(run: DbRun, spec: DbSpec, paths: RunPaths, from: string | undefined, ctx: JobContext): Promise<DbState> {
  const unet = makeTrainable(run.model.unet.params);
  // SDXL: only the chosen encoders' weights that reach the loss become variables (full-xl.ts)
  const { textXl } = run.model;
  const text = textXl ? makeXlTextVariables(textXl, spec.trainTextEncoder ? encodersOf(spec) : []) : makeTrainable(run.model.text.params);
  for (const v of text.values()) v.trainable = spec.trainTextEncoder;
  let step = 0;
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
  // SDXL: OpenCLIP-G its own group (its own rate, textEncoder2Lr), CLIP-L the text group
  const optimizer = makeTrainableOptimizer(spec.optimizer, unet, spec.trainTextEncoder ? text : new Map(), { text2Keys: textXl ? xlText2Keys(textXl) : undefined });
  // stored as bf16 bits (the job requires fusedBackward with it: memory/options.ts)
  if (spec.bf16Weights) useBf16Weights(optimizer, new Map([...unet, ...(spec.trainTextEncoder ? text : [])]), spec.seed, { store: true });
  if (from) await restoreOptimizer(optimizer, optimPath(paths, spec.name, step), ctx);
  ctx.emit({ type: 'log', level: 'info', message: from ? `continuing ${from} from step ${step}` : `training ${unet.size + (spec.trainTextEncoder ? text.size : 0)} tensors with ${spec.optimizer}` });
  return { unet, text, step, optimizer };
}

async function restoreOptimizer(optimizer: TrainableOptimizer, path: string, ctx: JobContext): Promise<void> {
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
    sidetrain_train_text_encoder: String(spec.trainTextEncoder), sidetrain_text_encoder_lr: spec.textEncoderLr,
    ...(spec.textEncoder2Lr ? { sidetrain_text_encoder2_lr: spec.textEncoder2Lr } : {}), sidetrain_seed: String(spec.seed),
    sidetrain_batch_size: String(run.dataset.batchSize), sidetrain_grad_accum: String(run.dataset.gradAccum), sidetrain_images: String(run.dataset.items.length),
  };
}

/** The checkpoint (output or snapshot) and the optimizer state of its step beside the snapshots. */
async function saveDreambooth(run: DbRun, spec: DbSpec, s: DbState, paths: RunPaths, step: number, final: boolean): Promise<string[]> {
  const path = final ? paths.output : snapshotPath(paths, spec.name, step, layout(spec));
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

export function dreamboothSession(run: DbRun, spec: DbSpec, s: DbState, paths: RunPaths, settings: object = {}): Session<unknown> {
  // past the text encoder's step limit its weights stop being trained (and differentiated)
  const all = new Map<string, tf.Variable>([...s.unet, ...(spec.trainTextEncoder ? s.text : [])]);
  const { trainable, prune } = textLimitedTrainable(s.optimizer, all, s.text.keys(), s.step);
  const ops = (run.model.textXl ? xlDreamboothOps(run, spec) : sdOps(run, spec)) as DbFamilyOps<unknown>;
  const log = new PriorLossLog(join(paths.runDir, 'prior-loss.csv'));
  return flushingPriorLog(log, {
    ...datasetSession(run, spec, settings),
    startStep: s.step,
    optimizer: s.optimizer,
    trainable,
    nextBatch: (step, micro) => ops.next(step, micro, s.optimizer.textActive(step - 1)),
    loss: (batch, step) => {
      const parts = ops.loss(batch);
      log.record(step, parts);
      return parts.loss;
    },
    afterStep: prune,
    disposeBatch: (b) => ops.dispose(b),
    save: (step, final) => saveDreambooth(run, spec, s, paths, step, final),
    preview: (step) => ops.preview(step, paths.images),
  });
}

/** SD1/SD2: the text encoder's context, precomputed while it is frozen; previews from the sampler. */
function sdOps(run: DbRun, spec: DbSpec): DbFamilyOps<DbBatch> {
  const model: DbModel = { ...run.model };
  const previewPrompt = tokenizeWithEmbeddings(run.tokenizer, spec.previewPrompt || previewPromptText(run, spec), new Map(), paddingFor(run.model.family));
  return {
    next: (step, micro, textTrains) => nextDbBatch(run, spec, step, micro, !textTrains),
    loss: (batch) => dreamboothLoss(model, batch, spec.priorWeight),
    dispose: (b) => tf.dispose([b.latents, b.noise, ...(b.context ? [b.context] : [])]),
    preview: (step, dir) => renderPreview(run, spec, join(dir, `${spec.name}-${step}.png`), previewPrompt, {}),
  };
}

/** `--dry-run`: the instance dataset report (prompts = the instance prompt) and where class images come from. */
export async function dreamboothDryRun(job: DreamboothJob): Promise<string> {
  const spec = dreamboothSpec(await withNativeSize(job));
  const quiet = { emit: () => {}, signal: new AbortController().signal };
  if (spec.lora) return loraDryRun(loraSpecOf(spec, quiet));
  const set = await loadPromptSet(spec, spec.images, spec.instancePrompt, spec.batchSize, quiet, spec.captionMode, await imageFit(spec));
  const report = datasetReport(set);
  report.template = `instance prompt ${JSON.stringify(spec.instancePrompt)}, captions: ${spec.captionMode}`;
  const override = captionOverrideWarning(set, spec.captionMode, spec.instancePrompt);
  if (override) report.warnings.push(override);
  const paths = dreamboothPaths(spec);
  return [
    formatDatasetReport(report), describePrior(spec), `learn rate ${spec.lr}${spec.trainTextEncoder ? `, text encoder ${spec.textEncoderLr}` : ''}${spec.trainTextEncoder && spec.textEncoder2Lr ? `, OpenCLIP-G ${spec.textEncoder2Lr}` : ''}`,
    `output: ${paths.output} (pick '${spec.name}' in the webui's checkpoint list)`, `snapshots, previews, loss CSV: ${paths.runDir}`,
  ].join('\n');
}

/** The spec with what the schema leaves out filled in: the learn rates, the dataset options Dreambooth fixes, default folders. */
export function dreamboothSpec<J extends DreamboothJob>(job: J): J & Unsized<DbSpec> {
  // the learn rates have no schema default: adapters want LoRA's (schemas/lora.json), the whole model diffusers' 5e-6
  const lr = job.lr ?? (job.lora ? LORA_LR : DB_LR);
  const textEncoderLr = job.textEncoderLr ?? (job.lora ? lr : DB_LR);
  return { ...withFolders(job, ['logDir', 'checkpointDir', 'loraDir']), ...DATASET_FIXED, lr, textEncoderLr };
}

const DB_LR = '5e-6';
const LORA_LR = '1e-4';

/** Dreambooth (a full checkpoint) as the one run (train/run.ts) drives it; `--lora` runs the LoRA definition. */
export const dreambooth: MethodDefinition<DbSpec, unknown> = {
  kind: 'checkpoint',
  sized: true,
  usage: (spec) => spec.name,
  layout,
  schedule: (spec, startStep) => parseLrSchedule(spec.lr, spec.steps, startStep),
  freshStart: (spec) => `starting from ${spec.model}`,
  async preflight(spec, _paths, _from, ctx) {
    if (spec.classImagesDir) await checkReadableDir(spec.classImagesDir, '/classImagesDir');
    textSchedule(spec); // a bad schedule fails before anything loads
    text2Schedule(spec);
    await checkTextEncoder2Lr(spec);
    if (spec.textEncoders !== 'both' && (await peekFamily(spec.model)) !== 'sdxl') {
      throw new Error(`/textEncoders: '${spec.textEncoders}' picks one of SDXL's two text encoders; ${spec.model} has one (use both)`);
    }
    if (spec.classPrompt && !priorOn(spec) && !spec.classImagesDir) {
      ctx.emit({ type: 'log', level: 'warn', message: 'classPrompt given but classImages is 0: training without prior preservation' });
    }
  },
  async load({ spec, paths, from, backend, onRelease }, ctx) {
    let state: DbState | undefined;
    // runs after the weights are freed: a bf16 weight store (optim/bf16-round.ts) then refills nothing
    onRelease(() => state?.optimizer.dispose());
    const run = await prepareDreambooth(spec, ctx, backend);
    onRelease(() => releaseDreambooth(run));
    const s = (state = await initDreamboothState(run, spec, paths, from?.path, ctx));
    s.optimizer.done = s.step;
    s.optimizer.textLr = textSchedule(spec);
    if (s.optimizer.text2) s.optimizer.text2.lr = text2Schedule(spec);
    s.optimizer.textSteps = spec.textEncoderSteps;
    await new PriorLossLog(join(paths.runDir, 'prior-loss.csv')).truncate(s.step);
    const settings = { classImagesDir: run.classes?.dir, classImagesUsed: run.classes?.dataset.items.length ?? 0, optimizer: spec.optimizer };
    const session = dreamboothSession(run, spec, s, paths, settings);
    if (run.textCache) ctx.emit({ type: 'log', level: 'info', message: `SDXL text encoders: ${run.textCache.size} prompt(s) encoded once; the encoders are released for training (they do not train)` });
    return session;
  },
};

const textSchedule = (spec: DbSpec) => (spec.trainTextEncoder ? parseLrSchedule(spec.textEncoderLr, spec.steps, 0, 'text encoder learn rate') : undefined);
/** OpenCLIP-G's schedule (SDXL): textEncoder2Lr, default the text encoder's. */
const text2Schedule = (spec: DbSpec) =>
  spec.trainTextEncoder ? parseLrSchedule(spec.textEncoder2Lr ?? spec.textEncoderLr, spec.steps, 0, 'OpenCLIP-G (textEncoder2Lr) learn rate') : undefined;

/** The Dreambooth job: check, generate class images, prepare, train, save the checkpoint (or, with `lora`, the LoRA). */
export function runDreambooth(job: DreamboothJob, ctx: JobContext): Promise<JobResult> {
  if (job.lora) return runMethod(lora, loraSpec(loraSpecOf(dreamboothSpec(job), ctx)), ctx);
  return runMethod(dreambooth, dreamboothSpec(job), ctx);
}

export async function releaseDreambooth(run: DbRun): Promise<void> {
  run.classes?.latents.dispose();
  run.textCache?.dispose();
  releaseRun(run);
  await run.raw.close();
  await run.model.source.close();
}

/**
 * `--lora`: the same job as LoRA adapters — a LoRA spec with the instance prompt on every image,
 * the class options, and the text encoder's own rate and step limit; the base stays frozen.
 */
export function loraSpecOf(spec: Unsized<DbSpec>, ctx: JobContext): Unsized<LoraSpec> {
  if (spec.half) ctx.emit({ type: 'log', level: 'warn', message: '--half applies to a checkpoint output; the LoRA is written in float32' });
  const { checkpointDir: _c, half: _h, lora: _l, template: _t, ...rest } = spec;
  return { ...rest, dropout: 0, targets: ['attn'], method: 'dreambooth' };
}
