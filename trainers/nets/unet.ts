/**
 * @file The ldm `UNetModel` (CompVis/stable-diffusion and Stability-AI/stablediffusion
 * `ldm/modules/diffusionmodules/openaimodel.py` + `ldm/modules/attention.py`) with the
 * SpatialTransformer of SD1 (1×1 conv proj_in/proj_out) and SD2 (Linear proj_in/proj_out).
 * Activations are NHWC; parameters are the checkpoint's keys (params.ts layout rule).
 *
 * The config is read from the checkpoint's key names and shapes (`unetConfigFromKeys`); only the
 * head split cannot be seen in shapes and comes from the family default or an override.
 * One plan (`unetPlan`) drives both the forward pass and the expected key list
 * (`unetParamShapes`), so "every key consumed, none missing" is checkable without running it.
 *
 * @example
 *   const cfg = unetConfigFromKeys(shapes, { numHeads: 8 });
 *   const eps = unetForward(params, cfg, latents, [999], context); // [B, H, W, 4]
 */
import { tf, type Tensor } from '../backend/tf.ts';
import { loadParams, param, type Params } from './params.ts';
import type { TensorSource } from '../io/types.ts';
import type { UNetMemory } from '../memory/options.ts';
import { attention, conv2d, gelu, groupNorm, groupNormSilu, headsAttention, layerNorm, linear, silu, upsampleNearest2x } from './layers.ts';
import { checkpointed } from './recompute.ts';
import { hasNativeAttention, nativeAttention, sliceRows, slicedAttentionCore } from './sliced-attention.ts';

export interface UNetConfig {
  /** Key prefix of the UNet in the checkpoint (ldm `LatentDiffusion`: 'model.diffusion_model.'). */
  prefix: string;
  /** Latent channels in (4; 9 for inpainting models). */
  inChannels: number;
  /** Channels out (4: eps or v). */
  outChannels: number;
  /** Channels of the first level (320 in SD1/SD2). */
  modelChannels: number;
  /** Channel multiplier per level ([1, 2, 4, 4] in SD1/SD2). */
  channelMult: number[];
  /** ResBlocks per level in the encoder (decoder has one more). */
  numResBlocks: number;
  /** ldm attention_resolutions: downsampling factors 2^level whose levels have transformers ([4, 2, 1]). */
  attentionResolutions: number[];
  /** BasicTransformerBlocks per SpatialTransformer. */
  transformerDepth: number;
  /** Width of the cross-attention context (768 SD1, 1024 SD2). */
  contextDim: number;
  /** SD2 `use_linear_in_transformer`: Linear proj_in/proj_out instead of 1×1 convs. */
  useLinearInTransformer: boolean;
  /** ldm num_heads (SD1: 8), used when numHeadChannels is -1. */
  numHeads: number;
  /** ldm num_head_channels (SD2: 64); -1 = split by numHeads. */
  numHeadChannels: number;
}

export const UNET_PREFIX = 'model.diffusion_model.';

/** Head split overrides, as a model's yaml / the fixture's config.json `unet.params` give them. */
export interface HeadOverrides {
  numHeads?: number;
  numHeadChannels?: number;
}

// ---------------------------------------------------------------------------------------------
// Config from the checkpoint

type Shapes = Map<string, number[]>;

function need(shapes: Shapes, key: string): number[] {
  const s = shapes.get(key);
  if (!s) throw new Error(`UNet: checkpoint has no '${key}'`);
  return s;
}

/** Walk input_blocks: channel multiplier, res blocks and attention per level. */
function scanLevels(shapes: Shapes, pre: string, mc: number) {
  const mult: number[] = [];
  const resPerLevel: number[] = [];
  const attnLevels = new Set<number>();
  let level = 0;
  for (let n = 1; ; n++) {
    const block = `${pre}input_blocks.${n}`;
    if (shapes.has(`${block}.0.op.weight`)) {
      level++;
      continue;
    }
    const conv = shapes.get(`${block}.0.in_layers.2.weight`);
    if (!conv) break;
    mult[level] = conv[0]! / mc;
    resPerLevel[level] = (resPerLevel[level] ?? 0) + 1;
    if (shapes.has(`${block}.1.proj_in.weight`)) attnLevels.add(level);
  }
  if (mult.length === 0) throw new Error('UNet: no input_blocks ResBlocks found');
  if (new Set(resPerLevel).size !== 1) throw new Error(`UNet: uneven res blocks per level ${resPerLevel}`);
  return { mult, numResBlocks: resPerLevel[0]!, attnLevels: [...attnLevels] };
}

