/**
 * @file Fused normalisation and activation ops: GroupNorm (optionally followed by SiLU, as in
 * every ldm ResBlock and the UNet/VAE heads), LayerNorm over the last axis, SiLU and exact GELU.
 * On the cpu-native backend each is one native kernel forward and one backward
 * (native/src/norm.cc) under a tf.customGrad, instead of the 6–10 elementwise ops (and their
 * autodiff backward) of the TF-ops versions; the backward keeps only x and the per-group/row
 * mean and 1/std. On the webgpu backend GroupNorm(+SiLU) is the same two kernels as WGSL shaders
 * (backend/webgpu/group-norm.ts). Every other backend runs the TF-ops versions below, which are also the
 * reference the tests compare against. Formulas: torch.nn.GroupNorm / LayerNorm (biased
 * variance), torch.nn.SiLU, torch.nn.GELU (erf).
 */
import { currentBackend, tf, type Tensor } from '../backend/tf.ts';
import { loadAddon, type NativeAddon } from '../backend/native/addon.ts';
import { outputArray } from '../backend/native/output.ts';
import type { CpuBackend } from '../backend/native/kernels.ts';

type Required<T> = { [K in keyof T]-?: T[K] };
type NormAddon = Required<Pick<NativeAddon, 'groupNormForward' | 'groupNormBackward' | 'layerNormForward' | 'layerNormBackward' | 'activationForward' | 'activationBackward'>>;

let enabled = process.env.SIDETRAIN_FUSED !== '0';
let registered: NormAddon | undefined;

/** Turns the native fused ops on or off (the TF-ops versions run when off); returns the previous setting. */
export function setFusedKernels(on: boolean): boolean {
  const was = enabled;
  enabled = on;
  return was;
}

/** The addon when the fused native kernels can run here (cpu-native backend, addon with norm kernels), else undefined. */
function nativeNorm(): NormAddon | undefined {
  if (!enabled || currentBackend()?.name !== 'cpu-native' || tf.getBackend() !== 'cpu') return undefined;
  if (registered) return registered;
  let addon: NativeAddon;
  try {
    addon = loadAddon();
  } catch {
    return undefined;
  }
  if (!addon.groupNormForward || !addon.layerNormForward || !addon.activationForward) return undefined;
  registered = addon as NormAddon;
  registerKernels(registered);
  return registered;
}

/** Whether the webgpu backend runs `kernel` as its own shader (backend/webgpu/group-norm.ts). */
function onWebgpu(kernel: string): boolean {
  return enabled && currentBackend()?.name === 'webgpu' && tf.getBackend() === 'webgpu' && tf.getKernel(kernel, 'webgpu') !== undefined;
}

const f32 = (backend: CpuBackend, t: tf.TensorInfo): Float32Array => {
  const v = backend.data.get(t.dataId).values;
  if (!(v instanceof Float32Array)) throw new Error('fused kernels: float32 CPU tensors expected');
  return v;
};
const sizeOf = (shape: number[]) => shape.reduce((a, b) => a * b, 1);

interface NormAttrs { groups: number; eps: number; silu: boolean }

