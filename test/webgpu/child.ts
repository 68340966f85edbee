/**
 * @file Runs in a child process of test/webgpu.test.ts (Dawn reads VK_ICD_FILENAMES and the
 * loader path at process start): `probe` prints the backend choice and health's webgpu line;
 * `oversize` makes a tensor over the adapter's storage binding limit and prints the error;
 * `oversize-inputs` gives such a tensor (uploaded from JS) to a gather and a matmul and prints theirs;
 * `attention` (`attention-quick`: two cases) and `group-norm` print the WGSL kernels' errors against the TF-ops versions;
 * `conv-filter-grad` prints Conv2DBackpropFilter's largest error against a float64 loop per case.
 */
import { initBackend, tf } from '../../trainers/backend/index.ts';
import { webgpuStatus } from '../../trainers/backend/webgpu/adapter.ts';
import { groupNormFused, groupNormOps, siluOps } from '../../trainers/nets/fused.ts';
import { hasNativeAttention, nativeAttention, slicedAttentionOps } from '../../trainers/nets/sliced-attention.ts';

const mode = process.argv[2];
if (mode === 'probe') {
  const choice = await initBackend();
  console.log(JSON.stringify({ ...choice, health: await webgpuStatus() }));
} else if (mode === 'oversize') {
  const choice = await initBackend('webgpu');
  const limit = Number(/binding ≤ (\d+) MiB/.exec(choice.adapter ?? '')?.[1]);
  const n = ((limit + 8) * 2 ** 20) / 4; // 8 MiB over the limit, float32
  let result: unknown;
  try {
    const big = tf.fill([n], 1.5);
    const values = await big.data();
    result = { error: null, first: values[0] };
  } catch (err) {
    result = { error: String(err instanceof Error ? err.message : err) };
  }
  // the backend keeps working after the refusal
  const small = Array.from(await tf.add(tf.tensor([1, 2]), 1).data());
  console.log(JSON.stringify({ ...(result as object), small }));
} else if (mode === 'oversize-inputs') {
  const choice = await initBackend('webgpu');
  const limit = Number(/binding ≤ (\d+) MiB/.exec(choice.adapter ?? '')?.[1]);
  const rows = ((limit + 8) * 2 ** 20) / (4 * 256); // 8 MiB over the limit as [rows, 256] float32
  const big = tf.tensor2d(new Float32Array(rows * 256).fill(0.5), [rows, 256]);
  const errorOf = async (f: () => tf.Tensor) => {
    try {
      return { value: Array.from(await f().data()).slice(0, 2) };
    } catch (err) {
      return { error: String(err instanceof Error ? err.message : err) };
    }
  };
  const gather = await errorOf(() => tf.gather(big, [0, 1]));
  const matmul = await errorOf(() => tf.matMul(big, tf.ones([256, 2])));
  const small = Array.from(await tf.add(tf.tensor([1, 2]), 1).data());
  console.log(JSON.stringify({ gather, matmul, small }));
} else if (mode === 'attention' || mode === 'attention-quick') {
  const choice = await initBackend('webgpu');
  console.log(JSON.stringify({ adapter: choice.adapter, ...(await attentionErrors(mode === 'attention-quick' ? 2 : Infinity)) }));
} else if (mode === 'group-norm') {
  await initBackend('webgpu');
  console.log(JSON.stringify(await groupNormErrors()));
} else if (mode === 'conv-filter-grad') {
  await initBackend('webgpu');
  console.log(JSON.stringify(await convFilterGradErrors()));
} else {
  throw new Error(`child.ts: unknown mode '${mode}'`);
}

/** Conv2DBackpropFilter on webgpu against a float64 loop: strides, 'same'/'valid'/numeric padding, 1×1 and 3×3. */
async function convFilterGradErrors(): Promise<number[]> {
  const cases: [number[], number[], [number, number], 'same' | 'valid' | number][] = [
    [[2, 9, 11, 5], [3, 3, 5, 7], [1, 1], 'same'], [[1, 10, 10, 4], [3, 3, 4, 6], [2, 2], 1],
    [[1, 9, 9, 4], [3, 3, 4, 6], [2, 2], 'same'], [[2, 8, 8, 6], [1, 1, 6, 3], [1, 1], 'valid'], [[1, 7, 8, 3], [3, 3, 3, 2], [1, 1], 'valid'],
  ];
  const errors: number[] = [];
  for (const [xs, fs, st, pad] of cases) {
    const info = tf.backend_util.computeConv2DInfo(xs as [number, number, number, number], fs as [number, number, number, number], st, 1, pad);
    const x = tf.randomUniform(xs, -1, 1, 'float32', 7);
    const dy = tf.randomUniform([info.batchSize, info.outHeight, info.outWidth, info.outChannels], -1, 1, 'float32', 8);
    const dw = tf.engine().runKernel('Conv2DBackpropFilter', { x, dy }, { strides: st, pad, dataFormat: 'NHWC', filterShape: fs }) as tf.Tensor;
    const [xv, dyv, dwv] = await Promise.all([x.data(), dy.data(), dw.data()]);
    const [, H, W, Ci] = xs as [number, number, number, number];
    const [, KW, , Co] = fs as [number, number, number, number];
    let maxErr = 0;
    for (let k = 0; k < dwv.length; k++) {
      const co = k % Co, ci = Math.floor(k / Co) % Ci, kw = Math.floor(k / (Co * Ci)) % KW, kh = Math.floor(k / (Co * Ci * KW));
      let sum = 0;
      for (let b = 0; b < info.batchSize; b++) for (let y = 0; y < info.outHeight; y++) for (let xx = 0; xx < info.outWidth; xx++) {
        const iy = y * st[0] + kh - info.padInfo.top, ix = xx * st[1] + kw - info.padInfo.left;
        if (iy >= 0 && iy < H && ix >= 0 && ix < W) sum += xv[((b * H + iy) * W + ix) * Ci + ci]! * dyv[((b * info.outHeight + y) * info.outWidth + xx) * Co + co]!;
      }
      maxErr = Math.max(maxErr, Math.abs(sum - dwv[k]!));
    }
    errors.push(maxErr);
  }
  return errors;
}

