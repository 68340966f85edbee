/**
 * @file LoRA training (kohya-ss sd-scripts train_network.py with networks/lora.py): low-rank
 * adapters on the UNet (and optionally the text encoder) train while every base weight stays
 * frozen. Output `<lora-dir>/<name>.safetensors` with kohya key names that the webui's built-in
 * Lora extension applies with `<lora:NAME:1>` (names from the checkpoint's own module paths,
 * nets/lora.ts), and the `ss_*` metadata kohya writes (train_network.py `metadata = {…}`); the
 * webui's Lora tab decides the model family from `ss_base_model_version`/`ss_v2` alone
 * (extensions-builtin/Lora/network.py NetworkOnDisk.detect_version), so both are always written.
 * AdamW (torch default weight decay 0.01, as kohya's default optimizer AdamW).
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
import { encodeText } from './nets/clip.ts';
import { openSafetensors, writeSafetensors, type TensorToWrite } from './io/safetensors.ts';
import { fileSha256 } from './io/checkpoint.ts';
import { AdamW, type AdamWParamGroup, type AdamWParamState } from './optim/adamw.ts';
import { parseLrSchedule } from './optim/lr.ts';
import type { TrainMethod } from './loop.ts';
import {
  checkRun, diffusionBatch, prepareRun, previewPromptText, releaseRun, renderPreview,
  type CommonSpec, type PreparedRun, type RunPaths, trainAndSave,
} from './run-common.ts';
import { tokenizeWithEmbeddings } from './text/tokenizer.ts';
import { denoisingLoss, type DiffusionBatch } from './diffusion-loss.ts';
import type { JobContext, JobResult } from './job.ts';

/** The job's options (schemas/lora.json). */
export interface LoraSpec extends Omit<CommonSpec, 'template'> {
  template?: string;
  instancePrompt?: string;
  rank: number;
  alpha: number;
  dropout: number;
  targets: LoraTargetKind[];
  trainTextEncoder: boolean;
  loraDir: string;
}

interface LoraState {
  net: LoraNetwork;
  step: number;
  optimizer: AdamW;
  startedAt: number;
  /** The instance prompt is every image's prompt (no caption files): it is what ss_tag_frequency counts. */
  instancePrompt?: string;
}

type LoraBatch = DiffusionBatch & { ids: number[][]; context?: Tensor };

// ---------------------------------------------------------------------------------------------
// Prompts: the instance prompt for every image when the folder has no caption files

