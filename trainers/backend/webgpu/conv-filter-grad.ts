/**
 * @file Conv2DBackpropFilter for the 'webgpu' backend as one matrix product per filter tap.
 * tfjs-backend-webgpu 4.22's Conv2DDerFilterProgram gives each weight one thread that loops over
 * every output pixel of the batch (64×64 latents: 4,096 iterations, 16,384 at 1024 px), with no
 * data reuse between threads — slow at SD sizes, and one long dispatch is what a Windows GPU
 * watchdog (TDR) kills. Here, for a KH×KW filter:
 *   dW[kh, kw] = Xpad[:, kh::sH, kw::sW, :]ᵀ · dY      ([Ci, N] · [N, Co], N = B·outH·outW)
 * through the backend's own tiled (split-K where it pays) BatchMatMul, one dispatch per tap.
 * Same sums as the stock kernel, in a different order (float32 rounding differs, ~1e-7 relative).
 * NHWC and dilation 1 only (all SD convs); anything else goes to the stock kernel.
 */
import { tf } from '../tf.ts';

type Info = tf.TensorInfo;
interface Backend { disposeData(dataId: object): void }
type Run = (name: string, inputs: Record<string, Info> | Info[], attrs: Record<string, unknown>) => Info;

function kernel(name: string, stock: Map<string, tf.KernelFunc>): tf.KernelFunc {
  const k = stock.get(name) ?? tf.getKernel(name, 'webgpu')?.kernelFunc;
  if (!k) throw new Error(`webgpu: no '${name}' kernel`);
  return k;
}

/** dW by per-tap products; `stock` holds the package's own kernels (this one replaces Conv2DBackpropFilter). */
export function convFilterGradByTaps(stock: Map<string, tf.KernelFunc>): tf.KernelFunc {
  return (args) => {
    const { inputs, backend, attrs } = args as unknown as { inputs: { x: Info; dy: Info }; backend: Backend; attrs: Record<string, unknown> };
    const { x, dy } = inputs;
    const filterShape = attrs.filterShape as [number, number, number, number];
    const info = tf.backend_util.computeConv2DInfo(
      x.shape as [number, number, number, number], filterShape, attrs.strides as [number, number], 1,
      attrs.pad as 'same', attrs.dimRoundingMode as 'round' | undefined, false, tf.backend_util.convertConv2DDataFormat(attrs.dataFormat as 'NHWC'),
    );
    if (info.dataFormat !== 'channelsLast' || info.dilationHeight !== 1 || info.dilationWidth !== 1) {
      return kernel('Conv2DBackpropFilter', stock)(args);
    }
    const temps: Info[] = [];
    const run: Run = (name, ins, at) => {
      const out = kernel(name, stock)({ inputs: ins as tf.NamedTensorInfoMap, backend: backend as never, attrs: at as never }) as Info;
      temps.push(out);
      return out;
    };
    try {
      const { top, bottom, left, right } = info.padInfo;
      const xp = top || bottom || left || right
        ? run('PadV2', { x }, { paddings: [[0, 0], [top, bottom], [left, right], [0, 0]], constantValue: 0 })
        : x;
      const n = info.batchSize * info.outHeight * info.outWidth;
      const dy3 = run('Reshape', { x: dy }, { shape: [1, n, info.outChannels] });
      const taps: Info[] = [];
      for (let kh = 0; kh < info.filterHeight; kh++) {
        for (let kw = 0; kw < info.filterWidth; kw++) {
          const end = [info.batchSize, kh + (info.outHeight - 1) * info.strideHeight + 1, kw + (info.outWidth - 1) * info.strideWidth + 1, info.inChannels];
          const tap = run('StridedSlice', { x: xp }, {
            begin: [0, kh, kw, 0], end, strides: [1, info.strideHeight, info.strideWidth, 1],
            beginMask: 0, endMask: 0, ellipsisMask: 0, newAxisMask: 0, shrinkAxisMask: 0,
          });
          const tap3 = run('Reshape', { x: tap }, { shape: [1, n, info.inChannels] });
          taps.push(run('BatchMatMul', { a: tap3, b: dy3 }, { transposeA: true, transposeB: false })); // [1, Ci, Co]
        }
      }
      const stacked = taps.length === 1 ? taps[0]! : run('Concat', taps, { axis: 0 });
      // not in temps: the result (shares the stacked buffer, which Reshape counted)
      return kernel('Reshape', stock)({ inputs: { x: stacked }, backend: backend as never, attrs: { shape: filterShape } as never });
    } finally {
      for (const t of temps) backend.disposeData(t.dataId);
    }
  };
}
