/**
 * @file Native layout, reduction and unary kernels — where the stock pure-JS ones took most of
 * an SD1.5 UNet step once conv and matmul were native (profile of fwd+bwd at 32×32 latents:
 * Sum 9.0 s, PadV2 3.0 s, Transpose 2.8 s, Mean 2.5 s, SplitV 1.7 s, Unpack 0.9 s, Neg, Erf,
 * Sigmoid, Exp, Square). Transpose, Slice (non-contiguous), SplitV, Unpack, PadV2 and Concat are one
 * strided copy each (exact); Sum and Mean sum in double like the stock loop (kernels/Sum.js;
 * Mean divides each element by the count first, as kernels/Mean.js does); the unary kernels
 * evaluate the stock formulas (in double where the stock one rounds from double). Anything
 * but float32 falls back to the stock kernel.
 */
import { tf } from '../tf.ts';
import type { NativeAddon } from './addon.ts';
import type { CpuBackend, StockLookup } from './kernels.ts';
import { outputArray } from './output.ts';

type KernelFunc = tf.KernelFunc;
type TensorInfo = tf.TensorInfo;

function f32(backend: CpuBackend, t: TensorInfo): Float32Array | undefined {
  if (t.dtype !== 'float32') return undefined;
  const v = backend.data.get(t.dataId).values;
  return v instanceof Float32Array ? v : undefined;
}

const contiguousStrides = (shape: number[]) => {
  const st = new Array<number>(shape.length);
  for (let d = shape.length - 1, s = 1; d >= 0; d--) (st[d] = s), (s *= shape[d]!);
  return st;
};

/** A copy of `shape` with per-dim strides, size-1 dims dropped and mergeable neighbours merged. */
export function copyLayout(shape: number[], src: number[], dst: number[]) {
  const dims: Array<[number, number, number]> = [];
  for (let d = 0; d < shape.length; d++) {
    if (shape[d] === 1) continue;
    const last = dims[dims.length - 1];
    if (last && last[1] === src[d]! * shape[d]! && last[2] === dst[d]! * shape[d]!) {
      last[0] *= shape[d]!;
      last[1] = src[d]!;
      last[2] = dst[d]!;
    } else dims.push([shape[d]!, src[d]!, dst[d]!]);
  }
  if (dims.length === 0) dims.push([1, 1, 1]);
  return dims;
}

/** Copies the block `shape` of src (strides, offset) into dst (strides, offset). */
function copy(addon: NativeAddon, src: Float32Array, dst: Float32Array, shape: number[], ss: number[], ds: number[], so = 0, dO = 0) {
  if (shape.some((s) => s === 0)) return;
  const dims = copyLayout(shape, ss, ds);
  addon.copy(src, dst, Float64Array.from(dims, (d) => d[0]), Float64Array.from(dims, (d) => d[1]), Float64Array.from(dims, (d) => d[2]), so, dO);
}

/** Groups of x's dims (size-1 dropped, same-kind neighbours merged) and whether each is reduced. */
export function reduceGroups(shape: number[], axes: number[]) {
  const sizes: number[] = [], reduced: number[] = [];
  shape.forEach((s, d) => {
    if (s === 1) return;
    const r = axes.includes(d) ? 1 : 0;
    if (reduced.length && reduced[reduced.length - 1] === r) sizes[sizes.length - 1]! *= s;
    else sizes.push(s), reduced.push(r);
  });
  if (sizes.length === 0) sizes.push(1), reduced.push(1);
  return { sizes: Float64Array.from(sizes), reduced: Float64Array.from(reduced) };
}

