/**
 * @file The LoRA file and what lies beside it (lora.ts trains; `train dreambooth --lora` goes
 * through the same code): kohya keys `<name>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
 * the `ss_*` metadata kohya-ss sd-scripts train_network.py writes (plus prior preservation in its
 * reg-image terms and sidetrain's class prompt), the addnet hash, the optimizer state as
 * `<file>.optim` (optim/trainable.ts layout), and reading them back to resume. The webui's
 * Lora tab decides the model family from `ss_base_model_version`/`ss_v2` alone
 * (extensions-builtin/Lora/network.py NetworkOnDisk.detect_version), so both are always written.
 */
import { existsSync, createReadStream } from 'node:fs';
import { mkdir, open } from 'node:fs/promises';
import { basename, resolve } from 'node:path';
import { createHash, randomUUID } from 'node:crypto';
import { tf } from '../../backend/tf.ts';
import type { LoraNetwork, LoraTargetKind } from '../../nets/lora.ts';
import type { Family } from '../../io/checkpoint.ts';
import { openSafetensors, writeSafetensors, type TensorToWrite } from '../../io/safetensors.ts';
import { pendingPath } from '../../io/atomic.ts';
import { parseLrSchedule } from '../../optim/lr.ts';
import { readOptimizerState, writeOptimizerState, type TrainableOptimizer, type OptimizerName } from '../../optim/trainable.ts';
import type { XlTextCache } from '../../train/sdxl-text-cache.ts';
import type { ClassSet, PriorSpec } from '../../train/prior-preservation.ts';
import type { CaptionMode } from '../../train/instance-prompts.ts';
import type { CommonSpec, PreparedRun } from '../../train/prepare.ts';
import type { Sized, WithFolders } from '../../train/run.ts';
import type { LoraJob } from '../../../schemas/types.ts';

/** The job's options (schemas/lora.json), folders set, and what `train dreambooth --lora` adds. */
export type LoraSpec = WithFolders<LoraJob, 'logDir' | 'loraDir'> & Sized & {
  /** The job type that trains it (ss_sidetrain_method; `dreambooth` for `train dreambooth --lora`). */
  method?: 'lora' | 'dreambooth';
};

/** A prepared run, with the class images when prior preservation is on. */
/** `textCache`: SDXL prompts encoded once while neither encoder trains (the encoders then released). */
export type LoraRun = PreparedRun & { classes?: ClassSet; textCache?: XlTextCache };

export interface LoraState {
  net: LoraNetwork;
  step: number;
  optimizer: TrainableOptimizer;
  startedAt: number;
}

// ---------------------------------------------------------------------------------------------
// Resume

export function targetKinds(spec: LoraSpec): LoraTargetKind[] {
  const kinds = new Set<LoraTargetKind>(spec.targets.filter((t) => t !== 'text'));
  if (spec.trainTextEncoder || spec.targets.includes('text')) kinds.add('text');
  return [...kinds];
}

/** ss_base_model_version of each family (kohya sd-scripts train_util / sdxl_train_util). */
const BASE_VERSION: Record<Family, string> = { sd1: 'sd_v1', sd2: 'sd_v2', sdxl: 'sdxl_base_v1-0' };

/**
 * Up/down weights from an existing LoRA file (resume); the step from its ss_steps. With `family`,
 * a file whose ss_base_model_version names another family (an SD1 LoRA for an SDXL run) is refused.
 */
export async function loadWeights(path: string, net: LoraNetwork, family?: Family): Promise<number> {
  const file = await openSafetensors(path);
  try {
    const base = file.metadata().ss_base_model_version;
    if (family && base && (base.startsWith('sdxl') ? 'sdxl' : base) !== (family === 'sdxl' ? 'sdxl' : BASE_VERSION[family])) {
      throw new Error(`${path}: a LoRA for ${base} (ss_base_model_version), this model is ${BASE_VERSION[family]}; pass --overwrite to start afresh`);
    }
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

// ---------------------------------------------------------------------------------------------
// Save: kohya keys + ss_* metadata + the optimizer state

/** kohya train_util.model_hash: sha256 of the 64 KiB at offset 1 MiB, first 8 hex (the webui's old hash). */
export async function legacyModelHash(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path, { start: 0x100000, end: 0x100000 + 0x10000 - 1 })) hash.update(chunk as Buffer);
  return hash.digest('hex').slice(0, 8);
}