/** Head split: explicit overrides win (num_head_channels before num_heads, as in ldm); else family default. */
function headSplit(linear: boolean, o: HeadOverrides): Pick<UNetConfig, 'numHeads' | 'numHeadChannels'> {
  if (o.numHeadChannels !== undefined && o.numHeadChannels !== -1) return { numHeads: -1, numHeadChannels: o.numHeadChannels };
  if (o.numHeads !== undefined && o.numHeads !== -1) return { numHeads: o.numHeads, numHeadChannels: -1 };
  // v1-inference.yaml: num_heads 8; v2-inference(-v).yaml: num_head_channels 64
  return linear ? { numHeads: -1, numHeadChannels: 64 } : { numHeads: 8, numHeadChannels: -1 };
}

/** Infer the UNet config from checkpoint key → PyTorch shape (heads from `overrides` or the family default). */
export function unetConfigFromKeys(shapes: Shapes, overrides: HeadOverrides = {}, prefix = UNET_PREFIX): UNetConfig {
  const convIn = need(shapes, `${prefix}input_blocks.0.0.weight`); // [mc, in, 3, 3]
  const mc = convIn[0]!;
  const { mult, numResBlocks, attnLevels } = scanLevels(shapes, prefix, mc);
  const attn = `${prefix}middle_block.1`;
  const projIn = need(shapes, `${attn}.proj_in.weight`);
  let depth = 0;
  while (shapes.has(`${attn}.transformer_blocks.${depth}.norm1.weight`)) depth++;
  const useLinearInTransformer = projIn.length === 2;
  return {
    prefix,
    inChannels: convIn[1]!,
    outChannels: need(shapes, `${prefix}out.2.weight`)[0]!,
    modelChannels: mc,
    channelMult: mult,
    numResBlocks,
    attentionResolutions: attnLevels.map((l) => 2 ** l),
    transformerDepth: depth,
    contextDim: need(shapes, `${attn}.transformer_blocks.0.attn2.to_k.weight`)[1]!,
    useLinearInTransformer,
    ...headSplit(useLinearInTransformer, overrides),
  };
}

// ---------------------------------------------------------------------------------------------
// The plan: which layer sits at which key (openaimodel.py UNetModel.__init__)

export type UNetLayer =
  | { kind: 'conv_in'; inCh: number; outCh: number }
  | { kind: 'res'; inCh: number; outCh: number }
  | { kind: 'attn'; ch: number; heads: number; dHead: number }
  | { kind: 'down'; ch: number }
  | { kind: 'up'; ch: number };

/** Blocks by key (`input_blocks.3`, `middle_block`, …), each a list of layers `.0`, `.1`, … */
export interface UNetPlan {
  blocks: { name: string; layers: UNetLayer[] }[];
}

function attnLayer(cfg: UNetConfig, ch: number): UNetLayer {
  // openaimodel.py: num_head_channels == -1 → dim_head = ch // num_heads, else heads = ch // num_head_channels
  const heads = cfg.numHeadChannels === -1 ? cfg.numHeads : ch / cfg.numHeadChannels;
  const dHead = ch / heads;
  if (!Number.isInteger(heads) || !Number.isInteger(dHead) || heads < 1) {
    throw new Error(`UNet: ${ch} channels cannot be split into heads (num_heads ${cfg.numHeads}, num_head_channels ${cfg.numHeadChannels})`);
  }
  return { kind: 'attn', ch, heads, dHead };
}