export function layoutKernelFuncs(addon: NativeAddon, stock: StockLookup): Record<string, KernelFunc> {
  const reduce = (name: 'Sum' | 'Mean'): KernelFunc => (args) => {
    const backend = args.backend as CpuBackend;
    const x = args.inputs.x!;
    const xv = f32(backend, x);
    if (!xv) return stock(name)(args);
    const { axis, keepDims } = args.attrs as { axis: number | number[]; keepDims: boolean };
    const axes = tf.util.parseAxisParam(axis, x.shape);
    const [outShape, reduceShape] = tf.backend_util.computeOutAndReduceShapes(x.shape, axes);
    const out = outputArray(tf.util.sizeFromShape(outShape));
    const { sizes, reduced } = reduceGroups(x.shape, axes);
    addon.reduceSum(xv, out, sizes, reduced, name === 'Mean' ? tf.util.sizeFromShape(reduceShape) : 1);
    const shape = keepDims ? tf.backend_util.expandShapeToKeepDim(outShape, axes) : outShape;
    return backend.makeTensorInfo(shape, 'float32', out);
  };
  const transpose: KernelFunc = (args) => {
    const backend = args.backend as CpuBackend;
    const x = args.inputs.x!;
    const xv = f32(backend, x);
    if (!xv) return stock('Transpose')(args);
    const perm = (args.attrs as { perm: number[] }).perm;
    const outShape = perm.map((p) => x.shape[p]!);
    const xs = contiguousStrides(x.shape);
    const out = outputArray(xv.length);
    copy(addon, xv, out, outShape, perm.map((p) => xs[p]!), contiguousStrides(outShape));
    return backend.makeTensorInfo(outShape, 'float32', out);
  };
  /** Slices of x along `axis` with the given sizes, each a new contiguous tensor. */
  const split = (backend: CpuBackend, x: TensorInfo, xv: Float32Array, axis: number, sizes: number[], squeeze: boolean) => {
    const xs = contiguousStrides(x.shape);
    let start = 0;
    return sizes.map((n) => {
      const shape = x.shape.map((s, d) => (d === axis ? n : s));
      const out = outputArray(tf.util.sizeFromShape(shape));
      copy(addon, xv, out, shape, xs, contiguousStrides(shape), start * xs[axis]!);
      start += n;
      return backend.makeTensorInfo(squeeze ? shape.filter((_, d) => d !== axis) : shape, 'float32', out);
    });
  };
  const splitV: KernelFunc = (args) => {
    const backend = args.backend as CpuBackend;
    const x = args.inputs.x!;
    const xv = f32(backend, x);
    if (!xv) return stock('SplitV')(args);
    const attrs = args.attrs as { numOrSizeSplits: number | number[]; axis: number };
    const axis = tf.util.parseAxisParam(attrs.axis, x.shape)[0]!;
    const sizes = tf.backend_util.prepareSplitSize(x as tf.Tensor, attrs.numOrSizeSplits, axis);
    return split(backend, x, xv, axis, sizes, false);
  };
  const unpack: KernelFunc = (args) => {
    const backend = args.backend as CpuBackend;
    const x = args.inputs.value!;
    const xv = f32(backend, x);
    if (!xv) return stock('Unpack')(args);
    let axis = (args.attrs as { axis: number }).axis;
    if (axis < 0) axis += x.shape.length;
    return split(backend, x, xv, axis, new Array<number>(x.shape[axis]!).fill(1), true);
  };
  const padV2: KernelFunc = (args) => {
    const backend = args.backend as CpuBackend;
    const x = args.inputs.x!;
    const xv = f32(backend, x);
    if (!xv) return stock('PadV2')(args);
    const { paddings, constantValue } = args.attrs as { paddings: Array<[number, number]>; constantValue: number };
    const outShape = x.shape.map((s, d) => paddings[d]![0] + s + paddings[d]![1]);
    const out = new Float32Array(tf.util.sizeFromShape(outShape));
    if (constantValue !== 0) out.fill(constantValue);
    const os = contiguousStrides(outShape);
    const offset = paddings.reduce((o, [before], d) => o + before * os[d]!, 0);
    copy(addon, xv, out, x.shape, contiguousStrides(x.shape), os, 0, offset);
    return backend.makeTensorInfo(outShape, 'float32', out);
  };
  /** Non-contiguous float32 slices (e.g. one head's columns); contiguous ones stay stock views. */
  const slice: KernelFunc = (args) => {
    const backend = args.backend as CpuBackend;
    const x = args.inputs.x!;
    const xv = f32(backend, x);
    const attrs = args.attrs as { begin: number | number[]; size: number | number[] };
    const [begin, size] = tf.slice_util.parseSliceParams(x as tf.Tensor, attrs.begin, attrs.size);
    if (!xv || tf.slice_util.isSliceContinous(x.shape, begin, size)) return stock('Slice')(args);
    tf.slice_util.assertParamsValid(x as tf.Tensor, begin, size);
    const xs = contiguousStrides(x.shape);
    const out = outputArray(tf.util.sizeFromShape(size));
    copy(addon, xv, out, size, xs, contiguousStrides(size), begin.reduce((o, b, d) => o + b * xs[d]!, 0));
    return backend.makeTensorInfo(size, 'float32', out);
  };
  /** Float32 Concat: each input copied into its columns of the output seen as [outer, Σ inner] (the stock kernel loops in JS). */
  const concat: KernelFunc = (args) => {
    const backend = args.backend as CpuBackend;
    const inputs = args.inputs as unknown as TensorInfo[];
    const values = inputs.map((t) => f32(backend, t));
    if (inputs.length === 0 || values.some((v) => !v)) return stock('Concat')(args);
    const shapes = inputs.map((t) => t.shape);
    const axis = tf.util.parseAxisParam((args.attrs as { axis: number | number[] }).axis, shapes[0]!)[0]!;
    tf.backend_util.assertParamsConsistent(shapes, axis);
    const outShape = tf.backend_util.computeOutShape(shapes, axis);
    const out = outputArray(tf.util.sizeFromShape(outShape));
    const outer = tf.util.sizeFromShape(outShape.slice(0, axis)), outInner = tf.util.sizeFromShape(outShape.slice(axis));
    let column = 0;
    inputs.forEach((t, i) => {
      const inner = tf.util.sizeFromShape(t.shape.slice(axis));
      copy(addon, values[i]!, out, [outer, inner], [inner, 1], [outInner, 1], 0, column);
      column += inner;
    });
    return backend.makeTensorInfo(outShape, 'float32', out);
  };
  const unary = (name: string, op: number): KernelFunc => (args) => {
    const backend = args.backend as CpuBackend;
    const x = args.inputs.x!;
    const xv = f32(backend, x);
    if (!xv) return stock(name)(args);
    const out = outputArray(xv.length);
    addon.unary(op, xv, out);
    return backend.makeTensorInfo(x.shape, 'float32', out);
  };
  return {
    Sum: reduce('Sum'), Mean: reduce('Mean'), Transpose: transpose, Slice: slice, SplitV: splitV, Unpack: unpack, PadV2: padV2, Concat: concat,
    Neg: unary('Neg', 0), Exp: unary('Exp', 1), Sigmoid: unary('Sigmoid', 2), Erf: unary('Erf', 3),
    Square: unary('Square', 4), Sqrt: unary('Sqrt', 5),
  };
}
