/**
 * @file Gradient kernels that stock tfjs-backend-wasm 4.22 does not register, so training on the
 * `wasm` backend would fail with "Kernel '…' not registered for backend 'wasm'": Conv2DBackpropFilter
 * (every conv weight's gradient), UnsortedSegmentSum (tf.gather's gradient) and the depthwise conv
 * backprops. They are plain TS loops on copies of the inputs (`backend.readSync`) writing into an
 * output allocated on the WASM heap (`backend.makeOutput` + `typedArrayFromHeap`, as the stock
 * kernels in tfjs-backend-wasm/dist/kernels/*.js do). Correct first: this backend is only picked
 * when the native addon did not build. Semantics follow tfjs-backend-cpu 4.22
 * (kernels/Conv2DBackpropFilter.js, UnsortedSegmentSum.js, DepthwiseConv2dNativeBackprop*.js).
 */
import { tf } from '../tf.ts';

type TensorInfo = tf.TensorInfo;
type KernelArgs = Parameters<tf.KernelFunc>[0];
type Conv2DInfo = ReturnType<typeof tf.backend_util.computeConv2DInfo>;
type Pad = 'valid' | 'same' | number | tf.backend_util.ExplicitPadding;

/** The parts of tfjs-backend-wasm's BackendWasm the kernels use (backend_wasm.d.ts). */
interface WasmBackend {
  readSync(dataId: object): Float32Array | Int32Array | Uint8Array;
  makeOutput(shape: number[], dtype: tf.DataType): TensorInfo;
  typedArrayFromHeap(info: TensorInfo): Float32Array | Int32Array | Uint8Array;
}

const as4 = (s: number[]) => s as [number, number, number, number];

/** A copy of a float32 input's values (readSync slices the heap, so growing it later is safe). */
function readF32(backend: WasmBackend, t: TensorInfo, kernel: string): Float32Array {
  if (t.dtype !== 'float32') throw new Error(`${kernel} on wasm: expected float32, got ${t.dtype}`);
  return backend.readSync(t.dataId) as Float32Array;
}

/** Allocate the output on the heap and fill it from a JS array (the view is taken after allocation). */
function writeOutput(backend: WasmBackend, shape: number[], dtype: tf.DataType, values: ArrayLike<number>): TensorInfo {
  const out = backend.makeOutput(shape, dtype);
  const view = backend.typedArrayFromHeap(out);
  for (let i = 0; i < view.length; i++) view[i] = values[i]!;
  return out;
}

function requireNHWC(dataFormat: string | undefined, kernel: string): void {
  if (dataFormat === 'NCHW') throw new Error(`${kernel} on wasm: NCHW is not supported (sidetrain is NHWC)`);
}

/**
 * dW[kh,kw,ci,co] = Σ_{b,oh,ow} x[b, oh·sh − top + kh·dh, ow·sw − left + kw·dw, ci] · dy[b,oh,ow,co].
 * Loops run over output pixels and taps with the co row innermost, so both dy and dW are read
 * contiguously; out-of-image taps (padding) are skipped.
 */
function convFilterGrad(x: Float32Array, dy: Float32Array, ci: Conv2DInfo, depthwise: boolean): Float64Array {
  const { batchSize, inHeight, inWidth, inChannels, outHeight, outWidth, outChannels } = ci;
  const { filterHeight, filterWidth, strideHeight, strideWidth, dilationHeight, dilationWidth } = ci;
  const top = ci.padInfo.top, left = ci.padInfo.left;
  const mult = depthwise ? outChannels / inChannels : 0;
  const dW = new Float64Array(filterHeight * filterWidth * inChannels * (depthwise ? mult : outChannels));
  for (let b = 0; b < batchSize; b++) {
    for (let oh = 0; oh < outHeight; oh++) {
      for (let kh = 0; kh < filterHeight; kh++) {
        const ih = oh * strideHeight - top + kh * dilationHeight;
        if (ih < 0 || ih >= inHeight) continue;
        for (let ow = 0; ow < outWidth; ow++) {
          const dyRow = ((b * outHeight + oh) * outWidth + ow) * outChannels;
          for (let kw = 0; kw < filterWidth; kw++) {
            const iw = ow * strideWidth - left + kw * dilationWidth;
            if (iw < 0 || iw >= inWidth) continue;
            const xRow = ((b * inHeight + ih) * inWidth + iw) * inChannels;
            const tap = (kh * filterWidth + kw) * inChannels;
            if (depthwise) accumulateDepthwise(dW, tap * mult, x, xRow, dy, dyRow, inChannels, mult);
            else accumulateOuter(dW, tap * outChannels, x, xRow, dy, dyRow, inChannels, outChannels);
          }
        }
      }
    }
  }
  return dW;
}