export function unetPlan(cfg: UNetConfig): UNetPlan {
  const mc = cfg.modelChannels;
  const levels = cfg.channelMult.length;
  const hasAttn = (level: number) => cfg.attentionResolutions.includes(2 ** level);
  const input: UNetLayer[][] = [[{ kind: 'conv_in', inCh: cfg.inChannels, outCh: mc }]];
  const skips = [mc];
  let ch = mc;
  for (let level = 0; level < levels; level++) {
    for (let i = 0; i < cfg.numResBlocks; i++) {
      const out = mc * cfg.channelMult[level]!;
      input.push([{ kind: 'res', inCh: ch, outCh: out }, ...(hasAttn(level) ? [attnLayer(cfg, out)] : [])]);
      ch = out;
      skips.push(ch);
    }
    if (level !== levels - 1) {
      input.push([{ kind: 'down', ch }]);
      skips.push(ch);
    }
  }
  const middle: UNetLayer[] = [{ kind: 'res', inCh: ch, outCh: ch }, attnLayer(cfg, ch), { kind: 'res', inCh: ch, outCh: ch }];
  const output: UNetLayer[][] = [];
  for (let level = levels - 1; level >= 0; level--) {
    for (let i = 0; i <= cfg.numResBlocks; i++) {
      const out = mc * cfg.channelMult[level]!;
      const block: UNetLayer[] = [{ kind: 'res', inCh: ch + skips.pop()!, outCh: out }];
      ch = out;
      if (hasAttn(level)) block.push(attnLayer(cfg, ch));
      if (level > 0 && i === cfg.numResBlocks) block.push({ kind: 'up', ch });
      output.push(block);
    }
  }
  return {
    blocks: [
      ...input.map((layers, n) => ({ name: `input_blocks.${n}`, layers })),
      { name: 'middle_block', layers: middle },
      ...output.map((layers, n) => ({ name: `output_blocks.${n}`, layers })),
    ],
  };
}

// ---------------------------------------------------------------------------------------------
// Expected keys and PyTorch shapes (the load check, the key-consumption test, random weights for bench)

function resShapes(l: { inCh: number; outCh: number }, embDim: number): [string, number[]][] {
  const { inCh: i, outCh: o } = l;
  const s: [string, number[]][] = [
    ['in_layers.0.weight', [i]], ['in_layers.0.bias', [i]], ['in_layers.2.weight', [o, i, 3, 3]], ['in_layers.2.bias', [o]],
    ['emb_layers.1.weight', [o, embDim]], ['emb_layers.1.bias', [o]],
    ['out_layers.0.weight', [o]], ['out_layers.0.bias', [o]], ['out_layers.3.weight', [o, o, 3, 3]], ['out_layers.3.bias', [o]],
  ];
  if (i !== o) s.push(['skip_connection.weight', [o, i, 1, 1]], ['skip_connection.bias', [o]]);
  return s;
}

function attnShapes(cfg: UNetConfig, ch: number): [string, number[]][] {
  const proj = (o: number, i: number) => (cfg.useLinearInTransformer ? [o, i] : [o, i, 1, 1]);
  const s: [string, number[]][] = [['norm.weight', [ch]], ['norm.bias', [ch]], ['proj_in.weight', proj(ch, ch)], ['proj_in.bias', [ch]]];
  for (let d = 0; d < cfg.transformerDepth; d++) {
    const t = `transformer_blocks.${d}`;
    for (const [a, ctx] of [['attn1', ch], ['attn2', cfg.contextDim]] as const) {
      s.push([`${t}.${a}.to_q.weight`, [ch, ch]], [`${t}.${a}.to_k.weight`, [ch, ctx]], [`${t}.${a}.to_v.weight`, [ch, ctx]]);
      s.push([`${t}.${a}.to_out.0.weight`, [ch, ch]], [`${t}.${a}.to_out.0.bias`, [ch]]);
    }
    for (const n of ['norm1', 'norm2', 'norm3']) s.push([`${t}.${n}.weight`, [ch]], [`${t}.${n}.bias`, [ch]]);
    s.push([`${t}.ff.net.0.proj.weight`, [8 * ch, ch]], [`${t}.ff.net.0.proj.bias`, [8 * ch]]);
    s.push([`${t}.ff.net.2.weight`, [ch, 4 * ch]], [`${t}.ff.net.2.bias`, [ch]]);
  }
  s.push(['proj_out.weight', proj(ch, ch)], ['proj_out.bias', [ch]]);
  return s;
}

