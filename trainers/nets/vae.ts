/**
 * @file Stable Diffusion's VAE: ldm `AutoencoderKL` (ldm/models/autoencoder.py) with `Encoder` and
 * `Decoder` from ldm/modules/diffusionmodules/model.py, NHWC. The config is inferred from the
 * checkpoint's keys and shapes (`vaeConfigFromKeys`), so a full SD1/SD2 VAE, a standalone VAE file
 * (no `first_stage_model.` prefix) and the tiny fixture all load the same way.
 *
 * Example:
 *   const { params, cfg } = await loadVae(await openSafetensors('model.safetensors'));
 *   const post = vaeEncode(params, cfg, image);            // image NHWC in [-1, 1]
 *   const latents = scaleLatents(cfg, post.mean);          // what training caches
 *   const decoded = vaeDecode(params, cfg, latents);       // back to NHWC, not clamped
 */
import { tf, type Tensor } from '../backend/tf.ts';
import { withPrecision } from '../backend/precision.ts';
import type { TensorSource } from '../io/types.ts';
import { loadParams, type Params } from './params.ts';
import { attention, conv2d, groupNorm, groupNormSilu } from './layers.ts';
import { hasNativeAttention, nativeAttention } from './sliced-attention.ts';

export interface VaeConfig {
  /** Key prefix: 'first_stage_model.' in a full checkpoint, '' in a standalone VAE file. */
  prefix: string;
  /** Image channels into the encoder (3). */
  inChannels: number;
  /** Image channels out of the decoder (3). */
  outChannels: number;
  /** Base channel count `ch` (SD: 128). */
  ch: number;
  /** Channel multiplier per level `ch_mult` (SD: [1, 2, 4, 4]); the image shrinks ×2 per level after the first. */
  chMult: number[];
  /** ResnetBlocks per encoder level `num_res_blocks` (the decoder has one more per level). */
  numResBlocks: number;
  /** Latent channels out of the encoder / into the decoder `z_channels` (4). */
  zChannels: number;
  /** Channels after quant_conv (mean/logvar each) and into post_quant_conv `embed_dim` (4). */
  embedDim: number;
  /** Encoder emits mean and logvar (`double_z`; always true for AutoencoderKL). */
  doubleZ: boolean;
  /** An AttnBlock between the two mid ResnetBlocks (ldm always builds one; attn_type 'none' drops it). */
  midAttention: boolean;
  /** Levels with an AttnBlock after every ResnetBlock (`attn_resolutions`; none in SD). */
  attnLevels: number[];
  /** Latent scale (`scale_factor`): UNet latents = scaleFactor · VAE latents. 0.18215 for SD1/SD2. */
  scaleFactor: number;
}

/** GroupNorm eps of every VAE norm (ldm model.py `Normalize`: 32 groups, eps 1e-6). */
const EPS = 1e-6;
/** ldm DiagonalGaussianDistribution clamps logvar to this range. */
const LOGVAR_MIN = -30;
const LOGVAR_MAX = 20;
export const SD_SCALE_FACTOR = 0.18215;

/** The sub-modules of AutoencoderKL whose keys we load (others, e.g. `loss.*`, are ignored). */
const PARTS = ['encoder.', 'decoder.', 'quant_conv.', 'post_quant_conv.'];

/** Infer the VAE config from `{key: PyTorch shape}` (a checkpoint header or keys-sd15.json). */
export function vaeConfigFromKeys(shapes: Map<string, number[]>, scaleFactor = SD_SCALE_FACTOR): VaeConfig {
  const prefix = ['first_stage_model.', ''].find((p) => shapes.has(`${p}encoder.conv_in.weight`));
  if (prefix === undefined) throw new Error('no VAE found: neither first_stage_model.encoder.conv_in.weight nor encoder.conv_in.weight');
  const shape = (key: string): number[] => {
    const s = shapes.get(prefix + key);
    if (!s) throw new Error(`VAE: missing '${prefix}${key}'`);
    return s;
  };
  const count = (stem: string): number => {
    let n = 0;
    while ([...shapes.keys()].some((k) => k.startsWith(`${prefix}${stem}${n}.`))) n++;
    return n;
  };
  const [ch, inChannels] = shape('encoder.conv_in.weight') as [number, number];
  const levels = count('encoder.down.');
  const chMult = Array.from({ length: levels }, (_, i) => shape(`encoder.down.${i}.block.0.conv1.weight`)[0]! / ch);
  const zChannels = shape('decoder.conv_in.weight')[1]!;
  const embedDim = shape('post_quant_conv.weight')[0]!;
  return {
    prefix,
    inChannels,
    outChannels: shape('decoder.conv_out.weight')[0]!,
    ch,
    chMult,
    numResBlocks: count('encoder.down.0.block.'),
    zChannels,
    embedDim,
    doubleZ: shape('encoder.conv_out.weight')[0] === 2 * zChannels,
    midAttention: shapes.has(`${prefix}encoder.mid.attn_1.q.weight`),
    attnLevels: chMult.map((_, i) => i).filter((i) => shapes.has(`${prefix}encoder.down.${i}.attn.0.q.weight`)),
    scaleFactor,
  };
}

