/**
 * @file Peak memory and time per step of a training job, before anything loads: the model's
 * shapes come from the checkpoint's header alone (io/checkpoint.ts openCheckpoint: keys and
 * shapes, no tensor read), the rest from the job's options (method, resolution, batch,
 * gradient accumulation, previews). Imports no TF.js, so the server process can call it.
 *
 * The model (calibrated on bench/steps.ts rows, see CAL below):
 * - weights: every loaded part in float32 (the loaders upcast F16/BF16 files); what each method
 *   trains, with its gradient and optimizer state, from estimate-methods.ts;
 * - preparation: text encoder + UNet + VAE encoder loaded, one image through the encoder;
 * - training: the forward's intermediates all live at the end of the UNet forward (it runs in one
 *   tf.tidy and the tape keeps what backward needs), counted per block (estimate-unet.ts) in
 *   two classes — per-pixel activations (N·C) and attention scores (heads·N·Tk); with gradient
 *   checkpointing only the blocks' outputs plus one block at a time, with sliced attention one
 *   slice of scores at a time;
 * - RSS = runtime + tensors × allocator slack (freed blocks stay in the process: native/ sets
 *   glibc to keep them, as the PyTorch yardstick does with jemalloc).
 * The auto memory toggles resolve here: checkpointing turns on when the job would not fit the
 * budget without it (memory.ts asks this before a job loads anything).
 * Time: dense FLOPs (conv, Linear; forward, input- and weight-gradient backward, recompute) and attention FLOPs over a
 * throughput measured per backend, plus a per-element cost of the elementwise/norm/layout ops.
 */
import { bf16DenseSpeedup, resolvePrecisionFor } from '../backend/precision.ts';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { basename, dirname, extname, join } from 'node:path';
import { createRequire } from 'node:module';
import { parse as parseYaml } from 'yaml';
import { nativeResolution, openCheckpoint, type Family } from '../io/checkpoint.ts';
import { blockScores, slicedAttnFlop, unetBlocks, type BlockCost, type Shapes } from './estimate-unet.ts';
import { describeMemory, unetMemoryFor, type MemorySpec, type UNetMemory } from './options.ts';
import { methodPlan, METHODS, type MethodPlan } from './estimate-methods.ts';
import { describeFit, fitLadder, type MemoryFit } from './estimate-fit.ts';
import { totalmem } from 'node:os';
import { currentBackend } from '../backend/tf.ts';
import { gpuBudgetAndNotes, gpuFacts } from './estimate-gpu.ts';

export interface JobEstimate {
  /** Peak resident memory of the job's process, bytes. */
  peakBytes: number;
  /** Seconds per optimizer step (all gradient-accumulation micro-batches). */
  secondsPerStep: number;
  breakdown: {
    runtimeBytes: number;
    weightBytes: { text: number; unet: number; vaeEncoder: number; vaeDecoder: number; trainable: number };
    /** One image through the VAE encoder while latents are cached. */
    vaeEncodeBytes: number;
    /** UNet forward intermediates: per-pixel activations and attention scores. */
    unetActivationBytes: number;
    attentionScoreBytes: number;
    textActivationBytes: number;
    /** Peak while loading and caching latents, while training, and while saving (full-weight jobs; else 0). */
    prepPeakBytes: number;
    trainPeakBytes: number;
    savePeakBytes: number;
    /** Forward+backward FLOPs of one micro-batch: dense (conv, Linear) and attention. */
    denseGflop: number;
    attentionGflop: number;
    /** Elements through elementwise, layout and norm ops in a micro-batch (1e9), optimizer included. */
    elementGiga: number;
  };
  backend: string;
  notes: string[];
  /** The memory mode the job will run with (auto toggles resolved against the budget). */
  memory: UNetMemory;
  /** Full-weight jobs (Dreambooth, fine-tune): the memory levers' ladder against the limit, and the pick. */
  fit?: MemoryFit;
}

