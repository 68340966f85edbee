/**
 * @file Trained weights held at bfloat16 precision, each update rounded stochastically (the
 * `bf16Weights` job option; Zamirai et al. 2020, "Revisiting BFloat16 Training"; OneTrainer's
 * stochastic rounding of bf16 weights): bf16 keeps float32's 8 exponent bits and 7 of its 23
 * mantissa bits, so an update smaller than half a bf16 step is lost by round-to-nearest — and a
 * fine-tune's updates (lr 1e-6 against weights near 1e-2) mostly are. Rounding up with probability
 * (dropped low bits) / 2^16 instead makes the expected stored value the exact float32 result.
 *
 * On float32 bits: add 16 uniform random bits to the low half and truncate. The sum carries into
 * the kept bits exactly when the random number exceeds 2^16 − (low bits), so |x| rounds away from
 * zero with probability low / 2^16 (a carry into the exponent is the next binade's first value,
 * as it should be). NaN and ±Inf stay as they are. The random bits come from a stream derived
 * from the job's seed, the step and the parameter's name, so a resumed run rounds as the
 * uninterrupted one.
 */
import type { tf } from '../backend/tf.ts';
import { Rng } from '../random.ts';
import { assignValues, hostValues } from './native.ts';
import type { TrainableOptimizer } from './trainable.ts';
import { Bf16Store } from '../nets/bf16-store.ts';

/** `values` stochastically rounded to bfloat16 precision (a new array; NaN/Inf kept). */
export function stochasticRoundBf16(values: Float32Array, rng: Rng): Float32Array {
  const out = new Float32Array(values.length);
  const src = new Uint32Array(values.buffer, values.byteOffset, values.length);
  const dst = new Uint32Array(out.buffer);
  let bits = 0;
  for (let i = 0; i < src.length; i++) {
    const u = src[i]!;
    if ((u & 0x7f800000) === 0x7f800000) {
      dst[i] = u; // NaN, ±Inf
      continue;
    }
    if ((i & 1) === 0) bits = rng.nextUint32(); // two 16-bit draws per 32-bit number
    const r = (i & 1) === 0 ? bits & 0xffff : bits >>> 16;
    dst[i] = ((u + r) & 0xffff0000) >>> 0;
  }
  return out;
}

/** Round-to-nearest-even to bfloat16 precision (what a plain cast does; for comparison and tests). */
export function nearestBf16(values: Float32Array): Float32Array {
  const out = new Float32Array(values.length);
  const src = new Uint32Array(values.buffer, values.byteOffset, values.length);
  const dst = new Uint32Array(out.buffer);
  for (let i = 0; i < src.length; i++) {
    const u = src[i]!;
    dst[i] = (u & 0x7f800000) === 0x7f800000 ? u : ((u + 0x7fff + ((u >>> 16) & 1)) & 0xffff0000) >>> 0;
  }
  return out;
}

/**
 * The rounding the optimizer applies after each update of a trained variable: its values replaced
 * by their stochastic bf16 rounding, the random stream keyed by (seed, step, name).
 */
export function bf16Rounder(seed: number): (name: string, variable: tf.Variable, step: number) => void {
  return (name, variable, step) => {
    const values = hostValues(variable) ?? (variable.dataSync() as Float32Array);
    assignValues(variable, stochasticRoundBf16(values, Rng.derive(seed, 'bf16-round', step, name)));
  };
}

let storeOn = true;

/** false: jobs keep bf16Weights as float32 arrays of bf16-exact values (the emulation), for tests comparing both. */
export function setBf16Store(on: boolean): void {
  storeOn = on;
}

/**
 * Turn on bf16Weights for `optimizer` over `vars` (the trained ones): the weights start at their
 * nearest bf16 values (as loading the checkpoint in bfloat16 would give) and every update is
 * rounded stochastically from then on. With `store` (the jobs, which run the fused backward) the
 * weights are also HELD as bf16 bits between uses (nets/bf16-store.ts: 2 bytes a weight instead of
 * 4); without it they stay float32 arrays of bf16-exact values — the same numbers, bit for bit.
 */
export function useBf16Weights(optimizer: TrainableOptimizer, vars: Map<string, tf.Variable>, seed: number, opts: { store?: boolean } = {}): void {
  for (const v of vars.values()) assignValues(v, nearestBf16(hostValues(v) ?? (v.dataSync() as Float32Array)));
  const round = bf16Rounder(seed);
  if (!opts.store || !storeOn) {
    optimizer.round = { vars, apply: round };
    return;
  }
  const store = new Bf16Store(vars.values());
  optimizer.round = {
    vars,
    apply: (name, v, step) => {
      round(name, v, step);
      store.commit(v); // the rounded values are bf16-exact: their upper halves are kept, the float32 array dropped
    },
    dispose: () => store.dispose(),
  };
}