function layerShapes(cfg: UNetConfig, l: UNetLayer, embDim: number): [string, number[]][] {
  switch (l.kind) {
    case 'conv_in': return [['weight', [l.outCh, l.inCh, 3, 3]], ['bias', [l.outCh]]];
    case 'res': return resShapes(l, embDim);
    case 'attn': return attnShapes(cfg, l.ch);
    case 'down': return [['op.weight', [l.ch, l.ch, 3, 3]], ['op.bias', [l.ch]]];
    case 'up': return [['conv.weight', [l.ch, l.ch, 3, 3]], ['conv.bias', [l.ch]]];
  }
}

/** Every UNet key (with prefix) and its PyTorch shape, in the forward's order. */
export function unetParamShapes(cfg: UNetConfig): Map<string, number[]> {
  const mc = cfg.modelChannels;
  const embDim = 4 * mc;
  const out = new Map<string, number[]>();
  const add = (key: string, shape: number[]) => out.set(cfg.prefix + key, shape);
  add('time_embed.0.weight', [embDim, mc]);
  add('time_embed.0.bias', [embDim]);
  add('time_embed.2.weight', [embDim, embDim]);
  add('time_embed.2.bias', [embDim]);
  for (const block of unetPlan(cfg).blocks) {
    block.layers.forEach((l, i) => {
      for (const [k, s] of layerShapes(cfg, l, embDim)) add(`${block.name}.${i}.${k}`, s);
    });
  }
  add('out.0.weight', [mc]);
  add('out.0.bias', [mc]);
  add('out.2.weight', [cfg.outChannels, mc, 3, 3]);
  add('out.2.bias', [cfg.outChannels]);
  return out;
}

/** Compare a checkpoint's UNet keys/shapes with the plan; throws naming every missing, extra or misshapen key. */
export function checkUnetKeys(shapes: Shapes, cfg: UNetConfig): void {
  const expected = unetParamShapes(cfg);
  const problems: string[] = [];
  for (const [k, s] of expected) {
    const got = shapes.get(k);
    if (!got) problems.push(`missing ${k} ${JSON.stringify(s)}`);
    else if (got.join() !== s.join()) problems.push(`${k}: checkpoint ${JSON.stringify(got)}, expected ${JSON.stringify(s)}`);
  }
  for (const k of shapes.keys()) if (k.startsWith(cfg.prefix) && !expected.has(k)) problems.push(`unexpected ${k}`);
  if (problems.length) throw new Error(`UNet keys do not match the inferred config:\n  ${problems.slice(0, 20).join('\n  ')}`);
}

/** Infer the config from `source`, check every key, and load the UNet weights. */
export async function loadUnet(source: TensorSource, overrides: HeadOverrides = {}): Promise<{ params: Params; cfg: UNetConfig }> {
  const shapes = new Map(source.keys().map((k) => [k, source.info(k).shape] as [string, number[]]));
  const cfg = unetConfigFromKeys(shapes, overrides);
  checkUnetKeys(shapes, cfg);
  return { params: await loadParams(source, [cfg.prefix]), cfg };
}

// ---------------------------------------------------------------------------------------------
// Forward

export interface UNetHooks {
  /**
   * Attention context hook (webui hypernetworks, modules/hypernetworks/hypernetwork.py
   * attention_CrossAttention_forward): called in EVERY CrossAttention with its context (for attn1
   * the block input itself); returns the inputs of to_k and to_v, or undefined to leave both as is.
   */
  kv?: (context: Tensor, layer: string) => [Tensor, Tensor] | undefined;
}

export interface UNetOptions {
  hooks?: UNetHooks;
  /** Filled with kept intermediates: 't_emb' [B, mc] and 'emb' [B, 4·mc]. The caller disposes them. */
  taps?: Map<string, Tensor>;
  /** Gradient checkpointing and attention slicing (memory-options.ts); absent = whole. */
  memory?: UNetMemory;
}

