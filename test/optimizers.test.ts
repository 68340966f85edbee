/**
 * @file trainers/optim/adamw8bit.ts and adafactor.ts: bitsandbytes' code books, blockwise
 * quantisation round trip, both optimizers lower a quadratic, 8-bit AdamW tracks float32 AdamW
 * over a few steps, Adafactor's first step matches transformers' formula computed by hand, and
 * exported states restore to the same next step.
 */
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { initBackend, tf, type Tensor } from '../trainers/backend/index.ts';
import { AdamW } from '../trainers/optim/adamw.ts';
import { AdamW8bit, CodeBook, dequantizeBlockwise, dynamicMap, linearMap, quantizeBlockwise } from '../trainers/optim/adamw8bit.ts';
import { Adafactor } from '../trainers/optim/adafactor.ts';
import { seededNormal } from '../trainers/random.ts';

before(async () => {
  await initBackend();
});

const randn = (shape: number[], seed: number): Tensor => tf.tensor(seededNormal(seed, shape.reduce((a, b) => a * b, 1)), shape);

async function maxAbs(a: Tensor, b: Tensor): Promise<number> {
  const d = tf.tidy(() => a.sub(b).abs().max());
  const v = (await d.data())[0]!;
  d.dispose();
  return v;
}

test('bitsandbytes dynamic maps: 256 sorted values with 0 and 1, signed and unsigned', () => {
  const s = dynamicMap(true);
  const u = dynamicMap(false);
  for (const m of [s, u, linearMap(true), linearMap(false)]) {
    assert.equal(m.length, 256);
    for (let i = 1; i < 256; i++) assert.ok(m[i]! >= m[i - 1]!);
    assert.equal(m[255], 1);
  }
  assert.ok(s.includes(0) && u.includes(0));
  assert.ok(s[0]! < -0.99 && u[0] === 0);
  assert.ok(Math.min(...[...u].filter((x) => x > 0)) < 1e-6); // decades down to 1e-6
});

test('blockwise quantisation round trip: each value within half a code step of its block scale', async () => {
  const book = new CodeBook(dynamicMap(true));
  const x = tf.tidy(() => randn([3, 5, 70], 7).mul(tf.linspace(0.001, 10, 70))); // 1050 values, 5 blocks of 256
  const [packed, absmax] = quantizeBlockwise(book, x, 256);
  const back = dequantizeBlockwise(book, packed, absmax, x.shape, 256);
  assert.deepEqual(back.shape, x.shape);
  assert.equal(absmax.size, 5);
  const xs = await x.data();
  const bs = await back.data();
  const am = await absmax.data();
  for (let i = 0; i < xs.length; i++) {
    const scale = am[Math.floor(i / 256)]!;
    // the dynamic map's widest gap is 0.9/64 of the scale near ±1
    assert.ok(Math.abs(xs[i]! - bs[i]!) <= scale * 0.0075 + 1e-12, `element ${i}: ${xs[i]} → ${bs[i]}`);
  }
  tf.dispose([x, packed, absmax, back]);
  book.dispose();
});

/** Steps of f(p) = Σ (p − target)², gradient 2(p − target); returns the final loss. */
function quadratic(opt: { step(g: Map<string, Tensor>, lr: number): void }, p: tf.Variable, target: Tensor, steps: number, lr: number): number {
  for (let i = 0; i < steps; i++) {
    const g = tf.tidy(() => p.sub(target).mul(2));
    opt.step(new Map([['p', g]]), lr);
    g.dispose();
  }
  return tf.tidy(() => p.sub(target).square().sum().dataSync()[0]!);
}

for (const [name, make] of [
  ['AdamW8bit', (p: Map<string, tf.Variable>) => new AdamW8bit(p, { minQuantSize: 0, weightDecay: 0 })],
  ['Adafactor', (p: Map<string, tf.Variable>) => new Adafactor(p)],
  ['Adafactor (β1, scaled)', (p: Map<string, tf.Variable>) => new Adafactor(p, { beta1: 0.9, scaleParameter: true })],
] as const) {
  test(`${name} lowers a quadratic (2-D and conv-shaped parameters)`, () => {
    for (const shape of [[40, 60], [3, 3, 8, 16], [50]]) {
      const p = tf.variable(randn(shape, 1), true);
      const target = randn(shape, 2);
      const before = tf.tidy(() => p.sub(target).square().sum().dataSync()[0]!);
      const opt = make(new Map([['p', p]]));
      const after = quadratic(opt, p, target, 60, 0.05);
      assert.ok(after < before * 0.5, `${shape}: ${before} → ${after}`);
      opt.dispose();
      tf.dispose([p, target]);
    }
  });
}