/** The template a run uses: the spec's, else the instance prompt (no captions) or the captions. */
async function templateFor(spec: LoraSpec, runDir: string): Promise<{ template: string; instancePrompt?: string }> {
  if (spec.template) return { template: spec.template };
  const captions = (await readdir(spec.images)).some((f) => f.toLowerCase().endsWith('.txt'));
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

async function initState(run: PreparedRun, spec: LoraSpec, paths: RunPaths, instancePrompt: string | undefined, ctx: JobContext): Promise<LoraState> {
  const targets = loraTargets(shapesOf(run.model.source), targetKinds(spec));
  const net = createLora(targets, { rank: spec.rank, alpha: spec.alpha, seed: spec.seed });
  let step = 0;
  const from = spec.resume ? await resumeFrom(paths, spec.name) : undefined;
  if (from) step = await loadWeights(from, net);
  else if (spec.resume) ctx.emit({ type: 'log', level: 'warn', message: `nothing to resume for '${spec.name}': starting a new LoRA` });
  const optimizer = new AdamW(net.weights, { lr: 0, weightDecay: 0.01 });
  const s: LoraState = { net, step, optimizer, startedAt: Date.now() / 1000, instancePrompt };
  if (from) {
    const warn = (message: string) => ctx.emit({ type: 'log', level: 'warn', message });
    const restored = await loadOptimizer(`${from}.optim`, s, step, warn);
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

export async function loraMetadata(run: PreparedRun, spec: LoraSpec, s: LoraState, step: number, hashes: { legacy: string; full: string }): Promise<Record<string, string>> {
  const sd2 = run.model.family === 'sd2';
  const args: Record<string, string> = {};
  if (spec.targets.includes('resnet')) Object.assign(args, { conv_dim: String(s.net.rank), conv_alpha: String(s.net.alpha) });
  if (spec.dropout > 0) args.rank_dropout = String(spec.dropout);
  const lr = parseLrSchedule(spec.lr, spec.steps).segments[0]?.rate ?? 0;
  return {
    ss_session_id: randomUUID(), ss_training_started_at: String(s.startedAt), ss_training_finished_at: String(Date.now() / 1000),
    ss_output_name: spec.name, ss_sd_model_name: basename(spec.model), ss_sd_model_hash: hashes.legacy, ss_new_sd_model_hash: hashes.full,
    ss_base_model_version: sd2 ? 'sd_v2' : 'sd_v1', ss_v2: sd2 ? 'True' : 'False', ss_v_parameterization: run.model.prediction === 'v' ? 'True' : 'False',
    ss_network_module: 'networks.lora', ss_network_dim: String(s.net.rank), ss_network_alpha: String(s.net.alpha),
    ss_network_dropout: 'None', ss_network_args: JSON.stringify(args),
    ss_learning_rate: String(lr), ss_unet_lr: String(lr), ss_text_encoder_lr: targetKinds(spec).includes('text') ? String(lr) : 'None',
    ss_lr_scheduler: 'constant', ss_sidetrain_lr_schedule: spec.lr, ss_lr_warmup_steps: '0',
    ss_resolution: `(${spec.width}, ${spec.height})`, ss_num_train_images: String(run.dataset.items.length), ss_num_reg_images: '0',
    ss_num_batches_per_epoch: String(run.dataset.stepsPerEpoch), ss_num_epochs: String(Math.ceil(spec.steps / run.dataset.stepsPerEpoch)),
    ss_epoch: String(Math.floor(step / run.dataset.stepsPerEpoch)), ss_steps: String(step), ss_max_train_steps: String(spec.steps),
    ss_batch_size_per_device: String(spec.batchSize), ss_total_batch_size: String(spec.batchSize * spec.gradAccum),
    ss_gradient_accumulation_steps: String(spec.gradAccum), ss_seed: String(spec.seed), ss_mixed_precision: 'no', ss_full_fp16: 'False',
    ss_clip_skip: 'None', ss_max_grad_norm: spec.clipGrad === 'norm' ? spec.clipGradValue : '0.0', ss_caption_dropout_rate: '0.0',
    ss_caption_tag_dropout_rate: String(spec.tagDropOut), ss_shuffle_caption: spec.shuffleTags ? 'True' : 'False',
    ss_tag_frequency: tagFrequency(run, spec, s), ss_dataset_dirs: JSON.stringify({ [basename(spec.images)]: { n_repeats: 1, img_count: run.dataset.items.length } }),
    ss_training_comment: 'sidetrain', ss_cache_latents: 'True', ss_optimizer: 'torch.optim.AdamW(weight_decay=0.01)',
  };
}

async function saveLora(run: PreparedRun, spec: LoraSpec, s: LoraState, path: string, step: number, hashes: { legacy: string; full: string }): Promise<string[]> {
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
  const optim = await saveOptimizer(`${path}.optim`, s, step);
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
 * AdamW moments beside the LoRA as `<file>.optim` (a safetensors the webui's Lora list ignores:
 * it lists only .safetensors/.pt/.ckpt): `<key>.exp_avg`, `<key>.exp_avg_sq` per weight, the
 * param group and per-weight step counts in the metadata, and the LoRA step it belongs to.
 */
async function saveOptimizer(path: string, s: LoraState, step: number): Promise<string[]> {
  const sd = await s.optimizer.stateDict();
  if (!sd.state.size) return [];
  const names = [...s.net.weights.keys()];
  const group = sd.param_groups[0]!;
  const tensors: TensorToWrite[] = [];
  const steps: Record<string, number> = {};
  for (const [index, entry] of sd.state) {
    const name = names[group.params.indexOf(index)]!;
    steps[name] = entry.step;
    tensors.push({ name: `${name}.exp_avg`, dtype: 'F32', shape: entry.shape, data: entry.exp_avg });
    tensors.push({ name: `${name}.exp_avg_sq`, dtype: 'F32', shape: entry.shape, data: entry.exp_avg_sq });
  }
  const { params: _params, ...hyper } = group;
  await writeSafetensors(path, tensors, { optimizer: 'AdamW', lora_step: String(step), param_group: JSON.stringify(hyper), steps: JSON.stringify(steps) }, { overwrite: true });
  return [path];
}

/** Restore the moments saved by saveOptimizer; any mismatch warns and starts them afresh. */
async function loadOptimizer(path: string, s: LoraState, step: number, warn: (message: string) => void): Promise<boolean> {
  if (!existsSync(path)) return false;
  const file = await openSafetensors(path);
  try {
    const meta = file.metadata();
    if (meta.optimizer !== 'AdamW' || Number(meta.lora_step) !== step) {
      warn(`${path} belongs to step ${meta.lora_step}, the LoRA is at step ${step}: optimizer state not loaded`);
      return false;
    }
    const names = [...s.net.weights.keys()];
    const steps = JSON.parse(meta.steps ?? '{}') as Record<string, number>;
    const state = new Map<number, AdamWParamState>();
    for (const [name, count] of Object.entries(steps)) {
      const index = names.indexOf(name);
      if (index < 0) throw new Error(`no LoRA weight '${name}'`);
      const shape = file.info(`${name}.exp_avg`).shape;
      state.set(index, { step: count, shape, exp_avg: await file.read(`${name}.exp_avg`), exp_avg_sq: await file.read(`${name}.exp_avg_sq`) });
    }
    const group = { ...(JSON.parse(meta.param_group!) as Omit<AdamWParamGroup, 'params'>), params: names.map((_, i) => i) };
    s.optimizer.loadStateDict({ state, param_groups: [group] });
    return true;
  } catch (err) {
    warn(`cannot resume from the saved optimizer state (${(err as Error).message}): starting it afresh`);
    return false;
  } finally {
    await file.close();
  }
}

// ---------------------------------------------------------------------------------------------
// The run

/** The LoRA loss: p_losses with the adapters merged into the weights inside the tape. */
export function loraLoss(run: PreparedRun, net: LoraNetwork, batch: LoraBatch, opts: { dropout: number; seed: number }): tf.Scalar {
  return tf.tidy(() => {
    const { text, unet } = run.model;
    const context = batch.context ?? encodeText(withLora(text.params, net, opts), text.cfg, batch.ids); // [B, 77, W]
    const model = { ...run.model, unet: { params: withLora(unet.params, net, opts), cfg: unet.cfg, memory: unet.memory } };
    return denoisingLoss(model, batch, context);
  });
}

function loraMethod(run: PreparedRun, spec: LoraSpec, s: LoraState, paths: RunPaths, hashes: { legacy: string; full: string }): TrainMethod<LoraBatch> {
  const { text } = run.model;
  const trainText = s.net.targets.some((t) => t.name.startsWith('lora_te_'));
  const previewPrompt = tokenizeWithEmbeddings(run.tokenizer, previewPromptText(run, spec as CommonSpec), new Map(), paddingFor(run.model.family));
  let dropoutSeed = 0;
  return {
    trainable: s.net.weights,
    nextBatch: (step, micro) => {
      const { prompts, ...batch } = diffusionBatch(run, spec as CommonSpec, step, micro, new Map());
      const ids = prompts.map((p) => p.ids);
      dropoutSeed = spec.seed * 1_000_003 + step * 1009 + micro;
      // a frozen text encoder's output is an input: encoded once, outside the gradient tape
      return { ...batch, ids, context: trainText ? undefined : encodeText(text.params, text.cfg, ids) };
    },
    loss: (batch) => loraLoss(run, s.net, batch, { dropout: spec.dropout, seed: dropoutSeed }),
    disposeBatch: (b) => tf.dispose([b.latents, b.noise, ...(b.context ? [b.context] : [])]),
    save: (step, final) => saveLora(run, spec, s, final ? paths.output : join(paths.snapshots, `${spec.name}-${step}.safetensors`), step, hashes),
    preview: async (step) => {
      const unet = run.model.unet;
      const merged = { unet: mergeLora(unet.params, s.net), text: mergeLora(text.params, s.net) }; // multiplier 1, no dropout
      const params = { unet: new Map([...unet.params, ...merged.unet]), text: new Map([...text.params, ...merged.text]) };
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
async function preflight(raw: LoraSpec, ctx: JobContext): Promise<{ spec: LoraSpec; paths: RunPaths; instancePrompt?: string }> {
  const spec: LoraSpec = { ...raw, loraDir: raw.loraDir ?? 'lora', logDir: raw.logDir ?? 'textual_inversion' };
  if (spec.rank < 1 || !Number.isInteger(spec.rank)) throw new Error(`rank must be an integer ≥ 1, got ${spec.rank}`);
  const paths = await checkRun({ ...spec, template: '' } as CommonSpec, resolve(spec.loraDir), 'lora');
  paths.output = resolve(spec.loraDir, `${spec.name}.safetensors`);
  if (existsSync(paths.output) && !spec.overwrite && !spec.resume) {
    throw new Error(`${paths.output} already exists: pass --resume to continue training it or --overwrite to replace it`);
  }
  const lr = parseLrSchedule(spec.lr, spec.steps); // a bad schedule fails before anything loads
  for (const message of lr.warnings) ctx.emit({ type: 'log', level: 'warn', message });
  const { template, instancePrompt } = await templateFor(spec, paths.runDir);
  return { spec: { ...spec, template }, paths, instancePrompt };
}

/** The LoRA job: check, prepare, train, save. Cancel saves the current step. */
export async function runLora(raw: LoraSpec, ctx: JobContext): Promise<JobResult> {
  const { spec, paths, instancePrompt } = await preflight(raw, ctx);
  const backend = await initBackend();
  let run: PreparedRun | undefined;
  let s: LoraState | undefined;
  try {
    run = await prepareRun(spec as CommonSpec, ctx, 'lora');
    s = await initState(run, spec, paths, instancePrompt, ctx);
    const full = await fileSha256(spec.model);
    const hashes = { legacy: await legacyModelHash(spec.model), full };
    const method = loraMethod(run, spec, s, paths, hashes);
    const settings = { lora: { rank: spec.rank, alpha: spec.alpha, targets: s.net.targets.length } };
    const { step, outputs, cancelled } = await trainAndSave(run, spec as CommonSpec, paths, method, s, backend.name, settings, ctx);
    return { step, output: paths.output, outputs, kind: 'lora', usage: `<lora:${spec.name}:1>`, cancelled };
  } finally {
    if (s) {
      disposeLora(s.net);
      s.optimizer.dispose();
    }
    if (run) {
      releaseRun(run);
      await run.model.source.close();
    }
  }
}
