/**
 * @file The DDPM noise schedule of ldm `LatentDiffusion` (ldm/models/diffusion/ddpm.py
 * `register_schedule`, ldm/modules/diffusionmodules/util.py `make_beta_schedule`), the forward
 * process `q_sample`, the eps / v targets and the loss of `p_losses`.
 *
 * ldm's 'linear' schedule is linear in sqrt(beta) (diffusers calls it 'scaled_linear'). ldm
 * computes it in float64 (numpy) and stores float32 buffers; the loss uses those float32 buffers,
 * so we keep exactly them: from the checkpoint when it carries them, else computed the same way.
 */
import { tf, type Tensor } from '../backend/tf.ts';
import type { TensorSource } from '../io/types.ts';

export interface ScheduleConfig {
  /** `linear_start` (SD1/SD2: 0.00085). */
  linearStart: number;
  /** `linear_end` (SD1/SD2: 0.012). */
  linearEnd: number;
  /** `timesteps` (1000). */
  timesteps: number;
}

export const SD_SCHEDULE: Readonly<ScheduleConfig> = Object.freeze({ linearStart: 0.00085, linearEnd: 0.012, timesteps: 1000 });

export type Parameterization = 'eps' | 'v';

/** The float32 buffers LatentDiffusion registers (the ones training uses). */
export interface ScheduleBuffers {
  betas: Float32Array;
  alphasCumprod: Float32Array;
  sqrtAlphasCumprod: Float32Array;
  sqrtOneMinusAlphasCumprod: Float32Array;
}

/** Checkpoint buffer names (ddpm.py register_buffer) for each field. */
const BUFFER_KEYS: Record<keyof ScheduleBuffers, string> = {
  betas: 'betas',
  alphasCumprod: 'alphas_cumprod',
  sqrtAlphasCumprod: 'sqrt_alphas_cumprod',
  sqrtOneMinusAlphasCumprod: 'sqrt_one_minus_alphas_cumprod',
};

/**
 * make_beta_schedule('linear') + register_schedule in float64, rounded to float32 at the end.
 * torch.linspace(float64) computes the first half from the start and the second half from the end.
 */
export function computeSchedule(cfg: ScheduleConfig = SD_SCHEDULE): ScheduleBuffers {
  const n = cfg.timesteps;
  const a = Math.sqrt(cfg.linearStart);
  const b = Math.sqrt(cfg.linearEnd);
  const step = (b - a) / (n - 1);
  const betas64 = Array.from({ length: n }, (_, i) => {
    const s = i < n / 2 ? a + step * i : b - step * (n - 1 - i);
    return s * s;
  });
  const acp64: number[] = [];
  let prod = 1;
  for (const beta of betas64) acp64.push((prod *= 1 - beta));
  return {
    betas: Float32Array.from(betas64),
    alphasCumprod: Float32Array.from(acp64),
    sqrtAlphasCumprod: Float32Array.from(acp64, Math.sqrt),
    sqrtOneMinusAlphasCumprod: Float32Array.from(acp64, (x) => Math.sqrt(1 - x)),
  };
}

/**
 * The schedule of a checkpoint: its float32 (or float64) buffers when it has them all, otherwise
 * computed from `cfg`. Half-precision buffers (fp16 files) are not used: they lost the precision
 * the float64 computation gives.
 */
export async function loadSchedule(source?: TensorSource, cfg: ScheduleConfig = SD_SCHEDULE): Promise<NoiseSchedule> {
  const computed = computeSchedule(cfg);
  const keys = Object.values(BUFFER_KEYS);
  const usable = source && keys.every((k) => source.has(k) && ['F32', 'F64'].includes(source.info(k).dtype));
  if (!usable) return new NoiseSchedule(computed);
  const read = async (k: string) => Float32Array.from(await source.read(k));
  const buffers: ScheduleBuffers = {
    betas: await read(BUFFER_KEYS.betas),
    alphasCumprod: await read(BUFFER_KEYS.alphasCumprod),
    sqrtAlphasCumprod: await read(BUFFER_KEYS.sqrtAlphasCumprod),
    sqrtOneMinusAlphasCumprod: await read(BUFFER_KEYS.sqrtOneMinusAlphasCumprod),
  };
  if (buffers.betas.length !== cfg.timesteps) throw new Error(`${source.path}: 'betas' has ${buffers.betas.length} steps, expected ${cfg.timesteps}`);
  return new NoiseSchedule(buffers);
}

export class NoiseSchedule implements ScheduleBuffers {
  readonly betas: Float32Array;
  readonly alphasCumprod: Float32Array;
  readonly sqrtAlphasCumprod: Float32Array;
  readonly sqrtOneMinusAlphasCumprod: Float32Array;

