/**
 * @file Preview images during training: a small DDIM (eta 0) or Euler sampler with classifier-free
 * guidance for eps and v models, deterministic from a seed, decoded by the VAE to RGB bytes, and
 * written as PNG with the webui's `parameters` infotext chunk.
 *
 * The model is a callback (`Denoiser`) so this file does not depend on the UNet module.
 * DDIM follows ldm/models/diffusion/ddim.py (`make_ddim_timesteps` 'uniform', `p_sample_ddim`);
 * Euler follows k-diffusion `sample_euler` with `CompVisDenoiser` / `CompVisVDenoiser` sigmas.
 *
 * Example:
 *   const { rgb, width, height } = await sampleImage(
 *     { denoise, schedule, vae, context, uncondContext },
 *     { seed: 1234, width: 512, height: 512, parameterization: 'eps' });
 *   await savePreviewPng('images/cat-500.png', rgb, width, height, 'a photo of cat\nSteps: 20, ...');
 */
import sharp from 'sharp';
import { tf, type Tensor } from '../backend/tf.ts';
import type { Params } from '../nets/params.ts';
import { vaeDecode, vaeDownscale, type VaeConfig } from '../nets/vae.ts';
import type { NoiseSchedule, Parameterization } from '../nets/noise-schedule.ts';
import { writeFileAtomic } from '../io/atomic.ts';
import { seededNormal } from '../random.ts';

/**
 * The model: latents NHWC [B, h, w, C], one timestep for the batch (fractional for Euler),
 * context [B, T, D] → the model's prediction (eps or v), NHWC like the latents.
 */
export type Denoiser = (latents: Tensor, t: number, context: Tensor) => Tensor;

export type SamplerName = 'ddim' | 'euler';

export interface SampleOptions {
  /** 'ddim' (eta 0) or 'euler' (default 'ddim'). */
  sampler?: SamplerName;
  /** Denoising steps (default 20). */
  steps?: number;
  /** Classifier-free guidance scale; 1 runs the conditional model only (default 7). */
  cfgScale?: number;
  /** Seed of the initial noise. */
  seed: number;
  /** Image size in pixels (multiples of the VAE downscale, 8 for SD). */
  width: number;
  height: number;
  /** What the model predicts. */
  parameterization: Parameterization;
}

export interface SampleInputs {
  denoise: Denoiser;
  schedule: NoiseSchedule;
  /** A VAE with its decoder loaded. */
  vae: { params: Params; cfg: VaeConfig };
  /** Text context of the prompt [1, T, D]. */
  context: Tensor;
  /** Context of the negative/empty prompt [1, T', D]; needed when cfgScale ≠ 1. */
  uncondContext?: Tensor;
}

// ---------------------------------------------------------------- guidance

/** The guided prediction: uncond + scale·(cond − uncond), one batched call when the contexts match. */
function guidedPrediction(inputs: SampleInputs, cfgScale: number, x: Tensor, t: number): Tensor {
  const { denoise, context, uncondContext } = inputs;
  if (cfgScale === 1) return denoise(x, t, context);
  if (!uncondContext) throw new Error('sampler: cfgScale ≠ 1 needs an uncondContext (the empty prompt\'s context)');
  return tf.tidy(() => {
    let uncond: Tensor;
    let cond: Tensor;
    if (uncondContext.shape.join() === context.shape.join()) {
      const both = denoise(tf.concat([x, x]), t, tf.concat([uncondContext, context])); // [2B, h, w, C]
      [uncond, cond] = tf.split(both, 2, 0) as [Tensor, Tensor];
    } else {
      uncond = denoise(x, t, uncondContext);
      cond = denoise(x, t, context);
    }
    return uncond.add(cond.sub(uncond).mul(cfgScale));
  });
}

// ---------------------------------------------------------------- DDIM

/**
 * ddim.py make_ddim_timesteps('uniform'): every c-th step, shifted by one (951 … 1 for 20 steps),
 * clipped to the last train step as the webui does (modules/sd_samplers_timesteps.py get_timesteps:
 * `clip(range(0, 1000, 1000 // steps) + 1, 0, 999)`). Without the clip, step counts whose c divides
 * 999 (3, 9, 27, 37, 111, …) end on t = 1000, one past alphas_cumprod: ldm raises IndexError there,
 * and a JS array read gives undefined → NaN latents → an all-black preview. Like both references,
 * this can yield more timesteps than asked for (3 → [1, 334, 667, 999]).
 */
