/**
 * @file The whole-model methods on SDXL (sdxl-tiny): the trainer's own loss and trained-weight
 * selection (methods/full-xl.ts) give ft.loss and every ft.grad.* golden — the UNet with
 * label_emb, both encoders, CLIP-L's last block and final_layer_norm exactly zero (left out of
 * training), OpenCLIP-G's last block reached through the pooled vector alone; and the full
 * checkpoint writer keeps every key, shape and dtype of the input in sgm's layout, reloads, and
 * is guessed as SDXL base by the webui's rules.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { copyFile, mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { tf, initBackend, type Tensor } from '../trainers/backend/index.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import { openCheckpoint, openTensorFile } from '../trainers/io/checkpoint.ts';
import { loadSdModel, type SdModel } from '../trainers/nets/sd.ts';
import { paramToTorch } from '../trainers/nets/params.ts';
import { lossAndGrads } from '../trainers/nets/recompute.ts';
import { writeCheckpoint } from '../trainers/nets/checkpoint-write.ts';
import { createHypernetwork } from '../trainers/nets/hypernet.ts';
import { attentionWidths, runHypernetwork, type HnSpec } from '../trainers/methods/hypernetwork.ts';
import { readHypernetwork } from '../trainers/io/pt-hypernet.ts';
import { validate } from '../schemas/index.ts';
import type { JobEvent } from '../trainers/job.ts';
import { xlHypernetworkLoss } from '../trainers/methods/hypernetwork-xl.ts';
import { makeXlVariables, xlConditioning, xlFullLoss, type XlFullModel } from '../trainers/methods/full-xl.ts';

await initBackend();

const DIR = 'test/fixtures/sdxl-tiny';
const MODEL = `${DIR}/model.safetensors`;
type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
const g = JSON.parse(readFileSync(`${DIR}/golden.json`, 'utf8')) as Json;

async function goldenBatch() {
  const gs = await openSafetensors(`${DIR}/golden.safetensors`);
  const read = async (n: string) => tf.tensor(await gs.read(n), gs.info(n).shape).transpose([0, 2, 3, 1]);
  const tb = g.train_batch;
  const v = g.vector_conditioning.inputs;
  const batch = {
    latents: await read(tb.x0), noise: await read(tb.noise), timesteps: tb.timesteps as number[], idsL: tb.ids_clip_l, idsG: tb.ids_clip_g, classRows: 0,
    sizes: v.original_size_as_tuple.map((original: [number, number], i: number) => ({ original, crop: v.crop_coords_top_left[i], target: v.target_size_as_tuple[i] })),
  };
  return { gs, batch };
}

test('sdxl-tiny: the whole-model trainer (UNet + both encoders) gives ft.loss and every ft.grad.* golden', async () => {
  const model = (await loadSdModel(MODEL, ['text', 'unet'], {}, { xl: true })) as SdModel & XlFullModel;
  const { gs, batch } = await goldenBatch();
  const { unet, text } = makeXlVariables(model, ['l', 'g']);
  const trainable = new Map([...unet, ...text]);
  const { value, grads } = lossAndGrads(() => xlFullLoss(model, batch).loss, trainable);
  const close = async (t: Tensor, name: string) => {
    const want = await gs.read(name);
    const got = await t.data();
    assert.equal(got.length, want.length, name);
    let max = 0;
    for (let i = 0; i < want.length; i++) max = Math.max(max, Math.abs(got[i]! - want[i]!));
    assert.ok(max <= g.tensors[name].atol, `${name}: ${max} > ${g.tensors[name].atol}`);
  };
  await close(value, 'ft.loss');
  for (const name of g.full_model_gradients.grads as string[]) {
    const key = name.slice('ft.grad.'.length);
    if (g.tensors[name].max_abs === 0) {
      // analytically zero (CLIP-L's last block, final_layer_norm): not trained at all, so its weight is copied as it was
      assert.ok(!trainable.has(key) && !grads[key], `${key} must not train`);
      continue;
    }
    assert.ok(grads[key], `${key}: no gradient`);
    const torch = paramToTorch(grads[key]);
    await close(torch, name);
    torch.dispose();
  }
  // OpenCLIP-G's last block reaches the loss only through the pooled vector (its golden above):
  // with the pooled vector cut off the tape, it gets no gradient at all
  const last = `conditioner.embedders.1.model.transformer.resblocks.${model.textXl.cfg.g.layers - 1}.mlp.c_fc.weight`;
  assert.ok(grads[last]);
  const cut = lossAndGrads(() => tf.tidy(() => {
    const cond = xlConditioning(model, batch);
    return xlFullLoss(model, { ...batch, cond: { crossattn: cond.crossattn, pooled: tf.tensor(cond.pooled.dataSync(), cond.pooled.shape) } }).loss;
  }), new Map([[last, trainable.get(last)!]]));
  assert.equal(cut.grads[last], undefined);
  cut.value.dispose();
  tf.dispose([value, ...Object.values(grads)]);
  await gs.close();
  await model.source.close();
});

/** The webui's guess (modules/sd_models_config.py guess_model_config_from_state_dict) for the keys SDXL files carry. */
function webuiGuess(shapes: Map<string, number[]>): string {
  if (shapes.has('model.diffusion_model.x_embedder.proj.weight')) return 'sd3';
  if (shapes.has('conditioner.embedders.1.model.ln_final.weight')) {
    return shapes.get('model.diffusion_model.input_blocks.0.0.weight')?.[1] === 9 ? 'sdxl-inpainting' : 'sdxl';
  }
  if (shapes.has('conditioner.embedders.0.model.ln_final.weight')) return 'sdxl-refiner';
  return 'sd1/sd2';
}