export interface EstimateOptions {
  /** The backend to estimate for; default SIDETRAIN_BACKEND or the best one installed. */
  backend?: string;
  /** Bytes above which auto gradient checkpointing turns on (default a third of RAM). */
  memoryBudget?: number;
  /** Bytes a full-weight job must fit for the lever ladder's pick (default 85% of RAM). */
  memoryLimit?: number;
}

/** Calibration constants (bench/steps.ts, 2-core x86-64, tfjs 4.22 + sidetrain native kernels). */
const CAL = {
  runtimeBytes: 260 * 2 ** 20, // node + tfjs + addon + tokenizer, nothing loaded
  /** RSS per byte of live forward tensors (allocator slack, tape clones, backward transients). */
  activationSlack: 2.2,
  scoreSlack: 2.1,
  vaeEncodeElementsPerPixel: 13, // × first-level channels: the largest encoder block's live tensors (fused norms on cpu-native)
  /** Elementwise passes of an optimizer step per trained parameter (AdamW: moments, bias corrections, decay, update). */
  optimizerElementsPerParam: 12,
  /**
   * Effective GFLOP/s of dense ops and attention matmuls; seconds per 1e9 elements through
   * elementwise/layout/norm ops; seconds per forward+backward pass of an SD1.5-sized UNet not
   * covered by those counts (~18,000 kernel calls and their small ops per step), scaled by the
   * UNet's size and the share recomputed.
   */
  backends: {
    // bench/steps.ts rows (2-core x86-64, fused norms and the native attention core): SD1.5 TI 256 px
    // 4.4 s/step (399 GFLOP), 512 px with 7 blocks checkpointed 10.1 s (2158 GFLOP), hypernetwork
    // 512 px 13.1 s: ~310 GFLOP/s on the big ops plus ~3 s per step of small kernels.
    // callSec: the part of those small kernels that does not shrink with the model (one dispatch per
    // kernel call, as many calls for the tiny test model as for SD1.5): without it a 64 px step of
    // test/fixtures/sd-tiny came out ~30× too fast (demo.ts: ~0.1 s/step on 2 cores, 3.5 ms estimated)
    'cpu-native': { denseGflops: 320, attentionGflops: 320, elementSec: 0.5, passSec: 2.7, callSec: 0.09 },
    // (measured on cpu-native only; the others keep their size-scaled pass cost)
    wasm: { denseGflops: 12, attentionGflops: 8, elementSec: 8, passSec: 0, callSec: 0 },
    cpu: { denseGflops: 0.35, attentionGflops: 0.3, elementSec: 15, passSec: 0, callSec: 0 },
    tensorflow: { denseGflops: 150, attentionGflops: 100, elementSec: 1, passSec: 0.5, callSec: 0 },
    'tensorflow-gpu': { denseGflops: 5000, attentionGflops: 3000, elementSec: 0.05, passSec: 0.2, callSec: 0 },
  } as Record<string, { denseGflops: number; attentionGflops: number; elementSec: number; passSec: number; callSec: number }>,
};

const WASM_HEAP = 3.9 * 2 ** 30;
const SD15_UNET_BYTES = 859_520_964 * 4;
const F32 = 4;

const numel = (s: number[]) => s.reduce((a, b) => a * b, 1);
const str = (v: unknown, d: string) => (typeof v === 'string' ? v : d);
const num = (v: unknown, d: number) => (typeof v === 'number' && Number.isFinite(v) ? v : d);

/** Keys and shapes of the checkpoint (header only) and its family. */
async function readShapes(path: string): Promise<{ shapes: Shapes; family: Family; fileBytes: number }> {
  if (!path) throw new Error('estimate: the job has no model path');
  if (!existsSync(path)) throw new Error(`estimate: model '${path}' does not exist`);
  let ckpt;
  try {
    ckpt = await openCheckpoint(path);
  } catch (err) {
    throw new Error(`estimate: cannot read model '${path}': ${String((err as Error).message ?? err).split('\n')[0]}`);
  }
  try {
    const shapes: Shapes = new Map(ckpt.source.keys().map((k) => [k, ckpt.source.info(k).shape] as [string, number[]]));
    return { shapes, family: ckpt.family, fileBytes: statSync(path).size };
  } finally {
    await ckpt.source.close();
  }
}

