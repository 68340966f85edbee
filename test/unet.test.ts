/**
 * @file UNet: config inference from the full SD1.5 / SD2.1 key lists (every key consumed, none
 * missing), the `unet.*` goldens and the UNet part of the full fine-tune goldens (`ft.loss`,
 * `ft.grad.model.diffusion_model.*`, with the frozen `train.context`) on every fixture, a gradient
 * for every UNet weight, and a leak check.
 */
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { initBackend, tf, type Tensor } from '../trainers/backend/index.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import { disposeParams, paramToTorch, type Params } from '../trainers/nets/params.ts';
import {
  SD15_UNET, SD21_UNET, checkUnetKeys, detectVPrediction, loadUnet, unetConfigFromKeys, unetForward, unetParamShapes,
  type HeadOverrides, type UNetConfig,
} from '../trainers/nets/unet.ts';
import { keyShapes, maxAbsDiff, onGradBackend } from './helpers/golden.ts';

const FIXTURES = ['test/fixtures/sd-tiny', 'test/fixtures/sd2-tiny'];

interface GoldenJson {
  tensors: Record<string, { atol?: number }>;
  unet: { timesteps?: number[]; inputs: { timesteps: number[] } };
  train_batch: { timesteps: number[] };
}

/** Golden tensors of a fixture as NHWC (the file is NCHW), with their atol. */
async function goldens(dir: string) {
  const json = JSON.parse(readFileSync(`${dir}/golden.json`, 'utf8')) as GoldenJson;
  const file = await openSafetensors(`${dir}/golden.safetensors`);
  const nhwc = async (name: string): Promise<Tensor> => {
    const { shape } = file.info(name);
    const values = await file.read(name);
    return tf.tidy(() => {
      const t = tf.tensor(values, shape, 'float32');
      return shape.length === 4 ? t.transpose([0, 2, 3, 1]) : t;
    });
  };
  const atol = (name: string): number => {
    const a = json.tensors[name]?.atol;
    if (a === undefined) throw new Error(`${dir}: no atol for ${name}`);
    return a;
  };
  return { json, file, nhwc, atol };
}

/** The head split the fixture's UNet was built with (config.json → unet.params). */
function headOverrides(dir: string): HeadOverrides {
  const cfg = JSON.parse(readFileSync(`${dir}/config.json`, 'utf8')) as { unet: { params: Record<string, number> } };
  return { numHeads: cfg.unet.params.num_heads, numHeadChannels: cfg.unet.params.num_head_channels };
}

/** The fixture's UNet (config inferred, every key checked), its file closed again. */
async function fixtureUnet(dir: string) {
  const source = await openSafetensors(`${dir}/model.safetensors`);
  try {
    return await loadUnet(source, headOverrides(dir));
  } finally {
    await source.close();
  }
}

/** p_losses on the training batch: mean((unet(q_sample(x0, t, noise), t, context) − noise)²). */
async function trainBatch(dir: string, g: Awaited<ReturnType<typeof goldens>>) {
  const model = await openSafetensors(`${dir}/model.safetensors`); // schedule buffers, float32
  const t = g.json.train_batch.timesteps;
  const sqrtAcp = await model.read('sqrt_alphas_cumprod');
  const sqrt1m = await model.read('sqrt_one_minus_alphas_cumprod');
  await model.close();
  const x0 = await g.nhwc('train.x0');
  const noise = await g.nhwc('train.noise');
  const xNoisy = tf.tidy(() => {
    const a = tf.tensor(t.map((i) => sqrtAcp[i]!), [t.length, 1, 1, 1]);
    const s = tf.tensor(t.map((i) => sqrt1m[i]!), [t.length, 1, 1, 1]);
    return x0.mul(a).add(noise.mul(s));
  });
  x0.dispose();
  return { t, noise, xNoisy, context: await g.nhwc('train.context') };
}

before(async () => {
  await initBackend();
});

for (const [file, preset] of [['keys-sd15.json', SD15_UNET], ['keys-sd21.json', SD21_UNET]] as const) {
  test(`UNet config of a full-size checkpoint from ${file} alone; every key consumed`, () => {
    const shapes = keyShapes(`test/fixtures/sd-tiny/${file}`);
    const cfg = unetConfigFromKeys(shapes);
    assert.deepEqual(cfg, preset);
    checkUnetKeys(shapes, cfg); // throws on any missing, extra or misshapen key
    const expected = unetParamShapes(cfg);
    const inFile = [...shapes.keys()].filter((k) => k.startsWith('model.diffusion_model.'));
    assert.equal(expected.size, inFile.length);
    assert.equal(expected.size, 686);
  });
}

test('UNet config errors name the problem', () => {
  assert.throws(() => unetConfigFromKeys(new Map()), /no 'model\.diffusion_model\.input_blocks\.0\.0\.weight'/);
  const shapes = keyShapes('test/fixtures/sd-tiny/keys-sd15.json');
  shapes.delete('model.diffusion_model.output_blocks.3.1.norm.bias');
  assert.throws(() => checkUnetKeys(shapes, unetConfigFromKeys(shapes)), /missing model\.diffusion_model\.output_blocks\.3\.1\.norm\.bias/);
  assert.throws(() => unetParamShapes({ ...SD15_UNET, numHeads: 7 }), /cannot be split into heads/);
});

