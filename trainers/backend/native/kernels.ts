/**
 * @file TF.js CPU-backend kernels that run in the native addon: Conv2D, Conv2DBackpropInput,
 * Conv2DBackpropFilter, BatchMatMul, and the fused variants (_FusedMatMul, FusedConv2D: the
 * stock ones call the pure-JS conv/matmul directly, so they are replaced too; bias and
 * activation still run on the stock kernels). They read and write the CPU backend's own
 * Float32Arrays (`backend.data.get(dataId).values`, `backend.makeTensorInfo`), so tensors stay
 * ordinary CPU tensors with no heap limit but RAM. Anything the addon does not cover
 * (non-float32, NCHW) falls back to the stock kernel, as tfjs-backend-cpu 4.22 implements it
 * (kernels/Conv2D.js etc.). Under bf16 precision (../precision.ts) conv2d, its input gradient and
 * matmul run the bf16 × bf16 → float32 kernels; the filter gradient stays float32.
 */
import { tf } from '../tf.ts';
import type { NativeAddon } from './addon.ts';
import { outputArray } from './output.ts';
import { computePrecision } from '../precision.ts';

type TensorInfo = tf.TensorInfo;
type KernelFunc = tf.KernelFunc;
type Conv2DInfo = ReturnType<typeof tf.backend_util.computeConv2DInfo>;

/** The parts of tfjs-backend-cpu's MathBackendCPU the kernels use. */
export interface CpuBackend {
  data: { get(dataId: object): { values?: unknown } };
  makeTensorInfo(shape: number[], dtype: tf.DataType, values?: Float32Array): TensorInfo;
  disposeIntermediateTensorInfo(info: TensorInfo): void;
}
type KernelArgs = Parameters<KernelFunc>[0];

/** Stock kernels by name, for fallbacks and for bias/activation of the fused kernels. */
export type StockLookup = (kernelName: string) => KernelFunc;

function f32(backend: CpuBackend, t: TensorInfo): Float32Array | undefined {
  if (t.dtype !== 'float32') return undefined;
  const v = backend.data.get(t.dataId).values;
  return v instanceof Float32Array ? v : undefined;
}

const size = (shape: number[]) => shape.reduce((a, b) => a * b, 1);
const same = (a: number[], b: number[]) => a.length === b.length && a.every((d, i) => d === b[i]);

/** The Int32Array layout of native/src/kernels.h ConvShape. */
function convShape(ci: Conv2DInfo): Int32Array {
  return Int32Array.from([
    ci.batchSize, ci.inHeight, ci.inWidth, ci.inChannels, ci.outHeight, ci.outWidth, ci.outChannels,
    ci.filterHeight, ci.filterWidth, ci.strideHeight, ci.strideWidth, ci.dilationHeight, ci.dilationWidth,
    ci.padInfo.top, ci.padInfo.left,
  ]);
}

interface ConvAttrs {
  strides: number | [number, number];
  pad: 'same' | 'valid' | number | tf.backend_util.ExplicitPadding;
  dataFormat?: 'NHWC' | 'NCHW';
  dilations?: number | [number, number];
  dimRoundingMode?: 'floor' | 'round' | 'ceil';
}

const as4 = (s: number[]) => s as [number, number, number, number];

function conv2dInfo(xShape: number[], wShape: number[], a: ConvAttrs, dilations: ConvAttrs['dilations'] = 1) {
  return tf.backend_util.computeConv2DInfo(as4(xShape), as4(wShape), a.strides, dilations, a.pad, a.dimRoundingMode, false, 'channelsLast');
}

/** y = conv2d(x, filter), or undefined when the addon does not cover the case. */
function nativeConv2D(addon: NativeAddon, backend: CpuBackend, x: TensorInfo, filter: TensorInfo, attrs: ConvAttrs) {
  const xv = f32(backend, x), wv = f32(backend, filter);
  if (!xv || !wv || attrs.dataFormat === 'NCHW' || x.shape.length !== 4) return undefined;
  const info = conv2dInfo(x.shape, filter.shape, attrs, attrs.dilations ?? 1);
  const y = outputArray(size(info.outShape));
  addon.conv2d(xv, wv, y, convShape(info), computePrecision() === 'bf16');
  return backend.makeTensorInfo(info.outShape, 'float32', y);
}

