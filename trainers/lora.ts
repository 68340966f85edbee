/**
 * @file LoRA training (kohya-ss sd-scripts train_network.py with networks/lora.py): low-rank
 * adapters on the UNet (and optionally the text encoder) train while every base weight stays
 * frozen. Output `<lora-dir>/<name>.safetensors` with kohya key names that the webui's built-in
 * Lora extension applies with `<lora:NAME:1>` (names from the checkpoint's own module paths,
 * nets/lora.ts), and the `ss_*` metadata kohya writes (train_network.py `metadata = {…}`); the
 * webui's Lora tab decides the model family from `ss_base_model_version`/`ss_v2` alone
 * (extensions-builtin/Lora/network.py NetworkOnDisk.detect_version), so both are always written.
 * Optimizer: AdamW (torch default weight decay 0.01, as kohya's default), 8-bit AdamW or
 * Adafactor, the text encoder's adapters as their own group (own rate, optional step limit;
 * dreambooth-optim.ts), its state beside the LoRA as `<file>.optim`. Optional prior preservation
 * (a class prompt turns it on; prior-preservation.ts): this is also `train dreambooth --lora`.
 */
import { existsSync } from 'node:fs';
import { mkdir, open, readdir, writeFile } from 'node:fs/promises';
import { basename, join, resolve } from 'node:path';
import { createHash, randomUUID } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { tf, initBackend, type Tensor } from './tf.ts';
import {
  createLora, disposeLora, loraTargets, mergeLora, withLora, type LoraNetwork, type LoraTargetKind,
} from './nets/lora.ts';
import { shapesOf, paddingFor } from './nets/sd.ts';
import { overlayParams } from './nets/half-params.ts';
import { encodeText } from './nets/clip.ts';
import { openSafetensors, writeSafetensors, type TensorToWrite } from './io/safetensors.ts';
import { fileSha256 } from './io/checkpoint.ts';
import { parseLrSchedule, type LrSchedule } from './optim/lr.ts';
import { DbOptimizer, makeGroupOptimizer, readOptimizerState, writeOptimizerState, type OptimizerName } from './dreambooth-optim.ts';
import {
  prepareClassSet, priorOn, priorPreservationLoss, PriorLossLog, PRIOR_DEFAULTS, withClassRows,
  type ClassSet, type PriorLoss, type PriorSpec,
} from './prior-preservation.ts';
import { checkReadableDir } from './io/paths.ts';
import type { TrainMethod } from './loop.ts';
import {
  checkRun, diffusionBatch, prepareRun, previewPromptText, releaseRun, renderPreview,
  type CommonSpec, type PreparedRun, type RunPaths, trainAndSave,
} from './run-common.ts';
import { tokenizeWithEmbeddings } from './text/tokenizer.ts';
import type { DiffusionBatch } from './diffusion-loss.ts';
import type { JobContext, JobResult } from './job.ts';

/** The job's options (schemas/lora.json). */
export interface LoraSpec extends Omit<CommonSpec, 'template'>, Partial<Omit<PriorSpec, keyof CommonSpec>> {
  template?: string;
  instancePrompt?: string;
  /** The instance prompt is every image's prompt even beside caption files (Dreambooth; not in the schema). */
  instancePromptAlways?: boolean;
  rank: number;
  alpha: number;
  dropout: number;
  targets: LoraTargetKind[];
  trainTextEncoder: boolean;
  /** The text encoder's adapters: own learn-rate schedule (default: the UNet's) and step limit (0 = always). */
  textEncoderLr?: string;
  textEncoderSteps?: number;
  optimizer?: OptimizerName;
  loraDir: string;
  /** The job type that trains it (ss_sidetrain_method; `dreambooth` for `train dreambooth --lora`). */
  method?: 'lora' | 'dreambooth';
}

/** A prepared run, with the class images when prior preservation is on. */
type LoraRun = PreparedRun & { classes?: ClassSet };

interface LoraState {
  net: LoraNetwork;
  step: number;
  optimizer: DbOptimizer;
  startedAt: number;
  /** The instance prompt is every image's prompt (no caption files): it is what ss_tag_frequency counts. */
  instancePrompt?: string;
}

type LoraBatch = DiffusionBatch & { ids: number[][]; classRows: number; context?: Tensor };

// ---------------------------------------------------------------------------------------------
// Prompts: the instance prompt for every image when the folder has no caption files

