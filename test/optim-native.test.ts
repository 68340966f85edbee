/**
 * @file trainers/optim/native.ts: the fused C++ optimizer kernels give the TF-ops path's results —
 * AdamW values within 1e-7 relative (in fact equal), 8-bit AdamW's byte codes and absmax identical
 * (including blocks with NaN, Inf and all-zero moments, padding, float32-moment small params), the
 * EMA update exact, the finite check the same verdicts — and states exported from one path
 * continue on the other to the same values; the clip-grad norm agrees. Skipped when the cpu-native backend is not in use.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { initBackend, tf, type Tensor } from '../trainers/backend/index.ts';
import { AdamW } from '../trainers/optim/adamw.ts';
import { AdamW8bit } from '../trainers/optim/adamw8bit.ts';
import type { ExportedOptimizerState } from '../trainers/optim/optim-state.ts';
import { Ema } from '../trainers/optim/ema.ts';
import { Adafactor, type AdafactorOptions } from '../trainers/optim/adafactor.ts';
import { allFiniteWithin } from '../trainers/optim/check.ts';
import { totalGradNorm } from '../trainers/optim/clip-grad.ts';
import { optimKernels, setNativeOptim } from '../trainers/optim/native.ts';
import { nativeSkip } from './helpers/native.ts';
import { seededNormal } from '../trainers/random.ts';

let skip: string | false = false;
before(async () => {
  await initBackend();
  skip = nativeSkip(optimKernels() ? false : 'native optim kernels not in use on this backend');
});
after(() => setNativeOptim(true));

// a 2-D param whose size is no multiple of the block or of 3, a conv filter, a small one (float32 moments)
const SHAPES: Record<string, number[]> = { 'w.weight': [300, 70], 'conv.weight': [3, 3, 8, 16], 'b.bias': [40] };

function values(shape: number[], seed: number, scale: number): Float32Array {
  const v = seededNormal(seed, shape.reduce((a, b) => a * b, 1));
  return v.map((x) => x * scale);
}

function makeParams(): Map<string, tf.Variable> {
  return new Map(Object.entries(SHAPES).map(([k, s], i) => [k, tf.variable(tf.tensor(values(s, 10 + i, 0.1), s), true, `${k}-${Math.random()}`)]));
}

/**
 * Gradients for step `step`; 'poison' puts NaN/Inf/zero blocks into the 2-D one, 'spread' gives
 * it magnitudes over 8 decades (every region of the dynamic code book).
 */
function makeGrads(step: number, mode: 'plain' | 'poison' | 'spread' = 'plain'): Map<string, Tensor> {
  return new Map(Object.entries(SHAPES).map(([k, s], i) => {
    const g = values(s, 100 * step + i, step === 2 ? 1e3 : 1e-2);
    if (mode === 'spread' && k === 'w.weight') for (let j = 0; j < g.length; j++) g[j] = Math.sign(g[j]!) * 10 ** (-8 * ((j * 0.618034) % 1));
    if (mode === 'poison' && k === 'w.weight') {
      g.fill(0, 0, 256); // an all-zero block: absmax 0
      g[300] = NaN;
      g[600] = Infinity;
      g[g.length - 1] = -Infinity; // in the padded last block
    }
    return [k, tf.tensor(g, s)];
  }));
}

async function run(native: boolean, make: (p: Map<string, tf.Variable>) => AdamW | AdamW8bit, mode: 'plain' | 'poison' | 'spread' = 'plain') {
  setNativeOptim(native);
  const params = makeParams();
  const opt = make(params);
  for (let step = 1; step <= 3; step++) {
    const grads = makeGrads(step, step === 3 ? mode : 'plain');
    opt.step(grads, 1e-3);
    tf.dispose([...grads.values()]);
  }
  const out = new Map<string, Float32Array>();
  for (const [k, p] of params) out.set(k, Float32Array.from(await p.data()));
  const state = opt instanceof AdamW8bit ? await opt.exportState() : undefined;
  opt.dispose();
  tf.dispose([...params.values()]);
  setNativeOptim(true);
  return { out, state };
}

function assertClose(a: Map<string, Float32Array>, b: Map<string, Float32Array>, rel: number): void {
  for (const [k, x] of a) {
    const y = b.get(k)!;
    for (let i = 0; i < x.length; i++) {
      if (Number.isNaN(x[i]) && Number.isNaN(y[i])) continue;
      const tol = rel * Math.max(Math.abs(x[i]!), Math.abs(y[i]!));
      assert.ok(x[i] === y[i] || Math.abs(x[i]! - y[i]!) <= tol, `${k}[${i}]: native ${x[i]} vs ops ${y[i]}`);
    }
  }
}