/** The CPU-backend kernels the customGrads below run (names prefixed so they clash with no TF.js kernel). */
function registerKernels(addon: NormAddon): void {
  const kernels: Record<string, tf.KernelFunc> = {
    SidetrainGroupNorm: ({ inputs, backend, attrs }) => {
      const be = backend as CpuBackend, { x, weight, bias } = inputs as Record<string, tf.TensorInfo>;
      const { groups, eps, silu } = attrs as unknown as NormAttrs;
      const [b, h, w, c] = x!.shape as [number, number, number, number];
      const y = outputArray(sizeOf(x!.shape)), mean = outputArray(b * groups), rstd = outputArray(b * groups);
      addon.groupNormForward(f32(be, x!), f32(be, weight!), f32(be, bias!), y, mean, rstd, Float64Array.of(b, h * w, c, groups), eps, silu);
      return [be.makeTensorInfo(x!.shape, 'float32', y), be.makeTensorInfo([b, groups], 'float32', mean), be.makeTensorInfo([b, groups], 'float32', rstd)];
    },
    SidetrainGroupNormGrad: ({ inputs, backend, attrs }) => {
      const be = backend as CpuBackend, { dy, x, mean, rstd, weight, bias } = inputs as Record<string, tf.TensorInfo>;
      const { groups, silu } = attrs as unknown as NormAttrs;
      const [b, h, w, c] = x!.shape as [number, number, number, number];
      const dx = outputArray(sizeOf(x!.shape)), dw = outputArray(c), db = outputArray(c);
      addon.groupNormBackward(
        f32(be, dy!), f32(be, x!), f32(be, mean!), f32(be, rstd!), f32(be, weight!), f32(be, bias!), dx, dw, db,
        Float64Array.of(b, h * w, c, groups), silu,
      );
      return [be.makeTensorInfo(x!.shape, 'float32', dx), be.makeTensorInfo(weight!.shape, 'float32', dw), be.makeTensorInfo(bias!.shape, 'float32', db)];
    },
    SidetrainLayerNorm: ({ inputs, backend, attrs }) => {
      const be = backend as CpuBackend, { x, weight, bias } = inputs as Record<string, tf.TensorInfo>;
      const n = x!.shape[x!.shape.length - 1]!, rows = sizeOf(x!.shape) / n;
      const y = outputArray(rows * n), mean = outputArray(rows), rstd = outputArray(rows);
      addon.layerNormForward(f32(be, x!), f32(be, weight!), f32(be, bias!), y, mean, rstd, rows, n, (attrs as unknown as NormAttrs).eps);
      return [be.makeTensorInfo(x!.shape, 'float32', y), be.makeTensorInfo([rows], 'float32', mean), be.makeTensorInfo([rows], 'float32', rstd)];
    },
    SidetrainLayerNormGrad: ({ inputs, backend }) => {
      const be = backend as CpuBackend, { dy, x, mean, rstd, weight, bias } = inputs as Record<string, tf.TensorInfo>;
      const n = x!.shape[x!.shape.length - 1]!, rows = sizeOf(x!.shape) / n;
      const dx = outputArray(rows * n), dw = outputArray(n), db = outputArray(n);
      addon.layerNormBackward(f32(be, dy!), f32(be, x!), f32(be, mean!), f32(be, rstd!), f32(be, weight!), dx, dw, db, rows, n);
      return [be.makeTensorInfo(x!.shape, 'float32', dx), be.makeTensorInfo(weight!.shape, 'float32', dw), be.makeTensorInfo(bias!.shape, 'float32', db)];
    },
    SidetrainActivation: ({ inputs, backend, attrs }) => {
      const be = backend as CpuBackend, x = inputs.x!;
      const y = outputArray(sizeOf(x.shape));
      addon.activationForward((attrs as { op: number }).op, f32(be, x), y);
      return be.makeTensorInfo(x.shape, 'float32', y);
    },
    SidetrainActivationGrad: ({ inputs, backend, attrs }) => {
      const be = backend as CpuBackend, { dy, x } = inputs as Record<string, tf.TensorInfo>;
      const dx = outputArray(sizeOf(x!.shape));
      addon.activationBackward((attrs as { op: number }).op, f32(be, dy!), f32(be, x!), dx);
      return be.makeTensorInfo(x!.shape, 'float32', dx);
    },
  };
  for (const [kernelName, kernelFunc] of Object.entries(kernels)) {
    if (!tf.getKernel(kernelName, 'cpu')) tf.registerKernel({ kernelName, backendName: 'cpu', kernelFunc });
  }
}

const run = (name: string, inputs: Record<string, Tensor>, attrs: Record<string, number | boolean> = {}) =>
  tf.engine().runKernel(name, inputs as unknown as tf.NamedTensorMap, attrs as unknown as tf.NamedAttrMap) as Tensor | Tensor[];

const allFloat32 = (...ts: Tensor[]) => ts.every((t) => t.dtype === 'float32');

// ---- the TF-ops versions (other backends; the tests' reference) ----------------------------

/** GroupNorm on NHWC x [B, H, W, C] with TF ops; weight and bias [C]. */
export function groupNormOps(x: Tensor, weight: Tensor, bias: Tensor, groups: number, eps: number): Tensor {
  const [b, h, w, c] = x.shape as [number, number, number, number];
  const grouped = x.reshape([b, h, w, groups, c / groups]); // [B, H, W, G, C/G]
  const { mean, variance } = tf.moments(grouped, [1, 2, 4], true);
  const normed = grouped.sub(mean).div(variance.add(eps).sqrt()).reshape([b, h, w, c]);
  return normed.mul(weight).add(bias);
}

