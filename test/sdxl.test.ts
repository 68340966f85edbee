/** @file SDXL: the configs of a full-size SDXL base from its keys alone (every key and shape consumed), detection, size embeddings. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { keyShapes } from './helpers/golden.ts';
import { SDXL_UNET, checkUnetKeys, unetConfigFromKeys, unetParamShapes } from '../trainers/nets/unet.ts';
import { textParamShapes } from '../trainers/nets/clip.ts';
import { sdxlTextConfigs, sdxlTextKeys } from '../trainers/nets/sdxl-conditioner.ts';
import { vaeConfigFromKeys, vaeParamShapes } from '../trainers/nets/vae.ts';
import { detectFamily, shapeOnlySource, yamlPrediction } from '../trainers/io/checkpoint.ts';
import { loadSdModel } from '../trainers/nets/sd.ts';

const KEYS = 'test/fixtures/sdxl-tiny/keys-sdxl.json';

test('full-size SDXL base: UNet, both text encoders and VAE inferred from keys-sdxl.json; every key and shape consumed', () => {
  const shapes = keyShapes(KEYS);
  const unet = unetConfigFromKeys(shapes);
  assert.deepEqual(unet, SDXL_UNET);
  checkUnetKeys(shapes, unet);
  const text = sdxlTextConfigs(shapes);
  assert.deepEqual([text.l.width, text.l.layers, text.l.heads, text.l.activation, text.l.contextNorm], [768, 12, 12, 'quick_gelu', false]);
  assert.deepEqual([text.g.width, text.g.layers, text.g.heads, text.g.activation, text.g.contextNorm], [1280, 32, 20, 'gelu', false]);
  assert.equal(text.pooledDim, 1280);
  assert.equal(unet.contextDim, text.l.width + text.g.width);
  assert.equal(unet.admInChannels, text.pooledDim + 6 * 256);
  const vae = vaeConfigFromKeys(shapes);
  const expected = new Map<string, number[]>([
    ...unetParamShapes(unet), ...textParamShapes(text.l), ...textParamShapes(text.g),
    ['conditioner.embedders.1.model.text_projection', [1280, 1280]],
    ...vaeParamShapes(vae),
  ]);
  const { used, unused } = sdxlTextKeys(text);
  for (const k of used) assert.ok(expected.has(k), `${k} read but has no expected shape`);
  const left = [...shapes.keys()].filter((k) => !expected.has(k) && !unused.includes(k));
  assert.deepEqual(left, [], 'keys of keys-sdxl.json no config accounts for');
  const wrong = [...expected].filter(([k, s]) => shapes.get(k)?.join() !== s.join()).map(([k]) => k);
  assert.deepEqual(wrong, [], 'expected keys missing or misshapen');
  assert.equal(shapes.size, 2515);
});

test('SDXL checkpoints are detected; the refiner and half layouts are refused with the reason', () => {
  const all = JSON.parse(readFileSync(KEYS, 'utf8')) as Record<string, number[]>;
  assert.equal(detectFamily(shapeOnlySource('xl.safetensors', all)), 'sdxl');
  const refiner = Object.fromEntries(Object.entries(all).filter(([k]) => !k.startsWith('conditioner.embedders.0.')));
  assert.throws(() => detectFamily(shapeOnlySource('refiner.safetensors', refiner)), /refiner\.safetensors: this is an SDXL refiner/);
  const noG = Object.fromEntries(Object.entries(all).filter(([k]) => !k.startsWith('conditioner.embedders.1.')));
  assert.throws(() => detectFamily(shapeOnlySource('odd.safetensors', noG)), /no OpenCLIP-G/);
});

test('prediction: an sgm yaml with VScaling says v, EpsScaling eps; --prediction overrides what the file says', async () => {
  const sgm = (target: string) => ({ model: { params: { denoiser_config: { params: { scaling_config: { target } } } } } });
  assert.equal(yamlPrediction(sgm('sgm.modules.diffusionmodules.denoiser_scaling.VScaling')), 'v');
  assert.equal(yamlPrediction(sgm('sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling')), 'eps');
  assert.equal(yamlPrediction({ model: { params: { parameterization: 'v' } } }), 'v');
  const { initBackend } = await import('../trainers/backend/index.ts');
  await initBackend();
  const model = await loadSdModel('test/fixtures/sdxl-tiny/model.safetensors', ['text'], {}, { xl: true, prediction: 'v' });
  assert.equal(model.prediction, 'v');
  await model.source.close();
  await assert.rejects(loadSdModel('test/fixtures/sdxl-tiny/model.safetensors', ['text'], {}, { what: 'hypernetwork' }), /model\.safetensors: an SDXL checkpoint; hypernetwork trains SD1\.x\/SD2\.x checkpoints only/);
});
