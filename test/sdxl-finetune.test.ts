/**
 * @file Fine-tune on SDXL (sdxl-tiny, 64 px buckets, captions): the trainer's own fine-tune loss
 * gives ft.loss on the golden batch; a run with EMA and both encoders writes a full checkpoint
 * with every key, shape and dtype of the input, renders SDXL samples, and cancel + resume from
 * its snapshot ends bit-identical to an uninterrupted run.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { tf } from '../trainers/backend/index.ts';
import { validate } from '../schemas/index.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import { loadSdModel } from '../trainers/nets/sd.ts';
import { finetuneLoss, runFinetune, type FinetuneSpec } from '../trainers/methods/finetune/finetune.ts';
import type { FtRun } from '../trainers/methods/finetune/types.ts';
import type { JobEvent } from '../trainers/job.ts';
import { onGradBackend } from './helpers/golden.ts';
import { ctxFor, jobSuite, readTensors } from './helpers/job-run.ts';

const XL = 'test/fixtures/sdxl-tiny';
const suite = jobSuite('sidetrain-ftxl-', ['an orange cat', 'a green triangle']);
let counter = 0;


function specFor(extra: Record<string, unknown> = {}): FinetuneSpec {
  const raw: Record<string, unknown> = {
    model: join(XL, 'model.safetensors'), images: suite.images, name: `ftxl${++counter}`, resolution: 64, steps: 4, lr: 0.001, seed: 5, trainTextEncoder: true,
    textEncoderLr: 0.0005, ema: true, save: 'both', crop: 'random', logDir: join(suite.tmp, 'logs'), checkpointDir: join(suite.tmp, 'ckpt'), ...extra,
  };
  assert.deepEqual(validate('finetune', raw), []);
  return raw as unknown as FinetuneSpec;
}

test('SDXL fine-tune: its loss on the golden batch is ft.loss', async () => {
  const g = JSON.parse(readFileSync(join(XL, 'golden.json'), 'utf8'));
  const model = await loadSdModel(join(XL, 'model.safetensors'), ['text', 'unet'], {}, { xl: true });
  const gs = await openSafetensors(join(XL, 'golden.safetensors'));
  const read = async (n: string) => tf.tensor(await gs.read(n), gs.info(n).shape).transpose([0, 2, 3, 1]);
  const v = g.vector_conditioning.inputs;
  const batch = {
    latents: await read(g.train_batch.x0), noise: await read(g.train_batch.noise), timesteps: g.train_batch.timesteps, ids: g.train_batch.ids_clip_g,
    sizes: v.original_size_as_tuple.map((original: [number, number], i: number) => ({ original, crop: v.crop_coords_top_left[i], target: v.target_size_as_tuple[i] })),
  };
  const loss = finetuneLoss({ model: model as FtRun['model'], spec: { minSnrGamma: 0 } as FinetuneSpec }, batch);
  const got = (await loss.data())[0]!;
  const want = (await gs.read('ft.loss'))[0]!;
  assert.ok(Math.abs(got - want) <= g.tensors['ft.loss'].atol, `${got} vs ${want}`);
  tf.dispose([loss, batch.latents, batch.noise]);
  await gs.close();
  await model.source.close();
});


test('SDXL fine-tune: EMA and both encoders, every key of the input; cancel + resume equals an uninterrupted run', async () => {
  await onGradBackend(async () => {
    const full = specFor({ sampleEvery: 4, samplePrompts: ['an orange cat'], sampleSteps: 2 });
    const events: JobEvent[] = [];
    const r1 = await runFinetune(full, ctxFor(events));
    assert.equal(r1.step, 4);
    assert.ok(events.some((e) => e.type === 'preview'), 'an SDXL sample image');
    const src = await openSafetensors(join(XL, 'model.safetensors'));
    for (const path of r1.outputs) {
      const out = await openSafetensors(path);
      assert.deepEqual(out.keys().sort(), src.keys().sort(), path);
      for (const k of src.keys()) assert.deepEqual(out.info(k), src.info(k), k);
      await out.close();
    }
    await src.close();

    const part = specFor({ saveEvery: 2 });
    const cut = await runFinetune(part, ctxFor([], (e, abort) => e.type === 'step' && e.step === 3 && abort()));
    assert.equal(cut.cancelled, true);
    const resumed = await runFinetune({ ...part, resume: true }, ctxFor([]));
    assert.equal(resumed.step, 4);
    const [a, b] = [await readTensors(r1.outputs[0]!), await readTensors(resumed.outputs[0]!)];
    for (const [k, v] of a) assert.deepEqual(b.get(k), v, `${k}: resumed = uninterrupted`);
  });
});
