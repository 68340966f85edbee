/**
 * @file Peak memory and time per step of a training job, before anything loads: the model's
 * shapes come from the checkpoint's header alone (io/checkpoint.ts openCheckpoint: keys and
 * shapes, no tensor read), the rest from the job's options (method, resolution, batch,
 * gradient accumulation, previews). Imports no TF.js, so the server process can call it.
 *
 * The model (calibrated on bench/steps.ts rows, see CAL below):
 * - weights: every loaded part in float32 (the loaders upcast F16/BF16 files);
 * - preparation: text encoder + UNet + VAE encoder loaded, one image through the encoder;
 * - training: the forward's intermediates all live at the end of the UNet forward (it runs in one
 *   tf.tidy and the tape keeps what backward needs), counted per layer from the UNet's layout in
 *   two classes — per-pixel activations (N·C) and attention scores (heads·N·Tk);
 * - RSS = runtime + tensors × allocator slack (freed blocks stay in the process: native/ sets
 *   glibc to keep them, as the PyTorch yardstick does with jemalloc).
 * Time: dense FLOPs (conv, Linear; forward + input-gradient backward) and attention FLOPs over a
 * throughput measured per backend, plus a per-element cost of the elementwise/norm/layout ops.
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { basename, dirname, extname, join } from 'node:path';
import { createRequire } from 'node:module';
import { parse as parseYaml } from 'yaml';
import { openCheckpoint, type Family } from './io/checkpoint.ts';

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
    /** Peak while loading and caching latents, and while training. */
    prepPeakBytes: number;
    trainPeakBytes: number;
    /** Forward+backward FLOPs of one micro-batch: dense (conv, Linear) and attention. */
    denseGflop: number;
    attentionGflop: number;
  };
  backend: string;
  notes: string[];
}

export interface EstimateOptions {
  /** The backend to estimate for; default SIDETRAIN_BACKEND or the best one installed. */
  backend?: string;
}

/** Calibration constants (bench/steps.ts, 2-core x86-64, tfjs 4.22 + sidetrain native kernels). */
const CAL = {
  runtimeBytes: 260 * 2 ** 20, // node + tfjs + addon + tokenizer, nothing loaded
  /** RSS per byte of live forward tensors (allocator slack, tape clones, backward transients). */
  activationSlack: 2.2,
  scoreSlack: 2.1,
  vaeEncodeElementsPerPixel: 20, // × first-level channels: the largest encoder block's live tensors
  /** Effective GFLOP/s of dense ops, attention matmuls; seconds per 1e9 elementwise elements. */
  backends: {
    // bench/profile.ts, SD1.5 TI 256 px: conv+matmul 2.4 s for 369 GFLOP, attention 0.7 s for 26,
    // 13.4 s in stock-JS transpose/reduction/elementwise kernels over ~1e9 intermediate elements
    'cpu-native': { denseGflops: 150, attentionGflops: 35, elementSec: 15 },
    wasm: { denseGflops: 12, attentionGflops: 8, elementSec: 8 },
    cpu: { denseGflops: 0.35, attentionGflops: 0.3, elementSec: 15 },
    tensorflow: { denseGflops: 150, attentionGflops: 100, elementSec: 1 },
    'tensorflow-gpu': { denseGflops: 5000, attentionGflops: 3000, elementSec: 0.05 },
  } as Record<string, { denseGflops: number; attentionGflops: number; elementSec: number }>,
};

const WASM_HEAP = 3.9 * 2 ** 30;
const F32 = 4;

type Shapes = Map<string, number[]>;
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

type Layer =
  | { kind: 'conv_in'; cin: number; cout: number }
  | { kind: 'res'; cin: number; cout: number }
  | { kind: 'attn'; ch: number; depth: number; ctx: number }
  | { kind: 'down' | 'up'; ch: number };

