/**
 * @file The kernels trainers/backend/wasm/kernels.ts adds to the wasm backend, each run on random inputs
 * on `wasm` and on the stock pure-JS `cpu` backend in the same process and compared. Shapes cover
 * stride 2, same/valid/number/explicit padding, 1×1 filters, batch > 1 and odd sizes.
 */
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { tf, initBackend } from '../trainers/backend/index.ts';
import { WASM_POLYFILLS } from '../trainers/backend/wasm/kernels.ts';

type Attrs = Record<string, unknown>;
interface Input { shape: number[]; dtype?: 'float32' | 'int32'; values: Float32Array | Int32Array }

let seed = 12345;
/** Deterministic uniform [-1, 1) values (mulberry32), so a failure reproduces. */
function rand(n: number): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    out[i] = (((t ^ (t >>> 14)) >>> 0) / 4294967296) * 2 - 1;
  }
  return out;
}
const randInput = (shape: number[]): Input => ({ shape, values: rand(shape.reduce((a, b) => a * b, 1)) });

/** Run one kernel on a backend from plain arrays; returns shape and values. */
async function runOn(backend: string, kernel: string, inputs: Record<string, Input>, attrs: Attrs) {
  await tf.setBackend(backend);
  const tensors = Object.fromEntries(Object.entries(inputs).map(([k, v]) => [k, tf.tensor(v.values, v.shape, v.dtype ?? 'float32')]));
  const out = tf.engine().runKernel(kernel, tensors, attrs as tf.NamedAttrMap) as tf.Tensor;
  const result = { shape: out.shape, values: await out.data() };
  tf.dispose([out, ...Object.values(tensors)]);
  return result;
}

/** wasm result vs cpu result, max |diff| within 1e-5 of the reference's scale. */
async function compare(kernel: string, inputs: Record<string, Input>, attrs: Attrs): Promise<void> {
  const got = await runOn('wasm', kernel, inputs, attrs);
  const want = await runOn('cpu', kernel, inputs, attrs);
  await tf.setBackend('wasm');
  assert.deepEqual(got.shape, want.shape, `${kernel} shape`);
  let scale = 1, maxDiff = 0;
  for (let i = 0; i < want.values.length; i++) {
    scale = Math.max(scale, Math.abs(want.values[i]!));
    maxDiff = Math.max(maxDiff, Math.abs(got.values[i]! - want.values[i]!));
  }
  assert.ok(maxDiff <= 1e-5 * scale, `${kernel} ${JSON.stringify(attrs)}: max diff ${maxDiff} (scale ${scale})`);
}

before(async () => {
  const choice = await initBackend('wasm');
  assert.equal(choice.name, 'wasm');
});

test('every polyfilled kernel is registered on wasm', () => {
  for (const name of Object.keys(WASM_POLYFILLS)) assert.ok(tf.getKernel(name, 'wasm'), name);
});

/** Output spatial size of a conv, for building dy. */
function outSize(x: number[], f: number[], strides: number, pad: unknown, dilations = 1, depthwise = false): number[] {
  const ci = tf.backend_util.computeConv2DInfo(x as [number, number, number, number], f as [number, number, number, number],
    strides, dilations, pad as 'same', undefined, depthwise);
  return [ci.batchSize, ci.outHeight, ci.outWidth, ci.outChannels];
}

const EXPLICIT = [[0, 0], [0, 1], [0, 1], [0, 0]]; // the VAE's asymmetric downsampling pad
const CONV_CASES: Array<{ x: number[]; f: number[]; strides: number; pad: unknown }> = [
  { x: [1, 8, 8, 3], f: [3, 3, 3, 5], strides: 1, pad: 'same' },
  { x: [2, 7, 9, 4], f: [3, 3, 4, 6], strides: 1, pad: 'valid' },
  { x: [1, 9, 9, 4], f: [3, 3, 4, 4], strides: 2, pad: 'same' },
  { x: [2, 8, 8, 3], f: [3, 3, 3, 5], strides: 2, pad: EXPLICIT },
  { x: [1, 6, 5, 4], f: [3, 3, 4, 2], strides: 1, pad: 1 },
  { x: [2, 5, 6, 7], f: [1, 1, 7, 3], strides: 1, pad: 'valid' },
  { x: [1, 8, 8, 6], f: [1, 1, 6, 4], strides: 2, pad: 'same' },
];

test('Conv2DBackpropFilter matches cpu (strides, padding variants, 1×1)', async () => {
  for (const c of CONV_CASES) {
    const dy = outSize(c.x, c.f, c.strides, c.pad);
    await compare('Conv2DBackpropFilter', { x: randInput(c.x), dy: randInput(dy) },
      { strides: c.strides, pad: c.pad, dataFormat: 'NHWC', filterShape: c.f });
  }
});

const DW_CASES: Array<{ x: number[]; f: number[]; strides: number; pad: unknown; dilations: number }> = [
  { x: [1, 8, 8, 3], f: [3, 3, 3, 2], strides: 1, pad: 'same', dilations: 1 },
  { x: [2, 9, 7, 4], f: [3, 3, 4, 1], strides: 2, pad: 'same', dilations: 1 },
  { x: [1, 6, 6, 3], f: [1, 1, 3, 2], strides: 2, pad: 'valid', dilations: 1 },
];