/** The template a run uses: the spec's, else the instance prompt (no captions) or the captions. */
async function templateFor(spec: LoraSpec, runDir: string): Promise<{ template: string; instancePrompt?: string }> {
  if (spec.template) return { template: spec.template };
  const captions = !spec.instancePromptAlways && (await readdir(spec.images)).some((f) => f.toLowerCase().endsWith('.txt'));
  const instancePrompt = spec.instancePrompt && !captions ? spec.instancePrompt : undefined;
  await mkdir(runDir, { recursive: true });
  const path = join(runDir, 'lora-template.txt');
  await writeFile(path, `${instancePrompt ?? '[filewords]'}\n`);
  return { template: path, instancePrompt };
}

// ---------------------------------------------------------------------------------------------
// State

function targetKinds(spec: LoraSpec): LoraTargetKind[] {
  const kinds = new Set<LoraTargetKind>(spec.targets.filter((t) => t !== 'text'));
  if (spec.trainTextEncoder || spec.targets.includes('text')) kinds.add('text');
  return [...kinds];
}

/** Up/down weights from an existing LoRA file (resume); the step from its ss_steps. */
async function loadWeights(path: string, net: LoraNetwork): Promise<number> {
  const file = await openSafetensors(path);
  try {
    for (const [key, v] of net.weights) {
      if (!file.has(key)) throw new Error(`${path}: no '${key}': it was trained with other targets or another model; pass --overwrite to start afresh`);
      const info = file.info(key);
      if (!tf.util.arraysEqual(info.shape, v.shape)) throw new Error(`${path}: '${key}' is [${info.shape}], this run needs [${v.shape}] (rank ${net.rank})`);
      const t = tf.tensor(await file.read(key), v.shape);
      v.assign(t);
      t.dispose();
    }
    const meta = file.metadata();
    if (meta.ss_network_alpha && Number(meta.ss_network_alpha) !== net.alpha) net.alpha = Number(meta.ss_network_alpha);
    return Number(meta.ss_steps ?? 0) || 0;
  } finally {
    await file.close();
  }
}

/** The output if it exists, else the newest `<name>-<step>.safetensors` snapshot a killed run left. */
async function resumeFrom(paths: RunPaths, name: string): Promise<string | undefined> {
  if (existsSync(paths.output)) return paths.output;
  if (!existsSync(paths.snapshots)) return undefined;
  const steps = (await readdir(paths.snapshots))
    .filter((f) => f.startsWith(`${name}-`) && f.endsWith('.safetensors'))
    .map((f) => f.slice(name.length + 1, -'.safetensors'.length))
    .filter((x) => /^\d+$/.test(x))
    .map(Number);
  return steps.length ? join(paths.snapshots, `${name}-${Math.max(...steps)}.safetensors`) : undefined;
}

/** The optimizer: the UNet adapters at the loop's rate, the text encoder's as their own group. */
function loraOptimizer(net: LoraNetwork, spec: LoraSpec, textLr: LrSchedule | undefined, done: number): DbOptimizer {
  const isText = (k: string) => k.startsWith('lora_te_');
  const unet = new Map([...net.weights].filter(([k]) => !isText(k)));
  const text = new Map([...net.weights].filter(([k]) => isText(k)));
  const kind = spec.optimizer ?? 'adamw';
  const optimizer = new DbOptimizer(makeGroupOptimizer(kind, unet), text.size ? makeGroupOptimizer(kind, text) : undefined, new Set(text.keys()), textLr, spec.textEncoderSteps ?? 0);
  optimizer.done = done;
  return optimizer;
}

async function initState(run: PreparedRun, spec: LoraSpec, paths: RunPaths, instancePrompt: string | undefined, textLr: LrSchedule | undefined, ctx: JobContext): Promise<LoraState> {
  const targets = loraTargets(shapesOf(run.model.source), targetKinds(spec));
  const net = createLora(targets, { rank: spec.rank, alpha: spec.alpha, seed: spec.seed });
  let step = 0;
  const from = spec.resume ? await resumeFrom(paths, spec.name) : undefined;
  if (from) step = await loadWeights(from, net);
  else if (spec.resume) ctx.emit({ type: 'log', level: 'warn', message: `nothing to resume for '${spec.name}': starting a new LoRA` });
  const optimizer = loraOptimizer(net, spec, textLr, step);
  const s: LoraState = { net, step, optimizer, startedAt: Date.now() / 1000, instancePrompt };
  if (from) {
    const warn = (message: string) => ctx.emit({ type: 'log', level: 'warn', message });
    const restored = await loadOptimizer(`${from}.optim`, s, spec, step, warn);
    ctx.emit({ type: 'log', level: 'info', message: `continuing ${from} from step ${step}${restored ? ' with its optimizer state' : ' (optimizer state starts afresh)'}` });
  }
  ctx.emit({ type: 'log', level: 'info', message: `LoRA: ${targets.length} modules (${targetKinds(spec).join(', ')}), rank ${spec.rank}, alpha ${spec.alpha}` });
  return s;
}