/** Applies the fused bias and activation with the stock kernels, disposing intermediates. */
function biasActivation(stock: StockLookup, backend: CpuBackend, result: TensorInfo, inputs: KernelArgs['inputs'], attrs: tf.NamedAttrMap) {
  const step = (next: TensorInfo) => {
    backend.disposeIntermediateTensorInfo(result);
    result = next;
  };
  if (inputs.bias) step(stock('Add')({ inputs: { a: result, b: inputs.bias }, backend }) as TensorInfo);
  const act = attrs.activation as string | undefined;
  if (act && act !== 'linear') {
    const names: Record<string, string> = { relu: 'Relu', relu6: 'Relu6', elu: 'Elu', sigmoid: 'Sigmoid', leakyrelu: 'LeakyRelu', prelu: 'Prelu' };
    const name = names[act];
    if (!name) throw new Error(`Activation ${act} has not been implemented for the CPU backend.`);
    const actInputs = act === 'prelu' ? { x: result, alpha: inputs.preluActivationWeights! } : { x: result };
    step(stock(name)({ inputs: actInputs, backend, attrs: { alpha: attrs.leakyreluAlpha as number } }) as TensorInfo);
  }
  return result;
}

/** Batch offsets of a and b for each batch of the broadcast output (numpy broadcasting). */
function batchOffsets(aOuter: number[], bOuter: number[], outOuter: number[], aMat: number, bMat: number) {
  const count = size(outOuter);
  const aOff = new Float64Array(count), bOff = new Float64Array(count);
  const offset = (outer: number[], idx: number[]) => {
    let off = 0;
    const shift = outer.length - idx.length;
    for (let d = 0; d < outer.length; d++) off = off * outer[d]! + (outer[d] === 1 ? 0 : idx[d - shift]!);
    return off;
  };
  const idx = new Array<number>(outOuter.length).fill(0);
  for (let i = 0; i < count; i++) {
    aOff[i] = offset(aOuter, idx) * aMat;
    bOff[i] = offset(bOuter, idx) * bMat;
    for (let d = outOuter.length - 1; d >= 0 && ++idx[d]! === outOuter[d]; d--) idx[d] = 0;
  }
  return { aOff, bOff };
}

function nativeMatMul(addon: NativeAddon, backend: CpuBackend, a: TensorInfo, b: TensorInfo, transposeA: boolean, transposeB: boolean) {
  const av = f32(backend, a), bv = f32(backend, b);
  if (!av || !bv || a.shape.length < 2 || b.shape.length < 2) return undefined;
  const ra = a.shape.length, rb = b.shape.length;
  const K = transposeA ? a.shape[ra - 2]! : a.shape[ra - 1]!;
  const kb = transposeB ? b.shape[rb - 1]! : b.shape[rb - 2]!;
  const M = transposeA ? a.shape[ra - 1]! : a.shape[ra - 2]!;
  const N = transposeB ? b.shape[rb - 2]! : b.shape[rb - 1]!;
  tf.util.assert(K === kb, () => `Error in matMul: inner shapes (${K}) and (${kb}) of Tensors with shapes ${a.shape} and ${b.shape} and transposeA=${transposeA} and transposeB=${transposeB} must match.`);
  const aOuter = a.shape.slice(0, -2), bOuter = b.shape.slice(0, -2);
  const outOuter = tf.broadcast_util.assertAndGetBroadcastShape(aOuter, bOuter);
  const { aOff, bOff } = batchOffsets(aOuter, bOuter, outOuter, M * K, K * N);
  const out = outputArray(size(outOuter) * M * N);
  addon.matmul(av, bv, out, aOff, bOff, M, N, K, transposeA, transposeB, computePrecision() === 'bf16');
  return backend.makeTensorInfo([...outOuter, M, N], 'float32', out);
}

