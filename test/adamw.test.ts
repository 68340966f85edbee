import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { tf, initBackend, type Tensor } from '../trainers/backend/index.ts';
import { AdamW, type AdamWStateDict } from '../trainers/optim/adamw.ts';
import { clipGradNorm, clipGradValue, totalGradNorm, makeClipper } from '../trainers/optim/clip-grad.ts';

before(async () => {
  await initBackend();
});

/** torch 1.13 _single_tensor_adamw, written out in float64 for one flat parameter. */
function referenceAdamW(
  p0: number[],
  grads: number[][],
  lrs: number[],
  { beta1 = 0.9, beta2 = 0.999, eps = 1e-8, wd = 0 } = {},
): { p: number[]; m: number[]; v: number[] } {
  const p = [...p0];
  const m = p.map(() => 0);
  const v = p.map(() => 0);
  grads.forEach((g, k) => {
    const step = k + 1;
    const lr = lrs[k]!;
    const bc1 = 1 - beta1 ** step;
    const bc2Sqrt = Math.sqrt(1 - beta2 ** step);
    for (let i = 0; i < p.length; i++) {
      p[i] = p[i]! * (1 - lr * wd);
      m[i] = m[i]! * beta1 + (1 - beta1) * g[i]!;
      v[i] = v[i]! * beta2 + (1 - beta2) * g[i]! * g[i]!;
      p[i] = p[i]! - (lr / bc1) * (m[i]! / (Math.sqrt(v[i]!) / bc2Sqrt + eps));
    }
  });
  return { p, m, v };
}

function closeTo(actual: ArrayLike<number>, expected: number[], atol: number, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  for (let i = 0; i < expected.length; i++) {
    const d = Math.abs(actual[i]! - expected[i]!);
    assert.ok(d <= atol, `${what}[${i}]: ${actual[i]} vs ${expected[i]} (|d| = ${d} > ${atol})`);
  }
}

const P0 = [0.5, -1.25, 2.0, 0.0, 3.5, -0.75];
const GRADS = [
  [0.1, -0.2, 0.3, 1e-4, -2.0, 0.05],
  [0.12, -0.1, -0.3, 0.0, -1.5, 0.07],
  [-0.05, 0.4, 0.2, 2e-4, 1.0, -0.02],
  [0.3, 0.3, 0.1, -1e-4, 0.5, 0.0],
  [0.01, -0.6, 0.25, 0.0, -0.25, 0.09],
];

function run(opt: AdamW, grads: number[][], lrs: number[], shape = [2, 3]): void {
  grads.forEach((g, k) => {
    const gt = tf.tensor(g, shape);
    opt.step(new Map([['w', gt]]), lrs[k]!);
    gt.dispose();
  });
}

test('AdamW matches torch 1.13 formulas (weight decay 0, changing learn rate)', async () => {
  const lrs = [0.005, 0.005, 0.001, 0.001, 1e-5];
  const p = tf.variable(tf.tensor(P0, [2, 3]));
  const opt = new AdamW(new Map([['w', p]]), { lr: 0.005, weightDecay: 0 });
  run(opt, GRADS, lrs);
  const ref = referenceAdamW(P0, GRADS, lrs);
  closeTo(await p.data(), ref.p, 2e-6, 'param');
  const sd = await opt.stateDict();
  const entry = sd.state.get(0)!;
  assert.equal(entry.step, 5);
  assert.deepEqual(entry.shape, [2, 3]);
  closeTo(entry.exp_avg, ref.m, 1e-7, 'exp_avg');
  closeTo(entry.exp_avg_sq, ref.v, 1e-8, 'exp_avg_sq');
  opt.dispose();
  p.dispose();
});