/** ss_tag_frequency: {"<repeats>_<folder>": {tag: count}} over the captions (kohya's per-subset counts). */
function tagFrequency(run: PreparedRun, spec: LoraSpec, s: LoraState): string {
  const counts: Record<string, number> = {};
  for (const item of run.dataset.items) {
    for (const tag of (item.fixedPrompt ?? item.caption).split(',').map((t) => t.trim()).filter(Boolean)) counts[tag] = (counts[tag] ?? 0) + 1;
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
  const xl = run.model.family === 'sdxl';
  const args: Record<string, string> = {};
  if (spec.targets.includes('resnet')) Object.assign(args, { conv_dim: String(s.net.rank), conv_alpha: String(s.net.alpha) });
  if (spec.dropout > 0) args.rank_dropout = String(spec.dropout);
  const lr = parseLrSchedule(spec.lr, spec.steps).segments[0]?.rate ?? 0;
  const textLr = spec.textEncoderLr ? parseLrSchedule(spec.textEncoderLr, spec.steps).segments[0]?.rate ?? 0 : lr;
  // kohya (train_network.py, networks.lora with several text-encoder rates) writes str() of its
  // `text_encoder_lr` list, "[te1, te2]"; one value as before when OpenCLIP-G has no rate of its own
  const text2Lr = xl && spec.textEncoder2Lr ? parseLrSchedule(spec.textEncoder2Lr, spec.steps).segments[0]?.rate ?? 0 : textLr;
  const textLrs = text2Lr === textLr ? String(textLr) : `[${textLr}, ${text2Lr}]`;
  return {
    ss_session_id: randomUUID(), ss_training_started_at: String(s.startedAt), ss_training_finished_at: String(Date.now() / 1000),
    ss_output_name: spec.name, ss_sd_model_name: basename(spec.model), ss_sd_model_hash: hashes.legacy, ss_new_sd_model_hash: hashes.full,
    ss_base_model_version: xl ? 'sdxl_base_v1-0' : sd2 ? 'sd_v2' : 'sd_v1', ss_v2: sd2 ? 'True' : 'False', ss_v_parameterization: run.model.prediction === 'v' ? 'True' : 'False',
    ss_network_module: 'networks.lora', ss_network_dim: String(s.net.rank), ss_network_alpha: String(s.net.alpha),
    ss_network_dropout: 'None', ss_network_args: JSON.stringify(args),
    ss_learning_rate: String(lr), ss_unet_lr: String(lr), ss_text_encoder_lr: targetKinds(spec).includes('text') ? textLrs : 'None',
    ss_lr_scheduler: 'constant', ss_sidetrain_lr_schedule: spec.lr, ss_lr_warmup_steps: '0',
    ss_resolution: `(${spec.width}, ${spec.height})`, ss_num_train_images: String(run.dataset.items.length), 
    ss_num_batches_per_epoch: String(run.dataset.stepsPerEpoch), ss_num_epochs: String(Math.ceil(spec.steps / run.dataset.stepsPerEpoch)),
    ss_epoch: String(Math.floor(step / run.dataset.stepsPerEpoch)), ss_steps: String(step), ss_max_train_steps: String(spec.steps),
    ss_batch_size_per_device: String(spec.batchSize), ss_total_batch_size: String(spec.batchSize * spec.gradAccum),
    ss_gradient_accumulation_steps: String(spec.gradAccum), ss_seed: String(spec.seed), ss_mixed_precision: 'no', ss_full_fp16: 'False',
    ss_clip_skip: 'None', ss_max_grad_norm: spec.clipGrad === 'norm' ? spec.clipGradValue : '0.0', ss_caption_dropout_rate: '0.0',
    ...tagMetadata(run),
    ss_tag_frequency: tagFrequency(run, spec, s), ss_dataset_dirs: JSON.stringify({ [basename(spec.images)]: { n_repeats: 1, img_count: run.dataset.items.length } }),
    ss_training_comment: 'sidetrain', ss_cache_latents: 'True', ss_optimizer: SS_OPTIMIZER[spec.optimizer],
    ...priorMetadata(run, spec),
    // kohya sd-scripts sai_model_spec: what Forge/SD.Next read to place the LoRA
    ...(xl ? { 'modelspec.architecture': 'stable-diffusion-xl-v1-base/lora', 'modelspec.implementation': 'https://github.com/Stability-AI/generative-models', 'modelspec.sai_model_spec': '1.0.0', 'modelspec.title': spec.name, 'modelspec.resolution': `${spec.width}x${spec.height}`, 'modelspec.prediction_type': run.model.prediction === 'v' ? 'v' : 'epsilon' } : {}),
  };
}

/** What the dataset really did to the captions' tags: nothing when its prompts have no [filewords]. */
function tagMetadata(run: LoraRun): Record<string, string> {
  const { template, captionedTemplate, shuffleTags, tagDropOut } = run.dataset.options;
  // each image's prompt comes from the captioned template when it has a caption file (dataset.ts)
  const tags = run.dataset.items.some((it) => (it.captionSource === 'txt' && captionedTemplate ? captionedTemplate : template).usesFilewords);
  return { ss_caption_tag_dropout_rate: String(tags ? tagDropOut : 0), ss_shuffle_caption: tags && shuffleTags ? 'True' : 'False' };
}

export async function saveLora(run: LoraRun, spec: LoraSpec, s: LoraState, path: string, step: number, hashes: { legacy: string; full: string }): Promise<string[]> {
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
  metadata.sshs_model_hash = await addnetHash(pendingPath(path)); // inside a save's atomicGroup the file is still its temp
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
 * ignores: it lists only .safetensors/.pt/.ckpt), in optim/trainable.ts's layout (one group per
 * network part), with the optimizer's name and the LoRA step it belongs to in the metadata.
 */
async function saveOptimizer(path: string, s: LoraState, spec: LoraSpec, step: number): Promise<string[]> {
  await writeOptimizerState(path, await s.optimizer.exportGroups(), { optimizer: spec.optimizer, lora_step: String(step) });
  return [path];
}

/** Restore the state saved by saveOptimizer; any mismatch warns and starts it afresh. */
export async function loadOptimizer(path: string, s: LoraState, spec: LoraSpec, step: number, warn: (message: string) => void): Promise<boolean> {
  if (!existsSync(path)) return false;
  try {
    const file = await openSafetensors(path);
    const meta = file.metadata();
    await file.close();
    const kind = spec.optimizer;
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