/** The UNet's layers in forward order, read from the key names (openaimodel.py layout). */
function unetLayers(shapes: Shapes, pre = 'model.diffusion_model.'): { name: string; layers: Layer[] }[] {
  const count = (re: RegExp) => new Set([...shapes.keys()].map((k) => re.exec(k)?.[1]).filter(Boolean)).size;
  const blocks = [
    ...Array.from({ length: count(new RegExp(`^${pre}input_blocks\\.(\\d+)\\.`)) }, (_, i) => `input_blocks.${i}`),
    'middle_block',
    ...Array.from({ length: count(new RegExp(`^${pre}output_blocks\\.(\\d+)\\.`)) }, (_, i) => `output_blocks.${i}`),
  ];
  return blocks.map((name) => {
    const layers: Layer[] = [];
    for (let m = 0; ; m++) {
      const k = `${pre}${name}.${m}`;
      const s = (suffix: string) => shapes.get(`${k}.${suffix}`);
      if (s('in_layers.2.weight')) layers.push({ kind: 'res', cin: s('in_layers.2.weight')![1]!, cout: s('in_layers.2.weight')![0]! });
      else if (s('proj_in.weight')) {
        layers.push({ kind: 'attn', ch: s('proj_in.weight')![0]!, depth: count(new RegExp(`^${k}\\.transformer_blocks\\.(\\d+)\\.norm1\\.weight$`)), ctx: s('transformer_blocks.0.attn2.to_k.weight')![1]! });
      } else if (s('op.weight')) layers.push({ kind: 'down', ch: s('op.weight')![0]! });
      else if (s('conv.weight')) layers.push({ kind: 'up', ch: s('conv.weight')![0]! });
      else if (s('weight') && name === 'input_blocks.0') layers.push({ kind: 'conv_in', cin: s('weight')![1]!, cout: s('weight')![0]! });
      else break;
    }
    return { name, layers };
  });
}

interface Cost { dense: number; scores: number; denseFlop: number; attnFlop: number }

/**
 * Forward intermediates (elements) and FLOPs of one layer at N pixels. Element counts are the
 * outputs of the ops the layer runs (nets/layers.ts, nets/unet.ts): GroupNorm ≈ 5 per input
 * element, SiLU 2, conv + bias 2, a transformer block 76 per pixel·channel plus 3 score tensors.
 */
function layerCost(l: Layer, n: number, tokens: number, heads: (ch: number) => number): Cost {
  const conv = (cin: number, cout: number, k: number, nOut: number) => 2 * k * k * cin * cout * nOut;
  switch (l.kind) {
    case 'conv_in': return { dense: 2 * n * l.cout, scores: 0, denseFlop: conv(l.cin, l.cout, 3, n), attnFlop: 0 };
    case 'res': {
      const skip = l.cin !== l.cout;
      return {
        dense: n * (7 * l.cin + 13 * l.cout + (skip ? 2 * l.cout : 0)), scores: 0, attnFlop: 0,
        denseFlop: conv(l.cin, l.cout, 3, n) + conv(l.cout, l.cout, 3, n) + (skip ? conv(l.cin, l.cout, 1, n) : 0),
      };
    }
    case 'attn': {
      const c = l.ch;
      const h = heads(c);
      const perBlock = { dense: 76 * n * c, scores: 3 * h * n * (n + tokens) };
      const linearFlop = 2 * n * c * (c * 4 + 12 * c) + 2 * 2 * tokens * l.ctx * c; // q, out ×2, GEGLU 8c+4c; k/v of the context
      return {
        dense: 10 * n * c + l.depth * perBlock.dense, scores: l.depth * perBlock.scores,
        denseFlop: conv(c, c, 1, n) * 2 + l.depth * (linearFlop + 2 * n * c * 2 * c), // proj_in/out; attn1 k, v
        attnFlop: l.depth * 4 * n * c * (n + tokens),
      };
    }
    case 'down': return { dense: 2 * (n / 4) * l.ch, scores: 0, denseFlop: conv(l.ch, l.ch, 3, n / 4), attnFlop: 0 };
    case 'up': return { dense: 5.5 * 4 * n * l.ch, scores: 0, denseFlop: conv(l.ch, l.ch, 3, 4 * n), attnFlop: 0 };
  }
}