/** dW[w0 + c·C + o] += x[x0 + c] · dy[d0 + o]: one rank-1 update of a [Cin, Cout] tap. */
function accumulateOuter(dW: Float64Array, w0: number, x: Float32Array, x0: number, dy: Float32Array, d0: number, cin: number, cout: number): void {
  for (let c = 0; c < cin; c++) {
    const xv = x[x0 + c]!;
    if (xv === 0) continue;
    const w = w0 + c * cout;
    for (let o = 0; o < cout; o++) dW[w + o] += xv * dy[d0 + o]!;
  }
}

/** Depthwise: output channel c·mult + m sees only input channel c. */
function accumulateDepthwise(dW: Float64Array, w0: number, x: Float32Array, x0: number, dy: Float32Array, d0: number, cin: number, mult: number): void {
  for (let c = 0; c < cin; c++) {
    const xv = x[x0 + c]!;
    const w = w0 + c * mult, d = d0 + c * mult;
    for (let m = 0; m < mult; m++) dW[w + m] += xv * dy[d + m]!;
  }
}

function conv2DBackpropFilter({ inputs, backend, attrs }: KernelArgs): TensorInfo {
  const { x, dy } = inputs as { x: TensorInfo; dy: TensorInfo };
  const a = attrs as unknown as tf.Conv2DBackpropFilterAttrs;
  requireNHWC(a.dataFormat, 'Conv2DBackpropFilter');
  const wb = backend as unknown as WasmBackend;
  const ci = tf.backend_util.computeConv2DInfo(as4(x.shape), a.filterShape, a.strides, 1, a.pad, a.dimRoundingMode, false, 'channelsLast');
  const dW = convFilterGrad(readF32(wb, x, 'Conv2DBackpropFilter'), readF32(wb, dy, 'Conv2DBackpropFilter'), ci, false);
  return writeOutput(wb, ci.filterShape, 'float32', dW);
}

interface DepthwiseAttrs {
  strides: [number, number] | number;
  dilations: [number, number] | number;
  pad: Pad;
  dimRoundingMode?: 'floor' | 'round' | 'ceil';
}

function depthwiseInfo(xShape: number[], filterShape: number[], a: DepthwiseAttrs): Conv2DInfo {
  return tf.backend_util.computeConv2DInfo(as4(xShape), as4(filterShape), a.strides, a.dilations, a.pad, a.dimRoundingMode, true);
}

function depthwiseBackpropFilter({ inputs, backend, attrs }: KernelArgs): TensorInfo {
  const { x, dy } = inputs as { x: TensorInfo; dy: TensorInfo };
  const a = attrs as unknown as DepthwiseAttrs & { filterShape: [number, number, number, number] };
  const wb = backend as unknown as WasmBackend;
  const ci = depthwiseInfo(x.shape, a.filterShape, a);
  const name = 'DepthwiseConv2dNativeBackpropFilter';
  const dW = convFilterGrad(readF32(wb, x, name), readF32(wb, dy, name), ci, true);
  return writeOutput(wb, ci.filterShape, 'float32', dW);
}

/**
 * dx[b,ih,iw,c] = Σ dy[b,oh,ow,c·mult+m] · W[kh,kw,c,m] over the (oh,ow,kh,kw) that read (ih,iw):
 * scattered from each output pixel, so no division by the stride is needed.
 */
