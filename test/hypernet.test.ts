/**
 * @file webui hypernetwork module: Sequential key indices, validation errors, init, train-mode
 * rules, and the `hn.*` goldens on every fixture (k/v module outputs, the UNet with the modules
 * in every CrossAttention, p_losses and the gradients w.r.t. every module weight).
 */
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { initBackend, tf, type Tensor } from '../trainers/backend/index.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import { disposeParams, type Params } from '../trainers/nets/params.ts';
import { loadUnet, unetForward } from '../trainers/nets/unet.ts';
import {
  createHypernetwork, hypernetForward, hypernetHook, hypernetLayers, hypernetSpecFromWebui, type HypernetworkSpec,
} from '../trainers/nets/hypernet.ts';
import { onGradBackend } from './helpers/golden.ts';

const FIXTURES = ['test/fixtures/sd-tiny', 'test/fixtures/sd2-tiny'];

const BASE: HypernetworkSpec = {
  sizes: [32], layerStructure: [1, 2, 1], activation: 'swish', layerNorm: false, dropout: false,
  activateOutput: false, weightInit: 'Normal', lastLayerDropout: false,
};

/** Module keys of the k module, as the webui's state_dict would list them. */
function moduleKeys(spec: HypernetworkSpec): string[] {
  const p = createHypernetwork(spec, 1);
  const keys = [...p.keys()].filter((k) => k.startsWith(`${spec.sizes[0]}.k.`)).map((k) => k.slice(`${spec.sizes[0]}.k.`.length));
  disposeParams(p);
  return keys;
}

before(async () => {
  await initBackend();
});

test('module keys carry the Sequential index (activation, LayerNorm, Dropout take indices)', () => {
  assert.deepEqual(moduleKeys(BASE), ['linear.0.weight', 'linear.0.bias', 'linear.2.weight', 'linear.2.bias']);
  assert.deepEqual(moduleKeys({ ...BASE, activation: 'linear' }), ['linear.0.weight', 'linear.0.bias', 'linear.1.weight', 'linear.1.bias']);
  // [1,2,1] relu + LN + dropout (last_layer_dropout): Linear, ReLU, LN, Dropout, Linear, LN
  const ln = { ...BASE, activation: 'relu', layerNorm: true, dropout: true, lastLayerDropout: true };
  assert.deepEqual(hypernetLayers(ln, 32).map((l) => l.kind), ['linear', 'act', 'layernorm', 'dropout', 'linear', 'layernorm']);
  assert.deepEqual(moduleKeys(ln).filter((k) => k.endsWith('weight')), ['linear.0.weight', 'linear.2.weight', 'linear.4.weight', 'linear.5.weight']);
  // webui default dropout structure [1, 2, 2, 1] → [0, 0.3, 0, 0] (no last-layer dropout)
  const deep = { ...BASE, layerStructure: [1, 2, 2, 1], dropout: true };
  assert.deepEqual(hypernetLayers(deep, 32).filter((l) => l.kind === 'dropout').map((l) => l.index), [2]);
  assert.deepEqual(hypernetLayers({ ...deep, activateOutput: true }, 32).map((l) => l.kind).slice(-2), ['linear', 'act']);
  // fractional multipliers: int(dim · m)
  const frac = hypernetLayers({ ...BASE, layerStructure: [1, 1.5, 1] }, 33)[0]!;
  assert.deepEqual(frac.kind === 'linear' && [frac.inDim, frac.outDim], [33, 49]);
});

test('bad structures give clear errors', () => {
  assert.throws(() => createHypernetwork({ ...BASE, layerStructure: [2, 2, 1] }, 0), /must start and end with 1/);
  assert.throws(() => createHypernetwork({ ...BASE, layerStructure: [1, 2, 2] }, 0), /must start and end with 1/);
  assert.throws(() => createHypernetwork({ ...BASE, activation: 'swishy' }, 0), /unknown activation 'swishy'.*hardswish/);
  assert.throws(() => createHypernetwork({ ...BASE, dropout: true, dropoutStructure: [0, 1, 0] }, 0), /dropout must be in \[0, 1\)/);
  assert.throws(() => createHypernetwork({ ...BASE, weightInit: 'Zeros' }, 0), /unknown weight init 'Zeros'/);
  assert.throws(() => createHypernetwork({ ...BASE, activation: 'glu' }, 0), /not supported/);
});

