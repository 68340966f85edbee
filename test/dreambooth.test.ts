/**
 * @file Dreambooth on the tiny SD1 fixture at 64 px: full-model gradients through the trainer's
 * own loss (dreamboothLoss) match golden ft.loss / ft.grad.* (and, split into an instance and a
 * class half, twice them); a short prior-preservation run lowers the instance loss at fixed
 * batches while the class loss stays bounded, with class images generated once and reused; the
 * written checkpoint reloads and reproduces the trained UNet's output; cancel + resume continues
 * with the saved optimizer state and ends bit-identical to an uninterrupted run. With `lora`:
 * the LoRA file's keys map to the checkpoint's modules and carry the ss_* + prior metadata; a
 * short LoRA run with prior preservation lowers the instance loss at fixed batches while the
 * class loss stays bounded; cancel + resume keeps the optimizer state.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { currentBackend, initBackend, tf, type Tensor } from '../trainers/backend/index.ts';
import { validate } from '../schemas/index.ts';
import { loadSdModel } from '../trainers/nets/sd.ts';
import { unetForward } from '../trainers/nets/unet.ts';
import { paramToTorch, type Params } from '../trainers/nets/params.ts';
import { shapesOf } from '../trainers/nets/sd.ts';
import { createLora, disposeLora, kohyaName, loraTargets, networkLayerMapping, webuiModuleFor, withLora } from '../trainers/nets/lora.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import { trainLoop } from '../trainers/train/loop.ts';
import {
  dreamboothLoss, dreamboothSession, dreamboothPaths, dreamboothSpec, initDreamboothState, nextDbBatch, prepareDreambooth,
  releaseDreambooth, runDreambooth, type DbBatch, type DbSpec,
} from '../trainers/methods/dreambooth.ts';
import type { JobEvent } from '../trainers/job.ts';
import { onGradBackend } from './helpers/golden.ts';
import { ctxFor, tempWithImages } from './helpers/job-run.ts';

const SD1 = 'test/fixtures/sd-tiny';
let tmp: string;
let images: string;
let counter = 0;

before(async () => {
  await initBackend();
  ({ tmp, images } = tempWithImages('sidetrain-db-'));
});
after(() => rmSync(tmp, { recursive: true, force: true }));

/** A validated spec (schema defaults) for the tiny model: 64 px, class images from a shared log dir. */
function specFor(extra: Record<string, unknown> = {}): DbSpec {
  const raw: Record<string, unknown> = {
    model: join(SD1, 'model.safetensors'), images, name: `db${++counter}`, instancePrompt: 'a photo of sks cat', classPrompt: 'a photo of a cat',
    classImages: 2, classSteps: 3, width: 64, height: 64, steps: 4, lr: '0.001', seed: 3, logDir: join(tmp, 'logs'), checkpointDir: join(tmp, 'ckpt'),
    ...extra,
  };
  const errors = validate('dreambooth', raw);
  assert.deepEqual(errors, []);
  return dreamboothSpec(raw as unknown as DbSpec);
}

// ---------------------------------------------------------------------------------------------

test('full-model gradients through dreamboothLoss match golden ft.* (and ×2 split into instance/class halves)', async () => {
  await onGradBackend(async () => {
    const g = JSON.parse(readFileSync(join(SD1, 'golden.json'), 'utf8'));
    const gold = await openSafetensors(join(SD1, 'golden.safetensors'));
    const model = await loadSdModel(join(SD1, 'model.safetensors'), ['text', 'unet']);
    const input = async (n: string) => tf.tensor(await gold.read(n), gold.info(n).shape).transpose([0, 2, 3, 1]);
    const vars = (p: Params) => new Map([...p].map(([k, t]) => [k, tf.variable(t, true)]));
    const text = vars(model.text!.params);
    const unet = vars(model.unet!.params);
    const dbModel = { ...model, text: { params: text as Params, cfg: model.text!.cfg }, unet: { params: unet as Params, cfg: model.unet!.cfg } };
    const tb = g.train_batch;
    const all = [...text.values(), ...unet.values()];
    for (const classRows of [0, 1]) {
      const batch: DbBatch = { latents: await input(tb.x0), noise: await input(tb.noise), timesteps: tb.timesteps, ids: tb.ids, classRows };
      const { value, grads } = tf.variableGrads(() => dreamboothLoss(dbModel, batch, 1).loss, all);
      const scale = classRows ? 2 : 1; // mean(half 0) + mean(half 1) = 2 × mean(all) for equal halves
      const check = async (name: string, got: Tensor) => {
        const want = await gold.read(name);
        const data = await got.data();
        let max = 0;
        data.forEach((v, i) => (max = Math.max(max, Math.abs(v - scale * want[i]!))));
        assert.ok(max <= scale * g.tensors[name].atol, `${name} (classRows ${classRows}): max diff ${max} > ${scale * g.tensors[name].atol}`);
      };
      await check('ft.loss', value);
      for (const name of g.full_model_gradients.grads as string[]) {
        const key = name.slice('ft.grad.'.length);
        const v = text.get(key) ?? unet.get(key);
        assert.ok(v, `${key} is a trained weight`);
        const torch = paramToTorch(grads[v.name]!);
        await check(name, torch);
        torch.dispose();
      }
      tf.dispose([value, ...Object.values(grads), batch.latents, batch.noise]);
    }
    tf.dispose(all);
    await gold.close();
    await model.source.close();
  });
});