test('AdamW decoupled weight decay (p *= 1 - lr*wd before the update), torch default wd 0.01', async () => {
  const lrs = [0.1, 0.1, 0.05, 0.05, 0.05];
  const p = tf.variable(tf.tensor(P0, [2, 3]));
  const opt = new AdamW(new Map([['w', p]]), { lr: 0.1 });
  assert.equal(opt.weightDecay, 0.01);
  run(opt, GRADS, lrs);
  closeTo(await p.data(), referenceAdamW(P0, GRADS, lrs, { wd: 0.01 }).p, 4e-6, 'param');
  const big = referenceAdamW(P0, GRADS, lrs, { wd: 0.5 });
  const q = tf.variable(tf.tensor(P0, [2, 3]));
  const opt2 = new AdamW(new Map([['w', q]]), { lr: 0.1, weightDecay: 0.5, betas: [0.9, 0.999], eps: 1e-8 });
  run(opt2, GRADS, lrs);
  closeTo(await q.data(), big.p, 4e-6, 'param wd 0.5');
  tf.dispose([p, q]);
  opt.dispose();
  opt2.dispose();
});

test('state_dict has the torch 1.13 layout of the webui .optim files', async () => {
  const a = tf.variable(tf.zeros([2, 4]));
  const b = tf.variable(tf.zeros([4]));
  const c = tf.variable(tf.zeros([3]));
  const opt = new AdamW(
    new Map([
      ['a', a],
      ['b', b],
      ['c', c],
    ]),
    { lr: 0.005, weightDecay: 0 },
  );
  const ga = tf.ones([2, 4]);
  const gb = tf.ones([4]);
  opt.step(new Map([['a', ga], ['b', gb]]), 0.005); // 'c' has no gradient: torch skips it, no state
  const sd = await opt.stateDict();
  assert.deepEqual([...sd.state.keys()], [0, 1]);
  assert.deepEqual(Object.keys(sd.state.get(0)!).sort(), ['exp_avg', 'exp_avg_sq', 'shape', 'step']);
  assert.equal(sd.state.get(1)!.step, 1);
  assert.deepEqual(Object.keys(sd.param_groups[0]!), ['lr', 'betas', 'eps', 'weight_decay', 'amsgrad', 'foreach', 'maximize', 'capturable', 'params']);
  assert.deepEqual(sd.param_groups[0], {
    lr: 0.005,
    betas: [0.9, 0.999],
    eps: 1e-8,
    weight_decay: 0,
    amsgrad: false,
    foreach: null,
    maximize: false,
    capturable: false,
    params: [0, 1, 2],
  });
  assert.equal(opt.stepCount('c'), 0);
  tf.dispose([a, b, c, ga, gb]);
  opt.dispose();
});

test('loadStateDict continues bit-identically to an uninterrupted run', async () => {
  const lrs = [0.005, 0.004, 0.003, 0.002, 0.001];
  const p = tf.variable(tf.tensor(P0, [2, 3]));
  const opt = new AdamW(new Map([['w', p]]), { lr: 0.005, weightDecay: 0 });
  run(opt, GRADS.slice(0, 3), lrs.slice(0, 3));
  const saved: AdamWStateDict = await opt.stateDict();
  const pSaved = await p.data();
  run(opt, GRADS.slice(3), lrs.slice(3));
  const straight = await p.data();

  const q = tf.variable(tf.tensor(pSaved, [2, 3]));
  const resumed = new AdamW(new Map([['w', q]]), { lr: 1, weightDecay: 0.3, betas: [0.5, 0.5] });
  resumed.loadStateDict(saved);
  assert.deepEqual([resumed.lr, resumed.weightDecay, resumed.betas], [0.003, 0, [0.9, 0.999]]); // torch takes the saved group
  run(resumed, GRADS.slice(3), lrs.slice(3));
  assert.deepEqual(Array.from(await q.data()), Array.from(straight));
  tf.dispose([p, q]);
  opt.dispose();
  resumed.dispose();
});

test('4-D (conv) parameters export moments in torch layout [out,in,kh,kw]', async () => {
  const p = tf.variable(tf.zeros([1, 2, 3, 4])); // TF [kh, kw, in, out]
  const opt = new AdamW(new Map([['conv', p]]), { lr: 0.01, weightDecay: 0 });
  const g = tf.range(0, 24).reshape([1, 2, 3, 4]);
  opt.step(new Map([['conv', g]]), 0.01);
  const sd = await opt.stateDict();
  const entry = sd.state.get(0)!;
  assert.deepEqual(entry.shape, [4, 3, 1, 2]);
  const expected = Array.from(await tf.tidy(() => g.transpose([3, 2, 0, 1]).mul(0.1)).data());
  closeTo(entry.exp_avg, expected, 1e-6, 'exp_avg (torch layout)');
  const q = tf.variable(tf.zeros([1, 2, 3, 4]));
  const opt2 = new AdamW(new Map([['conv', q]]), { lr: 0.01, weightDecay: 0 });
  opt2.loadStateDict(sd);
  assert.deepEqual(Array.from((await opt2.stateDict()).state.get(0)!.exp_avg), Array.from(entry.exp_avg));
  tf.dispose([p, q, g]);
  opt.dispose();
  opt2.dispose();
});

