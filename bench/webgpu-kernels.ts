/**
 * @file sidetrain's webgpu kernels beside the stock tfjs-backend-webgpu ones, at SD shapes:
 * ms per call (median of 5 after a warm-up, read back with await data()). Run twice by
 * bench/gpu-check.ts: as is, and with SIDETRAIN_WEBGPU_KERNELS=0 (stock). One JSON line per row.
 *   node --import tsx bench/webgpu-kernels.ts [--small]    (--small: shapes a software GPU can do)
 */
import { initBackend, tf } from '../trainers/backend/index.ts';

const SHAPES: Record<string, { x: number[]; filter: number[] }[]> = {
  // SD1.5 at 512 px (64×64 latents, 320 channels) and SDXL at 1024 px (128×128, 320 channels)
  full: [{ x: [1, 64, 64, 320], filter: [3, 3, 320, 320] }, { x: [1, 128, 128, 320], filter: [3, 3, 320, 320] }],
  small: [{ x: [1, 32, 32, 128], filter: [3, 3, 128, 128] }],
};

const choice = await initBackend('webgpu');
const kernels = process.env.SIDETRAIN_WEBGPU_KERNELS === '0' ? 'stock' : 'sidetrain';
for (const { x: xs, filter } of SHAPES[process.argv.includes('--small') ? 'small' : 'full']!) {
  const x = tf.randomUniform(xs, -1, 1);
  const dy = tf.randomUniform([...xs.slice(0, 3), filter[3]!], -1, 1);
  const call = async () => {
    const t0 = performance.now();
    const dw = tf.engine().runKernel('Conv2DBackpropFilter', { x, dy }, { strides: [1, 1], pad: 'same', dataFormat: 'NHWC', filterShape: filter }) as tf.Tensor;
    await dw.data();
    dw.dispose();
    return performance.now() - t0;
  };
  await call();
  const ms = [await call(), await call(), await call(), await call(), await call()].sort((a, b) => a - b)[2]!;
  console.log(JSON.stringify({ bench: 'webgpu-kernel', kernel: 'Conv2DBackpropFilter', kernels, x: xs, filter, ms: +ms.toFixed(2), adapter: choice.adapter }));
  x.dispose();
  dy.dispose();
}
