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
 */
import { existsSync } from 'node:fs';
import { appendFile, mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { basename, dirname, extname, join, resolve } from 'node:path';
import { tf, initBackend, type Tensor } from './tf.ts';
import { checkName, checkReadableDir, checkReadableFile } from './io/paths.ts';
import { Dataset, datasetReport, formatDatasetReport } from './data/dataset.ts';
import type { Template } from './text/templates.ts';
import { ClipTokenizer } from './text/tokenizer.ts';
import { loadSdModel, paddingFor, type SdModel } from './nets/sd.ts';
import { chooseUNetMemory } from './memory.ts';
import { disposeParams, paramFromTorch, type Params } from './nets/params.ts';
import { unetForward } from './nets/unet.ts';
import { loadVae } from './nets/vae.ts';
import { encodeText, type ClipTextConfig } from './nets/clip.ts';
import { modelHash, openCheckpoint, openTensorFile } from './io/checkpoint.ts';
import { writeCheckpoint } from './io/checkpoint-write.ts';
import { LatentCache, seededNoise } from './latent-cache.ts';
import { Rng } from './random.ts';
import { sampleImage, savePreviewPng, type SamplerName } from './sample.ts';
import { diffusionLoss } from './schedule.ts';
import type { Denoiser, DiffusionBatch } from './diffusion-loss.ts';
import type { JobContext, JobResult } from './job.ts';
import type { TrainMethod } from './loop.ts';
import { parseLrSchedule, type LrSchedule } from './optim/lr.ts';
import { DbOptimizer, makeGroupOptimizer, readOptimizerState, writeOptimizerState } from './dreambooth-optim.ts';
import { diffusionBatch, renderPreview, trainAndSave, previewPromptText, type CommonSpec, type PreparedRun, type RunPaths } from './run-common.ts';
import { tokenizeWithEmbeddings } from './text/tokenizer.ts';

/** The job's options (schemas/dreambooth.json). */
export interface DbSpec extends CommonSpec {
  instancePrompt: string;
  classPrompt: string;
  classImages: number;
  classImagesDir?: string;
  priorWeight: number;
  classSampler: SamplerName;
  classSteps: number;
  classCfgScale: number;
  trainTextEncoder: boolean;
  textEncoderLr: string;
  textEncoderSteps: number;
  optimizer: 'adamw' | 'adamw8bit' | 'adafactor';
  half: boolean;
  checkpointDir: string;
}

/** What the schema does not have (dataset options the webui methods use), fixed for Dreambooth. */
const FIXED: Partial<DbSpec> = {
  template: 'none', shuffleTags: false, tagDropOut: 0, doNotResize: false, useWeight: false, filenameWordRegex: '',
  filenameJoinString: ' ', latentSampling: 'once', clipGrad: 'disabled', clipGradValue: '0.1', previewSampler: 'ddim',
  previewSteps: 20, previewCfgScale: 7, classSampler: 'ddim', classSteps: 20, classCfgScale: 7, batchSize: 1, gradAccum: 1,
  instancePrompt: 'a photo of sks cat', classPrompt: '', classImages: 100, priorWeight: 1, trainTextEncoder: false,
  textEncoderLr: '5e-6', textEncoderSteps: 0, optimizer: 'adamw', half: false, lr: '5e-6', steps: 800, saveEvery: 0,
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

/** One UNet pass over both halves; loss = mean over instance rows + priorWeight × mean over class rows. */
export function dreamboothLoss(m: DbModel, batch: DbBatch, priorWeight: number): { loss: tf.Scalar; instance: tf.Scalar; prior?: tf.Scalar } {
  return tf.tidy(() => {
    const context = batch.context ?? encodeText(m.text.params, m.text.cfg, batch.ids); // [B, 77, W]
    const noisy = m.schedule.qSample(batch.latents, batch.noise, batch.timesteps);
    const pred = unetForward(m.unet.params, m.unet.cfg, noisy, batch.timesteps, context, { memory: m.unet.memory });
    const target = m.schedule.targetFor(m.prediction, batch.latents, batch.noise, batch.timesteps);
    const n = batch.timesteps.length - batch.classRows;
    const instance = diffusionLoss(pred.slice(0, n), target.slice(0, n)) as tf.Scalar;
    if (!batch.classRows) return { loss: instance, instance };
    const prior = diffusionLoss(pred.slice(n), target.slice(n)) as tf.Scalar;
    return { loss: instance.add(prior.mul(priorWeight)) as tf.Scalar, instance, prior };
  });
}

// ---------------------------------------------------------------------------------------------
// Class images: generated from the base model, cached by (model hash, class prompt)

const IMAGE_EXT = new Set(['.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif', '.tiff', '.tif', '.avif']);
const sha10 = (s: string) => createHash('sha256').update(s).digest('hex').slice(0, 10);

/** The class-image folder: the user's, or `<logDir>/class-images/<modelHash>-<prompt hash>/`. */
export function classImageDir(spec: Pick<DbSpec, 'classImagesDir' | 'logDir' | 'classPrompt'>, hash: string): string {
  return resolve(spec.classImagesDir ?? join(spec.logDir, 'class-images', `${hash}-${sha10(spec.classPrompt)}`));
}

/** Top the folder up to `spec.classImages` images; seeds derive from the prompt and index, so any job makes the same image. */
async function ensureClassImages(spec: DbSpec, model: SdModel, tokenizer: ClipTokenizer, dir: string, ctx: JobContext): Promise<number> {
  await mkdir(dir, { recursive: true });
  let count = (await readdir(dir)).filter((f) => IMAGE_EXT.has(extname(f).toLowerCase())).length;
  const missing = Math.max(0, spec.classImages - count);
  if (!missing) return 0;
  ctx.emit({ type: 'log', level: 'info', message: `generating ${missing} class images for '${spec.classPrompt}' in ${dir}` });
  const { text, unet, vae, schedule, prediction, family } = model;
  const context = encodeText(text!.params, text!.cfg, [tokenizer.encode(spec.classPrompt, paddingFor(family))]);
  const uncond = encodeText(text!.params, text!.cfg, [tokenizer.encode('', paddingFor(family))]);
  const denoise = (x: Tensor, t: number, c: Tensor) => unetForward(unet!.params, unet!.cfg, x, new Array(x.shape[0]).fill(t), c);
  try {
    for (let i = 0; count < spec.classImages && !ctx.signal.aborted; i++) {
      const path = join(dir, `class-${String(i).padStart(5, '0')}.png`);
      if (existsSync(path)) continue;
      const seed = Rng.derive(0, 'class-image', sha10(spec.classPrompt), i).nextUint32();
      const opts = { sampler: spec.classSampler, steps: spec.classSteps, cfgScale: spec.classCfgScale, seed, width: spec.width, height: spec.height, parameterization: prediction };
      const image = await sampleImage({ denoise, schedule, vae: vae!, context, uncondContext: uncond }, opts);
      const info = `${spec.classPrompt}\nSteps: ${spec.classSteps}, Sampler: ${spec.classSampler}, CFG scale: ${spec.classCfgScale}, Seed: ${seed}, Size: ${spec.width}x${spec.height}, Model: ${basename(spec.model)}`;
      await savePreviewPng(path, image.rgb, image.width, image.height, info);
      count++;
    }
  } finally {
    tf.dispose([context, uncond]);
  }
  if (ctx.signal.aborted) throw new Error('cancelled while generating class images (the ones written are kept for the next run)');
  return missing;
}

// ---------------------------------------------------------------------------------------------
// Preparation: datasets, cached latents, the model with every trained weight a variable

export interface DbRun extends PreparedRun {
  classes?: { dataset: Dataset; latents: LatentCache; dir: string };
  /** The input checkpoint, opened raw: keys and dtypes of the output. */
  raw: Awaited<ReturnType<typeof openTensorFile>>;
}

const fixedTemplate = (prompt: string): Template => ({ name: 'prompt', path: '', lines: [prompt], usesName: false, usesFilewords: prompt.includes('[filewords]') });

async function loadSet(spec: DbSpec, dir: string, prompt: string, batchSize: number, ctx: JobContext): Promise<Dataset> {
  return Dataset.load({
    dir, width: spec.width, height: spec.height, name: spec.name, template: fixedTemplate(prompt), latentSampling: spec.latentSampling,
    batchSize, gradAccum: spec.gradAccum, seed: spec.seed, onWarning: (message) => ctx.emit({ type: 'log', level: 'warn', message }),
  });
}

/** Model, class images, both datasets' latents (the VAE encoder is released). */
export async function prepareDreambooth(spec: DbSpec, ctx: JobContext): Promise<DbRun> {
  const model = (await loadSdModel(spec.model, ['text', 'unet', 'vae-encoder', 'vae-decoder'])) as PreparedRun['model'] & SdModel;
  model.unet.memory = await chooseUNetMemory('dreambooth', spec, ctx);
  const tokenizer = await ClipTokenizer.load();
  const hash = await modelHash(spec.model);
  const dataset = await loadSet(spec, spec.images, spec.instancePrompt, spec.batchSize, ctx);
  let classes: DbRun['classes'];
  if (spec.classPrompt && spec.classImages > 0) {
    const dir = classImageDir(spec, hash);
    await ensureClassImages(spec, model, tokenizer, dir, ctx);
    const set = await loadSet(spec, dir, spec.classPrompt, dataset.batchSize, ctx);
    classes = { dataset: set, latents: await LatentCache.build(set, model.vae!, spec.seed), dir };
    set.releasePixels();
  }
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
  const ids = prompts.map((p) => p.ids);
  let batch: DbBatch = { ...inst, ids, classRows: 0 };
  if (run.classes) {
    const set = run.classes.dataset;
    const k = (step - 1) * run.dataset.gradAccum + micro;
    const b = set.batchAt(Math.floor(k / set.gradAccum), k % set.gradAccum);
    const latents = run.classes.latents.latents(b.items, step, micro);
    const rng = Rng.derive(spec.seed, 'class-timesteps', step, micro);
    const noise = seededNoise(latents.shape, spec.seed, 'class-noise', step, micro);
    const padding = paddingFor(run.model.family);
    batch = {
      latents: tf.concat([inst.latents, latents]), noise: tf.concat([inst.noise, noise]),
      timesteps: [...inst.timesteps, ...b.items.map(() => rng.int(run.model.schedule.timesteps))],
      ids: [...ids, ...b.prompts.map((p) => run.tokenizer.encode(p, padding))], classRows: b.items.length,
    };
    tf.dispose([inst.latents, inst.noise, latents, noise]);
  }
  if (encodeFrozen) batch.context = encodeText(run.model.text.params, run.model.text.cfg, batch.ids);
  return batch;
}

export function dreamboothMethod(run: DbRun, spec: DbSpec, s: DbState, paths: RunPaths): TrainMethod<DbBatch> {
  const trainable = new Map<string, tf.Variable>([...s.unet, ...(spec.trainTextEncoder ? s.text : [])]);
  const model: DbModel = { ...run.model };
  const previewPrompt = tokenizeWithEmbeddings(run.tokenizer, spec.previewPrompt || previewPromptText(run, spec), new Map(), paddingFor(run.model.family));
  // each micro-batch's instance and class losses, read (async) at the next batch or save
  let parts: { step: number; instance: Tensor; prior?: Tensor }[] = [];
  let current = 0;
  const priorCsv = join(paths.runDir, 'prior-loss.csv');
  const flush = async () => {
    for (const p of parts) {
      const [instance, prior] = await Promise.all([p.instance, p.prior].map(async (t) => (t ? (await t.data())[0]! : undefined)));
      tf.dispose([p.instance, ...(p.prior ? [p.prior] : [])]);
      await appendPriorRow(priorCsv, p.step, instance!, prior);
    }
    parts = [];
  };
  return {
    trainable,
    nextBatch: async (step, micro) => {
      await flush();
      current = step;
      const textTrains = s.optimizer.textActive(step - 1);
      // past the text encoder's step limit its weights stop being trained (and differentiated)
      if (!textTrains) for (const k of s.text.keys()) trainable.delete(k);
      return nextDbBatch(run, spec, step, micro, !textTrains);
    },
    loss: (batch) => {
      const { loss, instance, prior } = dreamboothLoss(model, batch, spec.priorWeight);
      parts.push({ step: current, instance: tf.keep(instance), prior: prior && tf.keep(prior) });
      return loss;
    },
    disposeBatch: (b) => tf.dispose([b.latents, b.noise, ...(b.context ? [b.context] : [])]),
    save: async (step, final) => {
      await flush();
      return saveDreambooth(run, spec, s, paths, step, final);
    },
    preview: (step) => renderPreview(run, spec, join(paths.images, `${spec.name}-${step}.png`), previewPrompt, {}),
  };
}

/** `--dry-run`: the instance dataset report (prompts = the instance prompt) and where class images come from. */
export async function dreamboothDryRun(raw: Partial<DbSpec>): Promise<string> {
  const spec = dreamboothSpec(raw);
  const set = await loadSet(spec, spec.images, spec.instancePrompt, spec.batchSize, { emit: () => {}, signal: new AbortController().signal });
  const prior = spec.classPrompt && spec.classImages > 0
    ? `prior preservation: ${spec.classImages} class images of '${spec.classPrompt}' from ${spec.classImagesDir ?? join(spec.logDir, 'class-images', '<model hash>-' + sha10(spec.classPrompt))} (missing ones generated), weight ${spec.priorWeight}`
    : 'prior preservation: off (no classPrompt or classImages 0)';
  return `${formatDatasetReport(datasetReport(set))}\n${prior}`;
}

/** Keep the rows of steps ≤ `step` (a resumed run rewrites what followed its start). */
async function truncatePriorCsv(path: string, step: number): Promise<void> {
  if (!existsSync(path)) return;
  const [header, ...rows] = (await readFile(path, 'utf8')).split('\n').filter((l) => l.trim());
  await writeFile(path, [header, ...rows.filter((r) => Number(r.split(',')[0]) <= step)].map((l) => `${l}\n`).join(''));
}

/** `<runDir>/prior-loss.csv`: instance and class loss of each micro-batch (the loop's CSV has their weighted sum). */
async function appendPriorRow(path: string, step: number, instance: number, prior?: number): Promise<void> {
  if (!existsSync(path)) {
    await mkdir(dirname(path), { recursive: true });
    await appendFile(path, 'step,instance_loss,class_loss\n');
  }
  await appendFile(path, `${step},${instance},${prior ?? ''}\n`);
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
  if (spec.classPrompt && spec.classImages === 0 && !spec.classImagesDir) {
    ctx.emit({ type: 'log', level: 'warn', message: 'classPrompt given but classImages is 0: training without prior preservation' });
  }
  return { spec, paths, textLr };
}

/** The spec with what the schema leaves out filled in (the dataset options Dreambooth fixes, default folders). */
export function dreamboothSpec(raw: Partial<DbSpec>): DbSpec {
  return { ...(FIXED as DbSpec), ...stripUndefined(raw), template: 'none', logDir: raw.logDir ?? 'textual_inversion', checkpointDir: raw.checkpointDir ?? 'checkpoints' };
}

function stripUndefined<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}

/** The Dreambooth job: check, generate class images, prepare, train, save the checkpoint. */
export async function runDreambooth(raw: DbSpec, ctx: JobContext): Promise<JobResult> {
  const { spec, paths, textLr } = await preflight(raw, ctx);
  const backend = await initBackend();
  let run: DbRun | undefined;
  let s: DbState | undefined;
  try {
    run = await prepareDreambooth(spec, ctx);
    s = await initDreamboothState(run, spec, paths, ctx);
    s.optimizer.done = s.step;
    s.optimizer.textLr = textLr;
    s.optimizer.textSteps = spec.textEncoderSteps;
    const method = dreamboothMethod(run, spec, s, paths);
    await truncatePriorCsv(join(paths.runDir, 'prior-loss.csv'), s.step);
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
  disposeParams(run.model.text.params);
  disposeParams(run.model.unet.params);
  if (run.decoder) disposeParams(run.decoder.params);
  await run.raw.close();
  await run.model.source.close();
}