/** Instance and class loss summed over the batches of steps 1…n (fixed: seeded noise/timesteps). */
async function fixedLosses(run: Awaited<ReturnType<typeof prepareDreambooth>>, spec: DbSpec, unet: Params, n: number): Promise<[number, number]> {
  let inst = 0;
  let cls = 0;
  for (let step = 1; step <= n; step++) {
    const batch = nextDbBatch(run, spec, step, 0, true);
    const parts = dreamboothLoss({ ...run.model, unet: { params: unet, cfg: run.model.unet.cfg } }, batch, 1);
    inst += (await parts.instance.data())[0]!;
    cls += (await parts.prior!.data())[0]!;
    tf.dispose([parts.loss, parts.instance, parts.prior!, batch.latents, batch.noise, batch.context!]);
  }
  return [inst, cls];
}

test('prior preservation: class images cached; instance loss falls, class loss bounded; checkpoint reproduces the trained UNet', async () => {
  await onGradBackend(async () => {
    const spec = specFor({ steps: 8, lr: '0.002' });
    const events: JobEvent[] = [];
    const ctx = ctxFor(events);
    const run = await prepareDreambooth(spec, ctx, currentBackend()!.name);
    assert.ok(run.classes, 'prior preservation is on');
    assert.equal(readdirSync(run.classes.dir).filter((f) => f.endsWith('.png')).length, 2);
    assert.match(run.classes.dir, /class-images[/\\][0-9a-f]{10}-[0-9a-f]{10}$/);
    const paths = dreamboothPaths(spec);
    const s = await initDreamboothState(run, spec, paths, undefined, ctx);
    try {
      const base = new Map([...s.unet].map(([k, v]) => [k, v.clone()]));
      const before = await fixedLosses(run, spec, base, 4);
      const method = dreamboothSession(run, spec, s, paths);
      await trainLoop(method, { startStep: 0, steps: spec.steps, gradAccum: 1, learnRate: () => 0.002, optimizer: s.optimizer, saveEvery: 0, previewEvery: 0, stepsPerEpoch: 1 }, ctx);
      const after = await fixedLosses(run, spec, s.unet, 4);
      assert.ok(after[0] < before[0], `instance loss ${before[0]} → ${after[0]}`);
      assert.ok(after[1] < before[1] * 1.5, `class loss ${before[1]} → ${after[1]}`);
      const [output] = await method.save(spec.steps, true);
      assert.equal(output, paths.output);
      // the reloaded checkpoint gives the trained UNet's output
      const reloaded = await loadSdModel(output!, ['unet']);
      const x = tf.randomNormal([1, 8, 8, 4], 0, 1, 'float32', 5);
      const ctxT = tf.randomNormal([1, 77, run.model.text.cfg.width], 0, 1, 'float32', 6);
      const a = unetForward(s.unet, run.model.unet.cfg, x, [500], ctxT);
      // (same config: head counts come from the fixture's config.json, which the output folder lacks)
      const b = unetForward(reloaded.unet!.params, run.model.unet.cfg, x, [500], ctxT);
      const d = tf.tidy(() => a.sub(b).abs().max());
      assert.equal((await d.data())[0], 0);
      const baseOut = unetForward(base, run.model.unet.cfg, x, [500], ctxT);
      const moved = tf.tidy(() => a.sub(baseOut).abs().max());
      assert.ok((await moved.data())[0]! > 1e-4, 'training changed the UNet');
      const file = await openSafetensors(output!);
      const meta = file.metadata();
      await file.close();
      assert.equal(meta.sidetrain_method, 'dreambooth');
      assert.equal(meta.sidetrain_step, String(spec.steps));
      tf.dispose([x, ctxT, a, b, d, baseOut, moved, ...base.values()]);
      await reloaded.source.close();
    } finally {
      s.optimizer.dispose();
      await releaseDreambooth(run);
    }
    // a later job with the same model and class prompt reuses the cached images
    const events2: JobEvent[] = [];
    const run2 = await prepareDreambooth(specFor(), ctxFor(events2), currentBackend()!.name);
    assert.equal(run2.classes!.dir, run.classes.dir);
    assert.ok(!events2.some((e) => e.type === 'log' && /generating/.test(e.message)), 'no class image generated again');
    await releaseDreambooth(run2);
  });
});

