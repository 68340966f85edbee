/**
 * @file Textual Inversion on SDXL (sdxl-tiny): the trainer's tokenisation and loss give the
 * golden ti.* values, a short run writes `{clip_l, clip_g}` as the webui loads it and reloads
 * bit-exact, resume continues from it, and embeddings of the wrong family are refused by name.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { tf, initBackend, type Tensor } from '../trainers/backend/index.ts';
import { validate } from '../schemas/index.ts';
import { openSafetensors, writeSafetensors } from '../trainers/io/safetensors.ts';
import { loadSdModel } from '../trainers/nets/sd.ts';
import { lossAndGrads } from '../trainers/nets/recompute.ts';
import { ClipTokenizer, tokenizeWithEmbeddings } from '../trainers/text/tokenizer.ts';
import { runTextualInversion, type TiSpec } from '../trainers/methods/textual-inversion.ts';
import { xlTextualInversionLoss, type XlTiModel } from '../trainers/methods/textual-inversion-xl.ts';
import { eosPadded, readXlEmbedding } from '../trainers/methods/textual-inversion-xl-job.ts';
import type { JobContext } from '../trainers/job.ts';

await initBackend();

const DIR = 'test/fixtures/sdxl-tiny';
const MODEL = `${DIR}/model.safetensors`;
type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
const ctx: JobContext = { emit: () => {}, signal: new AbortController().signal };

function spec(dir: string, over: Record<string, unknown> = {}): TiSpec {
  const s: Record<string, unknown> = {
    model: MODEL, images: 'assets/demo-images', name: 'xl_ti', initText: 'woodblock fox', vectors: 2, steps: 3, width: 64, height: 64,
    previewEvery: 0, saveEvery: 0, seed: 5, embeddingsDir: join(dir, 'emb'), logDir: join(dir, 'log'), ...over,
  };
  assert.deepEqual(validate('textual-inversion', s), []);
  return s as unknown as TiSpec;
}

test('sdxl-tiny: the trainer tokenises the TI prompts to the golden ids, and its loss/gradients equal ti.loss, ti.grad_clip_l, ti.grad_clip_g', async () => {
  const g = JSON.parse(readFileSync(`${DIR}/golden.json`, 'utf8')) as Json;
  const ti = g.textual_inversion;
  const tokenizer = await ClipTokenizer.load();
  const prompts = (ti.prompts as string[]).map((p) => tokenizeWithEmbeddings(tokenizer, p, new Map([[ti.name, ti.num_vectors]]), 'zero'));
  assert.deepEqual(prompts.map((p) => p.ids), ti.ids_clip_g);
  assert.deepEqual(prompts.map((p) => eosPadded(p.ids)), ti.ids_clip_l);
  assert.deepEqual(prompts.map((p) => p.embeddings[0]!.positions), ti.vector_positions);
  const model = await loadSdModel(MODEL, ['text', 'unet'], {}, { xl: true });
  const gs = await openSafetensors(`${DIR}/golden.safetensors`);
  const read = async (n: string) => tf.tensor(await gs.read(n), gs.info(n).shape);
  const nhwc = (t: Tensor) => t.transpose([0, 2, 3, 1]);
  const l = tf.variable(await read('ti.clip_l'));
  const gv = tf.variable(await read('ti.clip_g'));
  const v = g.vector_conditioning.inputs;
  const batch = {
    latents: nhwc(await read('train.x0')), noise: nhwc(await read('train.noise')), timesteps: g.train_batch.timesteps,
    idsL: prompts.map((p) => eosPadded(p.ids)), idsG: prompts.map((p) => p.ids), positions: prompts.map((p) => p.embeddings[0]!.positions),
    sizes: v.original_size_as_tuple.map((original: [number, number], i: number) => ({ original, crop: v.crop_coords_top_left[i], target: v.target_size_as_tuple[i] })),
  };
  const { value, grads } = lossAndGrads(() => xlTextualInversionLoss(model as XlTiModel, { l, g: gv }, batch), new Map([['l', l], ['g', gv]]));
  const close = async (t: Tensor, name: string) => {
    const want = await gs.read(name);
    const got = await t.data();
    let max = 0;
    for (let i = 0; i < want.length; i++) max = Math.max(max, Math.abs(got[i]! - want[i]!));
    assert.ok(max <= g.tensors[name].atol, `${name}: ${max} > ${g.tensors[name].atol}`);
  };
  await close(value, 'ti.loss');
  await close(grads.l!, 'ti.grad_clip_l');
  await close(grads.g!, 'ti.grad_clip_g');
  await gs.close();
  await model.source.close();
});

test('sdxl-tiny: a TI run writes {clip_l, clip_g} as the webui loads it, reloads bit-exact, resumes; wrong-family embeddings are refused', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'sidetrain-xlti-'));
  const s = spec(dir, { previewEvery: 3, previewSteps: 2, saveEvery: 2 });
  const result = await runTextualInversion(s, ctx);
  assert.ok(existsSync(join(dir, 'log', 'xl_ti', 'images', 'xl_ti-3.png')), 'preview with the pooled/size conditioning');
  assert.ok(existsSync(join(dir, 'log', 'xl_ti', 'embeddings', 'xl_ti-2.safetensors')), 'snapshot');
  assert.equal(result.output, join(dir, 'emb', 'xl_ti.safetensors'));
  const file = await openSafetensors(result.output);
  assert.deepEqual(file.keys().sort(), ['clip_g', 'clip_l']);
  assert.deepEqual(file.info('clip_l').shape, [2, 32]);
  assert.deepEqual(file.info('clip_g').shape, [2, 48]);
  assert.equal(file.metadata().step, '3');
  const [l, g] = [await file.read('clip_l'), await file.read('clip_g')];
  await file.close();
  const model = await loadSdModel(MODEL, ['text'], {}, { xl: true });
  const back = await readXlEmbedding(result.output, model.textXl!);
  assert.deepEqual(await back.l.data(), l);
  assert.deepEqual(await back.g.data(), g);
  assert.equal(back.step, 3);
  // resume: 2 more steps from the saved step
  const resumed = await runTextualInversion(spec(dir, { steps: 5, resume: true }), ctx);
  assert.equal(resumed.step, 5);
  // an SD1 embedding (one table) and an embedding for other encoder widths are refused, naming the file
  const sd1 = join(dir, 'sd1.safetensors');
  await writeSafetensors(sd1, [{ name: 'emb_params', dtype: 'F32', shape: [2, 32], data: new Float32Array(64) }]);
  await assert.rejects(readXlEmbedding(sd1, model.textXl!), /sd1\.safetensors: not an SDXL embedding \(no 'clip_l'/);
  const wide = join(dir, 'wide.safetensors');
  await writeSafetensors(wide, [
    { name: 'clip_l', dtype: 'F32', shape: [1, 768], data: new Float32Array(768) },
    { name: 'clip_g', dtype: 'F32', shape: [1, 1280], data: new Float32Array(1280) },
  ]);
  await assert.rejects(readXlEmbedding(wide, model.textXl!), /wide\.safetensors: 'clip_l' is \[1,768\], this model's encoder needs \[n, 32\]/);
  await model.source.close();
  tf.dispose([back.l, back.g]);
  await writeFile(join(dir, 'done'), '');
});