test('webui init: Normal N(0, 0.01) weights and zero biases; Xavier/Kaiming bounds; seeded', async () => {
  const spec = { ...BASE, sizes: [320] };
  const p = createHypernetwork(spec, 7);
  const w = (await p.get('320.k.linear.0.weight')!.data()) as Float32Array;
  const std = Math.sqrt(w.reduce((s, x) => s + x * x, 0) / w.length);
  assert.ok(Math.abs(std - 0.01) < 0.0005, `std ${std}`);
  assert.ok((await p.get('320.v.linear.2.bias')!.data()).every((x) => x === 0));
  const again = createHypernetwork(spec, 7);
  assert.deepEqual(await again.get('320.k.linear.0.weight')!.data(), w);
  const xu = createHypernetwork({ ...spec, weightInit: 'XavierUniform' }, 7);
  const bound = Math.sqrt(6 / (320 + 640));
  const xw = await xu.get('320.k.linear.0.weight')!.data();
  assert.ok(xw.every((x) => Math.abs(x) <= bound) && xw.some((x) => Math.abs(x) > 0.9 * bound));
  assert.ok([...p.values()].every((v) => (v as tf.Variable).trainable));
  [p, again, xu].forEach(disposeParams);
});

test('multiplier scales the residual in eval and is 1 while training; dropout only in training', async () => {
  const spec = { ...BASE, weightInit: 'XavierNormal' };
  const p = createHypernetwork(spec, 3);
  const x = tf.randomNormal([2, 5, 32]);
  const [full, half, train] = [
    hypernetForward(p, spec, 32, 'k', x),
    hypernetForward(p, spec, 32, 'k', x, { multiplier: 0.5 }),
    hypernetForward(p, spec, 32, 'k', x, { multiplier: 0.5, training: true }),
  ];
  const d = (a: Tensor, b: Tensor) => tf.tidy(() => a.sub(b).abs().max().dataSync()[0]!);
  assert.ok(d(half, tf.tidy(() => x.add(full.sub(x).mul(0.5)))) < 1e-6);
  assert.ok(d(train, full) < 1e-6);
  assert.equal(hypernetHook(p, spec)(tf.zeros([1, 2, 48])), undefined);
  tf.dispose([x, full, half, train]);
  disposeParams(p);
});

test('spec from a webui .pt uses the webui load() defaults', () => {
  const spec = hypernetSpecFromWebui({ layer_structure: [1, 2, 1], activation_func: 'relu' }, [768]);
  assert.equal(spec.activateOutput, true); // a missing activate_output is TRUE in the webui
  assert.equal(spec.weightInit, 'Normal');
  assert.equal(hypernetSpecFromWebui({ activation_func: null }, [768]).activation, 'linear');
});

/** Golden tensor helpers for one fixture (NCHW in the file → NHWC). */
async function goldens(dir: string) {
  const json = JSON.parse(readFileSync(`${dir}/golden.json`, 'utf8')) as {
    tensors: Record<string, { atol?: number }>;
    unet: { inputs: { timesteps: number[] } };
    train_batch: { timesteps: number[] };
    hypernetwork: Record<string, unknown> & { enable_sizes: number[]; state_tensors: string[]; outputs: string[] };
  };
  const file = await openSafetensors(`${dir}/golden.safetensors`);
  const read = async (name: string): Promise<Tensor> => {
    const { shape } = file.info(name);
    const values = await file.read(name);
    return tf.tidy(() => {
      const t = tf.tensor(values, shape, 'float32');
      return shape.length === 4 ? t.transpose([0, 2, 3, 1]) : t;
    });
  };
  const check = async (name: string, ours: Tensor) => {
    const atol = json.tensors[name]?.atol;
    assert.ok(atol !== undefined, `${dir}: no atol for ${name}`);
    const golden = await read(name);
    assert.deepEqual(ours.shape, golden.shape, name);
    const err = tf.tidy(() => ours.sub(golden).abs().max().dataSync()[0]!);
    golden.dispose();
    assert.ok(err <= atol, `${dir} ${name}: max |ours - golden| = ${err} > atol ${atol}`);
  };
  return { json, file, read, check };
}