/** Every parameter key (with prefix) the config implies, with its PyTorch shape. */
export function vaeParamShapes(cfg: VaeConfig): Map<string, number[]> {
  const out = new Map<string, number[]>();
  const conv = (name: string, cin: number, cout: number, k = 3) => {
    out.set(`${cfg.prefix}${name}.weight`, [cout, cin, k, k]);
    out.set(`${cfg.prefix}${name}.bias`, [cout]);
  };
  const norm = (name: string, c: number) => {
    out.set(`${cfg.prefix}${name}.weight`, [c]);
    out.set(`${cfg.prefix}${name}.bias`, [c]);
  };
  const resnet = (name: string, cin: number, cout: number) => {
    norm(`${name}.norm1`, cin);
    conv(`${name}.conv1`, cin, cout);
    norm(`${name}.norm2`, cout);
    conv(`${name}.conv2`, cout, cout);
    if (cin !== cout) conv(`${name}.nin_shortcut`, cin, cout, 1);
  };
  const attn = (name: string, c: number) => {
    norm(`${name}.norm`, c);
    for (const n of ['q', 'k', 'v', 'proj_out']) conv(`${name}.${n}`, c, c, 1);
  };
  const mid = (name: string, c: number) => {
    resnet(`${name}.mid.block_1`, c, c);
    if (cfg.midAttention) attn(`${name}.mid.attn_1`, c);
    resnet(`${name}.mid.block_2`, c, c);
  };
  const levels = cfg.chMult.length;
  const top = cfg.ch * cfg.chMult[levels - 1]!;
  // Encoder (model.py Encoder.__init__): in_ch_mult = (1,) + ch_mult.
  conv('encoder.conv_in', cfg.inChannels, cfg.ch);
  let cin = cfg.ch;
  for (let i = 0; i < levels; i++) {
    const cout = cfg.ch * cfg.chMult[i]!;
    for (let j = 0; j < cfg.numResBlocks; j++, cin = cout) {
      resnet(`encoder.down.${i}.block.${j}`, cin, cout);
      if (cfg.attnLevels.includes(i)) attn(`encoder.down.${i}.attn.${j}`, cout);
    }
    if (i !== levels - 1) conv(`encoder.down.${i}.downsample.conv`, cout, cout);
  }
  mid('encoder', top);
  norm('encoder.norm_out', top);
  conv('encoder.conv_out', top, (cfg.doubleZ ? 2 : 1) * cfg.zChannels);
  conv('quant_conv', 2 * cfg.zChannels, 2 * cfg.embedDim, 1);
  // Decoder (model.py Decoder.__init__): levels built top-down, numResBlocks + 1 blocks each.
  conv('post_quant_conv', cfg.embedDim, cfg.zChannels, 1);
  conv('decoder.conv_in', cfg.zChannels, top);
  mid('decoder', top);
  cin = top;
  for (let i = levels - 1; i >= 0; i--) {
    const cout = cfg.ch * cfg.chMult[i]!;
    for (let j = 0; j <= cfg.numResBlocks; j++, cin = cout) {
      resnet(`decoder.up.${i}.block.${j}`, cin, cout);
      if (cfg.attnLevels.includes(i)) attn(`decoder.up.${i}.attn.${j}`, cout);
    }
    if (i !== 0) conv(`decoder.up.${i}.upsample.conv`, cout, cout);
  }
  norm('decoder.norm_out', cin);
  conv('decoder.conv_out', cin, cfg.outChannels);
  return out;
}

/**
 * Check that the VAE keys in `shapes` are exactly the ones `cfg` implies, with the same shapes.
 * Throws an error naming the first missing, unexpected or mis-shaped keys.
 */
export function checkVaeKeys(shapes: Map<string, number[]>, cfg: VaeConfig): void {
  const expected = vaeParamShapes(cfg);
  const ours = [...shapes.keys()].filter((k) => PARTS.some((p) => k.startsWith(cfg.prefix + p)));
  const problems: string[] = [];
  for (const k of ours) {
    const want = expected.get(k);
    if (!want) problems.push(`unexpected '${k}'`);
    else if (want.join() !== shapes.get(k)!.join()) problems.push(`'${k}' has shape [${shapes.get(k)}], expected [${want}]`);
  }
  for (const k of expected.keys()) if (!shapes.has(k)) problems.push(`missing '${k}'`);
  if (problems.length) throw new Error(`VAE weights do not match the inferred config: ${problems.slice(0, 5).join('; ')}`);
}

