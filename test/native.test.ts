/**
 * @file The native CPU kernels (trainers/native) against the stock pure-JS CPU kernels they
 * replace, on random inputs: conv2d forward and both gradients (strides, same/valid/explicit
 * padding, 1×1, dilation), batched matmul (transposes, batch broadcast), the fused variants,
 * fallbacks, and no leaked tensors. Skipped, with the reason, when the addon is not built.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { initBackend, tf, type Tensor } from '../trainers/backend/index.ts';
import { nativeStatus, registerNativeKernels, unregisterNativeKernels } from '../trainers/backend/native/index.ts';
import { nativeSkip } from './helpers/native.ts';
import { assertClose } from './helpers/close.ts';
import { poisonOutputs } from '../trainers/backend/native/output.ts';

// Every native output starts as NaN (the arrays are not zero-filled): an element a kernel leaves
// unwritten fails the comparison with the stock kernel.
poisonOutputs(true);

const status = nativeStatus();
const skip = nativeSkip(status.available ? false : status.reason);

/** Deterministic uniform [-1, 1) values (a small LCG, so failures reproduce). */
function rand(shape: number[], seed: number): Tensor {
  let s = seed >>> 0;
  const n = shape.reduce((a, b) => a * b, 1);
  const v = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    v[i] = s / 2 ** 31 - 1;
  }
  return tf.tensor(v, shape);
}

/** Runs f with the native kernels and with the stock ones; returns both results' values. */
async function both(f: () => Tensor[]): Promise<{ native: Float32Array[]; stock: Float32Array[] }> {
  const run = async () => {
    const outs = tf.tidy(f);
    const vals = await Promise.all(outs.map(async (t) => (await t.data()) as Float32Array));
    tf.dispose(outs);
    return vals;
  };
  registerNativeKernels();
  const native = await run();
  unregisterNativeKernels();
  const stock = await run();
  registerNativeKernels();
  return { native, stock };
}

type Pad = 'same' | 'valid' | [[number, number], [number, number], [number, number], [number, number]];
interface ConvCase { x: number[]; w: number[]; stride: number; pad: Pad; dilation?: number }

const convCases: ConvCase[] = [
  { x: [2, 9, 11, 5], w: [3, 3, 5, 7], stride: 1, pad: 'same' },
  { x: [1, 9, 11, 5], w: [3, 3, 5, 7], stride: 2, pad: 'valid' },
  { x: [2, 8, 8, 6], w: [3, 3, 6, 4], stride: 2, pad: 'same' },
  { x: [1, 8, 10, 4], w: [3, 3, 4, 5], stride: 2, pad: [[0, 0], [0, 1], [0, 1], [0, 0]] }, // VAE Downsample
  { x: [1, 7, 7, 3], w: [3, 3, 3, 9], stride: 1, pad: [[0, 0], [1, 1], [1, 1], [0, 0]] },
  { x: [2, 5, 6, 40], w: [1, 1, 40, 70], stride: 1, pad: 'valid' }, // 1×1
  { x: [1, 7, 9, 8], w: [1, 1, 8, 6], stride: 2, pad: 'valid' }, // 1×1 stride 2: empty phases
  { x: [1, 11, 10, 3], w: [5, 5, 3, 4], stride: 3, pad: 'same' },
  { x: [1, 20, 20, 40], w: [3, 3, 40, 33], stride: 1, pad: 'same' }, // K > one k-block, many row blocks
  // few output pixels (a UNet's 4×4 and 8×8 levels): the filter read in place (forward) or packed a
  // panel at a time (input gradient), over two full column panels, a partial one and two k-blocks
  { x: [1, 4, 5, 40], w: [3, 3, 40, 70], stride: 1, pad: 'same' },
  { x: [1, 8, 8, 40], w: [3, 3, 40, 96], stride: 2, pad: 'same' },
  // 144 output pixels in several column chunks: A packed once for all chunks, by two tasks of rows
  { x: [1, 12, 12, 16], w: [3, 3, 16, 70], stride: 1, pad: 'same' },
];

test('native conv2d and its gradients match the stock CPU kernels', { skip }, async () => {
  await initBackend('cpu-native');
  for (const [i, c] of convCases.entries()) {
    const label = `conv ${JSON.stringify(c)}`;
    const { native, stock } = await both(() => {
      const x = rand(c.x, 11 + i), w = rand(c.w, 23 + i);
      const f = (xx: Tensor, ww: Tensor) => tf.conv2d(xx as tf.Tensor4D, ww as tf.Tensor4D, c.stride, c.pad);
      const y = f(x, w);
      const r = rand(y.shape, 37 + i); // a random upstream gradient
      const [dx, dw] = tf.grads((xx: Tensor, ww: Tensor) => f(xx, ww).mul(r).sum())([x, w]);
      return [y, dx!, dw!];
    });
    const [kh, kw, ci, co] = c.w as [number, number, number, number];
    assertClose(`${label} y`, native[0]!, stock[0]!, kh * kw * ci);
    assertClose(`${label} dx`, native[1]!, stock[1]!, kh * kw * co);
    assertClose(`${label} dw`, native[2]!, stock[2]!, c.x[0]! * c.x[1]! * c.x[2]!);
  }
});