test('depthwise conv backprops match cpu', async () => {
  for (const c of DW_CASES) {
    const dy = outSize(c.x, c.f, c.strides, c.pad, c.dilations, true);
    const common = { strides: c.strides, pad: c.pad, dilations: c.dilations };
    await compare('DepthwiseConv2dNativeBackpropFilter', { x: randInput(c.x), dy: randInput(dy) }, { ...common, filterShape: c.f });
    await compare('DepthwiseConv2dNativeBackpropInput', { dy: randInput(dy), filter: randInput(c.f) }, { ...common, inputShape: c.x });
  }
});

/**
 * Dilation > 1: the cpu reference kernels ignore dilations (tfjs-core's depthwise gradient refuses
 * them), so check the adjoint identities against the forward op instead: both backprops are
 * linear maps whose adjoints are the forward conv, ⟨dW, V⟩ = ⟨dy, conv(x, V)⟩ and
 * ⟨dx, U⟩ = ⟨dy, conv(U, W)⟩.
 */
test('depthwise conv backprops with dilation 2 are adjoint to the forward op', () => {
  type Shape4 = [number, number, number, number];
  const xs: Shape4 = [1, 9, 8, 2], fs: Shape4 = [3, 3, 2, 3], a = { strides: 1, pad: 'valid' as const, dilations: 2 };
  const dyShape = outSize(xs, fs, a.strides, a.pad, a.dilations, true) as Shape4;
  const [lhsW, rhsW, lhsX, rhsX] = tf.tidy(() => {
    const x = tf.tensor(rand(2 * 9 * 8), xs) as tf.Tensor4D, w = tf.tensor(rand(54), fs) as tf.Tensor4D;
    const dy = tf.tensor(randInput(dyShape).values, dyShape) as tf.Tensor4D;
    const v = tf.tensor(rand(54), fs) as tf.Tensor4D, u = tf.tensor(rand(2 * 9 * 8), xs) as tf.Tensor4D;
    const dW = tf.engine().runKernel('DepthwiseConv2dNativeBackpropFilter', { x, dy }, { ...a, filterShape: fs }) as tf.Tensor;
    const dX = tf.engine().runKernel('DepthwiseConv2dNativeBackpropInput', { dy, filter: w }, { ...a, inputShape: xs }) as tf.Tensor;
    const conv = (inp: tf.Tensor4D, f: tf.Tensor4D) => tf.depthwiseConv2d(inp, f, a.strides, a.pad, 'NHWC', a.dilations);
    return [dW.mul(v).sum(), dy.mul(conv(x, v)).sum(), dX.mul(u).sum(), dy.mul(conv(u, w)).sum()].map((t) => t.dataSync()[0]!);
  });
  assert.ok(Math.abs(lhsW - rhsW) <= 1e-4 * Math.max(1, Math.abs(rhsW)), `filter: ${lhsW} vs ${rhsW}`);
  assert.ok(Math.abs(lhsX - rhsX) <= 1e-4 * Math.max(1, Math.abs(rhsX)), `input: ${lhsX} vs ${rhsX}`);
});

test('UnsortedSegmentSum matches cpu (repeats, empty segments, int32)', async () => {
  const ids = (v: number[]): Input => ({ shape: [v.length], dtype: 'int32', values: Int32Array.from(v) });
  await compare('UnsortedSegmentSum', { x: randInput([6, 5]), segmentIds: ids([3, 0, 3, 1, 0, 3]) }, { numSegments: 5 });
  await compare('UnsortedSegmentSum', { x: randInput([4]), segmentIds: ids([0, 0, 1, 0]) }, { numSegments: 2 });
  const xi: Input = { shape: [4, 2], dtype: 'int32', values: Int32Array.from([1, 2, 3, 4, 5, 6, 7, 8]) };
  await compare('UnsortedSegmentSum', { x: xi, segmentIds: ids([1, 0, 1, 1]) }, { numSegments: 2 });
});

test('gradients that use the polyfills run end to end on wasm (conv filter, gather table)', async () => {
  const [dW, dTable] = tf.tidy(() => {
    const x = tf.tensor(rand(2 * 6 * 6 * 3), [2, 6, 6, 3]);
    const table = tf.tensor(rand(10 * 4), [10, 4]);
    const ids = tf.tensor1d([3, 3, 7], 'int32');
    const gW = tf.grad((w: tf.Tensor) => tf.conv2d(x as tf.Tensor4D, w as tf.Tensor4D, 2, 'same').sum())(tf.ones([3, 3, 3, 4]));
    const gT = tf.grad((t: tf.Tensor) => tf.gather(t, ids).sum())(table);
    return [gW, gT];
  });
  assert.deepEqual(dW.shape, [3, 3, 3, 4]);
  const rows = (await dTable.array()) as number[][];
  assert.deepEqual(rows.map((r) => r[0]), [0, 0, 0, 2, 0, 0, 0, 1, 0, 0]);
  tf.dispose([dW, dTable]);
});