/** The whole UNet forward at a latent of h×w (batch 1), with skip concatenations. */
export function unetCost(shapes: Shapes, latentPixels: number, tokens: number, heads: (ch: number) => number): Cost {
  const total: Cost = { dense: 0, scores: 0, denseFlop: 0, attnFlop: 0 };
  let n = latentPixels;
  const skips: number[] = [];
  for (const block of unetLayers(shapes)) {
    if (block.name.startsWith('output_blocks.')) {
      const first = block.layers[0] as { cin: number };
      total.dense += n * first.cin; // concat [h, skip]
      skips.pop();
    }
    for (const l of block.layers) {
      const c = layerCost(l, n, tokens, heads);
      total.dense += c.dense; total.scores += c.scores; total.denseFlop += c.denseFlop; total.attnFlop += c.attnFlop;
      if (l.kind === 'down') n /= 4;
      if (l.kind === 'up') n *= 4;
    }
    if (block.name.startsWith('input_blocks.')) skips.push(n);
  }
  total.dense += 7 * n * (shapes.get('model.diffusion_model.out.0.weight')?.[0] ?? 0);
  return total;
}

/** Text encoder: width, layers, tokens, from its keys (SD1 HF CLIP or SD2 open_clip). */
function textShape(shapes: Shapes): { width: number; layers: number; tokens: number; mlp: number } {
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

/** The webui hypernetwork's parameters (sizes × (k, v) × Linear layers of layerStructure). */
function hypernetworkParams(spec: Record<string, unknown>): number {
  const sizes = Array.isArray(spec.sizes) ? (spec.sizes as number[]) : [768, 320, 640, 1280];
  const ls = Array.isArray(spec.layerStructure) ? (spec.layerStructure as number[]) : [1, 2, 1];
  let n = 0;
  for (const d of sizes) for (let i = 0; i + 1 < ls.length; i++) n += 2 * (ls[i]! * d * ls[i + 1]! * d + ls[i + 1]! * d);
  return n;
}

/**
 * The webui applies a hypernetwork module wherever the context width matches one of its sizes —
 * attn2's text context, and attn1's own input (size = channels: 320/640/1280): two modules (k, v),
 * each Linear d→2d, Linear 2d→d, `x + out·multiplier` ≈ 12 intermediates per element.
 */
function hypernetworkActivations(shapes: Shapes, latentPixels: number, tokens: number, sizes: number[]): number {
  if (!sizes.length) return 0;
  let n = latentPixels;
  let total = 0;
  for (const block of unetLayers(shapes)) {
    for (const l of block.layers) {
      if (l.kind === 'attn') total += l.depth * 24 * ((sizes.includes(l.ch) ? n * l.ch : 0) + (sizes.includes(l.ctx) ? tokens * l.ctx : 0));
      if (l.kind === 'down') n /= 4;
      if (l.kind === 'up') n *= 4;
    }
  }
  return total;
}

function defaultBackend(): string {
  const env = process.env.SIDETRAIN_BACKEND;
  if (env) return env;
  const require = createRequire(import.meta.url);
  for (const [pkg, name] of [['@tensorflow/tfjs-node-gpu', 'tensorflow-gpu'], ['@tensorflow/tfjs-node', 'tensorflow']] as const) {
    try {
      require.resolve(pkg);
      return name;
    } catch { /* not installed */ }
  }
  return existsSync(new URL('../native/build/Release/sidetrain_native.node', import.meta.url)) ? 'cpu-native' : 'wasm';
}

const METHODS = new Set(['textual_inversion', 'hypernetwork']);

/** Estimate `type`'s job `spec` (the job's JSON, defaults as in its schema). */
export async function estimateJob(type: string, spec: Record<string, unknown>, opts: EstimateOptions = {}): Promise<JobEstimate> {
  if (!METHODS.has(type)) throw new Error(`estimate: no estimate for job type '${type}' (known: ${[...METHODS].join(', ')})`);
  const modelPath = str(spec.model, '');
  const { shapes, family } = await readShapes(modelPath);
  const backend = opts.backend ?? defaultBackend();
  const cal = CAL.backends[backend] ?? CAL.backends['cpu-native']!;
  const notes: string[] = [];
  const width = num(spec.width, 512), height = num(spec.height, 512), batch = num(spec.batchSize, 1), accum = num(spec.gradAccum, 1);
  if (spec.doNotResize) notes.push(`doNotResize: images keep their own sizes; estimated at ${width}×${height}`);

  const rule = headRule(modelPath, family);
  const heads = (ch: number) => (rule.numHeadChannels ? ch / rule.numHeadChannels : rule.numHeads!);
  const text = textShape(shapes);
  const unet = unetCost(shapes, (width / 8) * (height / 8), text.tokens, heads);
  const trainableParams = type === 'hypernetwork' ? hypernetworkParams(spec) : num(spec.vectors, 1) * text.width;
  const weightBytes = {
    text: paramBytes(shapes, ['cond_stage_model.']),
    unet: paramBytes(shapes, ['model.diffusion_model.']),
    vaeEncoder: paramBytes(shapes, ['first_stage_model.encoder.', 'first_stage_model.quant_conv.']),
    vaeDecoder: num(spec.previewEvery, 500) > 0 ? paramBytes(shapes, ['first_stage_model.decoder.', 'first_stage_model.post_quant_conv.']) : 0,
    trainable: trainableParams * F32 * 4, // value, gradient, AdamW m and v
  };
  const vaeCh = shapes.get('first_stage_model.encoder.conv_in.weight')?.[0] ?? 128;
  const vaeEncodeBytes = CAL.vaeEncodeElementsPerPixel * width * height * vaeCh * F32;
  const hnSizes = type === 'hypernetwork' ? (Array.isArray(spec.sizes) ? (spec.sizes as number[]) : [768, 320, 640, 1280]) : [];
  const unetActivationBytes = (unet.dense + hypernetworkActivations(shapes, width * height / 64, text.tokens, hnSizes)) * batch * F32;
  const attentionScoreBytes = unet.scores * batch * F32;
  // TI backpropagates through the text encoder; a hypernetwork's text encoder runs without a tape.
  const textActivationBytes = type === 'textual_inversion' ? (40 * text.tokens * text.width + 3 * (text.width / 64) * text.tokens ** 2) * text.layers * batch * F32 : 0;

  const prepPeakBytes = CAL.runtimeBytes + weightBytes.text + weightBytes.unet + weightBytes.vaeEncoder + vaeEncodeBytes;
  const trainPeakBytes = CAL.runtimeBytes + weightBytes.text + weightBytes.unet + weightBytes.vaeDecoder + weightBytes.trainable +
    CAL.activationSlack * (unetActivationBytes + textActivationBytes) + CAL.scoreSlack * attentionScoreBytes;
  const textFlop = 2 * text.tokens * (4 * text.width ** 2 + 2 * text.width * text.mlp) * text.layers * (type === 'textual_inversion' ? 2 : 1);
  const denseFlop = (2 * unet.denseFlop + textFlop) * batch; // forward + input-gradient backward
  const attnFlop = 3 * unet.attnFlop * batch; // backward: dQ, dK, dV and dP
  const elementSec = ((unet.dense + unet.scores) * batch * 2 / 1e9) * cal.elementSec;
  const secondsPerStep = accum * (denseFlop / (cal.denseGflops * 1e9) + attnFlop / (cal.attentionGflops * 1e9) + elementSec);

  if (!CAL.backends[backend]) notes.push(`backend '${backend}' is not calibrated: time estimated as for cpu-native`);
  if (backend === 'wasm' && trainPeakBytes - CAL.runtimeBytes > WASM_HEAP) notes.push('does not fit the WASM backend: its heap holds at most ~3.9 GB of tensors');
  if (num(spec.previewEvery, 500) > 0) notes.push('previews load the VAE decoder (counted) and sample with the UNet between steps (not counted in s/step)');
  notes.push('weights are held in float32 (F16/BF16 checkpoints are upcast when loaded)');
  return {
    peakBytes: Math.round(Math.max(prepPeakBytes, trainPeakBytes)), secondsPerStep, backend, notes,
    breakdown: {
      runtimeBytes: CAL.runtimeBytes, weightBytes, vaeEncodeBytes, unetActivationBytes, attentionScoreBytes, textActivationBytes,
      prepPeakBytes: Math.round(prepPeakBytes), trainPeakBytes: Math.round(trainPeakBytes),
      denseGflop: +(denseFlop / 1e9).toFixed(1), attentionGflop: +(attnFlop / 1e9).toFixed(1),
    },
  };
}
