/**
 * @file Native elementwise kernels where the stock pure-JS ones dominate attention: Softmax
 * (last axis; the stock kernel runs max, sub, exp, sum and div as five kernels) and the
 * broadcasting float32 Add, Sub, Multiply, RealDiv (exact in float32, so bit-identical to stock).
 */
import { tf } from '../tf.ts';
import type { NativeAddon } from './addon.ts';
import { outputArray } from './output.ts';
import type { CpuBackend, StockLookup } from './kernels.ts';

type KernelFunc = tf.KernelFunc;

function f32(backend: CpuBackend, t: tf.TensorInfo): Float32Array | undefined {
  if (t.dtype !== 'float32') return undefined;
  const v = backend.data.get(t.dataId).values;
  return v instanceof Float32Array ? v : undefined;
}

/**
 * The broadcast of a and b as (shape, aStrides, bStrides) with size-1 dimensions dropped and
 * adjacent dimensions merged where both operands allow it (often down to one or two dims).
 */
export function broadcastLayout(aShape: number[], bShape: number[], outShape: number[]) {
  const rank = outShape.length;
  const strides = (shape: number[]) => {
    const padded = [...new Array<number>(rank - shape.length).fill(1), ...shape];
    const st = new Array<number>(rank).fill(0);
    for (let d = rank - 1, s = 1; d >= 0; d--) {
      st[d] = padded[d] === 1 ? 0 : s;
      s *= padded[d]!;
    }
    return st;
  };
  const as = strides(aShape), bs = strides(bShape);
  const dims: Array<[number, number, number]> = [];
  for (let d = 0; d < rank; d++) {
    if (outShape[d] === 1) continue;
    const last = dims[dims.length - 1];
    if (last && last[1] === as[d]! * outShape[d]! && last[2] === bs[d]! * outShape[d]!) {
      last[0] *= outShape[d]!;
      last[1] = as[d]!;
      last[2] = bs[d]!;
    } else {
      dims.push([outShape[d]!, as[d]!, bs[d]!]);
    }
  }
  if (dims.length === 0) dims.push([1, 0, 0]);
  return {
    shape: Float64Array.from(dims.map((d) => d[0])),
    aStrides: Float64Array.from(dims.map((d) => d[1])),
    bStrides: Float64Array.from(dims.map((d) => d[2])),
  };
}

export function elementwiseKernelFuncs(addon: NativeAddon, stock: StockLookup): Record<string, KernelFunc> {
  const softmax: KernelFunc = (args) => {
    const backend = args.backend as CpuBackend;
    const logits = args.inputs.logits!;
    const dim = (args.attrs as { dim: number }).dim;
    const x = f32(backend, logits);
    const rank = logits.shape.length;
    if (!x || rank === 0 || (dim !== -1 && dim !== rank - 1)) return stock('Softmax')(args);
    const n = logits.shape[rank - 1]!;
    const y = outputArray(x.length);
    addon.softmax(x, y, n === 0 ? 0 : x.length / n, n);
    return backend.makeTensorInfo(logits.shape, 'float32', y);
  };
  const binary = (name: string, op: number): KernelFunc => (args) => {
    const backend = args.backend as CpuBackend;
    const { a, b } = args.inputs;
    const av = f32(backend, a!), bv = f32(backend, b!);
    if (!av || !bv) return stock(name)(args);
    const outShape = tf.broadcast_util.assertAndGetBroadcastShape(a!.shape, b!.shape);
    const out = outputArray(outShape.reduce((x, y) => x * y, 1));
    const l = broadcastLayout(a!.shape, b!.shape, outShape);
    addon.binary(op, av, bv, out, l.shape, l.aStrides, l.bStrides);
    return backend.makeTensorInfo(outShape, 'float32', out);
  };
  return { Softmax: softmax, Add: binary('Add', 0), Sub: binary('Sub', 1), Multiply: binary('Multiply', 2), RealDiv: binary('RealDiv', 3) };
}