/** UNet head split from a config beside the checkpoint (as nets/sd.ts modelOverrides), else the family default. */
function headRule(path: string, family: Family): { numHeads?: number; numHeadChannels?: number } {
  const yamlPath = join(dirname(path), `${basename(path, extname(path))}.yaml`);
  const jsonPath = join(dirname(path), 'config.json');
  let p: Record<string, unknown> | undefined;
  try {
    if (existsSync(yamlPath)) p = (parseYaml(readFileSync(yamlPath, 'utf8')) as any)?.model?.params?.unet_config?.params; // eslint-disable-line @typescript-eslint/no-explicit-any
    else if (existsSync(jsonPath)) p = (JSON.parse(readFileSync(jsonPath, 'utf8')) as any)?.unet?.params; // eslint-disable-line @typescript-eslint/no-explicit-any
  } catch {
    p = undefined; // an unreadable config fails at load time with its own message
  }
  if (typeof p?.num_head_channels === 'number' && p.num_head_channels > 0) return { numHeadChannels: p.num_head_channels };
  if (typeof p?.num_heads === 'number' && p.num_heads > 0) return { numHeads: p.num_heads };
  return family === 'sd1' ? { numHeads: 8 } : { numHeadChannels: 64 };
}

/**
 * Text encoder: width, layers, tokens, from its keys (SD1 HF CLIP or SD2 open_clip). SDXL's two
 * encoders as one of width W_L + W_G (TI trains n × both) whose layer count keeps the sum of
 * Σ layers·W² (the weights' and FLOPs' measure).
 */
function textShape(shapes: Shapes): { width: number; layers: number; tokens: number; mlp: number } {
  const xlL = shapes.get('conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight');
  const xlG = shapes.get('conditioner.embedders.1.model.token_embedding.weight');
  if (xlL && xlG) {
    const count = (re: RegExp) => new Set([...shapes.keys()].map((k) => re.exec(k)?.[1]).filter(Boolean)).size;
    const [wl, wg] = [xlL[1]!, xlG[1]!];
    const ll = count(/^conditioner\.embedders\.0\.transformer\.text_model\.encoder\.layers\.(\d+)\./);
    const lg = count(/^conditioner\.embedders\.1\.model\.transformer\.resblocks\.(\d+)\./);
    const width = wl + wg;
    return { width, layers: Math.max(1, Math.round((ll * wl * wl + lg * wg * wg) / (width * width))), tokens: 77, mlp: 4 * width };
  }
  const sd1 = shapes.get('cond_stage_model.transformer.text_model.embeddings.token_embedding.weight');
  const sd2 = shapes.get('cond_stage_model.model.token_embedding.weight');
  const width = (sd1 ?? sd2)?.[1] ?? 768;
  const layerRe = sd1 ? /^cond_stage_model\.transformer\.text_model\.encoder\.layers\.(\d+)\./ : /^cond_stage_model\.model\.transformer\.resblocks\.(\d+)\./;
  const layers = new Set([...shapes.keys()].map((k) => layerRe.exec(k)?.[1]).filter(Boolean)).size;
  const tokens = (shapes.get('cond_stage_model.transformer.text_model.embeddings.position_embedding.weight') ?? shapes.get('cond_stage_model.model.positional_embedding'))?.[0] ?? 77;
  return { width, layers, tokens, mlp: 4 * width };
}