export interface VaeLoadOptions {
  /** Load only what is needed: TI caches latents with the encoder, previews need the decoder. */
  parts?: ('encoder' | 'decoder')[];
  scaleFactor?: number;
}

/** Infer the config from a checkpoint, verify every VAE key, and load the weights. */
export async function loadVae(source: TensorSource, opts: VaeLoadOptions = {}): Promise<{ params: Params; cfg: VaeConfig }> {
  const shapes = new Map(source.keys().map((k) => [k, source.info(k).shape] as [string, number[]]));
  const cfg = vaeConfigFromKeys(shapes, opts.scaleFactor);
  checkVaeKeys(shapes, cfg);
  const parts = opts.parts ?? ['encoder', 'decoder'];
  const prefixes = [
    ...(parts.includes('encoder') ? ['encoder.', 'quant_conv.'] : []),
    ...(parts.includes('decoder') ? ['decoder.', 'post_quant_conv.'] : []),
  ].map((p) => cfg.prefix + p);
  return { params: await loadParams(source, prefixes), cfg };
}

/** model.py ResnetBlock without temb: GN→SiLU→conv→GN→SiLU→(dropout)→conv, + skip (1×1 when channels change). */
function resnetBlock(p: Params, name: string, x: Tensor): Tensor {
  // A tidy per block frees its intermediates at once: at 512 px one level-0 activation is 128 MB,
  // and an outer tidy alone would hold every one of them until the whole encoder is done.
  return tf.tidy(() => {
    let h = conv2d(p, `${name}.conv1`, groupNormSilu(p, `${name}.norm1`, x, EPS));
    h = conv2d(p, `${name}.conv2`, groupNormSilu(p, `${name}.norm2`, h, EPS));
    const skip = p.has(`${name}.nin_shortcut.weight`) ? conv2d(p, `${name}.nin_shortcut`, x) : x;
    return skip.add(h);
  });
}

/**
 * model.py AttnBlock: single-head attention over the H·W positions, 1×1 convs for q/k/v/proj_out,
 * scale C^-0.5. At the mid block (H/8) a 512 px image gives 4096 positions: scores are 64 MB, fine.
 */
function attnBlock(p: Params, name: string, x: Tensor): Tensor {
  const [b, h, w, c] = x.shape as [number, number, number, number];
  return tf.tidy(() => {
    const normed = groupNorm(p, `${name}.norm`, x, EPS);
    const q = conv2d(p, `${name}.q`, normed).reshape([b, h * w, c]); // [B, H·W, C]
    const k = conv2d(p, `${name}.k`, normed).reshape([b, h * w, c]); // [B, H·W, C]
    const v = conv2d(p, `${name}.v`, normed).reshape([b, h * w, c]); // [B, H·W, C]
    // one head over H·W tokens: the native core (cpu-native) never holds the [H·W, H·W] scores
    const attended = (hasNativeAttention() ? nativeAttention(q, k, v, 1) : attention(q, k, v, 1)).reshape([b, h, w, c]); // [B, H, W, C]
    return x.add(conv2d(p, `${name}.proj_out`, attended));
  });
}

function midBlock(p: Params, cfg: VaeConfig, name: string, x: Tensor): Tensor {
  let h = resnetBlock(p, `${name}.mid.block_1`, x);
  if (cfg.midAttention) h = replace(h, attnBlock(p, `${name}.mid.attn_1`, h));
  return replace(h, resnetBlock(p, `${name}.mid.block_2`, h));
}

/**
 * Dispose the activation a block has consumed and return the block's output. Safe under tf.grad:
 * the tape keeps its own references to what backprop needs.
 */
function replace(consumed: Tensor, output: Tensor): Tensor {
  consumed.dispose();
  return output;
}

