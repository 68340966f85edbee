/**
 * @file sgm's denoiser and training loss (generative-models sgm/modules/diffusionmodules:
 * denoiser.py DiscreteDenoiser, denoiser_scaling.py EpsScaling/VScaling, loss.py
 * StandardDiffusionLoss, loss_weighting.py), the way SDXL was trained. sgm works in sigma space:
 * σ = sqrt((1 − ᾱ)/ᾱ) (noise-schedule.ts `sigmas`), noised input x0 + σ·noise, the UNet sees
 * c_in·x at timestep index(σ), denoised = c_skip·x + c_out·unet(…), and the loss is
 * mean(w(σ)·(denoised − x0)²) per sample, then over the batch.
 *   eps: c_skip 1, c_out −σ, c_in 1/√(σ²+1), w σ⁻²            (= the DDPM eps loss, up to rounding)
 *   v:   c_skip 1/(σ²+1), c_out −σ/√(σ²+1), c_in 1/√(σ²+1), w (σ²+1)/σ²  (= the v loss)
 */
import { tf, type Tensor } from '../backend/tf.ts';
import { unetForward, type UNetHooks } from '../nets/unet.ts';
import type { Denoiser, DiffusionBatch } from './diffusion-loss.ts';

/** What the UNet is conditioned on: the context and sgm's `vector` y. */
export interface SgmCond {
  crossattn: Tensor;
  vector: Tensor;
}

/** Per-sample scalings, [B, 1, 1, 1] tensors. */
function scalings(prediction: Denoiser['prediction'], sigmas: number[]) {
  const col = (f: (s: number) => number) => tf.tensor(sigmas.map(f), [sigmas.length, 1, 1, 1], 'float32');
  const cIn = col((s) => 1 / Math.sqrt(s * s + 1));
  if (prediction === 'v') {
    return { cSkip: col((s) => 1 / (s * s + 1)), cOut: col((s) => -s / Math.sqrt(s * s + 1)), cIn, weight: (s: number) => (s * s + 1) / (s * s) };
  }
  return { cSkip: undefined, cOut: col((s) => -s), cIn, weight: (s: number) => 1 / (s * s) };
}

/** DiscreteDenoiser.forward at the given timestep indices (σ = sigmas[t]): the denoised x0 estimate. */
export function sgmDenoise(m: Denoiser, x: Tensor, timesteps: number[], cond: SgmCond, hooks?: UNetHooks): Tensor {
  const sigmas = timesteps.map((t) => m.schedule.sigmas[t]!);
  return tf.tidy(() => {
    const s = scalings(m.prediction, sigmas);
    const out = unetForward(m.unet.params, m.unet.cfg, x.mul(s.cIn), timesteps, cond.crossattn, { hooks, memory: m.unet.memory, y: cond.vector });
    const skip = s.cSkip ? x.mul(s.cSkip) : x;
    return skip.add(out.mul(s.cOut));
  });
}

/** quantize_c_noise: the timestep index whose sigma is nearest. */
export function sigmaToTimestep(sigmas: Float32Array, sigma: number): number {
  let best = 0;
  for (let i = 1; i < sigmas.length; i++) if (Math.abs(sigmas[i]! - sigma) < Math.abs(sigmas[best]! - sigma)) best = i;
  return best;
}

/** sgm's noised input x0 + σ·noise (NHWC). */
export function sgmNoised(m: Pick<Denoiser, 'schedule'>, batch: DiffusionBatch): Tensor {
  const sigmas = batch.timesteps.map((t) => m.schedule.sigmas[t]!);
  return tf.tidy(() => batch.latents.add(batch.noise.mul(tf.tensor(sigmas, [sigmas.length, 1, 1, 1], 'float32'))));
}

/** StandardDiffusionLoss (l2): { loss: mean over the batch, perSample [B] }. */
export function sgmLoss(m: Denoiser, batch: DiffusionBatch, cond: SgmCond, hooks?: UNetHooks): { loss: tf.Scalar; perSample: Tensor } {
  return tf.tidy(() => {
    const b = batch.latents.shape[0]!;
    const weight = scalings(m.prediction, batch.timesteps.map((t) => m.schedule.sigmas[t]!)).weight;
    const w = tf.tensor1d(batch.timesteps.map((t) => weight(m.schedule.sigmas[t]!)), 'float32');
    const denoised = sgmDenoise(m, sgmNoised(m, batch), batch.timesteps, cond, hooks);
    const perSample = tf.squaredDifference(denoised, batch.latents).reshape([b, -1]).mean(1).mul(w); // [B]
    return { loss: perSample.mean() as tf.Scalar, perSample };
  });
}