async function fixtureUnet(dir: string) {
  const cfg = JSON.parse(readFileSync(`${dir}/config.json`, 'utf8')) as { unet: { params: Record<string, number> } };
  const source = await openSafetensors(`${dir}/model.safetensors`);
  try {
    const unet = await loadUnet(source, { numHeads: cfg.unet.params.num_heads, numHeadChannels: cfg.unet.params.num_head_channels });
    return { ...unet, sqrtAcp: await source.read('sqrt_alphas_cumprod'), sqrt1m: await source.read('sqrt_one_minus_alphas_cumprod') };
  } finally {
    await source.close();
  }
}

/** The fixture's hypernetwork: spec from golden.json, weights `hn.<size>.{k,v}.linear.*` as Variables. */
async function fixtureHypernet(g: Awaited<ReturnType<typeof goldens>>) {
  const hn = g.json.hypernetwork;
  const spec: HypernetworkSpec = {
    ...hypernetSpecFromWebui({ ...hn, is_layer_norm: hn.add_layer_norm, weight_initialization: hn.weight_init }, hn.enable_sizes),
  };
  const params: Params = new Map();
  for (const name of hn.state_tensors) params.set(name.slice('hn.'.length), tf.variable(await g.read(name)));
  return { spec, params };
}

for (const dir of FIXTURES) {
  test(`hypernetwork goldens (module k/v, UNet with modules): ${dir}`, async () => {
    const g = await goldens(dir);
    const { spec, params } = await fixtureHypernet(g);
    const unet = await fixtureUnet(dir);
    const context = await g.read('unet.context');
    for (const size of spec.sizes) {
      for (const kv of ['k', 'v'] as const) {
        const out = hypernetForward(params, spec, size, kv, context);
        await g.check(`hn.${kv}_out.${size}`, out);
        out.dispose();
      }
    }
    const x = await g.read('unet.x');
    const out = unetForward(unet.params, unet.cfg, x, g.json.unet.inputs.timesteps, context, { hooks: { kv: hypernetHook(params, spec) } });
    await g.check('hn.unet_out', out);
    tf.dispose([x, out, context]);
    disposeParams(params);
    disposeParams(unet.params);
    await g.file.close();
  });

  test(`hypernetwork training loss and gradients (hn.loss, hn.grad.*): ${dir}`, () => onGradBackend(async () => {
    const g = await goldens(dir);
    const { spec, params } = await fixtureHypernet(g);
    const unet = await fixtureUnet(dir);
    const t = g.json.train_batch.timesteps;
    const [x0, noise, context] = [await g.read('train.x0'), await g.read('train.noise'), await g.read('train.context')];
    const xNoisy = tf.tidy(() => x0.mul(tf.tensor(t.map((i) => unet.sqrtAcp[i]!), [t.length, 1, 1, 1]))
      .add(noise.mul(tf.tensor(t.map((i) => unet.sqrt1m[i]!), [t.length, 1, 1, 1]))));
    const hook = hypernetHook(params, spec, { training: true });
    const lossFn = () => unetForward(unet.params, unet.cfg, xNoisy, t, context, { hooks: { kv: hook } }).sub(noise).square().mean() as tf.Scalar;
    const { value, grads } = tf.variableGrads(lossFn, [...params.values()] as tf.Variable[]);
    await g.check('hn.loss', value.reshape([1]));
    for (const name of g.json.hypernetwork.outputs.filter((n) => n.startsWith('hn.grad.'))) {
      const v = params.get(name.slice('hn.grad.'.length)) as tf.Variable;
      await g.check(name, grads[v.name]!);
    }
    tf.dispose([value, ...Object.values(grads), x0, noise, context, xNoisy]);
    disposeParams(params);
    disposeParams(unet.params);
    await g.file.close();
  }));
}