test('native dilated conv2d forward matches', { skip }, async () => {
  await initBackend('cpu-native');
  const { native, stock } = await both(() => [tf.conv2d(rand([1, 12, 13, 6], 1) as tf.Tensor4D, rand([3, 3, 6, 5], 2) as tf.Tensor4D, 1, 'same', 'NHWC', 2)]);
  assertClose('dilated conv', native[0]!, stock[0]!, 54);
});

// grad: TF.js's BatchMatMul gradient does not reduce broadcast batch dimensions, so the
// broadcast cases check the forward product only
const matmulCases: Array<{ a: number[]; b: number[]; ta: boolean; tb: boolean; grad?: false }> = [
  { a: [5, 7], b: [7, 3], ta: false, tb: false },
  { a: [33, 70], b: [70, 45], ta: false, tb: false },
  { a: [70, 33], b: [70, 45], ta: true, tb: false },
  { a: [33, 70], b: [45, 70], ta: false, tb: true },
  { a: [70, 33], b: [45, 70], ta: true, tb: true },
  { a: [3, 17, 9], b: [3, 9, 13], ta: false, tb: false },
  { a: [2, 3, 4, 5], b: [5, 6], ta: false, tb: false, grad: false }, // b broadcast over the batch
  { a: [1, 4, 5], b: [3, 5, 6], ta: false, tb: false, grad: false }, // a broadcast
  { a: [300, 600], b: [600, 100], ta: false, tb: false }, // several k- and row blocks
  { a: [20, 300], b: [300, 70], ta: false, tb: false }, // few rows: B read in place, partial last panel
  { a: [20, 300], b: [70, 300], ta: false, tb: true }, // few rows: B packed a panel at a time
];

test('native batched matmul matches the stock CPU kernel', { skip }, async () => {
  await initBackend('cpu-native');
  for (const [i, c] of matmulCases.entries()) {
    const { native, stock } = await both(() => {
      const a = rand(c.a, 5 + i), b = rand(c.b, 9 + i);
      const y = tf.matMul(a, b, c.ta, c.tb);
      if (c.grad === false) return [y];
      const r = rand(y.shape, 13 + i);
      const [da, db] = tf.grads((aa: Tensor, bb: Tensor) => tf.matMul(aa, bb, c.ta, c.tb).mul(r).sum())([a, b]);
      return [y, da!, db!];
    });
    const k = c.ta ? c.a[c.a.length - 2]! : c.a[c.a.length - 1]!;
    for (const [j, name] of ['y', 'da', 'db'].slice(0, native.length).entries()) assertClose(`matmul ${JSON.stringify(c)} ${name}`, native[j]!, stock[j]!, k * 6);
  }
});

test('native matmul broadcasts both batch shapes (the stock kernel gets this case wrong)', { skip }, async () => {
  await initBackend('cpu-native');
  const a = () => rand([2, 1, 4, 5], 1), b = () => rand([3, 6, 5], 2);
  const { native } = await both(() => [tf.matMul(a(), b(), false, true)]);
  // reference: the stock kernel on explicitly tiled inputs
  const { stock } = await both(() => [tf.matMul(a().tile([1, 3, 1, 1]), b().reshape([1, 3, 6, 5]).tile([2, 1, 1, 1]), false, true)]);
  assertClose('broadcast matmul', native[0]!, stock[0]!, 5);
});

test('native fused matmul and conv2d apply bias and activation like the stock kernels', { skip }, async () => {
  await initBackend('cpu-native');
  const { native, stock } = await both(() => [
    tf.fused.matMul({ a: rand([9, 20], 1), b: rand([7, 20], 2), transposeB: true, bias: rand([7], 3), activation: 'relu' }),
    tf.fused.conv2d({ x: rand([1, 6, 6, 4], 4) as tf.Tensor4D, filter: rand([3, 3, 4, 5], 5) as tf.Tensor4D, strides: 1, pad: 'same', bias: rand([5], 6), activation: 'leakyrelu', leakyreluAlpha: 0.1 }),
  ]);
  assertClose('fused matmul', native[0]!, stock[0]!, 20);
  assertClose('fused conv2d', native[1]!, stock[1]!, 36);
});