/** Everything a block needs besides its input. */
export interface BlockCtx {
  p: Params;
  cfg: UNetConfig;
  emb: Tensor; // [B, 4·mc]
  context: Tensor; // [B, T, D]
  hooks: UNetHooks;
  memory?: UNetMemory;
}

/**
 * ldm `timestep_embedding` (openaimodel.py / util.py): [cos(t·f), sin(t·f)], cos FIRST, computed in
 * float32 like the original, f_i = exp(-ln(max_period)·i/half). Returns [B, dim].
 */
export function timestepEmbedding(timesteps: number[] | Tensor, dim: number, maxPeriod = 10000): Tensor {
  const half = Math.floor(dim / 2);
  const freqs = new Float32Array(half);
  const c = Math.fround(-Math.log(maxPeriod));
  for (let i = 0; i < half; i++) freqs[i] = Math.exp(Math.fround(Math.fround(c * i) / half)); // float32 steps
  return tf.tidy(() => {
    const t = Array.isArray(timesteps) ? tf.tensor1d(timesteps, 'float32') : timesteps.toFloat().reshape([-1]);
    const args = t.expandDims(1).mul(tf.tensor2d(freqs, [1, half])); // [B, half]
    const emb = tf.concat([tf.cos(args), tf.sin(args)], 1); // [B, 2·half]
    return dim % 2 ? tf.concat([emb, tf.zeros([emb.shape[0]!, 1])], 1) : emb;
  });
}

/** time_embed: Linear → SiLU → Linear on the sinusoid. [B, mc] → [B, 4·mc] */
export function timeMlp(p: Params, cfg: UNetConfig, tEmb: Tensor): Tensor {
  const pre = cfg.prefix;
  return linear(p, `${pre}time_embed.2`, silu(linear(p, `${pre}time_embed.0`, tEmb)));
}

/** openaimodel.py ResBlock: emb is added AFTER in_layers; skip is a 1×1 conv when channels change. */
function resBlock(c: BlockCtx, name: string, x: Tensor, l: { inCh: number; outCh: number }): Tensor {
  const { p } = c;
  let h = conv2d(p, `${name}.in_layers.2`, groupNormSilu(p, `${name}.in_layers.0`, x, 1e-5));
  const embOut = linear(p, `${name}.emb_layers.1`, silu(c.emb)); // [B, out]
  h = h.add(embOut.reshape([embOut.shape[0]!, 1, 1, l.outCh]));
  h = conv2d(p, `${name}.out_layers.3`, groupNormSilu(p, `${name}.out_layers.0`, h, 1e-5)); // dropout 0
  const skip = l.inCh === l.outCh ? x : conv2d(p, `${name}.skip_connection`, x);
  return skip.add(h);
}

/** attention.py CrossAttention (no q/k/v bias); the kv hook sees the context (x itself for attn1). */
function crossAttention(c: BlockCtx, name: string, x: Tensor, context: Tensor, heads: number): Tensor {
  const q = linear(c.p, `${name}.to_q`, x); // [B, N, inner]
  const [ctxK, ctxV] = c.hooks.kv?.(context, name) ?? [context, context];
  const k = linear(c.p, `${name}.to_k`, ctxK); // [B, T, inner]
  const v = linear(c.p, `${name}.to_v`, ctxV);
  return linear(c.p, `${name}.to_out.0`, attend(c, q, k, v, heads)); // scale d_head^-0.5
}

/** The native attention core where present; else whole attention, or sliced (memory-options.ts) when the layer's scores would exceed the job's slice size. */
function attend(c: BlockCtx, q: Tensor, k: Tensor, v: Tensor, heads: number): Tensor {
  // the native core (cpu-native) never holds a score tensor, sliced or not, and skips the head transposes
  if (hasNativeAttention()) return nativeAttention(q, k, v, heads);
  const maxBytes = c.memory?.attentionSliceBytes ?? 0;
  const [bh, tq, tk] = [q.shape[0]! * heads, q.shape[1]!, k.shape[1]!];
  if (!maxBytes || bh * tq * tk * 4 <= maxBytes) return attention(q, k, v, heads);
  const rows = sliceRows(bh, tq, tk, maxBytes);
  return headsAttention(q, k, v, heads, (qh, kh, vh) => slicedAttentionCore(qh, kh, vh, rows));
}

