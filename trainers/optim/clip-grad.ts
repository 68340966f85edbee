/**
 * @file Gradient clipping with torch's semantics (the webui's "Gradient Clipping" off/value/norm):
 * - by value: torch.nn.utils.clip_grad_value_ — clamp every element to [−value, value];
 * - by norm:  torch.nn.utils.clip_grad_norm_ (torch ≥ 1.13) — total = ‖(‖g₁‖, ‖g₂‖, …)‖ over all
 *   gradients; every gradient is multiplied by min(1, max_norm / (total + 1e-6)). The multiply
 *   always happens (by 1 when under the limit), as in torch, so there is no data-dependent branch
 *   and no GPU→CPU read. On the cpu-native backend the 2-norm is one native float64 pass per
 *   gradient over its host array (trainers/optim/native.ts) instead of square/sum/sqrt kernels.
 * The webui takes the clip value from a schedule string (`clip_grad_sched`, same syntax as the
 * learn rate), so callers pass the value for the current step (trainers/optim/lr.ts).
 *
 * Both return NEW tensors in a new Map and leave the input alone; the caller disposes both
 * (trainers/train/loop.ts does). Call inside tf.tidy or dispose the result.
 *
 * Example:
 *   const { grads: clipped, totalNorm } = clipGradNorm(grads, 1.0);
 */
import { tf, type Tensor } from '../backend/tf.ts';
import { hostValues, optimKernels } from './native.ts';

export type ClipMode = 'disabled' | 'value' | 'norm';

/** clip_grad_value_: clamp each element to [−clipValue, clipValue]. */
export function clipGradValue(grads: Map<string, Tensor>, clipValue: number): Map<string, Tensor> {
  if (!(clipValue >= 0) || !Number.isFinite(clipValue)) throw new Error(`clip value must be a finite number ≥ 0, got ${clipValue}`);
  const out = new Map<string, Tensor>();
  for (const [name, g] of grads) out.set(name, tf.clipByValue(g, -clipValue, clipValue));
  return out;
}

/** The total norm torch's clip_grad_norm_ computes (a scalar tensor; 2-norm or ∞-norm). */
export function totalGradNorm(grads: Map<string, Tensor>, normType: number = 2): tf.Scalar {
  if (normType !== 2 && normType !== Infinity) throw new Error(`norm type must be 2 or Infinity, got ${normType}`);
  const native = normType === 2 ? nativeNorm(grads) : undefined;
  if (native !== undefined) return tf.scalar(native);
  return tf.tidy(() => {
    const gs = [...grads.values()];
    if (gs.length === 0) return tf.scalar(0);
    if (normType === Infinity) return tf.stack(gs.map((g) => g.abs().max())).max() as tf.Scalar;
    // torch: vector_norm(stack([vector_norm(g) for g in grads])); the same as √Σ‖g‖² up to rounding.
    return tf.stack(gs.map((g) => g.square().sum().sqrt())).square().sum().sqrt() as tf.Scalar;
  });
}

/** The 2-norm natively: ‖g‖ per gradient from a float64 sum of squares, then the norm of those (undefined: use TF ops). */
function nativeNorm(grads: Map<string, Tensor>): number | undefined {
  const kernels = optimKernels();
  if (!kernels) return undefined;
  let total = 0;
  for (const g of grads.values()) {
    const values = hostValues(g);
    if (!values) return undefined;
    total += Math.sqrt(kernels.sumSquares(values)) ** 2;
  }
  return Math.sqrt(total);
}

/** clip_grad_norm_: scale all gradients by min(1, maxNorm / (total + 1e-6)); returns the new grads and the total norm. */
export function clipGradNorm(
  grads: Map<string, Tensor>,
  maxNorm: number,
  normType: number = 2,
): { grads: Map<string, Tensor>; totalNorm: tf.Scalar } {
  if (!(maxNorm >= 0) || !Number.isFinite(maxNorm)) throw new Error(`max norm must be a finite number ≥ 0, got ${maxNorm}`);
  const totalNorm = totalGradNorm(grads, normType);
  const out = new Map<string, Tensor>();
  tf.tidy(() => {
    const coef = tf.minimum(tf.scalar(maxNorm).div(totalNorm.add(1e-6)), 1);
    for (const [name, g] of grads) out.set(name, tf.keep(g.mul(coef)));
  });
  return { grads: out, totalNorm };
}

/**
 * A loop's clip function. `byNorm`: it needs every gradient of the step at once (the global norm),
 * so it cannot run per parameter inside a fused backward pass; clipping by value is per element
 * and gives the same result on any part of the gradients.
 */
export type Clipper = ((grads: Map<string, Tensor>, step: number) => Map<string, Tensor>) & { byNorm?: boolean };

/** A clip function for trainers/train/loop.ts: `value(step)` gives the clip value for the step (schedule). */
export function makeClipper(mode: ClipMode, value: (step: number) => number): Clipper | undefined {
  if (mode === 'disabled') return undefined;
  if (mode === 'value') return (grads, step) => clipGradValue(grads, value(step));
  if (mode === 'norm') {
    const clip: Clipper = (grads, step) => {
      const { grads: out, totalNorm } = clipGradNorm(grads, value(step));
      totalNorm.dispose();
      return out;
    };
    clip.byNorm = true;
    return clip;
  }
  throw new Error(`clip mode must be one of disabled, value, norm; got '${String(mode)}'`);
}