test('native softmax and broadcasting binary ops match the stock CPU kernels', { skip }, async () => {
  await initBackend('cpu-native');
  const pairs: Array<[number[], number[]]> = [[[6, 7], [6, 7]], [[6, 7], []], [[6, 7], [6, 1]], [[1, 7], [6, 7]], [[2, 1, 5], [3, 1]], [[4, 3, 1, 5], [3, 2, 1]],
    // rows long enough to be split between tasks (a same-shape add is one row of them all)
    [[140001], [140001]], [[3, 70001], [1, 70001]], [[2, 70001], [2, 1]]];
  const { native, stock } = await both(() => [
    tf.softmax(rand([5, 33], 1).mul(4)),
    tf.softmax(rand([2, 3, 200], 2).mul(10)),
    tf.softmax(tf.concat([rand([3, 1001], 3).mul(60), tf.fill([3, 7], -1e9)], 1)), // wide range, masked entries
    ...pairs.flatMap(([sa, sb], i) => {
      const a = rand(sa, 10 + i), b = rand(sb, 20 + i).add(1.5); // b away from 0 for div
      return [a.add(b), a.sub(b), b.sub(a), a.mul(b), a.div(b), b.div(a)];
    }),
  ]);
  assertClose('softmax', native[0]!, stock[0]!, 33);
  assertClose('softmax rank 3', native[1]!, stock[1]!, 200);
  assertClose('softmax wide range', native[2]!, stock[2]!, 1008);
  for (let i = 3; i < native.length; i++) assert.deepEqual(native[i], stock[i], `binary op ${i - 3} (${JSON.stringify(pairs[Math.floor((i - 3) / 6)])})`);
});

test('native kernels fall back for int32 and leak no tensors', { skip }, async () => {
  await initBackend('cpu-native');
  registerNativeKernels();
  const ints = tf.matMul(tf.tensor2d([1, 2, 3, 4], [2, 2], 'int32'), tf.tensor2d([5, 6, 7, 8], [2, 2], 'int32'));
  assert.equal(ints.dtype, 'int32');
  assert.deepEqual(Array.from(await ints.data()), [19, 22, 43, 50]);
  ints.dispose();
  const before = tf.memory().numTensors;
  const x = rand([1, 8, 8, 4], 1), w = rand([3, 3, 4, 4], 2);
  const g = tf.tidy(() => tf.grads((xx: Tensor, ww: Tensor) => tf.fused.conv2d({ x: xx as tf.Tensor4D, filter: ww as tf.Tensor4D, strides: 1, pad: 'same', bias: tf.ones([4]), activation: 'relu' }).sum())([x, w]));
  tf.dispose([x, w, ...g]);
  assert.equal(tf.memory().numTensors, before);
});

/** Every non-empty subset of 0..rank-1. */
const axisSubsets = (rank: number) => Array.from({ length: 2 ** rank - 1 }, (_, m) => [...Array(rank).keys()].filter((d) => (m + 1) & (1 << d)));

test('native Sum and Mean match the stock kernels on every axis subset, keepDims or not', { skip }, async () => {
  await initBackend('cpu-native');
  const cases: Array<[number[], number[][]]> = [
    [[3, 4, 5, 6], axisSubsets(4)],
    [[2, 1, 7, 300], axisSubsets(4)], // a size-1 dim; > 256 kept columns
    [[1, 6, 6, 4, 5], [[1, 2, 4], [1, 2, 3, 4], [4], [0, 1, 2]]], // GroupNorm moments, bias grads
    [[10], [[0]]],
  ];
  const shapes: number[][] = [];
  const { native, stock } = await both(() => cases.flatMap(([shape, subsets], c) => subsets.flatMap((axes, i) => {
    const x = rand(shape, 100 * c + i);
    const outs = [x.sum(axes), x.mean(axes, true), x.sum(axes.map((a) => a - shape.length), true)];
    shapes.push(...outs.map((t) => t.shape));
    return outs;
  })));
  assert.deepEqual(shapes.slice(0, shapes.length / 2), shapes.slice(shapes.length / 2), 'output shapes');
  for (let i = 0; i < native.length; i++) assertClose(`reduction ${i}`, native[i]!, stock[i]!, 2);
});