// ---------------------------------------------------------------------------------------------
// Save: kohya keys + ss_* metadata

/** kohya train_util.model_hash: sha256 of the 64 KiB at offset 1 MiB, first 8 hex (the webui's old hash). */
async function legacyModelHash(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path, { start: 0x100000, end: 0x100000 + 0x10000 - 1 })) hash.update(chunk as Buffer);
  return hash.digest('hex').slice(0, 8);
}

/** ss_tag_frequency: {"<repeats>_<folder>": {tag: count}} over the captions (kohya's per-subset counts). */
function tagFrequency(run: PreparedRun, spec: LoraSpec, s: LoraState): string {
  const counts: Record<string, number> = {};
  for (const item of run.dataset.items) {
    for (const tag of (s.instancePrompt ?? item.caption).split(',').map((t) => t.trim()).filter(Boolean)) counts[tag] = (counts[tag] ?? 0) + 1;
  }
  return JSON.stringify({ [`1_${basename(spec.images)}`]: counts });
}

/** ss_optimizer as kohya writes it (the optimizer's class path and its arguments). */
const SS_OPTIMIZER: Record<OptimizerName, string> = {
  adamw: 'torch.optim.AdamW(weight_decay=0.01)',
  adamw8bit: 'bitsandbytes.optim.AdamW8bit(weight_decay=0.01)',
  adafactor: 'transformers.optimization.Adafactor(relative_step=False,scale_parameter=False)',
};

/** Prior preservation in kohya's terms (reg images, prior_loss_weight) plus the class prompt. */
function priorMetadata(run: LoraRun, spec: LoraSpec): Record<string, string> {
  const meta: Record<string, string> = { ss_sidetrain_method: spec.method ?? 'lora', ss_num_reg_images: String(run.classes?.dataset.items.length ?? 0) };
  if (!run.classes) return meta;
  return {
    ...meta, ss_prior_loss_weight: String(spec.priorWeight), ss_sidetrain_class_prompt: spec.classPrompt!,
    ss_sidetrain_class_images: String(run.classes.dataset.items.length), ss_sidetrain_instance_prompt: spec.instancePrompt ?? '',
    ss_reg_dataset_dirs: JSON.stringify({ [basename(run.classes.dir)]: { n_repeats: 1, img_count: run.classes.dataset.items.length } }),
  };
}