test('runDreambooth: cancel + resume keeps the optimizer state and ends identical to an uninterrupted run', async () => {
  await onGradBackend(async () => {
    for (const optimizer of ['adamw8bit']) {
      const full = specFor({ optimizer, name: `full-${optimizer}` });
      const r1 = await runDreambooth(full, ctxFor([]));
      assert.equal(r1.kind, 'checkpoint');
      assert.equal(r1.usage, full.name);
      assert.equal(r1.step, 4);

      const part = specFor({ optimizer, name: `part-${optimizer}` });
      const r2 = await runDreambooth(part, ctxFor([], (e, abort) => e.type === 'step' && e.step === 2 && abort()));
      assert.equal(r2.cancelled, true);
      assert.equal(r2.step, 2);
      const optim = join(dreamboothPaths(part).snapshots, `${part.name}-2.optim.safetensors`);
      assert.ok(existsSync(optim), 'optimizer state saved beside the snapshots');
      const events: JobEvent[] = [];
      const r3 = await runDreambooth({ ...part, resume: true }, ctxFor(events));
      assert.equal(r3.step, 4);
      assert.ok(events.some((e) => e.type === 'log' && /optimizer state restored/.test(e.message)));

      const a = await openSafetensors(r1.output);
      const b = await openSafetensors(r3.output);
      assert.deepEqual(a.keys().sort(), b.keys().sort());
      for (const k of a.keys()) assert.deepEqual(await b.read(k), await a.read(k), k);
      await a.close();
      await b.close();
    }
  });
});

test('text encoder trained for textEncoderSteps then frozen; no prior preservation; half output; existing output kept', async () => {
  await onGradBackend(async () => {
    const spec = specFor({ classPrompt: '', trainTextEncoder: true, textEncoderSteps: 1, textEncoderLr: '0.001', optimizer: 'adafactor', half: true, steps: 2, saveEvery: 1 });
    const r = await runDreambooth(spec, ctxFor([]));
    const snap = await openSafetensors(join(dreamboothPaths(spec).snapshots, `${spec.name}-1.safetensors`));
    const out = await openSafetensors(r.output);
    const base = await openSafetensors(join(SD1, 'model.safetensors'));
    try {
      const textKey = 'cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight';
      const unetKey = 'model.diffusion_model.out.2.weight';
      assert.equal(out.info(textKey).dtype, 'F16');
      assert.equal(out.info('cond_stage_model.transformer.text_model.embeddings.position_ids').dtype, base.info('cond_stage_model.transformer.text_model.embeddings.position_ids').dtype);
      const changed = (a: Float32Array, b: Float32Array) => a.some((v, i) => Math.abs(v - b[i]!) > 1e-3);
      assert.ok(changed(await snap.read(textKey), await base.read(textKey)), 'step 1 trained the text encoder');
      assert.deepEqual(await out.read(textKey), await snap.read(textKey), 'frozen after textEncoderSteps');
      assert.ok(changed(await out.read(unetKey), await snap.read(unetKey)), 'the UNet kept training');
      assert.equal(out.metadata().sidetrain_class_images, '0');
    } finally {
      await Promise.all([snap.close(), out.close(), base.close()]);
    }
    await assert.rejects(runDreambooth(spec, ctxFor([])), /already exists/);
  });
});

// ---------------------------------------------------------------------------------------------
// --lora: the same job, trained as LoRA adapters

const loraSpecFor = (extra: Record<string, unknown> = {}) => specFor({ lora: true, rank: 4, alpha: 4, loraDir: join(tmp, 'Lora'), ...extra });

async function readAll(path: string): Promise<Map<string, Float32Array>> {
  const f = await openSafetensors(path);
  const out = new Map(await Promise.all(f.keys().map(async (k) => [k, await f.read(k)] as const)));
  await f.close();
  return out;
}