export function ddimTimesteps(numSteps: number, trainSteps: number): number[] {
  if (!Number.isInteger(numSteps) || numSteps < 1 || numSteps > trainSteps) {
    throw new Error(`sampler: DDIM steps must be an integer in 1..${trainSteps}, got ${numSteps}`);
  }
  const c = Math.floor(trainSteps / numSteps);
  const out: number[] = [];
  for (let t = 0; t < trainSteps; t += c) out.push(Math.min(t + 1, trainSteps - 1));
  return out;
}

/** One DDIM step, eta 0 (ddim.py p_sample_ddim): x_prev = √a_prev·x0̂ + √(1−a_prev)·ε̂. */
function ddimStep(pred: Tensor, x: Tensor, aT: number, aPrev: number, parameterization: Parameterization): Tensor {
  return tf.tidy(() => {
    let eps: Tensor;
    let x0: Tensor;
    if (parameterization === 'v') {
      // ddpm.py predict_eps_from_z_and_v / predict_start_from_z_and_v
      eps = x.mul(Math.sqrt(1 - aT)).add(pred.mul(Math.sqrt(aT)));
      x0 = x.mul(Math.sqrt(aT)).sub(pred.mul(Math.sqrt(1 - aT)));
    } else {
      eps = pred;
      x0 = x.sub(eps.mul(Math.sqrt(1 - aT))).div(Math.sqrt(aT));
    }
    return x0.mul(Math.sqrt(aPrev)).add(eps.mul(Math.sqrt(1 - aPrev)));
  });
}

function sampleDdim(inputs: SampleInputs, opts: Required<SampleOptions>, noise: Tensor): Tensor {
  const acp = inputs.schedule.alphasCumprod;
  const steps = ddimTimesteps(opts.steps, acp.length);
  let x = noise.clone();
  for (let i = steps.length - 1; i >= 0; i--) {
    const t = steps[i]!;
    const aPrev = i > 0 ? acp[steps[i - 1]!]! : acp[0]!; // ddim.py: alphas_prev starts at acp[0]
    const next = tf.tidy(() => ddimStep(guidedPrediction(inputs, opts.cfgScale, x, t), x, acp[t]!, aPrev, opts.parameterization));
    x.dispose();
    x = next;
  }
  return x;
}

// ---------------------------------------------------------------- Euler (k-diffusion)

/** k-diffusion DiscreteSchedule.get_sigmas: t = linspace(T−1, 0, n), σ(t) by log-σ interpolation, then 0. */
export function eulerSigmas(alphasCumprod: Float32Array, numSteps: number): { sigmas: number[]; timesteps: number[] } {
  const logSigmas = Array.from(alphasCumprod, (a) => Math.log(Math.sqrt((1 - a) / a)));
  const last = alphasCumprod.length - 1;
  const timesteps = Array.from({ length: numSteps }, (_, i) => (numSteps === 1 ? last : last - (last * i) / (numSteps - 1)));
  const sigmas = timesteps.map((t) => {
    const lo = Math.floor(t);
    const hi = Math.ceil(t);
    const w = t - lo;
    return Math.exp((1 - w) * logSigmas[lo]! + w * logSigmas[hi]!);
  });
  return { sigmas: [...sigmas, 0], timesteps };
}

/**
 * k-diffusion CompVisDenoiser (eps: c_skip 1, c_out −σ) / CompVisVDenoiser (v: c_skip 1/(σ²+1),
 * c_out −σ/√(σ²+1)); both scale the input by c_in = 1/√(σ²+1).
 */
function denoised(inputs: SampleInputs, opts: Required<SampleOptions>, x: Tensor, sigma: number, t: number): Tensor {
  return tf.tidy(() => {
    const cIn = 1 / Math.sqrt(sigma * sigma + 1);
    const pred = guidedPrediction(inputs, opts.cfgScale, x.mul(cIn), t);
    if (opts.parameterization === 'v') return x.mul(1 / (sigma * sigma + 1)).add(pred.mul(-sigma * cIn));
    return x.sub(pred.mul(sigma));
  });
}

function sampleEuler(inputs: SampleInputs, opts: Required<SampleOptions>, noise: Tensor): Tensor {
  const { sigmas, timesteps } = eulerSigmas(inputs.schedule.alphasCumprod, opts.steps);
  let x = noise.mul(sigmas[0]!);
  for (let i = 0; i < timesteps.length; i++) {
    const sigma = sigmas[i]!;
    const next = tf.tidy(() => {
      const d = x.sub(denoised(inputs, opts, x, sigma, timesteps[i]!)).div(sigma); // sample_euler: to_d
      return x.add(d.mul(sigmas[i + 1]! - sigma));
    });
    x.dispose();
    x = next;
  }
  return x;
}