export async function loraMetadata(run: LoraRun, spec: LoraSpec, s: LoraState, step: number, hashes: { legacy: string; full: string }): Promise<Record<string, string>> {
  const sd2 = run.model.family === 'sd2';
  const args: Record<string, string> = {};
  if (spec.targets.includes('resnet')) Object.assign(args, { conv_dim: String(s.net.rank), conv_alpha: String(s.net.alpha) });
  if (spec.dropout > 0) args.rank_dropout = String(spec.dropout);
  const lr = parseLrSchedule(spec.lr, spec.steps).segments[0]?.rate ?? 0;
  const textLr = spec.textEncoderLr ? parseLrSchedule(spec.textEncoderLr, spec.steps).segments[0]?.rate ?? 0 : lr;
  return {
    ss_session_id: randomUUID(), ss_training_started_at: String(s.startedAt), ss_training_finished_at: String(Date.now() / 1000),
    ss_output_name: spec.name, ss_sd_model_name: basename(spec.model), ss_sd_model_hash: hashes.legacy, ss_new_sd_model_hash: hashes.full,
    ss_base_model_version: sd2 ? 'sd_v2' : 'sd_v1', ss_v2: sd2 ? 'True' : 'False', ss_v_parameterization: run.model.prediction === 'v' ? 'True' : 'False',
    ss_network_module: 'networks.lora', ss_network_dim: String(s.net.rank), ss_network_alpha: String(s.net.alpha),
    ss_network_dropout: 'None', ss_network_args: JSON.stringify(args),
    ss_learning_rate: String(lr), ss_unet_lr: String(lr), ss_text_encoder_lr: targetKinds(spec).includes('text') ? String(textLr) : 'None',
    ss_lr_scheduler: 'constant', ss_sidetrain_lr_schedule: spec.lr, ss_lr_warmup_steps: '0',
    ss_resolution: `(${spec.width}, ${spec.height})`, ss_num_train_images: String(run.dataset.items.length), 
    ss_num_batches_per_epoch: String(run.dataset.stepsPerEpoch), ss_num_epochs: String(Math.ceil(spec.steps / run.dataset.stepsPerEpoch)),
    ss_epoch: String(Math.floor(step / run.dataset.stepsPerEpoch)), ss_steps: String(step), ss_max_train_steps: String(spec.steps),
    ss_batch_size_per_device: String(spec.batchSize), ss_total_batch_size: String(spec.batchSize * spec.gradAccum),
    ss_gradient_accumulation_steps: String(spec.gradAccum), ss_seed: String(spec.seed), ss_mixed_precision: 'no', ss_full_fp16: 'False',
    ss_clip_skip: 'None', ss_max_grad_norm: spec.clipGrad === 'norm' ? spec.clipGradValue : '0.0', ss_caption_dropout_rate: '0.0',
    ss_caption_tag_dropout_rate: String(spec.tagDropOut), ss_shuffle_caption: spec.shuffleTags ? 'True' : 'False',
    ss_tag_frequency: tagFrequency(run, spec, s), ss_dataset_dirs: JSON.stringify({ [basename(spec.images)]: { n_repeats: 1, img_count: run.dataset.items.length } }),
    ss_training_comment: 'sidetrain', ss_cache_latents: 'True', ss_optimizer: SS_OPTIMIZER[spec.optimizer ?? 'adamw'],
    ...priorMetadata(run, spec),
  };
}

async function saveLora(run: LoraRun, spec: LoraSpec, s: LoraState, path: string, step: number, hashes: { legacy: string; full: string }): Promise<string[]> {
  const tensors: TensorToWrite[] = [];
  for (const t of s.net.targets) {
    for (const part of ['lora_down', 'lora_up'] as const) {
      const v = s.net.weights.get(`${t.name}.${part}.weight`)!;
      tensors.push({ name: `${t.name}.${part}.weight`, dtype: 'F32', shape: [...v.shape], data: async () => (await v.data()) as Float32Array });
    }
    tensors.push({ name: `${t.name}.alpha`, dtype: 'F32', shape: [], data: new Float32Array([s.net.alpha]) });
  }
  await mkdir(resolve(path, '..'), { recursive: true });
  // .optim first: a kill between the two leaves weights beside an older .optim, which the step check refuses
  const optim = await saveOptimizer(`${path}.optim`, s, spec, step);
  const metadata = await loraMetadata(run, spec, s, step, hashes);
  await writeSafetensors(path, tensors, metadata, { overwrite: true, order: 'widest-first' });
  // sshs_model_hash (kohya precalculate_safetensors_hashes, the webui's addnet hash): sha256 of the
  // data after the header, which the metadata does not change; so: write, hash, write again
  metadata.sshs_model_hash = await addnetHash(path);
  await writeSafetensors(path, tensors, metadata, { overwrite: true, order: 'widest-first' });
  return [path, ...optim];
}

