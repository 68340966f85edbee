import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { detectFamily, keyMapping, modelHash, normaliseKeys, openCheckpoint, shapeOnlySource } from '../trainers/io/checkpoint.ts';

const FIX = 'test/fixtures';
const keys = async (file: string) => JSON.parse(await readFile(`${FIX}/${file}`, 'utf8')) as Record<string, number[]>;

test('family from full-size key lists: SD1.5, SD2.1, SDXL', async () => {
  assert.equal(detectFamily(shapeOnlySource('sd15.ckpt', await keys('sd-tiny/keys-sd15.json'))), 'sd1');
  assert.equal(detectFamily(shapeOnlySource('sd21.ckpt', await keys('sd-tiny/keys-sd21.json'))), 'sd2');
  assert.throws(() => detectFamily(shapeOnlySource('xl.safetensors', {})), /xl\.safetensors: unknown layout: no UNet/);
  assert.throws(() => detectFamily(shapeOnlySource('xl.safetensors', { 'conditioner.embedders.0.x': [1] })), /xl\.safetensors: this is an SDXL refiner/);
  const xl = shapeOnlySource('sdxl.safetensors', await keys('sdxl-tiny/keys-sdxl.json'));
  assert.equal(detectFamily(xl), 'sdxl');
});

test('inpainting and unknown UNet inputs are refused', async () => {
  const sd15 = await keys('sd-tiny/keys-sd15.json');
  const inpaint = { ...sd15, 'model.diffusion_model.input_blocks.0.0.weight': [320, 9, 3, 3] };
  assert.throws(() => detectFamily(shapeOnlySource('inpaint.ckpt', inpaint)), /inpaint\.ckpt: this is an inpainting model/);
  const p2p = { ...sd15, 'model.diffusion_model.input_blocks.0.0.weight': [320, 8, 3, 3] };
  assert.throws(() => detectFamily(shapeOnlySource('p2p.ckpt', p2p)), /8 channels/);
  const noText = Object.fromEntries(Object.entries(sd15).filter(([k]) => !k.startsWith('cond_stage_model')));
  assert.throws(() => detectFamily(shapeOnlySource('unet.ckpt', noText)), /no SD1 .* or SD2 .* text encoder/);
});

test('legacy SD1 text keys are normalised; model_ema hidden unless asked', async () => {
  const sd15 = await keys('sd-tiny/keys-sd15.json');
  const legacy: Record<string, number[]> = {};
  for (const [k, v] of Object.entries(sd15)) legacy[k.replace('cond_stage_model.transformer.text_model.', 'cond_stage_model.transformer.')] = v;
  legacy['model_ema.decay'] = [];
  legacy['model_ema.diffusion_modelinput_blocks00weight'] = [320, 4, 3, 3];
  const src = normaliseKeys(shapeOnlySource('legacy.ckpt', legacy), false);
  assert.deepEqual(new Set(src.keys()), new Set(Object.keys(sd15)));
  assert.equal(detectFamily(src), 'sd1');
  const ema = keyMapping(Object.keys(legacy), true, 'legacy.ckpt');
  assert.equal(ema.get('model.diffusion_model.input_blocks.0.0.weight'), 'model_ema.diffusion_modelinput_blocks00weight');
  assert.equal(ema.get('model.diffusion_model.input_blocks.0.0.bias'), 'model.diffusion_model.input_blocks.0.0.bias');
  assert.throws(() => keyMapping(Object.keys(sd15), true, 'x.ckpt'), /x\.ckpt: EMA weights asked for/);
});

test('fixtures open as SD1 eps / SD2 undecided; a v yaml beside the file decides', async () => {
  const sd1 = await openCheckpoint(`${FIX}/sd-tiny/model.ckpt`);
  assert.equal(sd1.family, 'sd1');
  assert.equal(sd1.prediction, 'eps');
  assert.equal(sd1.source.keys().length, 437);
  await sd1.source.close();
  const sd2 = await openCheckpoint(`${FIX}/sd2-tiny/model-fp16.safetensors`);
  assert.equal(sd2.family, 'sd2');
  assert.equal(sd2.prediction, undefined);
  await sd2.source.close();
  const dir = await mkdtemp(join(tmpdir(), 'sidetrain-ck-'));
  await copyFile(`${FIX}/sd2-tiny/model.safetensors`, join(dir, 'm.safetensors'));
  await writeFile(join(dir, 'm.yaml'), 'model:\n  params:\n    parameterization: "v"\n');
  const v = await openCheckpoint(join(dir, 'm.safetensors'));
  assert.equal(v.prediction, 'v');
  assert.equal(v.predictionFrom, join(dir, 'm.yaml'));
  await v.source.close();
  assert.equal(await modelHash(`${FIX}/sd-tiny/model.safetensors`), '25bf137707');
  await assert.rejects(() => openCheckpoint(dir), /is a directory/);
});