test('dreambooth --lora: a LoRA whose keys map to the checkpoint modules, with ss_* and prior metadata', async () => {
  await onGradBackend(async () => {
    const spec = loraSpecFor({ steps: 2, trainTextEncoder: true, textEncoderLr: '0.0005', priorWeight: 0.75 });
    const r = await runDreambooth(spec, ctxFor([]));
    assert.equal(r.kind, 'lora');
    assert.equal(r.output, join(spec.loraDir, `${spec.name}.safetensors`));
    assert.equal(r.usage, `<lora:${spec.name}:1>`);
    assert.ok(!existsSync(dreamboothPaths(spec).output), 'no checkpoint written');
    const file = await openSafetensors(r.output);
    const meta = file.metadata();
    const shapes = await (async () => {
      const m = await loadSdModel(spec.model, []);
      const sh = shapesOf(m.source);
      await m.source.close();
      return sh;
    })();
    const mapping = networkLayerMapping(shapes.keys());
    const stems = new Set(file.keys().map((k) => k.replace(/\.(lora_down\.weight|lora_up\.weight|alpha)$/, '')));
    const targets = loraTargets(shapes, ['attn', 'text']);
    assert.deepEqual([...stems].sort(), targets.map((t) => t.name).sort(), 'one adapter per attention projection (UNet + text)');
    for (const t of targets) {
      assert.equal(webuiModuleFor(t.name, mapping, false), t.module, t.name);
      assert.equal(kohyaName(t.module), t.name);
    }
    await file.close();
    assert.equal(meta.ss_network_dim, '4');
    assert.equal(meta.ss_network_alpha, '4');
    assert.equal(meta.ss_base_model_version, 'sd_v1');
    assert.equal(meta.ss_steps, '2');
    assert.equal(meta.ss_sidetrain_method, 'dreambooth');
    assert.equal(meta.ss_sidetrain_class_prompt, 'a photo of a cat');
    assert.equal(meta.ss_sidetrain_instance_prompt, 'a photo of sks cat');
    assert.equal(meta.ss_prior_loss_weight, '0.75');
    assert.equal(meta.ss_num_reg_images, '2');
    assert.equal(meta.ss_sidetrain_class_images, '2');
    assert.equal(meta.ss_text_encoder_lr, '0.0005');
    // every image is trained with the instance prompt
    assert.deepEqual(JSON.parse(meta.ss_tag_frequency!), { '1_images': { 'a photo of sks cat': 2 } });
    const csv = readFileSync(join(spec.logDir, spec.name, 'prior-loss.csv'), 'utf8').trim().split('\n');
    assert.equal(csv.length, 3, 'one instance/class row per step');
  });
});

test('dreambooth --lora: prior preservation lowers the instance loss at fixed batches, class loss bounded', async () => {
  await onGradBackend(async () => {
    const spec = loraSpecFor({ steps: 10, lr: '0.01', name: 'lora-prior' });
    const r = await runDreambooth(spec, ctxFor([]));
    const run = await prepareDreambooth(spec, ctxFor([]), currentBackend()!.name);
    const net = createLora(loraTargets(shapesOf(run.model.source), ['attn']), { rank: 4, alpha: 4, seed: 0 });
    try {
      assert.ok(run.classes, 'prior preservation is on');
      for (const [k, v] of await readAll(r.output)) if (net.weights.has(k)) net.weights.get(k)!.assign(tf.tensor(v, net.weights.get(k)!.shape));
      const before = await fixedLosses(run, spec, run.model.unet.params, 4);
      const after = await fixedLosses(run, spec, withLora(run.model.unet.params, net), 4);
      assert.ok(after[0] < before[0], `instance loss ${before[0]} → ${after[0]}`);
      assert.ok(after[1] < before[1] * 1.5, `class loss ${before[1]} → ${after[1]}`);
    } finally {
      disposeLora(net);
      await releaseDreambooth(run);
    }
  });
});

test('dreambooth --lora: cancel + resume keeps the optimizer state and ends identical to an uninterrupted run', async () => {
  await onGradBackend(async () => {
    const full = loraSpecFor({ optimizer: 'adamw8bit', name: 'lora-full', lr: '0.005' });
    const r1 = await runDreambooth(full, ctxFor([]));
    assert.equal(r1.step, 4);
    const part = loraSpecFor({ optimizer: 'adamw8bit', name: 'lora-part', lr: '0.005' });
    const r2 = await runDreambooth(part, ctxFor([], (e, abort) => e.type === 'step' && e.step === 2 && abort()));
    assert.equal(r2.cancelled, true);
    assert.equal(r2.step, 2);
    assert.ok(existsSync(`${r2.output}.optim`), 'optimizer state saved beside the LoRA');
    const events: JobEvent[] = [];
    const r3 = await runDreambooth({ ...part, resume: true }, ctxFor(events));
    assert.equal(r3.step, 4);
    assert.ok(events.some((e) => e.type === 'log' && /from step 2 with its optimizer state/.test(e.message)));
    const [a, b] = [await readAll(r1.output), await readAll(r3.output)];
    assert.deepEqual([...b.keys()].sort(), [...a.keys()].sort());
    for (const [k, v] of a) assert.deepEqual(b.get(k), v, k);
  });
});