/** The native kernel functions, each falling back to the stock kernel of the same name. */
export function nativeKernelFuncs(addon: NativeAddon, stock: StockLookup): Record<string, KernelFunc> {
  const conv2D: KernelFunc = (args) => {
    const backend = args.backend as CpuBackend;
    const y = nativeConv2D(addon, backend, args.inputs.x!, args.inputs.filter!, args.attrs as unknown as ConvAttrs);
    return y ?? stock('Conv2D')(args);
  };
  const conv2DBackpropInput: KernelFunc = (args) => {
    const backend = args.backend as CpuBackend;
    const { dy, filter } = args.inputs;
    const attrs = args.attrs as unknown as ConvAttrs & { inputShape: number[] };
    const dyv = f32(backend, dy!), wv = f32(backend, filter!);
    if (!dyv || !wv || attrs.dataFormat === 'NCHW') return stock('Conv2DBackpropInput')(args);
    const info = conv2dInfo(attrs.inputShape, filter!.shape, attrs);
    tf.util.assert(same(info.outShape, dy!.shape), () => `conv2dBackpropInput: dy shape ${dy!.shape} does not match ${info.outShape}`);
    const dx = outputArray(size(info.inShape));
    addon.conv2dBackpropInput(dyv, wv, dx, convShape(info), computePrecision() === 'bf16');
    return backend.makeTensorInfo(info.inShape, 'float32', dx);
  };
  const conv2DBackpropFilter: KernelFunc = (args) => {
    const backend = args.backend as CpuBackend;
    const { x, dy } = args.inputs;
    const attrs = args.attrs as unknown as ConvAttrs & { filterShape: [number, number, number, number] };
    const xv = f32(backend, x!), dyv = f32(backend, dy!);
    if (!xv || !dyv || attrs.dataFormat === 'NCHW') return stock('Conv2DBackpropFilter')(args);
    const info = conv2dInfo(x!.shape, attrs.filterShape, attrs);
    tf.util.assert(same(info.outShape, dy!.shape), () => `conv2dBackpropFilter: dy shape ${dy!.shape} does not match ${info.outShape}`);
    const dw = outputArray(size(info.filterShape));
    addon.conv2dBackpropFilter(xv, dyv, dw, convShape(info));
    return backend.makeTensorInfo(info.filterShape, 'float32', dw);
  };
  const batchMatMul: KernelFunc = (args) => {
    const { transposeA, transposeB } = args.attrs as { transposeA: boolean; transposeB: boolean };
    const out = nativeMatMul(addon, args.backend as CpuBackend, args.inputs.a!, args.inputs.b!, !!transposeA, !!transposeB);
    return out ?? stock('BatchMatMul')(args);
  };
  const fusedMatMul: KernelFunc = (args) => {
    const backend = args.backend as CpuBackend;
    const attrs = args.attrs as tf.NamedAttrMap;
    const out = nativeMatMul(addon, backend, args.inputs.a!, args.inputs.b!, !!attrs.transposeA, !!attrs.transposeB);
    return out ? biasActivation(stock, backend, out, args.inputs, attrs) : stock('_FusedMatMul')(args);
  };
  const fusedConv2D: KernelFunc = (args) => {
    const backend = args.backend as CpuBackend;
    const attrs = args.attrs as tf.NamedAttrMap;
    const y = nativeConv2D(addon, backend, args.inputs.x!, args.inputs.filter!, attrs as unknown as ConvAttrs);
    return y ? biasActivation(stock, backend, y, args.inputs, attrs) : stock('FusedConv2D')(args);
  };
  return {
    Conv2D: conv2D,
    Conv2DBackpropInput: conv2DBackpropInput,
    Conv2DBackpropFilter: conv2DBackpropFilter,
    BatchMatMul: batchMatMul,
    _FusedMatMul: fusedMatMul,
    FusedConv2D: fusedConv2D,
  };
}
