/**
 * @file What each training method adds to estimate.ts's model: the trained parameters and the
 * bytes each needs besides its value (gradient, optimizer state, EMA), whether UNet weights get
 * gradients (one more matmul per layer in backward), whether the text encoder runs under the
 * tape, the batch the UNet sees and the resolution. Field names and defaults are the schemas'.
 */
import type { Shapes } from './estimate-unet.ts';

export interface MethodPlan {
  /** Number of trained parameters. */
  trainableParams: number;
  /** Bytes per trained parameter besides its value: gradient + optimizer state (+ EMA copy). */
  bytesPerTrainable: number;
  /** Bytes per trained parameter for the value itself, when it is not a weight of the model (TI vectors, adapters). */
  ownValueBytes: number;
  /** The UNet's own weights train: backward also computes weight gradients. */
  unetWeightsTrain: boolean;
  /** The text encoder runs under the tape (TI vectors, a trained text encoder or its adapters). */
  textTrains: boolean;
  /** Rows the UNet sees per micro-batch (prior preservation doubles it). */
  batchRows: number;
  width: number;
  height: number;
  /** Frozen weights a LoRA forward rebuilds as W + ΔW (kept by the tape for backward). */
  mergedWeightBytes: number;
  /** The VAE decoder is loaded while preparing (Dreambooth's class images). */
  decoderAtPrep: boolean;
  /** Parts the method's loader keeps in float16 under halfFrozenWeights (train/prepare.ts prepareRun). */
  frozen: { text: boolean; unet: boolean };
  /**
   * fusedBackward: the UNet's gradients are applied and freed block by block, so only the
   * largest block's exist at once (estimate.ts adds them); `bytesPerTrainable` then leaves the
   * UNet's gradient out (the text encoder's, on the tape, still arrive together).
   */
  fusedUnetGradients: boolean;
  /**
   * bf16Weights with the fused backward (nets/bf16-store.ts): the trained weights held as 2-byte
   * bf16 bits; float32 copies only of the running block's and of those read outside every block.
   */
  bf16Stored?: boolean;
  /**
   * The text encoders are freed after preparation (SDXL LoRA without text adapters and with fixed
   * prompts: each prompt encoded once, train/sdxl-text-cache.ts): counted while preparing only.
   */
  textReleased?: boolean;
  /**
   * Full-weight jobs: the bytes per trained parameter that stay through a save (optimizer state,
   * EMA; no gradient then). The optimizer state is streamed into its file one tensor at a time
   * (optim/trainable.ts exportGroups); when it was exported whole first, SD1.5 AdamW's save
   * peaked at 15.4 GB (bench/steps.ts, 256 px), above its training step.
   */
  save?: { stateBytesPerTrainable: number };
  /** Full-weight jobs: the optimizer's temporaries while it updates the largest tensor. */
  stepTransientBytes?: number;
}

const F32 = 4;
const numel = (s: number[]) => s.reduce((a, b) => a * b, 1);
const num = (v: unknown, d: number) => (typeof v === 'number' && Number.isFinite(v) ? v : d);

/** Optimizer bytes per parameter: AdamW two float32 moments; 8-bit AdamW two bytes (+ a scale per 2048); Adafactor factored rows/columns (~nothing). */
const OPTIMIZER_BYTES: Record<string, number> = { adamw: 8, adamw8bit: 2 + 8 / 2048, adafactor: 0.1 };

function count(shapes: Shapes, test: (key: string) => boolean): number {
  return countShapes(shapes, (k) => test(k));
}

function countShapes(shapes: Shapes, test: (key: string, shape: number[]) => boolean): number {
  let n = 0;
  for (const [k, s] of shapes) if (test(k, s) && !k.endsWith('position_ids')) n += numel(s);
  return n;
}