function depthwiseBackpropInput({ inputs, backend, attrs }: KernelArgs): TensorInfo {
  const { dy, filter } = inputs as { dy: TensorInfo; filter: TensorInfo };
  const a = attrs as unknown as DepthwiseAttrs & { inputShape: [number, number, number, number] };
  const wb = backend as unknown as WasmBackend;
  const ci = depthwiseInfo(a.inputShape, filter.shape, a);
  const name = 'DepthwiseConv2dNativeBackpropInput';
  const dyV = readF32(wb, dy, name), w = readF32(wb, filter, name);
  const { inHeight, inWidth, inChannels: cin, outHeight, outWidth, outChannels, filterWidth } = ci;
  const mult = outChannels / cin;
  const dx = new Float64Array(ci.batchSize * inHeight * inWidth * cin);
  for (let b = 0; b < ci.batchSize; b++) {
    for (let oh = 0; oh < outHeight; oh++) {
      for (let kh = 0; kh < ci.filterHeight; kh++) {
        const ih = oh * ci.strideHeight - ci.padInfo.top + kh * ci.dilationHeight;
        if (ih < 0 || ih >= inHeight) continue;
        for (let ow = 0; ow < outWidth; ow++) {
          const d0 = ((b * outHeight + oh) * outWidth + ow) * outChannels;
          for (let kw = 0; kw < filterWidth; kw++) {
            const iw = ow * ci.strideWidth - ci.padInfo.left + kw * ci.dilationWidth;
            if (iw < 0 || iw >= inWidth) continue;
            const x0 = ((b * inHeight + ih) * inWidth + iw) * cin, w0 = (kh * filterWidth + kw) * outChannels;
            for (let c = 0; c < cin; c++) {
              let sum = 0;
              for (let m = 0; m < mult; m++) sum += dyV[d0 + c * mult + m]! * w[w0 + c * mult + m]!;
              dx[x0 + c] += sum;
            }
          }
        }
      }
    }
  }
  return writeOutput(wb, a.inputShape, 'float32', dx);
}

/**
 * out[s, …] = Σ_{i: ids[i] = s} x[i, …]. segmentIds covers x's leading dims (flattened here);
 * ids outside [0, numSegments) are dropped, as TF does for negative ids.
 */
function unsortedSegmentSum({ inputs, backend, attrs }: KernelArgs): TensorInfo {
  const { x, segmentIds } = inputs as { x: TensorInfo; segmentIds: TensorInfo };
  const { numSegments } = attrs as unknown as tf.UnsortedSegmentSumAttrs;
  const wb = backend as unknown as WasmBackend;
  if (x.dtype !== 'float32' && x.dtype !== 'int32') throw new Error(`UnsortedSegmentSum on wasm: unsupported dtype ${x.dtype}`);
  const xV = wb.readSync(x.dataId), ids = wb.readSync(segmentIds.dataId);
  const rowShape = x.shape.slice(segmentIds.shape.length);
  const row = rowShape.reduce((p, d) => p * d, 1);
  const sums = new Float64Array(numSegments * row);
  for (let i = 0; i < ids.length; i++) {
    const s = ids[i]!;
    if (s < 0 || s >= numSegments) continue;
    const src = i * row, dst = s * row;
    for (let j = 0; j < row; j++) sums[dst + j] += xV[src + j]!;
  }
  return writeOutput(wb, [numSegments, ...rowShape], x.dtype, sums);
}

/** Kernels registered by registerWasmKernels(), by name (for tests). */
export const WASM_POLYFILLS: Record<string, tf.KernelFunc> = {
  Conv2DBackpropFilter: conv2DBackpropFilter,
  DepthwiseConv2dNativeBackpropFilter: depthwiseBackpropFilter,
  DepthwiseConv2dNativeBackpropInput: depthwiseBackpropInput,
  UnsortedSegmentSum: unsortedSegmentSum,
};

/**
 * Register the missing kernels for backendName 'wasm'. Idempotent; a kernel that a later
 * tfjs-backend-wasm registers itself is left alone.
 */
export function registerWasmKernels(): void {
  for (const [kernelName, kernelFunc] of Object.entries(WASM_POLYFILLS)) {
    if (tf.getKernel(kernelName, 'wasm')) continue;
    tf.registerKernel({ kernelName, backendName: 'wasm', kernelFunc });
  }
}