/** webui hashes.addnet_hash_safetensors: sha256 of everything after the 8-byte length and the JSON header. */
export async function addnetHash(path: string): Promise<string> {
  const handle = await open(path, 'r');
  const lengthBytes = Buffer.alloc(8);
  await handle.read(lengthBytes, 0, 8, 0);
  await handle.close();
  const hash = createHash('sha256');
  const start = 8 + Number(lengthBytes.readBigUInt64LE(0));
  for await (const chunk of createReadStream(path, { start })) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/**
 * The optimizer state beside the LoRA as `<file>.optim` (a safetensors the webui's Lora list
 * ignores: it lists only .safetensors/.pt/.ckpt), in dreambooth-optim.ts's layout (one group per
 * network part), with the optimizer's name and the LoRA step it belongs to in the metadata.
 */
async function saveOptimizer(path: string, s: LoraState, spec: LoraSpec, step: number): Promise<string[]> {
  await writeOptimizerState(path, await s.optimizer.exportGroups(), { optimizer: spec.optimizer ?? 'adamw', lora_step: String(step) });
  return [path];
}

/** Restore the state saved by saveOptimizer; any mismatch warns and starts it afresh. */
async function loadOptimizer(path: string, s: LoraState, spec: LoraSpec, step: number, warn: (message: string) => void): Promise<boolean> {
  if (!existsSync(path)) return false;
  try {
    const file = await openSafetensors(path);
    const meta = file.metadata();
    await file.close();
    const kind = spec.optimizer ?? 'adamw';
    if (meta.optimizer !== kind || Number(meta.lora_step) !== step) {
      warn(`${path} is ${meta.optimizer ?? 'an older format'} state of step ${meta.lora_step}, the run uses ${kind} at step ${step}: optimizer state not loaded`);
      return false;
    }
    s.optimizer.importGroups(await readOptimizerState(path));
    return true;
  } catch (err) {
    warn(`cannot resume from the saved optimizer state (${(err as Error).message}): starting it afresh`);
    return false;
  }
}

// ---------------------------------------------------------------------------------------------
// The run

/** The LoRA loss (prior-preservation.ts; plain p_losses without class rows), the adapters read lazily inside the tape. */
export function loraLoss(run: PreparedRun, net: LoraNetwork, batch: LoraBatch, opts: { dropout: number; seed: number; priorWeight: number }): PriorLoss {
  return tf.tidy(() => {
    const { text, unet } = run.model;
    const context = batch.context ?? encodeText(withLora(text.params, net, opts), text.cfg, batch.ids); // [B, 77, W]
    const model = { ...run.model, unet: { params: withLora(unet.params, net, opts), cfg: unet.cfg, memory: unet.memory } };
    return priorPreservationLoss(model, batch, context, opts.priorWeight);
  });
}

/** The micro-batch: instance rows (+ class rows); the context precomputed while the text encoder's adapters do not train. */
function nextLoraBatch(run: LoraRun, spec: LoraSpec, net: LoraNetwork, step: number, micro: number, textTrains: boolean): LoraBatch {
  const { prompts, ...inst } = diffusionBatch(run, spec as CommonSpec, step, micro, new Map());
  const at = { step, micro, gradAccum: run.dataset.gradAccum };
  const model = { tokenizer: run.tokenizer, family: run.model.family, timesteps: run.model.schedule.timesteps };
  const batch: LoraBatch = withClassRows({ ...inst, ids: prompts.map((p) => p.ids) }, run.classes, spec, at, model);
  const { text } = run.model;
  // a frozen text encoder's output is an input: encoded once, outside the gradient tape
  if (!textTrains) batch.context = tf.tidy(() => encodeText(withLora(text.params, net), text.cfg, batch.ids));
  return batch;
}

function loraMethod(run: LoraRun, spec: LoraSpec, s: LoraState, paths: RunPaths, hashes: { legacy: string; full: string }): TrainMethod<LoraBatch> {
  const { text } = run.model;
  const textKeys = [...s.net.weights.keys()].filter((k) => k.startsWith('lora_te_'));
  const trainable = new Map(s.net.weights);
  const previewPrompt = tokenizeWithEmbeddings(run.tokenizer, previewPromptText(run, spec as CommonSpec), new Map(), paddingFor(run.model.family));
  const log = new PriorLossLog(join(paths.runDir, 'prior-loss.csv'));
  let dropoutSeed = 0;
  let current = 0;
  return {
    trainable,
    nextBatch: async (step, micro) => {
      await log.flush();
      current = step;
      const textTrains = textKeys.length > 0 && s.optimizer.textActive(step - 1);
      // past the text encoder's step limit its adapters stop being trained (and differentiated)
      if (!textTrains) for (const k of textKeys) trainable.delete(k);
      dropoutSeed = spec.seed * 1_000_003 + step * 1009 + micro;
      return nextLoraBatch(run, spec, s.net, step, micro, textTrains);
    },
    loss: (batch) => {
      const parts = loraLoss(run, s.net, batch, { dropout: spec.dropout, seed: dropoutSeed, priorWeight: spec.priorWeight ?? 1 });
      if (run.classes) log.record(current, parts);
      else tf.dispose(parts.instance);
      return parts.loss;
    },
    disposeBatch: (b) => tf.dispose([b.latents, b.noise, ...(b.context ? [b.context] : [])]),
    save: async (step, final) => {
      await log.flush();
      return saveLora(run, spec, s, final ? paths.output : join(paths.snapshots, `${spec.name}-${step}.safetensors`), step, hashes);
    },
    preview: async (step) => {
      const unet = run.model.unet;
      const merged = { unet: mergeLora(unet.params, s.net), text: mergeLora(text.params, s.net) }; // multiplier 1, no dropout
      // views, not copies: iterating a float16 base (halfFrozenWeights) would materialise every weight
      const params = { unet: overlayParams(unet.params, merged.unet), text: overlayParams(text.params, merged.text) };
      const adapted = { ...run, model: { ...run.model, unet: { ...unet, params: params.unet }, text: { ...text, params: params.text } } };
      try {
        return await renderPreview(adapted, spec as CommonSpec, join(paths.images, `${spec.name}-${step}.png`), previewPrompt, {});
      } finally {
        tf.dispose([...merged.unet.values(), ...merged.text.values()]);
      }
    },
  };
}

/** Everything checked before a model loads or a file is written. */
async function preflight(raw: LoraSpec, ctx: JobContext): Promise<{ spec: LoraSpec; paths: RunPaths; instancePrompt?: string; textLr?: LrSchedule }> {
  const defined = Object.fromEntries(Object.entries(raw).filter(([, v]) => v !== undefined)) as LoraSpec;
  const spec: LoraSpec = { ...PRIOR_DEFAULTS, ...defined, loraDir: raw.loraDir ?? 'lora', logDir: raw.logDir ?? 'textual_inversion' };
  if (spec.rank < 1 || !Number.isInteger(spec.rank)) throw new Error(`rank must be an integer ≥ 1, got ${spec.rank}`);
  const paths = await checkRun({ ...spec, template: '' } as CommonSpec, resolve(spec.loraDir), 'lora');
  paths.output = resolve(spec.loraDir, `${spec.name}.safetensors`);
  if (existsSync(paths.output) && !spec.overwrite && !spec.resume) {
    throw new Error(`${paths.output} already exists: pass --resume to continue training it or --overwrite to replace it`);
  }
  const lr = parseLrSchedule(spec.lr, spec.steps); // a bad schedule fails before anything loads
  for (const message of lr.warnings) ctx.emit({ type: 'log', level: 'warn', message });
  const textLr = spec.textEncoderLr && targetKinds(spec).includes('text') ? parseLrSchedule(spec.textEncoderLr, spec.steps, 0, 'text encoder learn rate') : undefined;
  if (spec.classImagesDir) await checkReadableDir(spec.classImagesDir, '/classImagesDir');
  if (spec.classPrompt && !priorOn(spec as PriorSpec)) ctx.emit({ type: 'log', level: 'warn', message: 'classPrompt given but classImages is 0: training without prior preservation' });
  const { template, instancePrompt } = await templateFor(spec, paths.runDir);
  return { spec: { ...spec, template }, paths, instancePrompt, textLr };
}

/** The LoRA job: check, prepare, train, save. Cancel saves the current step. */
export async function runLora(raw: LoraSpec, ctx: JobContext): Promise<JobResult> {
  const { spec, paths, instancePrompt, textLr } = await preflight(raw, ctx);
  const backend = await initBackend();
  let run: LoraRun | undefined;
  let s: LoraState | undefined;
  try {
    run = await prepareRun(spec as CommonSpec, ctx, 'lora');
    run.classes = await prepareClassSet(spec as PriorSpec, run.model, run.tokenizer, run.modelHash, run.dataset.batchSize, ctx);
    s = await initState(run, spec, paths, instancePrompt, textLr, ctx);
    await new PriorLossLog(join(paths.runDir, 'prior-loss.csv')).truncate(s.step);
    const full = await fileSha256(spec.model);
    const hashes = { legacy: await legacyModelHash(spec.model), full };
    const method = loraMethod(run, spec, s, paths, hashes);
    const prior = run.classes && { classImagesDir: run.classes.dir, classImagesUsed: run.classes.dataset.items.length };
    const settings = { lora: { rank: spec.rank, alpha: spec.alpha, targets: s.net.targets.length }, optimizer: spec.optimizer ?? 'adamw', ...prior };
    const { step, outputs, cancelled } = await trainAndSave(run, spec as CommonSpec, paths, method, s, backend.name, settings, ctx);
    return { step, output: paths.output, outputs, kind: 'lora', usage: `<lora:${spec.name}:1>`, cancelled };
  } finally {
    if (s) {
      disposeLora(s.net);
      s.optimizer.dispose();
    }
    if (run) {
      run.classes?.latents.dispose();
      releaseRun(run);
      await run.model.source.close();
    }
  }
}