/** Adapter patterns per LoRA target kind (nets/lora.ts loraTargets). */
const LORA_KINDS: Record<string, RegExp> = {
  attn: /^model\.diffusion_model\..*\.attn[12]\.to_(q|k|v|out\.0)\.weight$/,
  proj: /^model\.diffusion_model\..*\.proj_(in|out)\.weight$/,
  ff: /^model\.diffusion_model\..*\.ff\.net\.(0\.proj|2)\.weight$/,
  resnet: /^model\.diffusion_model\..*\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection|op|conv)\.weight$/,
  text: /^(cond_stage_model|conditioner)\..*(self_attn\.(q|k|v|out)_proj|mlp\.fc[12]|attn\.in_proj|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)(\.weight|_weight)$/,
};

/** rank·(in + out) per targeted weight (conv: in·kh·kw), and the targeted weights' own size. */
function loraSizes(shapes: Shapes, kinds: string[], rank: number): { params: number; targetParams: number } {
  let params = 0;
  let targetParams = 0;
  for (const [k, s] of shapes) {
    if (!kinds.some((kind) => LORA_KINDS[kind]?.test(k))) continue;
    params += rank * (s[0]! + numel(s.slice(1)));
    targetParams += numel(s);
  }
  return { params, targetParams };
}

/**
 * The plan of a job of `type` (a method name of trainers/methods/index.ts) with `spec`; a size the
 * spec leaves out is `side` (the family's native one, as the run fills it in).
 */
export function methodPlan(type: string, spec: Record<string, unknown>, shapes: Shapes, textWidth: number, side = 512): MethodPlan {
  const size = { width: num(spec.width, side), height: num(spec.height, side) };
  const base = { ...size, batchRows: num(spec.batchSize, 1), mergedWeightBytes: 0, decoderAtPrep: false, ownValueBytes: F32, unetWeightsTrain: false, fusedUnetGradients: false };
  const adamw = F32 + OPTIMIZER_BYTES.adamw!;
  const chosen = F32 + (OPTIMIZER_BYTES[String(spec.optimizer ?? 'adamw')] ?? OPTIMIZER_BYTES.adamw!);
  const trainTe = spec.trainTextEncoder === true;
  const xl = shapes.has('conditioner.embedders.1.model.token_embedding.weight');
  if (type === 'dreambooth' && spec.lora === true) type = 'lora'; // dreambooth --lora runs the LoRA trainer
  switch (type) {
    case 'textual_inversion':
      return { ...base, trainableParams: num(spec.vectors, 1) * textWidth, bytesPerTrainable: adamw, textTrains: true, frozen: { text: false, unet: true } };
    case 'hypernetwork':
      return { ...base, trainableParams: hypernetworkParams(spec), bytesPerTrainable: adamw, textTrains: false, frozen: { text: true, unet: true } };
    case 'lora': {
      const kinds = [...(Array.isArray(spec.targets) ? (spec.targets as string[]) : ['attn']), ...(trainTe ? ['text'] : [])];
      const { params, targetParams } = loraSizes(shapes, kinds, num(spec.rank, 16));
      return {
        ...base, trainableParams: params, bytesPerTrainable: chosen, textTrains: kinds.includes('text'),
        textReleased: xl && !kinds.includes('text') && spec.shuffleTags !== true && num(spec.tagDropOut, 0) === 0,
        mergedWeightBytes: targetParams * F32, frozen: { text: !kinds.includes('text'), unet: true }, batchRows: base.batchRows * (priorPreservation(spec) ? 2 : 1),
      };
    }
    case 'dreambooth':
    case 'finetune': {
      const unet = count(shapes, (k) => k.startsWith('model.diffusion_model.'));
      const text = trainTe ? count(shapes, trainedTextKey(spec)) : 0;
      const ema = type === 'finetune' && spec.ema === true ? F32 : 0;
      const side = type === 'finetune' ? num(spec.resolution, 512) : undefined;
      const fused = spec.fusedBackward === true;
      const optimizer = String(spec.optimizer ?? 'adamw');
      const trained = (k: string) => k.startsWith('model.diffusion_model.') || (trainTe && trainedTextKey(spec)(k));
      const state = optimizerStateBytes(shapes, trained, optimizer) / Math.max(1, unet + text); // per trained parameter
      return {
        ...base, ...(side ? { width: side, height: side } : {}),
        trainableParams: unet + text, ownValueBytes: 0, unetWeightsTrain: true, textTrains: trainTe, fusedUnetGradients: fused,
        bf16Stored: fused && spec.bf16Weights === true,
        // SDXL Dreambooth with frozen encoders: its fixed prompts encoded once, the encoders released (dreambooth-xl.ts)
        textReleased: type === 'dreambooth' && xl && !trainTe,
        // the UNet's share of the gradient bytes leaves the per-parameter cost when fused (estimate.ts adds one block's)
        bytesPerTrainable: F32 + state + ema - (fused ? (F32 * unet) / Math.max(1, unet + text) : 0),
        stepTransientBytes: largestTensor(shapes, trained) * F32 * (STEP_TEMPORARIES[optimizer] ?? 4),
        batchRows: base.batchRows * (type === 'dreambooth' && priorPreservation(spec) ? 2 : 1),
        decoderAtPrep: type === 'dreambooth' && priorPreservation(spec), frozen: { text: false, unet: false }, // their loaders keep float32
        save: { stateBytesPerTrainable: state + ema },
      };
    }
    default:
      throw new Error(`estimate: no estimate for job type '${type}' (known: ${METHODS.join(', ')})`);
  }
}

