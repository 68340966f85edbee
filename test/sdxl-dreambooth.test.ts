/**
 * @file Dreambooth on SDXL (sdxl-tiny, 64 px, prior preservation with generated class images):
 * the UNet and both text encoders train and the output is a full checkpoint with every key,
 * shape and dtype of the input (CLIP-L's last block and final_layer_norm untouched); the fused
 * backward gives the same weights as the unfused step; cancel + resume ends bit-identical to an
 * uninterrupted run; `lora` writes an SDXL LoRA; textEncoders other than both need SDXL; each
 * image is cut to its aspect bucket (to width × height when class images share the batches).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { copyFileSync, mkdtempSync } from 'node:fs';
import { validate } from '../schemas/index.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import { dreamboothDryRun, dreamboothSpec, runDreambooth, type DbSpec } from '../trainers/methods/dreambooth.ts';
import type { JobEvent } from '../trainers/job.ts';
import { onGradBackend } from './helpers/golden.ts';
import { ctxFor, jobSuite, readTensors } from './helpers/job-run.ts';

const XL = 'test/fixtures/sdxl-tiny';
const suite = jobSuite('sidetrain-dbxl-');
let counter = 0;

function specFor(extra: Record<string, unknown> = {}): DbSpec {
  const raw: Record<string, unknown> = {
    model: join(XL, 'model.safetensors'), images: suite.images, name: `dbxl${++counter}`, instancePrompt: 'a photo of sks cat', classPrompt: 'a photo of a cat',
    classImages: 1, classSteps: 2, width: 64, height: 64, steps: 4, lr: '0.001', seed: 3, trainTextEncoder: true, textEncoderLr: '0.0005',
    logDir: join(suite.tmp, 'logs'), checkpointDir: join(suite.tmp, 'ckpt'), ...extra,
  };
  assert.deepEqual(validate('dreambooth', raw), []);
  return dreamboothSpec(raw as unknown as DbSpec);
}

const L_LAST = 'conditioner.embedders.0.transformer.text_model.encoder.layers.2.mlp.fc1.weight';
const L_FINAL = 'conditioner.embedders.0.transformer.text_model.final_layer_norm.weight';

test('SDXL Dreambooth: UNet and both encoders train; the checkpoint has every key, shape and dtype of the input', async () => {
  await onGradBackend(async () => {
    const spec = specFor({ previewEvery: 4, previewSteps: 2 });
    const events: JobEvent[] = [];
    const r = await runDreambooth(spec, ctxFor(events));
    assert.equal(r.kind, 'checkpoint');
    assert.equal(r.step, 4);
    assert.ok(events.some((e) => e.type === 'preview'), 'an SDXL preview');
    const [src, out] = await Promise.all([openSafetensors(join(XL, 'model.safetensors')), openSafetensors(r.output)]);
    assert.deepEqual(out.keys().sort(), src.keys().sort());
    for (const k of src.keys()) assert.deepEqual(out.info(k), src.info(k), k);
    await Promise.all([src.close(), out.close()]);
    const [a, b] = [await readTensors(join(XL, 'model.safetensors')), await readTensors(r.output)];
    const changed = (k: string) => a.get(k)!.some((v, i) => v !== b.get(k)![i]);
    for (const k of ['model.diffusion_model.label_emb.0.0.weight', 'model.diffusion_model.out.2.weight',
      'conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight',
      'conditioner.embedders.1.model.transformer.resblocks.2.mlp.c_fc.weight', 'conditioner.embedders.1.model.text_projection']) assert.ok(changed(k), `${k} trained`);
    for (const k of [L_LAST, L_FINAL, 'first_stage_model.decoder.conv_out.weight']) assert.ok(!changed(k), `${k} untouched`);
  });
});

test('SDXL Dreambooth: fused backward equals the unfused step; cancel + resume equals an uninterrupted run', async () => {
  await onGradBackend(async () => {
    const opts = { gradientCheckpointing: 'on', optimizer: 'adamw8bit', textEncoders: 'clip-g' };
    const plain = await runDreambooth(specFor(opts), ctxFor([]));
    const fused = await runDreambooth(specFor({ ...opts, fusedBackward: true }), ctxFor([]));
    const [p, f] = [await readTensors(plain.output), await readTensors(fused.output)];
    for (const [k, v] of p) assert.deepEqual(f.get(k), v, `${k}: fused = unfused, bit for bit`);
    assert.deepEqual(p.get(L_LAST), (await readTensors(join(XL, 'model.safetensors'))).get(L_LAST), 'clip-g only: CLIP-L untouched');

    const part = specFor({ ...opts, fusedBackward: true });
    const cut = await runDreambooth(part, ctxFor([], (e, abort) => e.type === 'step' && e.step === 2 && abort()));
    assert.equal(cut.cancelled, true);
    assert.equal(cut.step, 2);
    const events: JobEvent[] = [];
    const resumed = await runDreambooth({ ...part, resume: true }, ctxFor(events));
    assert.equal(resumed.step, 4);
    assert.ok(events.some((e) => e.type === 'log' && /optimizer state restored/.test(e.message)));
    const r = await readTensors(resumed.output);
    for (const [k, v] of f) assert.deepEqual(r.get(k), v, `${k}: resumed = uninterrupted`);
  });
});

test('SDXL Dreambooth with frozen text encoders: prompts encoded once, the encoders released, the checkpoint keeps them as they were', async () => {
  await onGradBackend(async () => {
    const events: JobEvent[] = [];
    const r = await runDreambooth(specFor({ trainTextEncoder: false, steps: 2, previewEvery: 2, previewSteps: 2 }), ctxFor(events));
    assert.equal(r.step, 2);
    assert.ok(events.some((e) => e.type === 'log' && /prompt\(s\) encoded once; the encoders are released/.test(e.message)));
    assert.ok(events.some((e) => e.type === 'preview'), 'a preview from the cached conditioning');
    const [a, b] = [await readTensors(join(XL, 'model.safetensors')), await readTensors(r.output)];
    for (const [k, v] of a) if (k.startsWith('conditioner.')) assert.deepEqual(b.get(k), v, k);
    assert.ok(a.get('model.diffusion_model.out.2.weight')!.some((v, i) => v !== b.get('model.diffusion_model.out.2.weight')![i]));
  });
});

test('SDXL Dreambooth --lora writes an SDXL LoRA; textEncoders other than both are refused on SD1', async () => {
  await onGradBackend(async () => {
    const r = await runDreambooth(specFor({ lora: true, loraDir: join(suite.tmp, 'lora'), steps: 2, trainTextEncoder: false }), ctxFor([]));
    assert.equal(r.kind, 'lora');
    const f = await openSafetensors(r.output);
    assert.equal(f.metadata().ss_base_model_version, 'sdxl_base_v1-0');
    assert.ok(f.keys().some((k) => k.startsWith('lora_unet_input_blocks_')));
    await f.close();
    await assert.rejects(runDreambooth(specFor({ model: 'test/fixtures/sd-tiny/model.safetensors', textEncoders: 'clip-l' }), ctxFor([])), /textEncoders.*SDXL/);
  });
});

test('SDXL Dreambooth: each image in its aspect bucket, as LoRA; with class images cut to width × height', async () => {
  await onGradBackend(async () => {
    const images = mkdtempSync(join(suite.tmp, 'wide-'));
    for (const f of ['0042 blue square.jpg', '01-orange cat.png']) copyFileSync(join('test/fixtures/images', f), join(images, f));
    const wide = { images, width: 256, height: 256, steps: 2, classPrompt: '', classImages: 0, trainTextEncoder: false };
    assert.match(await dreamboothDryRun(specFor(wide)), /0042 blue square\.jpg {2}96×64 → 320×192/);
    assert.match(await dreamboothDryRun(specFor({ ...wide, classPrompt: 'a photo of a cat', classImages: 1 })), /0042 blue square\.jpg {2}96×64 → 256×256/);
    const r = await runDreambooth(specFor(wide), ctxFor([]));
    assert.equal(r.step, 2, 'trains across buckets of two sizes');
  });
});