test('sdxl-tiny: the full checkpoint keeps every key, shape and dtype of the input (sgm layout), reloads as SDXL, float16 optional', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'sidetrain-xlckpt-'));
  await copyFile(`${DIR}/config.json`, join(dir, 'config.json')); // the tiny model's heads, as a real one's yaml
  const model = (await loadSdModel(MODEL, ['text', 'unet'], {}, { xl: true })) as SdModel & XlFullModel;
  const src = await openTensorFile(MODEL);
  const { unet, text } = makeXlVariables(model, ['l', 'g']);
  const bumped = new Map<string, Tensor>([...unet, ...text].map(([k, v]) => [k, v.add(1)]));
  try {
    for (const half of [false, true]) {
      const path = await writeCheckpoint({ dir, name: half ? 'xl-half' : 'xl', source: src, trained: bumped, half, metadata: { sidetrain_method: 'dreambooth' } });
      const out = await openSafetensors(path);
      assert.deepEqual(out.keys().sort(), src.keys().sort());
      for (const prefix of ['conditioner.embedders.0.', 'conditioner.embedders.1.', 'model.diffusion_model.', 'first_stage_model.']) {
        assert.ok(out.keys().some((k) => k.startsWith(prefix)), prefix);
      }
      for (const k of src.keys()) {
        const want = src.info(k);
        assert.deepEqual(out.info(k).shape, want.shape, k);
        assert.equal(out.info(k).dtype, half && want.dtype === 'F32' ? 'F16' : want.dtype, k);
      }
      const key = 'model.diffusion_model.label_emb.0.0.weight';
      const [got, orig] = [await out.read(key), await src.read(key)];
      assert.ok(got.every((x, i) => Math.abs(x - Math.fround(orig[i]! + 1)) <= (half ? Math.abs(orig[i]! + 1) * 1e-3 : 0)), `${key} carries the trained values`);
      const untouched = 'conditioner.embedders.0.transformer.text_model.final_layer_norm.weight';
      if (!half) assert.deepEqual(await out.read(untouched), await src.read(untouched), `${untouched} copied unchanged`);
      assert.equal(webuiGuess(new Map(out.keys().map((k) => [k, out.info(k).shape]))), 'sdxl');
      await out.close();
      const back = await openCheckpoint(path);
      assert.equal(back.family, 'sdxl');
      await back.source.close();
      const reloaded = await loadSdModel(path, ['text', 'unet'], {}, { xl: true });
      assert.equal(reloaded.unet!.params.size, model.unet.params.size);
      assert.equal(reloaded.textXl!.params.size, model.textXl.params.size);
      await reloaded.source.close();
    }
  } finally {
    tf.dispose([...bumped.values()]);
    await src.close();
    await model.source.close();
  }
});