test('native Transpose, Slice, SplitV, Unpack, PadV2, Concat equal the stock kernels exactly', { skip }, async () => {
  await initBackend('cpu-native');
  const perms: Array<[number[], number[]]> = [
    [[5, 7], [1, 0]], [[2, 3, 4, 5], [0, 2, 1, 3]], [[2, 3, 4, 5], [3, 2, 1, 0]], [[1, 6, 1, 9], [2, 3, 0, 1]],
    [[2, 3, 4, 5, 6], [0, 3, 1, 4, 2]], [[3, 1, 4], [0, 1, 2]], [[2, 70, 3], [1, 0, 2]],
    [[70001, 3], [1, 0]], // rows long enough to be split between tasks
  ];
  const shapes: number[][] = [];
  const { native, stock } = await both(() => {
    const x = rand([4, 5, 6, 7], 7);
    const outs = [
      ...perms.map(([s, p], i) => rand(s, 30 + i).transpose(p)),
      ...[0, 1, 2, 3, -1].flatMap((axis) => tf.split(x, [1, x.shape.at(axis)! - 3, 2], axis)),
      ...tf.split(x, 2, 2), ...tf.split(rand([2, 8, 10], 3), 2, -1), ...tf.split(rand([2, 140001], 8), 2, 0),
      ...[0, 1, 2, 3, -1].flatMap((axis) => tf.unstack(x, axis)),
      x.pad([[0, 0], [1, 1], [1, 1], [0, 0]]), x.pad([[1, 0], [0, 2], [3, 0], [0, 1]], 2.5), rand([5], 4).pad([[2, 3]], -1),
      rand([3, 4], 5).pad([[0, 0], [0, 0]]),
      ...[0, 1, 2, 3, -1].map((axis) => tf.concat([x, rand(x.shape.map((n, d) => (d === (axis + 4) % 4 ? 2 : n)), 9), x.slice([0, 0, 0, 0], x.shape.map((n, d) => (d === (axis + 4) % 4 ? 0 : n)))], axis)),
      tf.concat([rand([256, 700], 10), rand([256, 300], 11)], 1), tf.concat([rand([5], 12)], 0),
      x.slice([0, 1, 2, 3], [2, 3, 4, 4]), x.slice([1, 0, 0, 0], [2, 5, 6, 7]), rand([64, 320], 6).slice([0, 40], [64, 40]), x.slice([0, 0, 0, 6], [-1, -1, -1, 1]),
    ];
    shapes.push(...outs.map((t) => t.shape));
    return outs;
  });
  assert.deepEqual(shapes.slice(0, shapes.length / 2), shapes.slice(shapes.length / 2), 'output shapes');
  for (let i = 0; i < native.length; i++) assert.deepEqual(native[i], stock[i], `layout op ${i}`);
});

test('native Neg, Exp, Sigmoid, Erf, Square, Sqrt match the stock kernels; int32 falls back', { skip }, async () => {
  await initBackend('cpu-native');
  const { native, stock } = await both(() => {
    const x = rand([70000], 9).mul(6); // > one 32k chunk, both signs, |x| up to 6
    return [x.neg(), x.exp(), x.sigmoid(), x.erf(), tf.scalar(0).erf(), tf.scalar(-0.5).exp(), x.square(), x.abs().sqrt()];
  });
  for (let i = 0; i < native.length; i++) assertClose(`unary ${i}`, native[i]!, stock[i]!, 1);
  registerNativeKernels();
  const ints = tf.tensor2d([1, 2, 3, 4, 5, 6], [2, 3], 'int32');
  const outs = [ints.sum(0), ints.mean(1), ints.transpose(), ints.pad([[1, 0], [0, 1]]), ints.neg(), tf.concat([ints, ints], 1), ...tf.split(ints, 3, 1), ...tf.unstack(ints)];
  assert.deepEqual(outs.map((t) => t.dtype), ['int32', 'float32', 'int32', 'int32', 'int32', 'int32', 'int32', 'int32', 'int32', 'int32', 'int32']);
  assert.deepEqual(Array.from(await outs[0]!.data()), [5, 7, 9]);
  assert.deepEqual(Array.from(await outs[5]!.data()), [1, 2, 3, 1, 2, 3, 4, 5, 6, 4, 5, 6]);
  assert.deepEqual(Array.from(await outs[3]!.data()), [0, 0, 0, 0, 1, 2, 3, 0, 4, 5, 6, 0]);
  tf.dispose([ints, ...outs]);
});

test('the compute kernels read denormals as zero (they cost a hundredfold) and leave JavaScript IEEE', { skip }, async () => {
  await initBackend('cpu-native');
  const denormal = 1e-39; // float32-denormal: |x| < 1.18e-38, as CLIP's masked attention probabilities
  const a = tf.tensor2d([denormal, denormal, 1, 0], [2, 2]), b = tf.tensor2d([1e30, 0, 0, 1e30], [2, 2]);
  const { native, stock } = await both(() => [tf.matMul(a, b)]);
  assert.deepEqual([...stock[0]!].map((v) => v > 0), [true, true, true, false], 'stock: 1e-39·1e30 = 1e-9');
  assert.deepEqual([...native[0]!], [0, 0, 1e30, 0].map(Math.fround), 'native: the denormal reads as zero');
  // the flags are the call's alone: JS arithmetic on denormal doubles and float32s is unchanged
  const tiny = [Number.MIN_VALUE, 1e-39][Number(a.shape[0] > 5)]!;
  assert.ok(tiny * 3 > 0 && Math.fround(1e-39) * 2 > 0);
  tf.dispose([a, b]);
});