/**
 * attention.py GEGLU feed-forward: proj → [value | gate], value·gelu_erf(gate) → Linear. Whichever
 * is smaller is split in two: the output [N, 2·inner] (low resolutions, where the weight is the
 * big one: 10240×1280 in SD1.5) or the weight's rows (high resolutions); the tape keeps the
 * halves, and a trained weight's sliced gradient is padded back to full size. Same numbers.
 */
function feedForward(p: Params, name: string, x: Tensor): Tensor {
  const w = param(p, `${name}.net.0.proj.weight`); // [2·inner, C]
  const b = param(p, `${name}.net.0.proj.bias`); // [2·inner]
  const inner = w.shape[0]! / 2;
  const x2 = x.reshape([-1, x.shape[x.rank - 1]!]); // [N, C]
  let value: Tensor, gate: Tensor; // first half value, second half gate: [N, inner]
  if (x2.shape[0]! < x2.shape[1]!) {
    [value, gate] = tf.split(tf.matMul(x2, w, false, true).add(b), 2, 1) as [Tensor, Tensor];
  } else {
    const half = (i: number) => tf.matMul(x2, w.slice([i * inner, 0], [inner, -1]), false, true).add(b.slice([i * inner], [inner]));
    [value, gate] = [half(0), half(1)];
  }
  return linear(p, `${name}.net.2`, value.mul(gelu(gate)).reshape([...x.shape.slice(0, -1), inner]));
}

/** attention.py BasicTransformerBlock: self-attn, cross-attn, GEGLU, each pre-LayerNorm + residual. */
function transformerBlock(c: BlockCtx, name: string, x: Tensor, heads: number): Tensor {
  const n1 = layerNorm(c.p, `${name}.norm1`, x, 1e-5);
  let h = x.add(crossAttention(c, `${name}.attn1`, n1, n1, heads));
  h = h.add(crossAttention(c, `${name}.attn2`, layerNorm(c.p, `${name}.norm2`, h, 1e-5), c.context, heads));
  return h.add(feedForward(c.p, `${name}.ff`, layerNorm(c.p, `${name}.norm3`, h, 1e-5)));
}

/**
 * attention.py SpatialTransformer: GroupNorm (eps 1e-6) → proj_in → blocks → proj_out → + x.
 * SD1 projects with 1×1 convs before flattening, SD2 with Linears after; in NHWC both are the
 * same per-pixel matmul, so only the weight layout differs.
 */
function spatialTransformer(c: BlockCtx, name: string, x: Tensor, heads: number): Tensor {
  const [b, hh, ww, ch] = x.shape as [number, number, number, number];
  const linearProj = c.cfg.useLinearInTransformer;
  const normed = groupNorm(c.p, `${name}.norm`, x, 1e-6);
  let h = linearProj
    ? linear(c.p, `${name}.proj_in`, normed.reshape([b, hh * ww, ch]))
    : conv2d(c.p, `${name}.proj_in`, normed).reshape([b, hh * ww, ch]); // [B, H·W, C]
  for (let d = 0; d < c.cfg.transformerDepth; d++) h = transformerBlock(c, `${name}.transformer_blocks.${d}`, h, heads);
  const out = linearProj
    ? linear(c.p, `${name}.proj_out`, h).reshape([b, hh, ww, ch])
    : conv2d(c.p, `${name}.proj_out`, h.reshape([b, hh, ww, ch]));
  return out.add(x);
}