test('AdamW8bit tracks float32 AdamW over a few steps', async () => {
  const shape = [64, 100]; // 6400 elements ≥ min_8bit_size: quantised, 25 blocks of 256
  const p32 = tf.variable(randn(shape, 3), true);
  const p8 = tf.variable(p32.clone(), true);
  const a = new AdamW(new Map([['p', p32]]), { lr: 0, weightDecay: 0.01 });
  const b = new AdamW8bit(new Map([['p', p8]]), { weightDecay: 0.01 });
  const lr = 1e-3;
  const start = p32.clone();
  for (let i = 0; i < 8; i++) {
    const g = randn(shape, 100 + i);
    a.step(new Map([['p', g]]), lr);
    b.step(new Map([['p', g]]), lr);
    g.dispose();
  }
  const moved = await maxAbs(p32, start);
  const diff = await maxAbs(p32, p8);
  assert.ok(moved > 4 * lr, `fp32 moved ${moved}`);
  assert.ok(diff < 0.05 * moved, `8-bit differs by ${diff} after moving ${moved}`);
  tf.dispose([p32, p8, start]);
  a.dispose();
  b.dispose();
});

test('Adafactor first step = transformers formula by hand (factored 2-D)', async () => {
  const [rows, cols] = [3, 4];
  const p0 = Float32Array.from({ length: 12 }, (_, i) => Math.sin(i + 1));
  const g0 = Float32Array.from({ length: 12 }, (_, i) => Math.cos(2 * i + 1) * 0.1);
  const p = tf.variable(tf.tensor(p0, [rows, cols]), true);
  const opt = new Adafactor(new Map([['p', p]]), { weightDecay: 0.1 });
  const g = tf.tensor(g0, [rows, cols]);
  const lr = 0.01;
  opt.step(new Map([['p', g]]), lr);
  // step 1: β2t = 1 − 1^−0.8 = 0 → R = rowmean(g²+eps), C = colmean(g²+eps)
  const u = Array.from(g0, (x) => x * x + 1e-30);
  const R = [...Array(rows)].map((_, r) => u.slice(r * cols, r * cols + cols).reduce((s, x) => s + x, 0) / cols);
  const C = [...Array(cols)].map((_, c) => [...Array(rows)].reduce((s, _r, r) => s + u[r * cols + c]!, 0) / rows);
  const Rmean = R.reduce((s, x) => s + x, 0) / rows;
  let upd = Array.from(g0, (x, i) => x / Math.sqrt(R[Math.floor(i / cols)]! / Rmean) / Math.sqrt(C[i % cols]!));
  const rms = Math.sqrt(upd.reduce((s, x) => s + x * x, 0) / upd.length);
  upd = upd.map((x) => (x / Math.max(1, rms)) * lr);
  const want = Array.from(p0, (x, i) => x - x * 0.1 * lr - upd[i]!);
  const got = await p.data();
  for (let i = 0; i < 12; i++) assert.ok(Math.abs(got[i]! - want[i]!) < 1e-6, `${i}: ${got[i]} vs ${want[i]}`);
  tf.dispose([p, g]);
  opt.dispose();
});

for (const [name, make] of [
  ['AdamW8bit', (p: Map<string, tf.Variable>) => new AdamW8bit(p, { minQuantSize: 1000 })],
  ['Adafactor', (p: Map<string, tf.Variable>) => new Adafactor(p, { beta1: 0.9 })],
] as const) {
  test(`${name}: an exported state restores to the same next step`, async () => {
    const shapes: Record<string, number[]> = { big: [40, 60], conv: [3, 3, 4, 8], small: [30] };
    const mk = () => new Map(Object.entries(shapes).map(([k, s], i) => [k, tf.variable(randn(s, 10 + i), true)]));
    const grads = (seed: number) => new Map(Object.entries(shapes).map(([k, s], i) => [k, randn(s, seed + i)]));
    const pa = mk();
    const a = make(pa);
    for (let i = 0; i < 3; i++) {
      const g = grads(50 + 10 * i);
      a.step(g, 0.01);
      tf.dispose([...g.values()]);
    }
    const state = await a.exportState();
    const pb = new Map([...pa].map(([k, v]) => [k, tf.variable(v.clone(), true)]));
    const b = make(pb);
    b.importState(state);
    const g = grads(99);
    a.step(g, 0.01);
    b.step(g, 0.01);
    for (const k of pa.keys()) assert.equal(await maxAbs(pa.get(k)!, pb.get(k)!), 0, k);
    assert.throws(() => make(new Map([['other', tf.variable(tf.zeros([2]))]])).importState(state), /not a trained parameter/);
    tf.dispose([...g.values(), ...pa.values(), ...pb.values()]);
    a.dispose();
    b.dispose();
  });
}
