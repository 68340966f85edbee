/**
 * @file bf16Weights (trainers/optim/bf16-round.ts): stochastic rounding to bfloat16 lands on one
 * of the two neighbouring bf16 values, the upper one with the probability of the dropped bits
 * (unbiased: the mean of many roundings is the float32 value); NaN/Inf survive; round-to-nearest
 * ties to even. Training with it keeps every weight bf16-exact and still moves weights by updates
 * far below a bf16 step (which round-to-nearest would lose); a Dreambooth run with it writes
 * bf16-exact weights, and cancel + resume ends identical to an uninterrupted run.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initBackend, tf } from '../trainers/backend/index.ts';
import { nearestBf16, stochasticRoundBf16, useBf16Weights } from '../trainers/optim/bf16-round.ts';
import { TrainableOptimizer, makeGroupOptimizer } from '../trainers/optim/trainable.ts';
import { Rng } from '../trainers/random.ts';
import { validate } from '../schemas/index.ts';
import { dreamboothSpec, runDreambooth, type DbSpec } from '../trainers/methods/dreambooth.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import type { JobContext } from '../trainers/job.ts';
import { onGradBackend } from './helpers/golden.ts';

let tmp: string;
before(async () => {
  await initBackend();
  tmp = mkdtempSync(join(tmpdir(), 'sidetrain-bf16-'));
});
after(() => rmSync(tmp, { recursive: true, force: true }));

const bf16Exact = (x: Float32Array) => new Uint32Array(x.buffer, x.byteOffset, x.length).every((u) => (u & 0xffff) === 0);

test('stochastic bf16 rounding: one of the two neighbours, the upper with the dropped bits\' probability (unbiased)', () => {
  const rng = new Rng(7);
  const xs = Float32Array.from({ length: 40 }, (_, i) => (i % 2 ? -1 : 1) * (0.001 + rng.next()) * 2 ** (i % 9 - 4));
  const n = 20000;
  for (const x of xs) {
    const lo = new Float32Array(new Uint32Array([new Uint32Array(Float32Array.of(x).buffer)[0]! & 0xffff0000]).buffer)[0]!; // toward zero
    const ulp = new Float32Array(new Uint32Array([(new Uint32Array(Float32Array.of(x).buffer)[0]! & 0xffff0000) + 0x10000]).buffer)[0]! - lo;
    const p = (x - lo) / ulp; // probability of rounding away from zero
    const draws = stochasticRoundBf16(new Float32Array(n).fill(x), Rng.derive(1, 'test', x));
    let up = 0;
    let sum = 0;
    for (const d of draws) {
      assert.ok(d === lo || d === lo + ulp, `${x} → ${d} is not a neighbour`);
      if (d !== lo) up++;
      sum += d;
    }
    const sigma = Math.sqrt((p * (1 - p)) / n);
    assert.ok(Math.abs(up / n - p) < 5 * sigma + 1e-9, `${x}: rounded up ${up / n}, expected ${p}`);
    assert.ok(Math.abs(sum / n - x) < 5 * sigma * Math.abs(ulp) + 1e-12, `${x}: mean ${sum / n}`);
  }
  const special = stochasticRoundBf16(Float32Array.of(NaN, Infinity, -Infinity, 0, -0, 1), new Rng(1));
  assert.ok(Number.isNaN(special[0]!));
  assert.deepEqual([...special.slice(1)], [Infinity, -Infinity, 0, -0, 1]);
  assert.ok(bf16Exact(stochasticRoundBf16(xs, new Rng(3))));
});

test('round-to-nearest bf16 ties to even and keeps NaN/Inf', () => {
  // 1 + 2^-8 is half a bf16 step above 1 (even) → 1; 1 + 3·2^-8 is half a step above 1 + 2^-7 (odd) → 1 + 2^-6
  const got = nearestBf16(Float32Array.of(1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, Infinity, NaN));
  assert.deepEqual([...got.slice(0, 4)], [1, 1 + 2 ** -6, 1 + 2 ** -7, Infinity]);
  assert.ok(Number.isNaN(got[4]!));
});

test('bf16Weights: updates 40× below half a bf16 step still train (in expectation); every weight stays bf16-exact', async () => {
  const w = tf.variable(tf.ones([1024]), true);
  const vars = new Map([['w', w]]);
  const opt = new TrainableOptimizer(makeGroupOptimizer('adamw', vars));
  useBf16Weights(opt, vars, 11);
  const nearest = Float32Array.from({ length: 1024 }, () => 1);
  const g = tf.ones([1024]);
  const steps = 400;
  const lr = 1e-4; // AdamW with a constant gradient moves each weight by ≈ lr; bf16's step at 1 is 2^-7 ≈ 7.8e-3
  for (let i = 0; i < steps; i++) {
    opt.step(new Map([['w', g]]), lr);
    for (let j = 0; j < nearest.length; j++) nearest[j] = nearestBf16(Float32Array.of(nearest[j]! - lr))[0]!;
  }
  const values = (await w.data()) as Float32Array;
  assert.ok(bf16Exact(values));
  const mean = values.reduce((a, b) => a + b, 0) / values.length;
  // weight decay 1e-2 adds lr·wd·w per step, negligible here
  assert.ok(Math.abs(mean - (1 - steps * lr)) < 2e-3, `mean ${mean}, float32 would give ${1 - steps * lr}`);
  assert.deepEqual([...new Set(nearest)], [1], 'round-to-nearest never moves');
  opt.dispose();
  tf.dispose([w, g]);
});

test('Dreambooth on sd-tiny with bf16Weights: bf16-exact weights written; cancel + resume equals the uninterrupted run', async () => {
  const images = join(tmp, 'images');
  mkdirSync(images);
  for (const f of ['01-orange cat.png', 'green_triangle.png']) copyFileSync(join('test/fixtures/images', f), join(images, f));
  const specFor = (name: string): DbSpec => {
    const raw: Record<string, unknown> = {
      model: 'test/fixtures/sd-tiny/model.safetensors', images, name, instancePrompt: 'a photo of sks cat', width: 64, height: 64, steps: 4, lr: '0.001',
      seed: 9, logDir: join(tmp, 'logs'), checkpointDir: join(tmp, 'ckpt'), bf16Weights: true, fusedBackward: true, saveEvery: 0, previewEvery: 0,
    };
    assert.deepEqual(validate('dreambooth', raw), []);
    return dreamboothSpec(raw as unknown as DbSpec);
  };
  const ctxFor = (stopAt?: number): JobContext => {
    const controller = new AbortController();
    return { emit: (e) => { if (e.type === 'step' && e.step === stopAt) controller.abort(); }, signal: controller.signal };
  };
  await onGradBackend(async () => {
    const full = await runDreambooth(specFor('full'), ctxFor());
    const part = specFor('part');
    assert.equal((await runDreambooth(part, ctxFor(2))).step, 2);
    const resumed = await runDreambooth({ ...part, resume: true }, ctxFor());
    assert.equal(resumed.step, 4);
    const a = await openSafetensors(full.output);
    const b = await openSafetensors(resumed.output);
    try {
      for (const k of a.keys()) {
        const x = await a.read(k);
        assert.deepEqual(await b.read(k), x, k);
        if (k.startsWith('model.diffusion_model.')) assert.ok(bf16Exact(x), `${k} is bf16-exact`);
      }
    } finally {
      await a.close();
      await b.close();
    }
  });
});