test('loadStateDict refuses a state that does not fit, naming the entry and shapes', async () => {
  const p = tf.variable(tf.zeros([2, 3]));
  const opt = new AdamW(new Map([['w', p]]), { lr: 0.005, weightDecay: 0 });
  const bad: AdamWStateDict = {
    state: new Map([[0, { step: 3, exp_avg: new Float32Array(6), exp_avg_sq: new Float32Array(6), shape: [3, 2] }]]),
    param_groups: [{ lr: 0.005, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0, amsgrad: false, foreach: null, maximize: false, capturable: false, params: [0] }],
  };
  assert.throws(() => opt.loadStateDict(bad), /entry 0 \('w'\) has shape \[3,2\], the parameter has \[2,3\]/);
  bad.param_groups[0]!.params = [0, 1];
  assert.throws(() => opt.loadStateDict(bad), /2 parameters, this model has 1/);
  assert.throws(() => opt.step(new Map([['nope', p]]), 0.1), /unknown parameter 'nope'/);
  tf.dispose(p);
  opt.dispose();
});

test('AdamW steps leak no tensors', () => {
  const p = tf.variable(tf.randomNormal([8, 8]));
  const opt = new AdamW(new Map([['w', p]]), { lr: 0.01 });
  const g = tf.randomNormal([8, 8]);
  opt.step(new Map([['w', g]]), 0.01); // burn-in creates the moment variables
  const before = tf.memory().numTensors;
  for (let i = 0; i < 5; i++) opt.step(new Map([['w', g]]), 0.01);
  assert.equal(tf.memory().numTensors, before);
  opt.dispose();
  assert.equal(tf.memory().numTensors, before - 2);
  tf.dispose([p, g]);
});

test('clip by value clamps every element (clip_grad_value_)', async () => {
  const grads = new Map<string, Tensor>([['a', tf.tensor([-3, -0.05, 0.2, 5])]]);
  const out = clipGradValue(grads, 0.1);
  assert.deepEqual(Array.from(await out.get('a')!.data()).map((x) => Math.round(x * 1e6) / 1e6), [-0.1, -0.05, 0.1, 0.1]);
  tf.dispose([...grads.values(), ...out.values()]);
});

test('clip by norm uses the global norm and max_norm / (total + 1e-6) (clip_grad_norm_)', async () => {
  const a = [3, 0, -4];
  const b = [12, 0];
  const grads = new Map<string, Tensor>([
    ['a', tf.tensor(a)],
    ['b', tf.tensor(b)],
  ]);
  const total = 13; // √(9 + 16 + 144)
  const { grads: out, totalNorm } = clipGradNorm(grads, 1.3);
  assert.ok(Math.abs((await totalNorm.data())[0]! - total) < 1e-5);
  const coef = 1.3 / (total + 1e-6);
  closeTo(await out.get('a')!.data(), a.map((x) => x * coef), 1e-6, 'a');
  closeTo(await out.get('b')!.data(), b.map((x) => x * coef), 1e-6, 'b');
  const under = clipGradNorm(grads, 100); // under the limit: multiplied by exactly 1
  assert.deepEqual(Array.from(await under.grads.get('b')!.data()), b);
  const inf = totalGradNorm(grads, Infinity);
  assert.equal((await inf.data())[0], 12);
  const before = tf.memory().numTensors;
  const clip = makeClipper('norm', () => 1)!;
  const c = clip(grads, 0);
  assert.equal(tf.memory().numTensors, before + 2); // only the two clipped gradients remain
  assert.equal(makeClipper('disabled', () => 1), undefined);
  tf.dispose([...grads.values(), ...out.values(), totalNorm, ...under.grads.values(), under.totalNorm, inf, ...c.values()]);
});