function paramBytes(shapes: Shapes, prefixes: string[]): number {
  let n = 0;
  for (const [k, s] of shapes) if (prefixes.some((p) => k.startsWith(p)) && !k.endsWith('position_ids')) n += numel(s);
  return n * F32;
}

/**
 * The webui applies a hypernetwork module wherever the context width matches one of its sizes —
 * attn2's text context, and attn1's own input (size = channels: 320/640/1280): two modules (k, v),
 * each Linear d→2d, Linear 2d→d, `x + out·multiplier` ≈ 12 intermediates per element.
 */
function hypernetworkActivations(block: BlockCost, sizes: number[]): number {
  return block.attention.reduce((sum, op) => sum + (sizes.includes(op.ctx) ? 24 * op.tk * op.ctx : 0), 0);
}

/**
 * The backend a standalone estimate assumes (CLI `estimate`, the HTTP route: processes that never
 * start TF.js): the one in use, SIDETRAIN_BACKEND, or the one initBackend would pick. A job
 * passes the backend it runs on instead (memory/choice.ts).
 */
async function defaultBackend(): Promise<string> {
  const env = currentBackend()?.name ?? process.env.SIDETRAIN_BACKEND;
  if (env) return env;
  const require = createRequire(import.meta.url);
  const installed = (pkg: string) => {
    try {
      require.resolve(pkg);
      return true;
    } catch {
      return false;
    }
  };
  if (installed('@tensorflow/tfjs-node-gpu')) return 'tensorflow-gpu';
  if (typeof (await gpuFacts()).adapter !== 'string') return 'webgpu'; // a hardware adapter
  if (installed('@tensorflow/tfjs-node')) return 'tensorflow';
  return existsSync(new URL('../../native/build/Release/sidetrain_native.node', import.meta.url)) ? 'cpu-native' : 'wasm';
}

/** Whether `type` (a trainers/methods/index.ts name) has an estimate. */
export function hasEstimate(type: string): boolean {
  return METHODS.includes(type);
}

/** Estimate `type`'s job `spec` (the job's JSON, defaults as in its schema). */
export async function estimateJob(type: string, spec: Record<string, unknown>, opts: EstimateOptions = {}): Promise<JobEstimate> {
  if (!METHODS.includes(type)) throw new Error(`estimate: no estimate for job type '${type}' (known: ${METHODS.join(', ')})`);
  const { shapes, family } = await readShapes(str(spec.model, ''));
  const backend = opts.backend ?? (await defaultBackend());
  // webgpu: tensors live in GPU memory, whose free part (when known) is the auto budget
  const gpu = backend === 'webgpu' ? await gpuFacts() : undefined;
  const gpuSide = gpu && gpuBudgetAndNotes(gpu.adapter, gpu.memory, Math.max(...[...shapes.values()].map((s) => F32 * numel(s))));
  const budget = opts.memoryBudget ?? gpuSide?.budget ?? AUTO_BUDGET_SHARE * totalmem();
  const estimate = estimateShapes(type, spec, shapes, family, backend, budget, gpuSide);
  if ((type === 'dreambooth' && spec.lora !== true) || type === 'finetune') {
    const limit = opts.memoryLimit ?? gpuSide?.budget ?? FIT_SHARE * totalmem();
    estimate.fit = await fitLadder(spec, limit, async (s) => estimateShapes(type, s, shapes, family, backend, budget, gpuSide), backend);
    estimate.notes.push(describeFit(estimate.fit));
  }
  return estimate;
}

/** The share of the machine's memory a job may plan for (the rest: the OS, the webui's process, page cache). */
export const FIT_SHARE = 0.85;