  constructor(b: ScheduleBuffers) {
    this.betas = b.betas;
    this.alphasCumprod = b.alphasCumprod;
    this.sqrtAlphasCumprod = b.sqrtAlphasCumprod;
    this.sqrtOneMinusAlphasCumprod = b.sqrtOneMinusAlphasCumprod;
  }

  get timesteps(): number {
    return this.betas.length;
  }

  private sigmaTable?: Float32Array;

  /**
   * sgm's sigma of each timestep, ascending (DiscreteDenoiser, LegacyDDPMDiscretization):
   * float32((1 − ᾱ)/ᾱ) then its float32 square root; σ and t are the same index.
   */
  get sigmas(): Float32Array {
    this.sigmaTable ??= Float32Array.from(this.alphasCumprod, (acp) => Math.fround(Math.sqrt(Math.fround((1 - acp) / acp))));
    return this.sigmaTable;
  }

  /** util.py extract_into_tensor: per-sample coefficient broadcast as [B, 1, 1, 1]. */
  private coef(buffer: Float32Array, timesteps: number[]): Tensor {
    const values = timesteps.map((t) => {
      if (!Number.isInteger(t) || t < 0 || t >= buffer.length) throw new Error(`timestep ${t} outside 0..${buffer.length - 1}`);
      return buffer[t]!;
    });
    return tf.tensor(values, [timesteps.length, 1, 1, 1], 'float32');
  }

  /** ddpm.py q_sample: sqrt_acp[t]·x0 + sqrt(1−acp[t])·noise (float32 buffers, as p_losses). */
  qSample(x0: Tensor, noise: Tensor, timesteps: number[]): Tensor {
    return tf.tidy(() =>
      this.coef(this.sqrtAlphasCumprod, timesteps).mul(x0).add(this.coef(this.sqrtOneMinusAlphasCumprod, timesteps).mul(noise)),
    );
  }

  /** The p_losses target: noise for eps models; ddpm.py get_v for v models: sqrt_acp·noise − sqrt(1−acp)·x0. */
  targetFor(parameterization: Parameterization, x0: Tensor, noise: Tensor, timesteps: number[]): Tensor {
    if (parameterization === 'eps') return noise.clone();
    if (parameterization !== 'v') throw new Error(`parameterization: unknown '${String(parameterization)}', expected 'eps' or 'v'`);
    return tf.tidy(() =>
      this.coef(this.sqrtAlphasCumprod, timesteps).mul(noise).sub(this.coef(this.sqrtOneMinusAlphasCumprod, timesteps).mul(x0)),
    );
  }

  /** Signal-to-noise ratio acp / (1 − acp) per timestep (float64 from the float32 buffer). */
  snr(timesteps: number[]): number[] {
    return timesteps.map((t) => {
      const acp = this.alphasCumprod[t]!;
      return acp / (1 - acp);
    });
  }

  /**
   * Min-SNR-γ loss weights (Hang et al. 2023, as diffusers train scripts): min(SNR, γ)/SNR for eps,
   * min(SNR, γ)/(SNR + 1) for v. Use with `weightedDiffusionLoss`.
   */
  minSnrWeights(timesteps: number[], gamma: number, parameterization: Parameterization): number[] {
    return this.snr(timesteps).map((s) => Math.min(s, gamma) / (parameterization === 'v' ? s + 1 : s));
  }
}

/** p_losses with l2 and no weighting: mean over all elements of (modelPred − target)². */
export function diffusionLoss(modelPred: Tensor, target: Tensor): Tensor {
  return tf.tidy(() => tf.squaredDifference(modelPred, target).mean());
}

/** Per-sample weighted loss: mean over each sample's elements, times its weight, mean over the batch. */
export function weightedDiffusionLoss(modelPred: Tensor, target: Tensor, weights: number[]): Tensor {
  return tf.tidy(() => {
    const b = modelPred.shape[0]!;
    const perSample = tf.squaredDifference(modelPred, target).reshape([b, -1]).mean(1); // [B]
    return perSample.mul(tf.tensor1d(weights, 'float32')).mean();
  });
}

/**
 * Noise offset (crosslabs, "diffusion with offset noise"): noise + offset · N(0,1) per sample and
 * channel, constant over H and W. noise is NHWC; `perChannel` is standard normal [B, 1, 1, C].
 */
export function offsetNoise(noise: Tensor, offset: number, perChannel: Tensor): Tensor {
  return tf.tidy(() => noise.add(perChannel.mul(offset)));
}