function runLayer(c: BlockCtx, name: string, l: UNetLayer, h: Tensor): Tensor {
  switch (l.kind) {
    case 'conv_in': return conv2d(c.p, name, h);
    case 'res': return resBlock(c, name, h, l);
    case 'attn': return spatialTransformer(c, name, h, l.heads);
    // UNet Downsample: 3×3, stride 2, padding 1 on ALL sides (unlike the VAE's right/bottom pad)
    case 'down': return conv2d(c.p, `${name}.op`, h, { stride: 2, pad: 1 });
    // Upsample: F.interpolate(nearest, ×2) then 3×3 conv, padding 1
    case 'up': return conv2d(c.p, `${name}.conv`, upsampleNearest2x(h));
  }
}

/**
 * One block (`input_blocks.N`, `middle_block`, `output_blocks.N`): x → x; the unit of gradient
 * checkpointing (recompute.ts).
 */
export function runBlock(c: BlockCtx, block: UNetPlan['blocks'][number], h: Tensor): Tensor {
  return block.layers.reduce((acc, l, i) => runLayer(c, `${c.cfg.prefix}${block.name}.${i}`, l, acc), h);
}

/**
 * UNetModel.forward: x [B, H, W, in] NHWC, timesteps [B], context [B, T, contextDim]
 * → model output [B, H, W, out] (eps or v, as the checkpoint was trained).
 */
export function unetForward(
  p: Params, cfg: UNetConfig, x: Tensor, timesteps: number[] | Tensor, context: Tensor, opts: UNetOptions = {},
): Tensor {
  return tf.tidy(() => {
    const tEmb = timestepEmbedding(timesteps, cfg.modelChannels); // [B, mc]
    const emb = timeMlp(p, cfg, tEmb); // [B, 4·mc]
    if (opts.taps) opts.taps.set('t_emb', tf.keep(tEmb)).set('emb', tf.keep(emb));
    const c: BlockCtx = { p, cfg, emb, context, hooks: opts.hooks ?? {}, memory: opts.memory };
    const skips: Tensor[] = [];
    let h = x;
    for (const block of unetPlan(cfg).blocks) {
      // output blocks concatenate [h, skip] on channels, in that order
      if (block.name.startsWith('output_blocks.')) h = tf.concat([h, skips.pop()!], 3);
      h = opts.memory?.checkpointing || opts.memory?.checkpointBlocks?.includes(block.name)
        ? checkpointed((hIn, embIn, contextIn) => runBlock({ ...c, emb: embIn!, context: contextIn! }, block, hIn!), [h, emb, context])
        : runBlock(c, block, h);
      if (block.name.startsWith('input_blocks.')) skips.push(h);
    }
    const pre = cfg.prefix;
    return conv2d(p, `${pre}out.2`, groupNormSilu(p, `${pre}out.0`, h, 1e-5));
  });
}

/**
 * webui modules/sd_models_config.py is_using_v_parameterization_for_sd2: run the UNet on x = 0.5,
 * context = 0.5 (2 tokens) at t = 999; a v-model's mean(out − x) is below −1.
 */
export async function detectVPrediction(p: Params, cfg: UNetConfig): Promise<boolean> {
  const score = tf.tidy(() => {
    const x = tf.fill([1, 8, 8, cfg.inChannels], 0.5);
    const context = tf.fill([1, 2, cfg.contextDim], 0.5);
    return unetForward(p, cfg, x, [999], context).sub(x).mean();
  });
  const value = (await score.data())[0]!; // never dataSync: a GPU backend cannot read synchronously in Node
  score.dispose();
  return value < -1;
}

/** Frozen full-size configs (the yaml's values), for checks and benches. */
export const SD15_UNET: Readonly<UNetConfig> = Object.freeze({
  prefix: UNET_PREFIX, inChannels: 4, outChannels: 4, modelChannels: 320, channelMult: [1, 2, 4, 4], numResBlocks: 2,
  attentionResolutions: [1, 2, 4], transformerDepth: 1, contextDim: 768, useLinearInTransformer: false,
  numHeads: 8, numHeadChannels: -1,
});
export const SD21_UNET: Readonly<UNetConfig> = Object.freeze({
  ...SD15_UNET, contextDim: 1024, useLinearInTransformer: true, numHeads: -1, numHeadChannels: 64,
});