/**
 * The WGSL attention core (forward and the three gradients) against the TF-ops slices on the same
 * backend: the largest error relative to the reference's largest value, per case and output.
 * Cases: several heads, Tq ≠ Tk (cross-attention on 7 or 77 tokens), rows past a 64-row block,
 * head widths 16/40/160 and the VAE's one head of 512 (a tile of a few rows), and a shader
 * compiled for one shape reused for another (the same head width).
 */
async function attentionErrors(count: number): Promise<{ native: boolean; cases: Record<string, number>[] }> {
  const cases: [b: number, tq: number, tk: number, heads: number, d: number][] = [
    [2, 70, 70, 2, 16], [1, 100, 7, 3, 40], [1, 65, 77, 1, 160], [1, 20, 20, 1, 512], [1, 33, 9, 2, 16],
  ];
  const out: Record<string, number>[] = [];
  for (const [b, tq, tk, heads, d] of cases.slice(0, count)) {
    const c = heads * d;
    const [q, k, v] = [[b, tq, c], [b, tk, c], [b, tk, c]].map((s, i) => tf.randomNormal(s, 0, 1, 'float32', 11 + i));
    const w = tf.randomNormal([b, tq, c], 0, 1, 'float32', 20);
    const split = (t: tf.Tensor, n: number) => t.reshape([b, n, heads, d]).transpose([0, 2, 1, 3]).reshape([b * heads, n, d]);
    const merge = (t: tf.Tensor) => t.reshape([b, heads, tq, d]).transpose([0, 2, 1, 3]).reshape([b, tq, c]);
    const ours = (x: tf.Tensor, y: tf.Tensor, z: tf.Tensor) => nativeAttention(x, y, z, heads);
    const reference = (x: tf.Tensor, y: tf.Tensor, z: tf.Tensor) => merge(slicedAttentionOps(split(x, tq), split(y, tk), split(z, tk), tq));
    const run = (f: typeof ours) => {
      const value = f(q, k, v);
      const grads = tf.grads((x: tf.Tensor, y: tf.Tensor, z: tf.Tensor) => f(x, y, z).mul(w).sum())([q, k, v]);
      return [value, ...grads];
    };
    const [a, r] = [run(ours), run(reference)];
    const errs: Record<string, number> = {};
    for (const [i, name] of ['out', 'dq', 'dk', 'dv'].entries()) errs[name] = await relError(a[i]!, r[i]!);
    out.push(errs);
  }
  return { native: hasNativeAttention(), cases: out };
}

/** Largest |a − r| relative to the reference's largest |r|. */
async function relError(a: tf.Tensor, r: tf.Tensor): Promise<number> {
  const [x, y] = await Promise.all([a.data(), r.data()]);
  let err = 0, scale = 0;
  for (let n = 0; n < y.length; n++) {
    err = Math.max(err, Math.abs(x[n]! - y[n]!));
    scale = Math.max(scale, Math.abs(y[n]!));
  }
  return err / scale;
}

/**
 * The WGSL GroupNorm(+SiLU) (y, dx, dweight, dbias) against the TF-ops version on the same backend:
 * with and without SiLU, more than one 256-row chunk of dw/db, more than 256 channels, odd sizes.
 */
async function groupNormErrors(): Promise<{ kernel: boolean; cases: Record<string, number>[] }> {
  const cases: [shape: number[], groups: number, silu: boolean][] = [
    [[2, 5, 7, 32], 8, true], [[1, 9, 9, 64], 32, false], [[1, 33, 31, 12], 3, true], [[1, 4, 4, 320], 32, true],
  ];
  const out: Record<string, number>[] = [];
  for (const [shape, groups, silu] of cases) {
    const c = shape[3]!;
    const x = tf.randomNormal(shape, 0.3, 2, 'float32', 5);
    const [w, b] = [tf.randomNormal([c], 1, 0.5, 'float32', 6), tf.randomNormal([c], 0, 0.5, 'float32', 7)];
    const dy = tf.randomNormal(shape, 0, 1, 'float32', 8);
    const ours = (xi: tf.Tensor, wi: tf.Tensor, bi: tf.Tensor) => groupNormFused(xi, wi, bi, groups, 1e-5, silu);
    const reference = (xi: tf.Tensor, wi: tf.Tensor, bi: tf.Tensor) => {
      const y = groupNormOps(xi, wi, bi, groups, 1e-5);
      return silu ? siluOps(y) : y;
    };
    const run = (f: typeof ours) => [f(x, w, b), ...tf.grads((xi: tf.Tensor, wi: tf.Tensor, bi: tf.Tensor) => f(xi, wi, bi).mul(dy).sum())([x, w, b])];
    const [a, r] = [run(ours), run(reference)];
    const errs: Record<string, number> = {};
    for (const [i, name] of ['y', 'dx', 'dweight', 'dbias'].entries()) errs[name] = await relError(a[i]!, r[i]!);
    out.push(errs);
  }
  return { kernel: tf.getKernel('SidetrainGroupNorm', 'webgpu') !== undefined, cases: out };
}
