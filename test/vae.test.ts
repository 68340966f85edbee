/**
 * @file VAE goldens on every fixture (posterior, sample, scaled mean, decode), config inference
 * from the full SD1.5 / SD2.1 key lists (every VAE key consumed), and a leak check.
 */
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { initBackend, tf, type Tensor } from '../trainers/backend/index.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import { disposeParams } from '../trainers/nets/params.ts';
import {
  checkVaeKeys, loadVae, samplePosterior, scaleLatents, vaeConfigFromKeys, vaeDecode, vaeEncode, vaeParamShapes,
} from '../trainers/nets/vae.ts';
import { keyShapes, maxAbsDiff } from './helpers/golden.ts';

const FIXTURES = ['test/fixtures/sd-tiny', 'test/fixtures/sd2-tiny'];

interface GoldenJson {
  tensors: Record<string, { shape: number[]; atol?: number }>;
  vae: { scale_factor: number };
}

/** A golden tensor (NCHW in the file) as NHWC, and its atol. */
async function goldenLoader(dir: string) {
  const json = JSON.parse(readFileSync(`${dir}/golden.json`, 'utf8')) as GoldenJson;
  const file = await openSafetensors(`${dir}/golden.safetensors`);
  const nhwc = async (name: string): Promise<Tensor> => {
    const { shape } = file.info(name);
    return toNhwc(await file.read(name), shape);
  };
  const atol = (name: string): number => {
    const a = json.tensors[name]?.atol;
    if (a === undefined) throw new Error(`${dir}: no atol for ${name}`);
    return a;
  };
  return { json, file, nhwc, atol };
}

function toNhwc(values: Float32Array, shape: number[]): Tensor {
  return tf.tidy(() => {
    const t = tf.tensor(values, shape, 'float32');
    return shape.length === 4 ? t.transpose([0, 2, 3, 1]) : t;
  });
}

before(async () => {
  await initBackend();
});

for (const dir of FIXTURES) {
  test(`VAE goldens: ${dir}`, async () => {
    const g = await goldenLoader(dir);
    const model = await openSafetensors(`${dir}/model.safetensors`);
    const { params, cfg } = await loadVae(model, { scaleFactor: g.json.vae.scale_factor });
    const image = await g.nhwc('vae.image');
    const noise = await g.nhwc('vae.sample_noise');
    const post = vaeEncode(params, cfg, image);
    const sample = samplePosterior(post, noise);
    const scaledMean = scaleLatents(cfg, post.mean);
    const decoded = vaeDecode(params, cfg, await g.nhwc('vae.z_scaled'));
    const ours: Record<string, Tensor> = {
      'vae.posterior_mean': post.mean,
      'vae.posterior_logvar': post.logvar,
      'vae.posterior_std': post.std,
      'vae.posterior_sample': sample,
      'vae.latent_scaled_mean': scaledMean,
      'vae.decoded': decoded,
    };
    for (const [name, t] of Object.entries(ours)) {
      const golden = await g.nhwc(name);
      const diff = await maxAbsDiff(t, golden);
      assert.ok(diff <= g.atol(name), `${dir} ${name}: max |ours − golden| = ${diff} > atol ${g.atol(name)}`);
      golden.dispose();
    }
    tf.dispose([image, noise, ...Object.values(ours)]);
    disposeParams(params);
    await model.close();
    await g.file.close();
  });
}

for (const [file, family] of [['keys-sd15.json', 'SD1.5'], ['keys-sd21.json', 'SD2.1']] as const) {
  test(`VAE config of a full ${family} checkpoint is inferred from its keys; every first_stage_model key is consumed`, () => {
    const shapes = keyShapes(`test/fixtures/sd-tiny/${file}`);
    const cfg = vaeConfigFromKeys(shapes);
    assert.deepEqual(
      { prefix: cfg.prefix, ch: cfg.ch, chMult: cfg.chMult, numResBlocks: cfg.numResBlocks, zChannels: cfg.zChannels, embedDim: cfg.embedDim },
      { prefix: 'first_stage_model.', ch: 128, chMult: [1, 2, 4, 4], numResBlocks: 2, zChannels: 4, embedDim: 4 },
    );
    assert.equal(cfg.midAttention, true);
    assert.deepEqual(cfg.attnLevels, []);
    const vaeKeys = [...shapes.keys()].filter((k) => k.startsWith('first_stage_model.'));
    const expected = vaeParamShapes(cfg);
    assert.equal(vaeKeys.length, 248);
    assert.deepEqual([...expected.keys()].sort(), vaeKeys.sort());
    checkVaeKeys(shapes, cfg); // shapes equal too
  });
}

test('a standalone VAE file (no prefix) and a wrong shape are handled', () => {
  const full = keyShapes('test/fixtures/sd-tiny/keys-sd15.json');
  const bare = new Map([...full].filter(([k]) => k.startsWith('first_stage_model.')).map(([k, s]) => [k.slice(18), s]));
  const cfg = vaeConfigFromKeys(bare);
  assert.equal(cfg.prefix, '');
  checkVaeKeys(bare, cfg);
  bare.set('decoder.conv_out.weight', [3, 128, 1, 1]);
  assert.throws(() => checkVaeKeys(bare, cfg), /decoder\.conv_out\.weight' has shape \[3,128,1,1\], expected \[3,128,3,3\]/);
  bare.delete('decoder.norm_out.bias');
  assert.throws(() => checkVaeKeys(bare, cfg), /missing 'decoder\.norm_out\.bias'/);
});

test('VAE encode/decode leave no tensors behind, and the decoder is differentiable', async () => {
  const model = await openSafetensors('test/fixtures/sd-tiny/model.safetensors');
  const { params, cfg } = await loadVae(model);
  const image = tf.randomUniform([1, 32, 32, 3], -1, 1);
  const run = () => {
    const post = vaeEncode(params, cfg, image);
    const dec = vaeDecode(params, cfg, post.mean);
    tf.dispose([post.mean, post.logvar, post.std, dec]);
  };
  run();
  const before = tf.memory().numTensors;
  run();
  run();
  assert.equal(tf.memory().numTensors, before);
  const z = tf.randomNormal([1, 4, 4, cfg.embedDim]);
  const grad = tf.grad((x: Tensor) => vaeDecode(params, cfg, x).square().mean())(z);
  assert.deepEqual(grad.shape, z.shape);
  assert.ok(Number.isFinite((await grad.abs().sum().data())[0]!));
  tf.dispose([image, z, grad]);
  disposeParams(params);
  await model.close();
});