test('sdxl-tiny: hypernetwork modules apply by context width (cross-attention 80 = L+G, self-attention 64), identity modules leave the sgm loss as it was', async () => {
  const model = (await loadSdModel(MODEL, ['text', 'unet'], {}, { xl: true })) as SdModel & XlFullModel;
  const { gs, batch } = await goldenBatch();
  const { source } = await openCheckpoint(MODEL);
  const widths = attentionWidths(source.keys().map((k) => [k, source.info(k).shape] as [string, number[]]));
  await source.close();
  assert.deepEqual(widths, [64, 80], 'the tiny model: transformer channels 64, context 32 + 48');
  const full = Object.entries(JSON.parse(readFileSync(`${DIR}/keys-sdxl.json`, 'utf8')) as Record<string, number[]>);
  assert.deepEqual(attentionWidths(full), [640, 1280, 2048], 'SDXL base: self-attention 640/1280, cross-attention 2048');
  const spec = { sizes: widths, layerStructure: [1, 2, 1], activation: 'relu', layerNorm: false, dropout: false, activateOutput: false, weightInit: 'Normal', lastLayerDropout: false };
  const params = createHypernetwork(spec, 3);
  const cond = xlConditioning(model, batch);
  const xlBatch = { ...batch, cond };
  const trainable = new Map([...params].filter(([, v]) => (v as tf.Variable).trainable) as [string, tf.Variable][]);
  const { value, grads } = lossAndGrads(() => xlHypernetworkLoss(model, { params, spec }, xlBatch, 1), trainable);
  for (const size of widths) for (const kv of ['k', 'v']) assert.ok(grads[`${size}.${kv}.linear.0.weight`], `module ${size}.${kv} reached`);
  // zero output layers: every module is x + 0, so the loss is the plain sgm loss
  for (const [k, v] of trainable) if (k.includes('.linear.2.')) v.assign(tf.zerosLike(v));
  const identity = xlHypernetworkLoss(model, { params, spec }, xlBatch, 1);
  const plain = xlFullLoss(model, xlBatch).loss;
  assert.equal((await identity.data())[0], (await plain.data())[0]);
  assert.ok(Number.isFinite((await value.data())[0]!));
  tf.dispose([value, identity, plain, cond.crossattn, cond.pooled, ...Object.values(grads), ...params.values()]);
  await gs.close();
  await model.source.close();
});

test('sdxl-tiny: a hypernetwork job on SDXL takes the model\'s widths for the default sizes, trains with the size vector, writes the webui file', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'sidetrain-hnxl-'));
  const raw = {
    model: MODEL, images: 'assets/demo-images', name: 'hnxl', steps: 2, width: 64, height: 64, lr: '0.00001', previewEvery: 2, previewSteps: 2, saveEvery: 0,
    hypernetworkDir: join(dir, 'hn'), logDir: join(dir, 'logs'), seed: 2,
  };
  assert.deepEqual(validate('hypernetwork', raw), []);
  const events: JobEvent[] = [];
  const r = await runHypernetwork(raw as unknown as HnSpec, { emit: (e) => events.push(e), signal: new AbortController().signal });
  assert.equal(r.step, 2);
  assert.ok(events.some((e) => e.type === 'preview'), 'an SDXL preview with the modules applied');
  assert.ok(events.some((e) => e.type === 'log' && /attentions take 64, 80/.test(e.message)));
  const hn = await readHypernetwork(r.output);
  assert.deepEqual([...hn.modules.keys()].sort((a, b) => a - b), [64, 80]);
  await assert.rejects(runHypernetwork({ ...raw, name: 'bad', sizes: [768] } as unknown as HnSpec, { emit: () => {}, signal: new AbortController().signal }), /size 768 is not a context width.*64, 80/);
});
