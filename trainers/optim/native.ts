/**
 * @file The optimizers' native path: fused C++ kernels (native/src/optim.cc) that read the CPU
 * backend's own Float32Arrays (as trainers/backend/native/kernels.ts does) and write NEW arrays that are
 * wrapped as tensors and assigned to the variables — never a tensor's array mutated in place
 * (why: `await t.data()` on the CPU backend returns that very array, e.g. to an exported
 * optimizer state, and tensors may share it). One pass over param, grad and moments instead of
 * the ~10 (AdamW) to ~60 (8-bit AdamW) full-size passes of the TF-ops path.
 *
 * The choice is automatic: native when the backend is 'cpu-native' and the addon has the
 * optim kernels; the TF-ops path everywhere else (WASM, pure CPU, GPU). Tests switch it with
 * setNativeOptim(false) to compare both.
 */
import { tf, currentBackend, type Tensor } from '../backend/tf.ts';
import { loadAddon, type NativeAddon } from '../backend/native/addon.ts';
import { storedValues } from '../nets/bf16-store.ts';

export type OptimKernels = Required<Pick<NativeAddon, 'adamwStep' | 'adamw8bitStep' | 'emaUpdate' | 'finiteWithin' | 'sumSquares'>>;

let enabled = true;

/** Turn the native path off (true = automatic again). For tests and benches. */
export function setNativeOptim(on: boolean): void {
  enabled = on;
}

/** The addon's optim kernels when they apply to the current backend, else undefined. */
export function optimKernels(): OptimKernels | undefined {
  if (!enabled || currentBackend()?.name !== 'cpu-native' || tf.getBackend() !== 'cpu') return undefined;
  let addon: NativeAddon;
  try {
    addon = loadAddon();
  } catch {
    return undefined;
  }
  return addon.adamwStep && addon.adamw8bitStep && addon.emaUpdate && addon.finiteWithin && addon.sumSquares ? (addon as OptimKernels) : undefined;
}

interface CpuBackend {
  data: { get(dataId: object): { values?: unknown } };
}

/**
 * A float32 CPU tensor's own values (read only!), or undefined when it has none on the host. A
 * weight held as bf16 bits (nets/bf16-store.ts) gives a decoded copy when it is not resident.
 */
export function hostValues(t: Tensor): Float32Array | undefined {
  if (t.dtype !== 'float32' || tf.getBackend() !== 'cpu') return undefined;
  const stored = storedValues(t);
  if (stored) return stored;
  const v = (tf.backend() as unknown as CpuBackend).data.get(t.dataId).values;
  return v instanceof Float32Array && v.length === t.size ? v : undefined;
}

/** Make `values` (a new array, owned from now on by the variable) the variable's value. */
export function assignValues(variable: tf.Variable, values: Float32Array): void {
  const t = tf.tensor(values, variable.shape, 'float32');
  variable.assign(t);
  t.dispose();
}

/** AdamW's float32 constants in the order adamwStep takes them (the TF-ops path rounds the same numbers). */
export function adamwConstants(lr: number, wd: number, betas: [number, number], eps: number, bc1: number, bc2Sqrt: number): Float32Array {
  return Float32Array.from([wd !== 0 ? 1 - lr * wd : 1, betas[0], 1 - betas[0], betas[1], 1 - betas[1], bc2Sqrt, eps, -lr / bc1]);
}

/**
 * AdamW on the host arrays of p, g and the float32 moments m, v (new arrays assigned to the
 * variables); false when a tensor has no host values (the caller then uses TF ops).
 */
export function nativeAdamw(kernels: OptimKernels, p: tf.Variable, g: Tensor, m: tf.Variable, v: tf.Variable, k: Float32Array): boolean {
  const pv = hostValues(p), gv = hostValues(g), mv = hostValues(m), vv = hostValues(v);
  if (!pv || !gv || !mv || !vv) return false;
  const n = pv.length;
  const [pOut, mOut, vOut] = [new Float32Array(n), new Float32Array(n), new Float32Array(n)];
  kernels.adamwStep(pv, gv, mv, vv, pOut, mOut, vOut, k);
  assignValues(p, pOut);
  assignValues(m, mOut);
  assignValues(v, vOut);
  return true;
}

