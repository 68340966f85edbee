/**
 * @file Gradient checkpointing (trainers/nets/recompute.ts) and sliced attention
 * (trainers/nets/sliced-attention.ts) give the same numbers as the whole computation; the goldens
 * with both on are in golden.test.ts (`golden --low-memory`).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { tf, initBackend, type Tensor } from '../trainers/backend/index.ts';
import { attention, headsAttention } from '../trainers/nets/layers.ts';
import { hasNativeAttention, nativeAttention, sliceRows, slicedAttentionOps } from '../trainers/nets/sliced-attention.ts';
import { checkpointed, lossAndGrads } from '../trainers/nets/recompute.ts';
import { hypernetHook, hypernetSpecFromWebui, createHypernetwork } from '../trainers/nets/hypernet.ts';
import { maxAbsDiff } from './helpers/golden.ts';

await initBackend();

test('sliceRows keeps a slice within the byte budget, at least one row', () => {
  assert.equal(sliceRows(8, 4096, 4096, 256 * 2 ** 20), 2048);
  assert.equal(sliceRows(8, 4096, 77, 1), 1);
  assert.equal(sliceRows(2, 10, 10, 1e9), 10);
});

test('sliced attention: output and q/k/v gradients equal the whole computation for any slice size', async () => {
  const [q, k, v] = [[2, 13, 16], [2, 7, 16], [2, 7, 16]].map((s, i) => tf.randomNormal(s, 0, 1, 'float32', i + 1));
  const dOut = tf.randomNormal([2, 13, 16], 0, 1, 'float32', 9);
  const whole = (a: Tensor, b: Tensor, c: Tensor) => attention(a, b, c, 2);
  const want = tf.grads((a: Tensor, b: Tensor, c: Tensor) => whole(a, b, c).mul(dOut).sum())([q!, k!, v!]);
  for (const rows of [1, 4, 13]) {
    const sliced = (a: Tensor, b: Tensor, c: Tensor) => headsAttention(a, b, c, 2, (qh, kh, vh) => slicedAttentionOps(qh, kh, vh, rows));
    assert.ok((await maxAbsDiff(sliced(q!, k!, v!), whole(q!, k!, v!))) < 1e-6, `output, ${rows} rows`);
    const got = tf.grads((a: Tensor, b: Tensor, c: Tensor) => sliced(a, b, c).mul(dOut).sum())([q!, k!, v!]);
    for (let i = 0; i < 3; i++) assert.ok((await maxAbsDiff(got[i]!, want[i]!)) < 1e-5, `grad ${'qkv'[i]}, ${rows} rows`);
    tf.dispose(got);
  }
  tf.dispose([q!, k!, v!, dOut, ...want]);
});

test('checkpointed: gradients of inputs and of variables read inside equal the plain tape, and nothing leaks', async () => {
  const w = tf.variable(tf.randomNormal([5, 5], 0, 1, 'float32', 3), true);
  const u = tf.variable(tf.randomNormal([5], 0, 1, 'float32', 4), true); // used outside the block too
  const x = tf.randomNormal([3, 5], 0, 1, 'float32', 5);
  const block = (h: Tensor) => tf.tanh(tf.matMul(h, w).add(u));
  const plain = tf.variableGrads(() => block(block(x)).mul(u).sum() as tf.Scalar, [w, u]);
  const before = tf.memory().numTensors;
  const ours = lossAndGrads(() => checkpointed(block, [checkpointed(block, [x])]).mul(u).sum() as tf.Scalar, new Map([['w', w], ['u', u]]));
  assert.ok(Math.abs((await ours.value.data())[0]! - (await plain.value.data())[0]!) < 1e-5);
  assert.ok((await maxAbsDiff(ours.grads.w!, plain.grads[w.name]!)) < 1e-5);
  assert.ok((await maxAbsDiff(ours.grads.u!, plain.grads[u.name]!)) < 1e-5);
  tf.dispose([ours.value, ...Object.values(ours.grads)]);
  assert.equal(tf.memory().numTensors, before, 'no tensor left behind');
  tf.dispose([plain.value, ...Object.values(plain.grads), w, u, x]);
});

test("a checkpointed block's recompute takes its attention cores' outputs from the forward: each runs once, the gradients are the plain tape's, nothing leaks", { skip: hasNativeAttention() ? false : 'native attention kernels not available on this backend' }, async () => {
  const w = tf.variable(tf.randomNormal([16, 16], 0, 0.3, 'float32', 11), true);
  const x = tf.randomNormal([1, 24, 16], 0, 1, 'float32', 12);
  const context = tf.randomNormal([1, 9, 16], 0, 1, 'float32', 13);
  const block = (h: Tensor) => {
    const q = tf.matMul(h.reshape([24, 16]), w).reshape([1, 24, 16]);
    return nativeAttention(q, context, context, 2).add(nativeAttention(q, q, h, 2)).tanh(); // cross, then self
  };
  const plain = tf.variableGrads(() => block(block(x)).sum() as tf.Scalar, [w]);
  const before = tf.memory().numTensors;
  let ours: ReturnType<typeof lossAndGrads> | undefined;
  const info = await tf.profile(() => {
    ours = lossAndGrads(() => checkpointed(block, [checkpointed(block, [x])]).sum() as tf.Scalar, new Map([['w', w]]));
    return [];
  });
  assert.equal(info.kernels.filter((k) => k.name === 'SidetrainAttention').length, 4, 'two blocks × two attentions, none run again in the recompute');
  assert.ok(Math.abs((await ours!.value.data())[0]! - (await plain.value.data())[0]!) < 1e-5);
  assert.ok((await maxAbsDiff(ours!.grads.w!, plain.grads[w.name]!)) < 1e-5);
  tf.dispose([ours!.value, ...Object.values(ours!.grads)]);
  assert.equal(tf.memory().numTensors, before, 'no tensor left behind');
  tf.dispose([plain.value, ...Object.values(plain.grads), w, x, context]);
});

test('checkpointed blocks whose inputs are constants still give their variables a gradient', async () => {
  const w = tf.variable(tf.randomNormal([4, 4], 0, 1, 'float32', 6), true);
  const x = tf.randomNormal([2, 4], 0, 1, 'float32', 7);
  const { value, grads } = lossAndGrads(() => checkpointed((h) => tf.matMul(h, w).square(), [x]).sum() as tf.Scalar, new Map([['w', w]]));
  const want = tf.variableGrads(() => tf.matMul(x, w).square().sum() as tf.Scalar, [w]);
  assert.ok((await maxAbsDiff(grads.w!, want.grads[w.name]!)) < 1e-5);
  tf.dispose([value, grads.w!, want.value, want.grads[w.name]!, w, x]);
});

test('checkpointing refuses tf.variableGrads (whose gradients would miss the block weights)', () => {
  const w = tf.variable(tf.ones([2, 2]), true);
  assert.throws(() => tf.variableGrads(() => checkpointed((h) => tf.matMul(h, w), [tf.ones([1, 2])]).sum() as tf.Scalar, [w]), /lossAndGrads/);
  w.dispose();
});

test('hypernetwork dropout with a seed: a recomputed block draws the same masks (checkpointed = plain gradients)', async () => {
  const spec = hypernetSpecFromWebui({ layer_structure: [1, 2, 1], activation_func: 'rrelu', use_dropout: true, dropout_structure: [0, 0.3, 0] }, [8]);
  const params = createHypernetwork(spec, 1);
  const vars = params as Map<string, tf.Variable>;
  const x = tf.randomNormal([1, 6, 8], 0, 1, 'float32', 8);
  const hook = hypernetHook(params, spec, { training: true, seed: 42 });
  const block = (h: Tensor) => hook(h, 'attn1')![0].add(hook(h, 'attn2')![1]).square();
  const plain = lossAndGrads(() => block(x).sum() as tf.Scalar, vars);
  const ours = lossAndGrads(() => checkpointed(block, [x]).sum() as tf.Scalar, vars);
  for (const key of vars.keys()) assert.ok((await maxAbsDiff(ours.grads[key]!, plain.grads[key]!)) < 1e-5, key);
  tf.dispose([plain.value, ours.value, ...Object.values(plain.grads), ...Object.values(ours.grads), x]);
  vars.forEach((v) => v.dispose());
});

test('checkpointing some blocks only (auto picks them) keeps every golden within its atol', async () => {
  const { runGolden } = await import('../trainers/golden.ts');
  const memory = { checkpointing: false, checkpointBlocks: ['input_blocks.1', 'middle_block', 'output_blocks.2'], attentionSliceBytes: 0 };
  const rows = await runGolden('test/fixtures/sd-tiny', { memory });
  const bad = rows.filter((r) => !r.pass).map((r) => `${r.name} ${r.maxAbsDiff}`);
  assert.deepEqual(bad, []);
});
