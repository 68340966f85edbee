/**
 * @file bf16 mixed precision in the native kernels (native/src/bf16.h, trainers/backend/precision.ts):
 * conv2d, its input gradient and batched matmul under bf16 equal the float32 kernels run on the
 * bf16-rounded operands, within float32 accumulation error (a bf16 product is exact in float32,
 * so only the summation order differs); the filter gradient stays float32 bit for bit. Runs every
 * bf16 kernel this CPU has (AMX, AVX512-BF16, AVX-512 FMA on the widened values) and the portable
 * one always; the portable kernel gives the AVX512-BF16 and AVX-512 FMA kernels' sums bit for bit.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { initBackend, tf, setComputePrecision, choosePrecision, type Tensor } from '../trainers/backend/index.ts';
import { nativeStatus } from '../trainers/backend/native/index.ts';
import { loadAddon } from '../trainers/backend/native/addon.ts';
import { bf16BitsToFloat, floatToBf16Bits } from '../trainers/io/half.ts';
import { assertClose } from './helpers/close.ts';
import { nativeSkip } from './helpers/native.ts';
import { values } from './helpers/values.ts';

const status = nativeStatus();
const skip = nativeSkip(status.available ? false : status.reason);

const bf16 = (v: Float32Array) => v.map((x) => bf16BitsToFloat(floatToBf16Bits(x)));
const rand = (shape: number[], seed: number, round = false): Tensor => {
  const v = values(shape.reduce((a, b) => a * b, 1), seed);
  return tf.tensor(round ? bf16(v) : v, shape);
};

/** The bf16 kernels to run: each distinct one this CPU reaches, portable always. */
function kernels(): string[] {
  const addon = loadAddon();
  const seen = new Set<string>();
  for (const cap of ['', 'avx512-bf16', 'avx512-fma', 'portable'] as const) seen.add(addon.bf16Isa!(cap));
  addon.bf16Isa!(''); // back to the best (or the env's cap)
  return [...seen];
}

async function run(precision: 'fp32' | 'bf16', f: () => Tensor[]): Promise<Float32Array[]> {
  setComputePrecision(precision);
  try {
    const outs = tf.tidy(f);
    const vals = await Promise.all(outs.map(async (t) => (await t.data()) as Float32Array));
    tf.dispose(outs);
    return vals;
  } finally {
    setComputePrecision('fp32');
  }
}

const convCases = [
  { x: [2, 9, 11, 5], w: [3, 3, 5, 7], stride: 1, pad: 'same' as const },
  { x: [1, 9, 11, 5], w: [3, 3, 5, 7], stride: 2, pad: 'valid' as const },
  { x: [2, 8, 8, 6], w: [3, 3, 6, 4], stride: 2, pad: 'same' as const },
  { x: [2, 5, 6, 40], w: [1, 1, 40, 70], stride: 1, pad: 'valid' as const },
  { x: [1, 20, 20, 77], w: [3, 3, 77, 33], stride: 1, pad: 'same' as const }, // K = 693: two k-blocks, odd
];