for (const dir of FIXTURES) {
  test(`UNet goldens (t_emb, emb, out): ${dir}`, async () => {
    const g = await goldens(dir);
    const { params, cfg } = await fixtureUnet(dir);
    const x = await g.nhwc('unet.x');
    const context = await g.nhwc('unet.context');
    const taps = new Map<string, Tensor>();
    const out = unetForward(params, cfg, x, g.json.unet.inputs.timesteps, context, { taps });
    const ours: Record<string, Tensor> = { 'unet.t_emb': taps.get('t_emb')!, 'unet.emb': taps.get('emb')!, 'unet.out': out };
    for (const [name, t] of Object.entries(ours)) {
      const golden = await g.nhwc(name);
      const err = await maxAbsDiff(t, golden);
      assert.ok(err <= g.atol(name), `${dir} ${name}: max |ours - golden| = ${err} > atol ${g.atol(name)}`);
      golden.dispose();
    }
    tf.dispose([x, context, out, ...taps.values()]);
    disposeParams(params);
    await g.file.close();
  });

  test(`UNet fine-tune loss and weight gradients (ft.*, UNet part): ${dir}`, () => onGradBackend(async () => {
    const g = await goldens(dir);
    const loaded = await fixtureUnet(dir);
    const vars: Params = new Map([...loaded.params].map(([k, t]) => [k, tf.variable(t)]));
    disposeParams(loaded.params);
    const b = await trainBatch(dir, g);
    const lossFn = () => unetForward(vars, loaded.cfg, b.xNoisy, b.t, b.context).sub(b.noise).square().mean() as tf.Scalar;
    const { value, grads } = tf.variableGrads(lossFn, [...vars.values()] as tf.Variable[]);
    const byKey = new Map([...vars].map(([k, v]) => [k, grads[(v as tf.Variable).name]]));
    // every UNet weight gets a gradient of its own shape
    for (const [k, v] of vars) assert.deepEqual(byKey.get(k)?.shape, v.shape, `no gradient for ${k}`);
    const lossErr = Math.abs((await value.data())[0]! - (await g.file.read('ft.loss'))[0]!);
    assert.ok(lossErr <= g.atol('ft.loss'), `${dir} ft.loss: |ours - golden| = ${lossErr} > atol ${g.atol('ft.loss')}`);
    for (const name of Object.keys(g.json.tensors).filter((n) => n.startsWith('ft.grad.model.diffusion_model.'))) {
      const ours = paramToTorch(byKey.get(name.slice('ft.grad.'.length))!);
      const golden = tf.tensor(await g.file.read(name), g.file.info(name).shape);
      const err = await maxAbsDiff(ours, golden);
      assert.ok(err <= g.atol(name), `${dir} ${name}: max |ours - golden| = ${err} > atol ${g.atol(name)}`);
      tf.dispose([ours, golden]);
    }
    tf.dispose([value, ...Object.values(grads), b.noise, b.xNoisy, b.context]);
    disposeParams(vars);
    await g.file.close();
  }));
}

test('v-prediction detection (webui is_using_v_parameterization_for_sd2)', async () => {
  for (const dir of FIXTURES) {
    const { params, cfg } = await fixtureUnet(dir);
    const g = JSON.parse(readFileSync(`${dir}/golden.json`, 'utf8')) as { unet: { prediction: string } };
    assert.equal(await detectVPrediction(params, cfg), g.unet.prediction === 'v', dir);
    // an output pushed far below x (mean(out − x) < −1) is what the webui reads as v
    const bias = `${cfg.prefix}out.2.bias`;
    const shifted: Params = new Map(params).set(bias, tf.fill([cfg.outChannels], -3));
    assert.equal(await detectVPrediction(shifted, cfg), true, dir);
    shifted.get(bias)!.dispose();
    disposeParams(params);
  }
});

test('UNet forward+backward leaks no tensors', () => onGradBackend(async () => {
  const { params, cfg } = await fixtureUnet(FIXTURES[0]!);
  const vars: Params = new Map([...params].map(([k, t]) => [k, tf.variable(t)]));
  disposeParams(params);
  const x = tf.randomNormal([1, 8, 8, cfg.inChannels]);
  const context = tf.randomNormal([1, 5, cfg.contextDim]);
  const step = (c: UNetConfig) => {
    const { value, grads } = tf.variableGrads(() => unetForward(vars, c, x, [500], context).square().mean() as tf.Scalar);
    tf.dispose([value, ...Object.values(grads)]);
  };
  step(cfg);
  const before = tf.memory().numTensors;
  for (let i = 0; i < 2; i++) step(cfg);
  assert.equal(tf.memory().numTensors, before);
  tf.dispose([x, context]);
  disposeParams(vars);
}));