/**
 * Optimizer state of the trained tensors, bytes. Adafactor (optim/adafactor.ts) factors the last
 * two dims in torch layout: a Linear [out, in] keeps out + in values, but a conv filter
 * [out, in, kh, kw] keeps out·in·(kh + kw) — 2/3 of a 3×3 filter, not a small share (SD1.5's
 * convs are 69% of its UNet); 1-D tensors keep a full second moment.
 */
function optimizerStateBytes(shapes: Shapes, trained: (key: string) => boolean, optimizer: string): number {
  if (optimizer !== 'adafactor') return count(shapes, trained) * (OPTIMIZER_BYTES[optimizer] ?? OPTIMIZER_BYTES.adamw!);
  let n = 0;
  for (const [k, s] of shapes) {
    if (!trained(k) || k.endsWith('position_ids')) continue;
    n += s.length < 2 ? numel(s) : numel(s) / s[s.length - 1]! + numel(s) / s[s.length - 2]!;
  }
  return n * F32;
}

/** Full-size temporaries of one tensor's update (g², layout copies, the update): AdamW's native kernel updates in place. */
const STEP_TEMPORARIES: Record<string, number> = { adamw: 2, adamw8bit: 4, adafactor: 6 };

function largestTensor(shapes: Shapes, trained: (key: string) => boolean): number {
  let max = 0;
  for (const [k, s] of shapes) if (trained(k)) max = Math.max(max, numel(s));
  return max;
}

/** SD1/SD2's text encoder; on SDXL the encoders `textEncoders` names (both by default: CLIP-L embedders.0, OpenCLIP-G embedders.1). */
function trainedTextKey(spec: Record<string, unknown>): (key: string) => boolean {
  const which = String(spec.textEncoders ?? 'both');
  const xl = [...(which !== 'clip-g' ? ['conditioner.embedders.0.'] : []), ...(which !== 'clip-l' ? ['conditioner.embedders.1.'] : [])];
  return (k) => k.startsWith('cond_stage_model.') || xl.some((p) => k.startsWith(p));
}

export const METHODS = ['textual_inversion', 'hypernetwork', 'lora', 'dreambooth', 'finetune'];

/** Prior preservation is on when a class prompt and a class image count are given. */
const priorPreservation = (spec: Record<string, unknown>) => typeof spec.classPrompt === 'string' && spec.classPrompt.trim() !== '' && num(spec.classImages, 0) > 0;

/** The webui hypernetwork's parameters (sizes × (k, v) × Linear layers of layerStructure). */
function hypernetworkParams(spec: Record<string, unknown>): number {
  const sizes = Array.isArray(spec.sizes) ? (spec.sizes as number[]) : [768, 320, 640, 1280];
  const ls = Array.isArray(spec.layerStructure) ? (spec.layerStructure as number[]) : [1, 2, 1];
  let n = 0;
  for (const d of sizes) for (let i = 0; i + 1 < ls.length; i++) n += 2 * (ls[i]! * d * ls[i + 1]! * d + ls[i + 1]! * d);
  return n;
}
