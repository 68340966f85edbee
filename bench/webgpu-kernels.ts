/**
 * @file sidetrain's webgpu kernels beside the stock tfjs-backend-webgpu ones, at SD shapes:
 * ms per call (median of 5 after a warm-up, read back with await data()). Run twice by
 * bench/gpu-check.ts: as is, and with SIDETRAIN_WEBGPU_KERNELS=0 (stock). One JSON line per row.
 * Rows: Conv2DBackpropFilter; the attention core and GroupNorm+SiLU, each forward + backward
 * (with the stock kernels: the TF-ops paths the networks take then — sliced attention at 64 MB of
 * scores, GroupNorm from moments).
 *   node --import tsx bench/webgpu-kernels.ts [--small]    (--small: shapes a software GPU can do)
 */
import { initBackend, tf } from '../trainers/backend/index.ts';
import { hasNativeAttention, nativeAttention, slicedAttentionCore, sliceRows } from '../trainers/nets/sliced-attention.ts';
import { headsAttention } from '../trainers/nets/layers.ts';
import { groupNormFused } from '../trainers/nets/fused.ts';

const small = process.argv.includes('--small');
const CONV: { x: number[]; filter: number[] }[] = small
  ? [{ x: [1, 32, 32, 128], filter: [3, 3, 128, 128] }]
  // SD1.5 at 512 px (64×64 latents, 320 channels) and SDXL at 1024 px (128×128, 320 channels)
  : [{ x: [1, 64, 64, 320], filter: [3, 3, 320, 320] }, { x: [1, 128, 128, 320], filter: [3, 3, 320, 320] }];
/** [batch, Tq, Tk, heads, head width]: SD1.5 512 px self- and cross-attention of the first level; SDXL 1024 px second level. */
const ATTENTION: number[][] = small ? [[1, 1024, 1024, 2, 32], [1, 1024, 77, 2, 32]] : [[1, 4096, 4096, 8, 40], [1, 4096, 77, 8, 40], [1, 4096, 4096, 10, 64]];
/** [B, H, W, C] with 32 groups: the UNet's first level at 512 px (SD1.5) and 1024 px (SDXL). */
const NORM: number[][] = small ? [[1, 32, 32, 128]] : [[1, 64, 64, 320], [1, 128, 128, 320]];

const choice = await initBackend('webgpu');
const kernels = process.env.SIDETRAIN_WEBGPU_KERNELS === '0' ? 'stock' : 'sidetrain';

/** Median ms of 5 calls after a warm-up; `f` returns the tensors to read back. */
async function time(f: () => tf.Tensor[]): Promise<number> {
  const call = async () => {
    const t0 = performance.now();
    const outs = f();
    await Promise.all(outs.map((t) => t.data()));
    tf.dispose(outs);
    return performance.now() - t0;
  };
  await call();
  const ms: number[] = [];
  for (let i = 0; i < 5; i++) ms.push(await call());
  return +ms.sort((a, b) => a - b)[2]!.toFixed(2);
}

const row = (kernel: string, shape: Record<string, unknown>, ms: number) =>
  console.log(JSON.stringify({ bench: 'webgpu-kernel', kernel, kernels, ...shape, ms, adapter: choice.adapter }));

for (const { x: xs, filter } of CONV) {
  const x = tf.randomUniform(xs, -1, 1);
  const dy = tf.randomUniform([...xs.slice(0, 3), filter[3]!], -1, 1);
  row('Conv2DBackpropFilter', { x: xs, filter }, await time(() => [
    tf.engine().runKernel('Conv2DBackpropFilter', { x, dy }, { strides: [1, 1], pad: 'same', dataFormat: 'NHWC', filterShape: filter }) as tf.Tensor,
  ]));
  tf.dispose([x, dy]);
}

for (const [b, tq, tk, heads, d] of ATTENTION as [number, number, number, number, number][]) {
  const c = heads * d;
  const [q, k, v] = [[b, tq, c], [b, tk, c], [b, tk, c]].map((s) => tf.randomNormal(s));
  const w = tf.randomNormal([b, tq, c]);
  const rows = sliceRows(b * heads, tq, tk, 64 * 2 ** 20);
  const attend = (x: tf.Tensor, y: tf.Tensor, z: tf.Tensor) =>
    hasNativeAttention() ? nativeAttention(x, y, z, heads) : headsAttention(x, y, z, heads, (qh, kh, vh) => slicedAttentionCore(qh, kh, vh, rows));
  const grads = tf.grads((x: tf.Tensor, y: tf.Tensor, z: tf.Tensor) => attend(x, y, z).mul(w).sum());
  row('attention fwd+bwd', { tq, tk, heads, d }, await time(() => [attend(q!, k!, v!), ...grads([q!, k!, v!])]));
  tf.dispose([q!, k!, v!, w]);
}

for (const shape of NORM) {
  const x = tf.randomNormal(shape), c = shape[3]!;
  const [weight, bias, dy] = [tf.randomNormal([c]), tf.randomNormal([c]), tf.randomNormal(shape)];
  const grads = tf.grads((xi: tf.Tensor, wi: tf.Tensor, bi: tf.Tensor) => groupNormFused(xi, wi, bi, 32, 1e-5, true).mul(dy).sum());
  row('GroupNorm+SiLU fwd+bwd', { x: shape }, await time(() => [groupNormFused(x, weight, bias, 32, 1e-5, true), ...grads([x, weight, bias])]));
  tf.dispose([x, weight, bias, dy]);
}