function estimateShapes(
  type: string, spec: Record<string, unknown>, shapes: Shapes, family: Family, backend: string, budget: number,
  gpuSide: ReturnType<typeof gpuBudgetAndNotes> | undefined,
): JobEstimate {
  const job = describeJob(type, spec, shapes, family, backend);
  // float16 weights (and the checkpointing they bring) only where the method's loader keeps frozen weights in float16
  const memSpec = { ...(spec as Partial<MemorySpec>), halfFrozenWeights: spec.halfFrozenWeights === true && (job.plan.frozen.unet || job.plan.frozen.text) };
  const plain = unetMemoryFor(memSpec, true);
  let estimate = estimateWith(job, plain, backend, spec);
  if (estimate.peakBytes > budget && !plain.checkpointing && memSpec.gradientCheckpointing !== 'off') {
    estimate = fitByCheckpointing(job, plain, budget, (memory) => estimateWith(job, memory, backend, spec));
  }
  if (gpuSide) estimate.notes.push(...gpuSide.notes);
  if (gpuSide?.budget !== undefined && estimate.peakBytes > gpuSide.budget) estimate.notes.push(`needs more than the GPU's ${gb(gpuSide.budget / 0.9)} GB free: lower the resolution or batch, or turn on halfFrozenWeights`);
  else if (estimate.peakBytes > FIT_SHARE * totalmem()) estimate.notes.push(`needs more than 85% of this machine's ${gb(totalmem())} GB: lower the resolution or batch, or turn on gradientCheckpointing / halfFrozenWeights`);
  return estimate;
}

const gb = (bytes: number) => (bytes / 2 ** 30).toFixed(1);

/**
 * auto checkpointing: blocks are checkpointed in the order of memory freed per FLOP recomputed
 * (the high-resolution blocks first: their activations are large for their FLOPs) until the
 * estimate fits the budget; all of them when that is not enough.
 */
function fitByCheckpointing(job: Job, memory: UNetMemory, budget: number, estimate: (m: UNetMemory) => JobEstimate): JobEstimate {
  const freed = (b: BlockCost) => (b.dense + blockScores(b, memory.attentionSliceBytes, job.nativeAttention).kept - b.output) / Math.max(1, b.denseFlop + b.attnFlop);
  const order = job.blocks.filter((b) => b.name !== 'out').sort((a, b) => freed(b) - freed(a));
  const chosen: string[] = [];
  for (const b of order.slice(0, -1)) {
    chosen.push(b.name);
    const e = estimate({ ...memory, checkpointBlocks: [...chosen] });
    if (e.peakBytes <= budget) return e;
  }
  return estimate({ ...memory, checkpointing: true });
}
/**
 * auto gradient checkpointing turns on when a job would use more than this share of RAM without
 * it: sidetrain shares the machine with the webui (which holds its own model and the browser's
 * tab), so by default it keeps to a third and pays the recompute (about one more forward pass of
 * the checkpointed blocks) instead.
 */
const AUTO_BUDGET_SHARE = 1 / 3;

interface Job {
  type: string;
  plan: MethodPlan;
  blocks: BlockCost[];
  text: ReturnType<typeof textShape>;
  shapes: Shapes;
  modelPath: string;
  /** The backend runs attention in sidetrain's own core (native or WGSL, nets/sliced-attention.ts): no score tensors. */
  nativeAttention: boolean;
}

function describeJob(type: string, spec: Record<string, unknown>, shapes: Shapes, family: Family, backend: string): Job {
  const text = textShape(shapes);
  const plan = methodPlan(type, spec, shapes, text.width, nativeResolution(family));
  const modelPath = str(spec.model, '');
  const rule = headRule(modelPath, family);
  const heads = (ch: number) => (rule.numHeadChannels ? ch / rule.numHeadChannels : rule.numHeads!);
  const native = backend === 'cpu-native'; // the addon's fused norms and attention core
  // webgpu runs the same attention core as tiled WGSL (backend/webgpu/attention.ts): no score tensors either
  const attentionCore = native || backend === 'webgpu';
  return { type, plan, text, shapes, modelPath, nativeAttention: attentionCore, blocks: unetBlocks(shapes, (plan.width / 8) * (plan.height / 8), text.tokens, heads, native) };
}

