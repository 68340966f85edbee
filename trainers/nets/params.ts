/**
 * @file Named parameters: a map from checkpoint key to tensor. Keys are the checkpoint's own
 * (`model.diffusion_model.input_blocks.1.0.in_layers.2.weight`), so loading is one pass and a
 * gradient can be named by the key it belongs to.
 *
 * Layout rule (the one place it is applied): 4-D tensors are Conv2d filters and are stored in
 * TF.js layout [kh, kw, in, out] (PyTorch has [out, in, kh, kw]); everything else keeps the
 * checkpoint's shape, Linear weights included ([out, in], applied with transposeB).
 */
import { tf, type Tensor } from '../backend/tf.ts';
import type { TensorSource } from '../io/types.ts';

export type Params = Map<string, Tensor>;

/** PyTorch [out, in, kh, kw] → TF.js [kh, kw, in, out]. */
export const TORCH_TO_TF_CONV = [2, 3, 1, 0];
/** TF.js [kh, kw, in, out] → PyTorch [out, in, kh, kw]. */
export const TF_TO_TORCH_CONV = [3, 2, 0, 1];

/** Make a parameter tensor from checkpoint values and the checkpoint (PyTorch) shape. */
export function paramFromTorch(values: Float32Array, shape: number[]): Tensor {
  return tf.tidy(() => {
    const t = tf.tensor(values, shape, 'float32');
    return shape.length === 4 ? t.transpose(TORCH_TO_TF_CONV) : t;
  });
}

/** A parameter (or its gradient) back in the checkpoint's (PyTorch) layout. */
export function paramToTorch(t: Tensor): Tensor {
  return t.rank === 4 ? tf.transpose(t, TF_TO_TORCH_CONV) : t.clone();
}

/**
 * Load every key of `source` that starts with one of `prefixes` (and is not skipped).
 * Keys keep their full names.
 */
export async function loadParams(
  source: TensorSource,
  prefixes: string[],
  skip: (key: string) => boolean = () => false,
): Promise<Params> {
  const params: Params = new Map();
  for (const key of source.keys()) {
    if (!prefixes.some((p) => key.startsWith(p)) || skip(key)) continue;
    const { shape } = source.info(key);
    params.set(key, paramFromTorch(await source.read(key), shape));
  }
  return params;
}

/** The tensor for `key`, or an error naming the key (a missing weight is never silently zero). */
export function param(params: Params, key: string): Tensor {
  const t = params.get(key);
  if (!t) throw new Error(`missing weight '${key}'`);
  return t;
}

export function disposeParams(params: Params): void {
  // a float16 store (half-params.ts HalfParams) frees its own bits; iterating would upcast each first
  const own = (params as Params & { dispose?: () => void }).dispose;
  if (typeof own === 'function') return own.call(params);
  for (const t of params.values()) t.dispose();
  params.clear();
}