function assertSameState(a: ExportedOptimizerState, b: ExportedOptimizerState): void {
  assert.deepEqual([...a.params.keys()], [...b.params.keys()]);
  for (const [name, pa] of a.params) {
    const pb = b.params.get(name)!;
    assert.equal(pa.step, pb.step);
    assert.deepEqual([...pa.buffers.keys()], [...pb.buffers.keys()]);
    for (const [key, ba] of pa.buffers) {
      const bb = pb.buffers.get(key)!;
      assert.equal(ba.dtype, bb.dtype, `${name} ${key}`);
      assert.deepEqual(ba.shape, bb.shape, `${name} ${key}`);
      // byte codes and absmax identical (NaN where the other has NaN)
      assert.deepEqual(Array.from(ba.data as Float32Array), Array.from(bb.data as Float32Array), `${name} ${key} differs`);
    }
  }
}

test('AdamW: native step = TF-ops step (within 1e-7 relative), with and without weight decay', async (t) => {
  if (skip) return t.skip(skip);
  for (const weightDecay of [0, 0.01]) {
    const make = (p: Map<string, tf.Variable>) => new AdamW(p, { lr: 1e-3, weightDecay });
    const [a, b] = [await run(true, make), await run(false, make)];
    assertClose(a.out, b.out, 1e-7);
  }
});

test('AdamW8bit: native codes and absmax identical to the TF-ops path (zero, NaN, Inf blocks, padding)', async (t) => {
  if (skip) return t.skip(skip);
  for (const mode of ['plain', 'poison', 'spread'] as const) {
    const make = (p: Map<string, tf.Variable>) => new AdamW8bit(p, { minQuantSize: 1000, blockSize: 256 });
    const [a, b] = [await run(true, make, mode), await run(false, make, mode)];
    assertSameState(a.state!, b.state!);
    assertClose(a.out, b.out, 1e-7);
  }
  // a block size that is no multiple of the vector width; every parameter quantised; linear map
  const make = (p: Map<string, tf.Variable>) => new AdamW8bit(p, { minQuantSize: 0, quantMap: 'linear', blockSize: 100 });
  const [a, b] = [await run(true, make), await run(false, make)];
  assertSameState(a.state!, b.state!);
});

test('AdamW8bit: a state exported from the native path continues on the TF-ops path alike', async (t) => {
  if (skip) return t.skip(skip);
  const continueFrom = async (exportNative: boolean, continueNative: boolean) => {
    setNativeOptim(exportNative);
    const params = makeParams();
    const opt = new AdamW8bit(params, { minQuantSize: 1000 });
    const g1 = makeGrads(1, 'spread');
    opt.step(g1, 1e-3);
    const state = await opt.exportState();
    setNativeOptim(continueNative);
    const resumed = new AdamW8bit(params, { minQuantSize: 1000 });
    resumed.importState(state);
    const g2 = makeGrads(2);
    resumed.step(g2, 1e-3);
    const out = await resumed.exportState();
    tf.dispose([...g1.values(), ...g2.values(), ...params.values()]);
    opt.dispose();
    resumed.dispose();
    setNativeOptim(true);
    return out;
  };
  assertSameState(await continueFrom(true, false), await continueFrom(false, false));
  assertSameState(await continueFrom(false, true), await continueFrom(false, false));
});

test('EMA: native update equal to the JS expression, bit for bit', async (t) => {
  if (skip) return t.skip(skip);
  const shape = [1000, 37];
  const start = new Map([['w', { values: values(shape, 1, 1), shape }]]);
  const results: Float32Array[] = [];
  for (const native of [true, false]) {
    setNativeOptim(native);
    const ema = Ema.fromArrays(start, { decay: 0.9999, warmup: true });
    for (let i = 0; i < 3; i++) ema.updateArrays(new Map([['w', values(shape, 2 + i, 1)]]));
    results.push(ema.weights().get('w')!.values);
  }
  setNativeOptim(true);
  assert.deepEqual(Array.from(results[0]!), Array.from(results[1]!));
});