/** Adafactor's state of one parameter (trainers/optim/adafactor.ts), all float32, torch layout. */
export interface AdafactorSlotVars {
  row?: tf.Variable;
  col?: tf.Variable;
  v?: tf.Variable;
  m?: tf.Variable;
}

/**
 * [d0, d1, R, C] and the strides of those torch dims in the TF-layout parameter: 4-D conv filters
 * are TF [kh,kw,in,out] = torch [out,in,kh,kw]; undefined for ranks the kernel does not take.
 */
function adafactorView(shape: number[]): [number[], number[]] | undefined {
  if (shape.length === 1) return [[1, 1, shape[0]!, 1], [0, 0, 1, 1]];
  if (shape.length === 2) return [[1, 1, shape[0]!, shape[1]!], [0, 0, shape[1]!, 1]];
  if (shape.length === 3) return [[1, shape[0]!, shape[1]!, shape[2]!], [0, shape[1]! * shape[2]!, shape[2]!, 1]];
  if (shape.length === 4) {
    const [kh, kw, cin, cout] = shape as [number, number, number, number];
    return [[cout, cin, kh, kw], [1, cout, kw * cin * cout, cin * cout]];
  }
  return undefined;
}

/**
 * Adafactor on host arrays (new arrays assigned to p and the slot's variables); k as
 * NativeAddon.adafactorStep takes it. False when it does not apply (the caller then uses TF ops).
 */
export function nativeAdafactor(p: tf.Variable, g: Tensor, s: AdafactorSlotVars, k: Float32Array, scaleParameter: boolean): boolean {
  const step = enabled ? optimKernels() && loadAddon().adafactorStep : undefined;
  const view = adafactorView(p.shape);
  if (!step || !view) return false;
  const factored = !!(s.row && s.col);
  const stats = factored ? [s.row!, s.col!] : [s.v!];
  const ins = [p, g, ...stats, ...(s.m ? [s.m] : [])].map(hostValues);
  if (ins.some((x) => !x)) return false;
  const [pv, gv] = ins as Float32Array[];
  const rowV = ins[2]!, colV = factored ? ins[3]! : new Float32Array(0), mV = s.m ? ins[ins.length - 1]! : new Float32Array(0);
  const [pOut, rowOut, colOut, mOut] = [pv!, rowV, colV, mV].map((x) => new Float32Array(x.length)) as Float32Array[];
  const flags = (factored ? 1 : 0) | (scaleParameter ? 2 : 0) | (s.m ? 4 : 0) | (k[8] !== 0 ? 8 : 0);
  step(pv!, gv!, rowV, colV, mV, pOut!, rowOut!, colOut!, mOut!, Float64Array.from(view[0]), Float64Array.from(view[1]), k, flags);
  assignValues(p, pOut!);
  assignValues(factored ? s.row! : s.v!, rowOut!);
  if (factored) assignValues(s.col!, colOut!);
  if (s.m) assignValues(s.m, mOut!);
  return true;
}

/** Blockwise 8-bit moments as trainers/optim/adamw8bit.ts keeps them. */
interface PackedMoment {
  packed: tf.Variable;
  absmax: tf.Variable;
}

/**
 * 8-bit AdamW on host arrays: dequantise, update, requantise with the code books `books`
 * ([signed code, signed mids, unsigned code, unsigned mids], 1022 values) — the same codes as
 * the TF-ops path. False when a tensor has no host values.
 */
export function nativeAdamw8bit(
  kernels: OptimKernels, p: tf.Variable, g: Tensor, m: PackedMoment, v: PackedMoment, books: Float32Array, k: Float32Array, blockSize: number,
): boolean {
  const ins = [p, g, m.packed, m.absmax, v.packed, v.absmax].map(hostValues);
  if (ins.some((x) => !x)) return false;
  const [pv, gv, mp, ma, vp, va] = ins as Float32Array[];
  const outs = [pv!, mp!, ma!, vp!, va!].map((x) => new Float32Array(x.length));
  const [pOut, mpOut, maOut, vpOut, vaOut] = outs as [Float32Array, Float32Array, Float32Array, Float32Array, Float32Array];
  kernels.adamw8bitStep(pv!, gv!, mp!, ma!, vp!, va!, pOut, mpOut, maOut, vpOut, vaOut, books, k, blockSize);
  [p, m.packed, m.absmax, v.packed, v.absmax].forEach((t, i) => assignValues(t, outs[i]!));
  return true;
}