/** UNet tape memory (elements, batch 1): per-pixel activations and attention scores, whole or checkpointed. */
function unetLive(job: Job, memory: UNetMemory, hnSizes: number[]): { activations: number; scores: number } {
  const slice = memory.attentionSliceBytes;
  const dense = (b: BlockCost) => b.dense + hypernetworkActivations(b, hnSizes);
  const scores = job.blocks.map((b) => blockScores(b, slice, job.nativeAttention));
  const transient = Math.max(0, ...scores.map((s) => s.transient));
  // a checkpointed block keeps its output (the next block's saved input, a skip); one at a time is recomputed in backward
  const ckpt = job.blocks.map((b) => isCheckpointed(memory, b.name));
  let activations = 0;
  let kept = 0;
  let recompute = { dense: 0, scores: 0 };
  // with the attention core (native or WGSL) a checkpointed block also keeps each core's output
  // and log-sum-exp for its recompute (nets/recompute.ts reuseInRecompute)
  const coreOutputs = (b: BlockCost) => (job.nativeAttention ? b.attention.reduce((s, op) => s + op.tq * (op.width + op.heads), 0) : 0);
  job.blocks.forEach((b, i) => {
    activations += ckpt[i] ? b.output + coreOutputs(b) : dense(b);
    kept += ckpt[i] ? 0 : scores[i]!.kept;
    if (ckpt[i] && dense(b) + scores[i]!.kept > recompute.dense + recompute.scores) recompute = { dense: dense(b), scores: scores[i]!.kept };
  });
  return { activations: activations + recompute.dense, scores: kept + recompute.scores + transient };
}

const isCheckpointed = (m: UNetMemory, block: string) => block !== 'out' && (m.checkpointing || (m.checkpointBlocks?.includes(block) ?? false));