// ---------------------------------------------------------------- entry points

function withDefaults(opts: SampleOptions): Required<SampleOptions> {
  const full = { sampler: 'ddim' as SamplerName, steps: 20, cfgScale: 7, ...opts };
  if (!['ddim', 'euler'].includes(full.sampler)) throw new Error(`sampler: unknown '${full.sampler}', expected 'ddim' or 'euler'`);
  if (!Number.isInteger(full.steps) || full.steps < 1) throw new Error(`sampler: steps must be a positive integer, got ${full.steps}`);
  return full;
}

/** Denoise seeded noise to UNet-space latents NHWC [1, height/f, width/f, C]. */
export function sampleLatents(inputs: SampleInputs, options: SampleOptions): Tensor {
  const opts = withDefaults(options);
  const f = vaeDownscale(inputs.vae.cfg);
  if (opts.width % f || opts.height % f) throw new Error(`sampler: width and height must be multiples of ${f}, got ${opts.width}×${opts.height}`);
  const shape = [1, opts.height / f, opts.width / f, inputs.vae.cfg.embedDim];
  const noise = tf.tensor(seededNormal(opts.seed, shape.reduce((a, b) => a * b)), shape, 'float32');
  const latents = opts.sampler === 'euler' ? sampleEuler(inputs, opts, noise) : sampleDdim(inputs, opts, noise);
  noise.dispose();
  return latents;
}

/** VAE output NHWC [1, H, W, 3] in ≈[-1, 1] → RGB bytes HWC (the webui's (x+1)/2 clamp, rounded). */
export async function imageToRgb(image: Tensor): Promise<Uint8Array> {
  const bytes = tf.tidy(() => tf.clipByValue(image.add(1).mul(127.5), 0, 255).round().toInt());
  const values = await bytes.data();
  bytes.dispose();
  return Uint8Array.from(values);
}

/** Sample, decode and convert: the preview image as RGB bytes HWC. */
export async function sampleImage(inputs: SampleInputs, options: SampleOptions): Promise<{ rgb: Uint8Array; width: number; height: number }> {
  const latents = sampleLatents(inputs, options);
  const image = vaeDecode(inputs.vae.params, inputs.vae.cfg, latents);
  latents.dispose();
  const rgb = await imageToRgb(image);
  image.dispose();
  return { rgb, width: options.width, height: options.height };
}

// ---------------------------------------------------------------- PNG

const CRC_TABLE = Uint32Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(bytes: Uint8Array): number {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/**
 * A PNG text chunk as PIL's PngInfo.add_text writes it (what the webui uses for `parameters`):
 * tEXt when the text is Latin-1, otherwise iTXt, uncompressed UTF-8.
 */
export function pngTextChunk(keyword: string, text: string): Buffer {
  const latin1 = /^[\u0000-\u00ff]*$/.test(text);
  const data = latin1
    ? Buffer.concat([Buffer.from(`${keyword}\0`, 'latin1'), Buffer.from(text, 'latin1')])
    : Buffer.concat([Buffer.from(`${keyword}\0\0\0\0\0`, 'latin1'), Buffer.from(text, 'utf8')]);
  const typeAndData = Buffer.concat([Buffer.from(latin1 ? 'tEXt' : 'iTXt', 'latin1'), data]);
  const chunk = Buffer.alloc(12 + data.length);
  chunk.writeUInt32BE(data.length, 0);
  typeAndData.copy(chunk, 4);
  chunk.writeUInt32BE(crc32(typeAndData), 8 + data.length);
  return chunk;
}

/**
 * Write RGB bytes (HWC) as PNG with the infotext in a `parameters` chunk. sharp cannot write PNG
 * text chunks, so the chunk is inserted after IHDR (8-byte signature + 25-byte IHDR chunk).
 */
export async function savePreviewPng(path: string, rgb: Uint8Array, width: number, height: number, infotext?: string): Promise<void> {
  const png = await sharp(Buffer.from(rgb.buffer, rgb.byteOffset, rgb.byteLength), { raw: { width, height, channels: 3 } })
    .png()
    .toBuffer();
  const ihdrEnd = 8 + 25;
  const out = infotext === undefined ? png : Buffer.concat([png.subarray(0, ihdrEnd), pngTextChunk('parameters', infotext), png.subarray(ihdrEnd)]);
  await writeFileAtomic(path, out, { overwrite: true });
}