/** model.py Encoder.forward: image [B, H, W, 3] → moments [B, H/f, W/f, 2·z]. */
function encoder(p: Params, cfg: VaeConfig, image: Tensor): Tensor {
  const n = `${cfg.prefix}encoder`;
  const levels = cfg.chMult.length;
  let h = conv2d(p, `${n}.conv_in`, image);
  for (let i = 0; i < levels; i++) {
    for (let j = 0; j < cfg.numResBlocks; j++) {
      h = replace(h, resnetBlock(p, `${n}.down.${i}.block.${j}`, h));
      if (cfg.attnLevels.includes(i)) h = replace(h, attnBlock(p, `${n}.down.${i}.attn.${j}`, h));
    }
    // Downsample pads right/bottom only, then 3×3 stride 2 unpadded (fixture README item 2).
    if (i !== levels - 1) h = replace(h, conv2d(p, `${n}.down.${i}.downsample.conv`, h, { stride: 2, pad: 'vae-down' }));
  }
  h = replace(h, midBlock(p, cfg, n, h));
  return tf.tidy(() => conv2d(p, `${n}.conv_out`, groupNormSilu(p, `${n}.norm_out`, h, EPS)));
}

/** model.py Decoder.forward: z [B, h, w, z] → image [B, h·f, w·f, 3]. */
function decoder(p: Params, cfg: VaeConfig, z: Tensor): Tensor {
  const n = `${cfg.prefix}decoder`;
  let h = conv2d(p, `${n}.conv_in`, z);
  h = replace(h, midBlock(p, cfg, n, h));
  for (let i = cfg.chMult.length - 1; i >= 0; i--) {
    for (let j = 0; j <= cfg.numResBlocks; j++) {
      h = replace(h, resnetBlock(p, `${n}.up.${i}.block.${j}`, h));
      if (cfg.attnLevels.includes(i)) h = replace(h, attnBlock(p, `${n}.up.${i}.attn.${j}`, h));
    }
    if (i !== 0) h = replace(h, tf.tidy(() => conv2d(p, `${n}.up.${i}.upsample.conv`, upsampleNearest2x(h))));
  }
  return tf.tidy(() => conv2d(p, `${n}.conv_out`, groupNormSilu(p, `${n}.norm_out`, h, EPS)));
}

/** F.interpolate(scale_factor=2, mode='nearest'); resizeNearestNeighbor has a registered gradient. */
function upsampleNearest2x(x: Tensor): Tensor {
  const [, h, w] = x.shape as [number, number, number, number];
  return tf.image.resizeNearestNeighbor(x as tf.Tensor4D, [2 * h, 2 * w]);
}

/** ldm DiagonalGaussianDistribution, NHWC [B, h, w, embedDim] each. */
export interface Posterior {
  mean: Tensor;
  /** Clamped to [-30, 20]. */
  logvar: Tensor;
  /** exp(logvar / 2). */
  std: Tensor;
}

/**
 * AutoencoderKL.encode: image NHWC in [-1, 1] → posterior (unscaled VAE latent space).
 * Always float32, whatever the job's precision: it runs once per image (the latents are cached)
 * and its deep full-resolution conv stacks take bf16 rounding past 1% of the posterior's range
 * (measured on the sd-tiny goldens: 1.7%; the UNet's outputs stay within 0.5%).
 */
export function vaeEncode(params: Params, cfg: VaeConfig, image: Tensor): Posterior {
  return withPrecision('fp32', () => tf.tidy(() => {
    const moments = conv2d(params, `${cfg.prefix}quant_conv`, encoder(params, cfg, image)); // [B, h, w, 2E]
    const [mean, rawLogvar] = tf.split(moments, 2, 3) as [Tensor, Tensor];
    const logvar = tf.clipByValue(rawLogvar, LOGVAR_MIN, LOGVAR_MAX);
    return { mean, logvar, std: tf.exp(logvar.mul(0.5)) };
  }) as unknown as Posterior);
}

/** DiagonalGaussianDistribution.sample with given standard normal noise: mean + std·noise. */
export function samplePosterior(post: Posterior, noise: Tensor): Tensor {
  return tf.tidy(() => post.mean.add(post.std.mul(noise)));
}

/** VAE latents → UNet latents (LatentDiffusion.get_first_stage_encoding: scale_factor · z). */
export function scaleLatents(cfg: VaeConfig, z: Tensor): Tensor {
  return tf.mul(z, cfg.scaleFactor);
}

/** LatentDiffusion.decode_first_stage: UNet latents NHWC → image NHWC (≈[-1, 1], not clamped). Float32 always, as vaeEncode. */
export function vaeDecode(params: Params, cfg: VaeConfig, zScaled: Tensor): Tensor {
  return withPrecision('fp32', () => tf.tidy(() => {
    const z = zScaled.div(cfg.scaleFactor);
    return decoder(params, cfg, conv2d(params, `${cfg.prefix}post_quant_conv`, z));
  }));
}

/** How many pixels one latent cell covers (8 for SD). */
export function vaeDownscale(cfg: VaeConfig): number {
  return 2 ** (cfg.chMult.length - 1);
}