test('allFiniteWithin: the same verdicts natively and with TF ops', async (t) => {
  if (skip) return t.skip(skip);
  const cases: [number[], number, boolean][] = [
    [[0, -1, 2.5], Infinity, true],
    [[0, NaN, 1], Infinity, false],
    [[0, Infinity], Infinity, false],
    [[0, -Infinity], 1e30, false],
    [[3, -3], 3, true],
    [[3, -3.0001], 3, false],
    [[0.1], 0.1, true], // the limit rounds to float32 as the value does
  ];
  for (const [xs, limit, want] of cases) {
    const vars = [tf.variable(tf.tensor1d(new Array(70000).fill(0))), tf.variable(tf.tensor1d(xs))];
    for (const native of [true, false]) {
      setNativeOptim(native);
      assert.equal(await allFiniteWithin(vars, limit), want, `${xs} ≤ ${limit} (${native ? 'native' : 'ops'})`);
    }
    tf.dispose(vars);
  }
  setNativeOptim(true);
});

test('totalGradNorm: the native float64 norm agrees with the TF-ops one (1e-6 relative)', async (t) => {
  if (skip) return t.skip(skip);
  const grads = makeGrads(1, 'spread');
  const norms: number[] = [];
  for (const native of [true, false]) {
    setNativeOptim(native);
    const n = totalGradNorm(grads);
    norms.push((await n.data())[0]!);
    n.dispose();
  }
  setNativeOptim(true);
  tf.dispose([...grads.values()]);
  assert.ok(Math.abs(norms[0]! - norms[1]!) <= 1e-6 * norms[1]!, `native ${norms[0]} vs ops ${norms[1]}`);
});

// 1-D, 2-D (one row, several row chunks per task), 4-D conv filters (torch-layout factoring), odd sizes
const AF_SHAPES: Record<string, number[]> = {
  'b.bias': [37], 'w.weight': [300, 70], 'one.weight': [1, 5], 'tall.weight': [1500, 131], 'conv.weight': [3, 3, 8, 16], 'conv1.weight': [1, 1, 7, 5],
};

async function runAdafactor(native: boolean, opts: AdafactorOptions) {
  setNativeOptim(native);
  const params = new Map(Object.entries(AF_SHAPES).map(([k, s], i) => [k, tf.variable(tf.tensor(values(s, 10 + i, 0.1), s), true, `${k}-${Math.random()}`)]));
  const opt = new Adafactor(params, opts);
  for (let step = 1; step <= 3; step++) {
    // step 2's large gradients make the update-RMS clipping act
    const grads = new Map(Object.entries(AF_SHAPES).map(([k, s], i) => [k, tf.tensor(values(s, 100 * step + i, step === 2 ? 1e3 : 1e-2), s)]));
    opt.step(grads, 1e-3);
    tf.dispose([...grads.values()]);
  }
  const out = new Map<string, Float32Array>();
  for (const [k, p] of params) out.set(k, Float32Array.from(await p.data()));
  const state = await opt.exportState();
  opt.dispose();
  tf.dispose([...params.values()]);
  setNativeOptim(true);
  return { out, state };
}

test('Adafactor: native step = TF-ops step over 3 steps (1e-6 relative), state alike in format and values', async (t) => {
  if (skip) return t.skip(skip);
  const variants: AdafactorOptions[] = [{}, { beta1: 0.9, weightDecay: 0.01, scaleParameter: true }, { clipThreshold: 0.5, weightDecay: 0.1 }];
  for (const opts of variants) {
    const [a, b] = [await runAdafactor(true, opts), await runAdafactor(false, opts)];
    assertClose(a.out, b.out, 1e-6);
    assert.deepEqual(a.state.hyper, b.state.hyper);
    assert.deepEqual([...a.state.params.keys()], [...b.state.params.keys()]);
    for (const [name, pa] of a.state.params) {
      const pb = b.state.params.get(name)!;
      assert.equal(pa.step, pb.step);
      assert.deepEqual([...pa.buffers.keys()], [...pb.buffers.keys()], name);
      for (const [key, ba] of pa.buffers) {
        const bb = pb.buffers.get(key)!;
        assert.equal(ba.dtype, bb.dtype);
        assert.deepEqual(ba.shape, bb.shape, `${name} ${key}`);
        assertClose(new Map([[`${name} ${key}`, ba.data as Float32Array]]), new Map([[`${name} ${key}`, bb.data as Float32Array]]), 1e-6);
      }
    }
  }
});
