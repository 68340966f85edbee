/**
 * @file The ldm `UNetModel` (CompVis/stable-diffusion and Stability-AI/stablediffusion
 * `ldm/modules/diffusionmodules/openaimodel.py` + `ldm/modules/attention.py`) with the
 * SpatialTransformer of SD1 (1×1 conv proj_in/proj_out) and SD2 (Linear proj_in/proj_out), and
 * sgm's (SDXL) with per-level depth and `label_emb(y)` added to the time embedding.
 * Activations are NHWC; parameters are the checkpoint's keys (params.ts layout rule).
 *
 * The config and the plan of blocks come from the checkpoint's keys (unet-config.ts).
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
import { checkUnetKeys, unetConfigFromKeys, unetPlan, type HeadOverrides, type UNetConfig, type UNetLayer, type UNetPlan } from './unet-config.ts';

export * from './unet-config.ts';

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
  /** Filled with kept intermediates: 't_emb' [B, mc], 'time_emb' and 'emb' [B, 4·mc] (+ 'label_emb' with y). The caller disposes them. */
  taps?: Map<string, Tensor>;
  /** sgm `vector` conditioning [B, admInChannels] (SDXL: pooled text + size embeddings); required when the UNet has label_emb. */
  y?: Tensor;
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

/** sgm label_emb (num_classes "sequential"): Linear → SiLU → Linear on y. [B, adm] → [B, 4·mc]; undefined without label_emb. */
function labelMlp(p: Params, cfg: UNetConfig, y: Tensor | undefined): Tensor | undefined {
  if (cfg.admInChannels === 0) return undefined;
  if (!y || y.rank !== 2 || y.shape[1] !== cfg.admInChannels) {
    throw new Error(`UNet: this model needs the vector conditioning y [B, ${cfg.admInChannels}], got ${y ? `[${y.shape}]` : 'none'}`);
  }
  const pre = cfg.prefix;
  return linear(p, `${pre}label_emb.0.2`, silu(linear(p, `${pre}label_emb.0.0`, y)));
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
function spatialTransformer(c: BlockCtx, name: string, x: Tensor, heads: number, depth: number): Tensor {
  const [b, hh, ww, ch] = x.shape as [number, number, number, number];
  const linearProj = c.cfg.useLinearInTransformer;
  const normed = groupNorm(c.p, `${name}.norm`, x, 1e-6);
  let h = linearProj
    ? linear(c.p, `${name}.proj_in`, normed.reshape([b, hh * ww, ch]))
    : conv2d(c.p, `${name}.proj_in`, normed).reshape([b, hh * ww, ch]); // [B, H·W, C]
  for (let d = 0; d < depth; d++) h = transformerBlock(c, `${name}.transformer_blocks.${d}`, h, heads);
  const out = linearProj
    ? linear(c.p, `${name}.proj_out`, h).reshape([b, hh, ww, ch])
    : conv2d(c.p, `${name}.proj_out`, h.reshape([b, hh, ww, ch]));
  return out.add(x);
}

function runLayer(c: BlockCtx, name: string, l: UNetLayer, h: Tensor): Tensor {
  switch (l.kind) {
    case 'conv_in': return conv2d(c.p, name, h);
    case 'res': return resBlock(c, name, h, l);
    case 'attn': return spatialTransformer(c, name, h, l.heads, l.depth);
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
    const timeEmb = timeMlp(p, cfg, tEmb); // [B, 4·mc]
    const labelEmb = labelMlp(p, cfg, opts.y);
    const emb = labelEmb ? timeEmb.add(labelEmb) : timeEmb;
    if (opts.taps) {
      opts.taps.set('t_emb', tf.keep(tEmb)).set('time_emb', tf.keep(timeEmb)).set('emb', tf.keep(emb));
      if (labelEmb) opts.taps.set('label_emb', tf.keep(labelEmb));
    }
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