test('bf16 conv2d and its input gradient equal float32 on bf16-rounded operands; the filter gradient stays float32', { skip }, async () => {
  await initBackend('cpu-native');
  const addon = loadAddon();
  const byKernel = new Map<string, Float32Array[]>();
  for (const kernel of kernels()) {
    addon.bf16Isa!(kernel as 'portable');
    for (const [i, c] of convCases.entries()) {
      const label = `${kernel} conv ${JSON.stringify(c)}`;
      const grads = (round: boolean) => () => {
        const x = rand(c.x, 11 + i, round), w = rand(c.w, 23 + i, round);
        const f = (xx: Tensor, ww: Tensor) => tf.conv2d(xx as tf.Tensor4D, ww as tf.Tensor4D, c.stride, c.pad);
        const y = f(x, w);
        const r = rand(y.shape, 37 + i, round);
        const [dx, dw] = tf.grads((xx: Tensor, ww: Tensor) => f(xx, ww).mul(r).sum())([x, w]);
        return [y, dx!, dw!];
      };
      const mixed = await run('bf16', grads(false));
      const rounded = await run('fp32', grads(true));
      const plain = await run('fp32', grads(false));
      const [kh, kw, ci, co] = c.w as [number, number, number, number];
      assertClose(`${label} y`, mixed[0]!, rounded[0]!, kh * kw * ci);
      assertClose(`${label} dx`, mixed[1]!, rounded[1]!, kh * kw * co);
      assert.deepEqual(mixed[2], plain[2], `${label} dw: float32 in both modes`);
      assert.notDeepEqual(mixed[0], plain[0], `${label}: the bf16 path ran`);
      byKernel.set(`${i}`, [...(byKernel.get(`${i}`) ?? []), mixed[0]!, mixed[1]!]);
    }
  }
  addon.bf16Isa!('');
  // every kernel but AMX gives the portable kernel's sums bit for bit
  const ran = kernels();
  for (const [i, outs] of byKernel) {
    const at = (k: string) => 2 * ran.indexOf(k);
    for (const k of ran.filter((k) => k !== 'amx' && k !== 'portable')) {
      assert.deepEqual(outs[at(k)], outs[at('portable')], `conv case ${i} y: portable = ${k}`);
      assert.deepEqual(outs[at(k) + 1], outs[at('portable') + 1], `conv case ${i} dx: portable = ${k}`);
    }
  }
});

const matmulCases = [
  { a: [5, 7], b: [7, 3], ta: false, tb: false },
  { a: [70, 33], b: [45, 70], ta: true, tb: true },
  { a: [3, 17, 9], b: [3, 9, 13], ta: false, tb: false },
  { a: [2, 3, 4, 5], b: [5, 6], ta: false, tb: false },
  { a: [2, 64, 40], b: [2, 77, 40], ta: false, tb: true }, // attention-shaped: head width 40
  { a: [130, 1031], b: [1031, 65], ta: false, tb: false }, // K over two blocks, odd; edge rows and columns
];

test('bf16 batched matmul equals float32 on bf16-rounded operands, on every kernel present', { skip }, async () => {
  await initBackend('cpu-native');
  const addon = loadAddon();
  const outs = new Map<string, Float32Array>();
  for (const kernel of kernels()) {
    addon.bf16Isa!(kernel as 'portable');
    for (const [i, c] of matmulCases.entries()) {
      const f = (round: boolean) => () => [tf.matMul(rand(c.a, 5 + i, round), rand(c.b, 9 + i, round), c.ta, c.tb)];
      const [mixed] = await run('bf16', f(false));
      const [rounded] = await run('fp32', f(true));
      const k = c.ta ? c.a[c.a.length - 2]! : c.a[c.a.length - 1]!;
      assertClose(`${kernel} matmul ${JSON.stringify(c)}`, mixed!, rounded!, k);
      outs.set(`${kernel} ${i}`, mixed!);
    }
  }
  addon.bf16Isa!('');
  for (const k of kernels().filter((k) => k !== 'amx' && k !== 'portable'))
    for (const i of matmulCases.keys()) assert.deepEqual(outs.get(`${k} ${i}`), outs.get(`portable ${i}`), `matmul case ${i}: portable = ${k}`);
});

test('precision: fp32 stays the float32 kernels bit for bit; auto and bf16 resolve with a reason; bad values are named', { skip }, async () => {
  await initBackend('cpu-native');
  const f = () => [tf.matMul(rand([40, 50], 1), rand([50, 30], 2))];
  const before = await run('fp32', f);
  assert.equal(choosePrecision('fp32').precision, 'fp32');
  const after = await run('fp32', f);
  assert.deepEqual(after[0], before[0]);
  const bf = choosePrecision('bf16');
  assert.equal(bf.precision, 'bf16');
  assert.ok(['amx', 'avx512-bf16', 'avx512-fma', 'portable'].includes(bf.kernel!), bf.kernel);
  const auto = choosePrecision('auto');
  assert.match(auto.why, /^precision auto → (fp32|bf16): /);
  assert.throws(() => choosePrecision('fp16' as 'fp32'), /precision: unknown 'fp16'/);
  setComputePrecision('fp32');
  assert.throws(() => loadAddon().bf16Isa!('avx2' as 'portable'), /bf16Isa: 'avx2' is not/);
});