function estimateWith(job: Job, memory: UNetMemory, backend: string, spec: Record<string, unknown>): JobEstimate {
  const { plan, shapes, text } = job;
  const notes: string[] = [];
  // bf16: the dense products (conv, linear) run at the bf16 kernels' rate; the native attention
  // core, norms and elementwise ops stay float32
  const bf16 = resolvePrecisionFor(spec.precision, backend) === 'bf16';
  const base = CAL.backends[backend] ?? CAL.backends['cpu-native']!;
  const cal = bf16 ? { ...base, denseGflops: base.denseGflops * bf16DenseSpeedup() } : base;
  if (bf16) notes.push(`precision bf16: dense products at ${bf16DenseSpeedup().toFixed(2)}× the fp32 rate (this CPU's measured peak ratio)`);
  const { width, height } = plan;
  const batch = plan.batchRows;
  const accum = num(spec.gradAccum, 1);
  if (spec.doNotResize) notes.push(`doNotResize: images keep their own sizes; estimated at ${width}×${height}`);
  // float16 frozen weights: half the bytes, plus the float32 copies alive at once (one block's when checkpointed, all the tape's otherwise)
  const half = spec.halfFrozenWeights === true;
  const unetF32 = paramBytes(shapes, ['model.diffusion_model.']);
  const textF32 = paramBytes(shapes, ['cond_stage_model.', 'conditioner.']);
  const largestBlock = Math.max(...job.blocks.map((b) => b.weightBytes));
  const upcastUnet = memory.checkpointing ? largestBlock : unetF32;
  // bf16-stored trained UNet: the bits, the running block's float32 copy, and the weights read
  // outside every block (time/label embeddings, out.*), float32 for the whole step
  const onTapeUnet = Math.max(0, unetF32 - job.blocks.reduce((a, b) => a + b.weightBytes, 0));
  const weightBytes = {
    text: half && plan.frozen.text ? textF32 / 2 + textF32 / Math.max(1, text.layers) : textF32,
    unet: plan.bf16Stored ? unetF32 / 2 + largestBlock + onTapeUnet : half && plan.frozen.unet ? unetF32 / 2 + upcastUnet : unetF32,
    vaeEncoder: paramBytes(shapes, ['first_stage_model.encoder.', 'first_stage_model.quant_conv.']),
    vaeDecoder: num(spec.previewEvery ?? spec.sampleEvery, job.type === 'finetune' ? 0 : 500) > 0 ? paramBytes(shapes, ['first_stage_model.decoder.', 'first_stage_model.post_quant_conv.']) : 0,
    // fused backward: the gradients of the block whose recompute just ended (at most the largest block's)
    trainable: plan.trainableParams * (plan.bytesPerTrainable + plan.ownValueBytes) + (plan.fusedUnetGradients ? Math.max(...job.blocks.map((b) => b.weightBytes)) : 0),
  };
  const vaeCh = shapes.get('first_stage_model.encoder.conv_in.weight')?.[0] ?? 128;
  const vaeEncodeBytes = CAL.vaeEncodeElementsPerPixel * width * height * vaeCh * F32;
  const hnSizes = job.type === 'hypernetwork' ? (Array.isArray(spec.sizes) ? (spec.sizes as number[]) : [768, 320, 640, 1280]) : [];
  const live = unetLive(job, memory, hnSizes);
  const unetActivationBytes = live.activations * batch * F32;
  const attentionScoreBytes = live.scores * batch * F32;
  const textActivationBytes = plan.textTrains ? (40 * text.tokens * text.width + 3 * (text.width / 64) * text.tokens ** 2) * text.layers * batch * F32 : 0;
  // a LoRA's W + ΔW per target, kept by the tape (of one block at a time when checkpointed)
  const blockShare = memory.checkpointing ? Math.max(...job.blocks.map((b) => b.weightBytes)) / Math.max(1, unetF32) : 1;
  const mergedBytes = plan.mergedWeightBytes * blockShare;

  const decoderAtPrep = plan.decoderAtPrep ? paramBytes(shapes, ['first_stage_model.decoder.', 'first_stage_model.post_quant_conv.']) : 0;
  // preparation in two stages (train/prepare.ts encodeFirst): the latents with the VAE encoder
  // alone, then the model, in float32 (a bf16 store takes the trained weights over once it is
  // loaded); class images (prior preservation) are generated and encoded with the model loaded
  const encodeStage = CAL.runtimeBytes + weightBytes.vaeEncoder + vaeEncodeBytes;
  const classStage = decoderAtPrep ? decoderAtPrep + weightBytes.vaeEncoder + vaeEncodeBytes : 0;
  const modelStage = CAL.runtimeBytes + weightBytes.text + (plan.bf16Stored ? unetF32 : weightBytes.unet) + classStage;
  const prepPeakBytes = Math.max(encodeStage, modelStage);
  // the final save (and each snapshot) of a full-weight job: weights, the state that stays, one
  // tensor in conversion (the optimizer state streams into its file, estimate-methods.ts)
  const largest = Math.max(...[...shapes.values()].map((s) => numel(s))) * F32;
  const savePeakBytes = plan.save
    ? CAL.runtimeBytes + weightBytes.text + weightBytes.unet + weightBytes.vaeDecoder + plan.trainableParams * plan.save.stateBytesPerTrainable + 2 * largest
    : 0;
  const trainPeakBytes = CAL.runtimeBytes + (plan.textReleased ? 0 : weightBytes.text) + weightBytes.unet + weightBytes.vaeDecoder + weightBytes.trainable + mergedBytes + (plan.stepTransientBytes ?? 0) +
    CAL.activationSlack * (unetActivationBytes + textActivationBytes) + CAL.scoreSlack * attentionScoreBytes;

  // forward, input gradients (+ weight gradients when the UNet trains) of every block, and the forward again of checkpointed ones
  const sum = (f: (b: BlockCost) => number, only = (_: BlockCost) => true) => job.blocks.reduce((a, b) => a + (only(b) ? f(b) : 0), 0);
  const ckpt = (b: BlockCost) => isCheckpointed(memory, b.name);
  // score tensors through softmax and its gradient (inside the attention FLOPs with the native core)
  const scoreElements = (b: BlockCost) => (job.nativeAttention ? 0 : b.attention.reduce((s, op) => s + 3 * op.heads * op.tq * op.tk, 0));
  const textFlop = 2 * text.tokens * (4 * text.width ** 2 + 2 * text.width * text.mlp) * text.layers * (plan.textTrains ? 2 : 1);
  const denseFlop = ((2 + (plan.unetWeightsTrain ? 1 : 0)) * sum((b) => b.denseFlop) + sum((b) => b.denseFlop, ckpt) + textFlop) * batch;
  // (a checkpointed block's recompute takes the attention core's forward results: no attention FLOPs again)
  const attnFlop = (3 * sum((b) => b.attnFlop) + (job.nativeAttention ? 0 : sum((b) => b.attnFlop, ckpt)) + slicedAttnFlop(job.blocks, memory.attentionSliceBytes, job.nativeAttention)) * batch;
  const elements = (2 * sum((b) => b.dense + scoreElements(b)) + sum((b) => b.dense + scoreElements(b), ckpt)) * batch;
  const optimizerElements = plan.trainableParams * CAL.optimizerElementsPerParam;
  const recomputedShare = sum((b) => b.denseFlop, ckpt) / Math.max(1, 2 * sum((b) => b.denseFlop));
  const secondsPerStep = accum * (denseFlop / (cal.denseGflops * 1e9) + attnFlop / (cal.attentionGflops * 1e9) + (elements / 1e9) * cal.elementSec +
    (cal.passSec * (unetF32 / SD15_UNET_BYTES) + cal.callSec) * (1 + recomputedShare)) +
    (optimizerElements / 1e9) * cal.elementSec;

  if (!CAL.backends[backend]) notes.push(`backend '${backend}' is not calibrated: time estimated as for cpu-native`);
  if (backend === 'wasm' && trainPeakBytes - CAL.runtimeBytes > WASM_HEAP) notes.push('does not fit the WASM backend: its heap holds at most ~3.9 GB of tensors');
  if (weightBytes.vaeDecoder > 0) notes.push('previews load the VAE decoder (counted) and sample with the UNet between steps (not counted in s/step)');
  notes.push(half && (plan.frozen.unet || plan.frozen.text) ? `frozen weights held in ${bf16 ? 'bfloat16' : 'float16'}, upcast per layer` : 'weights are held in float32 (F16/BF16 checkpoints are upcast when loaded)');
  notes.push(`${describeMemory(memory)}`);
  if (plan.textReleased) notes.push('SDXL text encoders: each prompt encoded once, then the encoders are released (counted while preparing only)');
  if (plan.bf16Stored) notes.push('trained weights stored in bfloat16 (2 bytes each), float32 only for the running block and the weights read outside every block');
  if (plan.fusedUnetGradients) notes.push('fused backward: each UNet block\'s gradients applied and freed as its recompute ends (no whole-model gradient buffer)');
  return {
    peakBytes: Math.round(Math.max(prepPeakBytes, trainPeakBytes, savePeakBytes)), secondsPerStep, backend, notes, memory,
    breakdown: {
      runtimeBytes: CAL.runtimeBytes, weightBytes, vaeEncodeBytes, unetActivationBytes, attentionScoreBytes, textActivationBytes,
      prepPeakBytes: Math.round(prepPeakBytes), trainPeakBytes: Math.round(trainPeakBytes), savePeakBytes: Math.round(savePeakBytes),
      denseGflop: +(denseFlop / 1e9).toFixed(1), attentionGflop: +(attnFlop / 1e9).toFixed(1),
      elementGiga: +((elements + optimizerElements) / 1e9).toFixed(2),
    },
  };
}