/** LayerNorm over the last axis with TF ops; weight and bias [n]. */
export function layerNormOps(x: Tensor, weight: Tensor, bias: Tensor, eps: number): Tensor {
  const { mean, variance } = tf.moments(x, -1, true);
  return x.sub(mean).div(variance.add(eps).sqrt()).mul(weight).add(bias);
}

export const siluOps = (x: Tensor): Tensor => x.mul(tf.sigmoid(x));
export const geluOps = (x: Tensor): Tensor => x.mul(tf.erf(x.mul(Math.SQRT1_2)).add(1)).mul(0.5);

// ---- the fused ops -------------------------------------------------------------------------

/**
 * torch.nn.GroupNorm on NHWC x [B, H, W, C] (G groups, weight/bias [C]), followed by SiLU when
 * `silu` (ldm's `normalization(ch)` then `nn.SiLU()`).
 */
export function groupNormFused(x: Tensor, weight: Tensor, bias: Tensor, groups: number, eps: number, silu = false): Tensor {
  if (!(nativeNorm() || onWebgpu('SidetrainGroupNorm')) || x.rank !== 4 || !allFloat32(x, weight, bias)) {
    const y = groupNormOps(x, weight, bias, groups, eps);
    return silu ? siluOps(y) : y;
  }
  const op = tf.customGrad((xi, wi, bi, save) => {
    const [y, mean, rstd] = run('SidetrainGroupNorm', { x: xi as Tensor, weight: wi as Tensor, bias: bi as Tensor }, { groups, eps, silu }) as Tensor[];
    (save as tf.GradSaveFunc)([xi as Tensor, mean!, rstd!, wi as Tensor, bi as Tensor]);
    return {
      value: y!,
      gradFunc: (dy, [xs, m, r, w, b]) =>
        run('SidetrainGroupNormGrad', { dy: dy as Tensor, x: xs!, mean: m!, rstd: r!, weight: w!, bias: b! }, { groups, silu }) as Tensor[],
    };
  });
  return op(x, weight, bias);
}

/** torch.nn.LayerNorm over the last axis of x; weight and bias [n]. */
export function layerNormFused(x: Tensor, weight: Tensor, bias: Tensor, eps: number): Tensor {
  if (!nativeNorm() || !allFloat32(x, weight, bias)) return layerNormOps(x, weight, bias, eps);
  const op = tf.customGrad((xi, wi, bi, save) => {
    const [y, mean, rstd] = run('SidetrainLayerNorm', { x: xi as Tensor, weight: wi as Tensor, bias: bi as Tensor }, { eps }) as Tensor[];
    (save as tf.GradSaveFunc)([xi as Tensor, mean!, rstd!, wi as Tensor, bi as Tensor]);
    return {
      value: y!,
      gradFunc: (dy, [xs, m, r, w, b]) =>
        run('SidetrainLayerNormGrad', { dy: dy as Tensor, x: xs!, mean: m!, rstd: r!, weight: w!, bias: b! }) as Tensor[],
    };
  });
  return op(x, weight, bias);
}

function activation(op: number, x: Tensor, reference: (x: Tensor) => Tensor): Tensor {
  if (!nativeNorm() || x.dtype !== 'float32') return reference(x);
  const f = tf.customGrad((xi, save) => {
    (save as tf.GradSaveFunc)([xi as Tensor]);
    return {
      value: run('SidetrainActivation', { x: xi as Tensor }, { op }) as Tensor,
      gradFunc: (dy, [xs]) => run('SidetrainActivationGrad', { dy: dy as Tensor, x: xs! }, { op }) as Tensor,
    };
  });
  return f(x);
}

/** SiLU x·sigmoid(x). */
export const siluFused = (x: Tensor): Tensor => activation(0, x, siluOps);
/** Exact GELU x·Φ(x) = x·(1 + erf(x/√2))/2. */
export const geluFused = (x: Tensor): Tensor => activation(1, x, geluOps);
