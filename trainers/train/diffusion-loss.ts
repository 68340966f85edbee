/**
 * @file The denoising loss every method trains (ldm ddpm.py LatentDiffusion.p_losses): noise the
 * latents at the batch's timesteps, run the UNet with the method's conditioning, and take the
 * mean squared error against noise (eps models) or velocity (v models) — optionally min-SNR-γ
 * weighted per sample (Hang et al. 2023; diffusers train_text_to_image.py `snr_gamma`).
 */
import { tf, type Tensor } from '../backend/tf.ts';
import { unetForward, type UNetConfig, type UNetHooks } from '../nets/unet.ts';
import type { Params } from '../nets/params.ts';
import type { UNetMemory } from '../memory/options.ts';
import { diffusionLoss, weightedDiffusionLoss, type NoiseSchedule, type Parameterization } from '../nets/noise-schedule.ts';

/** One training batch in UNet latent space. */
export interface DiffusionBatch {
  latents: Tensor; // [B, h, w, 4] NHWC, already × scale_factor
  noise: Tensor; // [B, h, w, 4] standard normal
  timesteps: number[]; // [B] integers in [0, T)
}

export interface Denoiser {
  unet: { params: Params; cfg: UNetConfig; memory?: UNetMemory };
  schedule: NoiseSchedule;
  prediction: Parameterization;
}

export interface DenoisingOptions {
  /** The method's UNet hooks (hypernetwork modules). */
  hooks?: UNetHooks;
  /** min-SNR-γ: each sample's loss weighted by min(SNR, γ)/SNR (v: /(SNR+1)); off when absent or ≤ 0. */
  minSnrGamma?: number;
}

/** p_losses: mean((unet(q_sample(x0, t, noise), t, context) − target)²) over all elements. */
export function denoisingLoss(m: Denoiser, batch: DiffusionBatch, context: Tensor, opts: DenoisingOptions = {}): tf.Scalar {
  return tf.tidy(() => {
    const noisyLatents = m.schedule.qSample(batch.latents, batch.noise, batch.timesteps);
    const modelPred = unetForward(m.unet.params, m.unet.cfg, noisyLatents, batch.timesteps, context, { hooks: opts.hooks, memory: m.unet.memory });
    const target = m.schedule.targetFor(m.prediction, batch.latents, batch.noise, batch.timesteps);
    if (!(opts.minSnrGamma! > 0)) return diffusionLoss(modelPred, target) as tf.Scalar;
    return weightedDiffusionLoss(modelPred, target, m.schedule.minSnrWeights(batch.timesteps, opts.minSnrGamma!, m.prediction)) as tf.Scalar;
  });
}
