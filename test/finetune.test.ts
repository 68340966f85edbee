import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, mkdir, writeFile, rm, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { initBackend } from '../trainers/backend/index.ts';
import { validate } from '../schemas/index.ts';
import { runFinetune, type FinetuneSpec } from '../trainers/methods/finetune/finetune.ts';
import { finetuneDryRun } from '../trainers/methods/finetune/data.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import { methods } from '../trainers/methods/index.ts';
import type { JobContext, JobEvent } from '../trainers/job.ts';
import { onGradBackend } from './helpers/golden.ts';
import { tf } from '../trainers/backend/tf.ts';
import { finetuneLrSchedule, makeFinetuneOptimizer } from '../trainers/methods/finetune/optim.ts';

const MODEL = 'test/fixtures/sd-tiny/model.safetensors';
let tmp: string;
let images: string;

/** Stripes of two colours: enough structure for the loss to move, cheap to make. */
async function stripes(path: string, width: number, height: number, a: number[], b: number[]): Promise<void> {
  const data = Buffer.alloc(width * height * 3);
  for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) data.set(Math.floor(x / 16) % 2 ? a : b, (y * width + x) * 3);
  await sharp(data, { raw: { width, height, channels: 3 } }).png().toFile(path);
}

before(async () => {
  await initBackend();
  tmp = await mkdtemp(join(tmpdir(), 'finetune-'));
  images = join(tmp, 'data');
  await mkdir(join(images, '2_wide'), { recursive: true });
  await mkdir(join(images, 'square'), { recursive: true });
  const sizes: [string, number, number][] = [['2_wide/w1', 192, 64], ['2_wide/w2', 200, 70], ['square/s1', 128, 128], ['square/s2', 120, 130], ['square/s3', 64, 192], ['square/s4', 130, 128]];
  for (const [i, [stem, w, h]] of sizes.entries()) {
    await stripes(join(images, `${stem}.png`), w, h, [200, 30 + i * 20, 40], [20, 60, 220 - i * 10]);
    await writeFile(join(images, `${stem}.txt`), `stripes, red, blue, picture ${i}`);
  }
  await writeFile(join(images, 'square', 'broken.png'), 'not a png');
  // header fine, pixel data cut: passes the header probe, fails when decoded for the latent cache
  const noise = Buffer.from(Array.from({ length: 96 * 96 * 3 }, (_, i) => (i * 7919) % 251));
  const png = await sharp(noise, { raw: { width: 96, height: 96, channels: 3 } }).png({ compressionLevel: 0 }).toBuffer();
  await writeFile(join(images, 'square', 'truncated.png'), png.subarray(0, png.length >> 1));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

function context(): JobContext & { events: JobEvent[] } {
  const events: JobEvent[] = [];
  return { events, signal: new AbortController().signal, emit: (e) => void events.push(e) };
}
const logs = (events: JobEvent[]) => events.flatMap((e) => (e.type === 'log' ? [e.message] : []));

function jobSpec(overrides: Record<string, unknown>): FinetuneSpec {
  const spec: Record<string, unknown> = {
    model: MODEL, images, name: 'ft', resolution: 128, steps: 6, lr: 1e-3, warmupSteps: 1, validationSplit: 0.2, validateEvery: 3,
    checkpointDir: join(tmp, 'ckpt'), logDir: join(tmp, 'logs'), seed: 3, shuffleTags: true, keepTokens: 1,
    ...overrides,
  };
  assert.deepEqual(validate('finetune', spec), []);
  return spec as unknown as FinetuneSpec;
}

async function tensorsOf(path: string, prefix: string): Promise<Map<string, Float32Array>> {
  const f = await openSafetensors(path);
  const out = new Map<string, Float32Array>();
  for (const k of f.keys()) if (k.startsWith(prefix)) out.set(k, await f.read(k));
  await f.close();
  return out;
}

test('registered as a method with its schema', () => {
  assert.equal(methods.finetune?.schema, 'finetune');
});

test('mixed aspect ratios: buckets, cached latents, lower validation loss, raw + EMA checkpoints', async () => {
  await onGradBackend(async () => {
    const ctx = context();
    const result = await runFinetune(jobSpec({ ema: true, emaDecay: 0.5, save: 'both', minSnrGamma: 5, noiseOffset: 0.05 }), ctx);
    const messages = logs(ctx.events);
    assert.ok(messages.some((m) => /1 image\(s\) skipped:\n  square\/broken\.png/.test(m)), 'broken image reported');
    assert.ok(messages.some((m) => /square\/truncated\.png: /.test(m)), 'truncated image reported');
    const table = messages.find((m) => m.startsWith('bucket'))!;
    assert.match(table, /128×128/);
    assert.match(table, /192×64/);
    assert.ok(messages.includes('encoding latents (VAE loaded)'));
    assert.equal(result.step, 6);
    assert.deepEqual(result.outputs, [join(tmp, 'ckpt', 'ft.safetensors'), join(tmp, 'ckpt', 'ft-ema.safetensors')]);
    const rows = (await readFile(join(tmp, 'logs', 'ft', 'validation.csv'), 'utf8')).trim().split('\n').slice(1).map((l) => l.split(',').map(Number));
    assert.deepEqual(rows.map((r) => r[0]), [0, 3, 6]);
    assert.ok(rows[2]![1]! < rows[0]![1]!, `validation loss ${rows[0]![1]} → ${rows[2]![1]}`);
    // every key kept; the UNet trained; the VAE copied; EMA lies between start and raw
    const src = await tensorsOf(MODEL, '');
    const raw = await tensorsOf(result.outputs[0]!, '');
    const ema = await tensorsOf(result.outputs[1]!, '');
    assert.deepEqual([...raw.keys()].sort(), [...src.keys()].sort());
    const k = 'model.diffusion_model.out.2.weight';
    assert.notDeepEqual(raw.get(k), src.get(k));
    assert.notDeepEqual(ema.get(k), raw.get(k));
    assert.deepEqual(raw.get('first_stage_model.encoder.conv_in.weight'), src.get('first_stage_model.encoder.conv_in.weight'));
    assert.deepEqual(raw.get('cond_stage_model.transformer.text_model.final_layer_norm.weight'), src.get('cond_stage_model.transformer.text_model.final_layer_norm.weight'));
  });
});

test('a second run reuses the cached latents (no VAE) and EMA with decay 0 saves the raw weights', async () => {
  await onGradBackend(async () => {
    const ctx = context();
    const spec = jobSpec({ steps: 2, ema: true, emaDecay: 0, save: 'both', name: 'ft2', trainTextEncoder: true, lrScheduler: 'constant', validateEvery: 0,
      samplePrompts: ['red stripes', 'blue stripes'], sampleEvery: 2, sampleSteps: 2, sampler: 'euler', half: true });
    const result = await runFinetune(spec, ctx);
    assert.ok(!logs(ctx.events).includes('encoding latents (VAE loaded)'));
    const previews = ctx.events.flatMap((e) => (e.type === 'preview' ? [e.path] : []));
    assert.deepEqual(previews, [join(tmp, 'logs', 'ft2', 'images', 'ft2-2-0.png')]);
    for (const i of [0, 1]) assert.deepEqual(await sharp(join(tmp, 'logs', 'ft2', 'images', `ft2-2-${i}.png`)).metadata().then((m) => [m.width, m.height]), [128, 128]);
    const raw = await tensorsOf(result.outputs[0]!, '');
    const ema = await tensorsOf(result.outputs[1]!, '');
    const src = await tensorsOf(MODEL, '');
    for (const [key, values] of raw) assert.deepEqual(ema.get(key), values, key);
    const file = await openSafetensors(result.outputs[0]!);
    const dtypes = new Set(file.keys().map((k) => file.info(k).dtype));
    assert.ok(dtypes.has('F16') && !dtypes.has('F32'), `half: every float tensor F16, got ${[...dtypes]}`);
    await file.close();
    const t = 'cond_stage_model.transformer.text_model.final_layer_norm.weight';
    assert.notDeepEqual(raw.get(t), src.get(t), 'text encoder trained');
    await assert.rejects(runFinetune(spec, context()), /already exists/);
  });
});

test('resume restores the weights, optimizer and EMA state exactly: stopped-and-resumed = straight run', async () => {
  await onGradBackend(async () => {
    const common = { steps: 4, saveEvery: 2, ema: true, emaDecay: 0.7, save: 'both', validationSplit: 0, lrScheduler: 'cosine', optimizer: 'adamw' };
    const straight = await runFinetune(jobSpec({ ...common, name: 'straight' }), context());
    const events: JobEvent[] = [];
    const abort = new AbortController();
    const stopAt2: JobContext = { signal: abort.signal, emit: (e) => { events.push(e); if (e.type === 'step' && e.step === 2) abort.abort(); } };
    const stopped = await runFinetune(jobSpec({ ...common, name: 'resumed' }), stopAt2);
    assert.deepEqual([stopped.step, stopped.cancelled], [2, true]);
    const ctx = context();
    const resumed = await runFinetune(jobSpec({ ...common, name: 'resumed', resume: true }), ctx);
    assert.ok(logs(ctx.events).some((m) => /continuing .*resumed-2\.weights\.safetensors from step 2/.test(m)));
    assert.equal(ctx.events.filter((e) => e.type === 'step').length, 2);
    for (const i of [0, 1]) {
      const a = await tensorsOf(straight.outputs[i]!, 'model.diffusion_model.');
      const b = await tensorsOf(resumed.outputs[i]!, 'model.diffusion_model.');
      for (const [key, values] of a) assert.deepEqual(b.get(key), values, `${i ? 'EMA' : 'raw'} ${key}`);
    }
  });
});

test('textEncoderLr: the optimizer moves text-encoder weights by its rate and UNet weights by lr (AdamW first step |Δ| = lr)', () => {
  const spec = { optimizer: 'adamw', lr: 1e-3, textEncoderLr: 2.5e-4, lrScheduler: 'constant', warmupSteps: 0, steps: 10 } as const;
  // zero weights: the decoupled weight decay (p·(1 − lr·wd)) adds nothing, so Δ = −lr·g/(|g| + eps)
  const unet = tf.variable(tf.zeros([4]), true, 'lr-test/unet');
  const text = tf.variable(tf.zeros([3]), true, 'lr-test/text');
  const opt = makeFinetuneOptimizer(spec, new Map([['unet.w', unet], ['text.w', text]]), new Set(['text.w']));
  const grads = new Map([['unet.w', tf.tensor1d([2, -3, 0.5, -1])], ['text.w', tf.tensor1d([-4, 1, 0.25])]]);
  opt.step(grads, finetuneLrSchedule(spec, spec.lr).getLr(0));
  const expect = (g: number[], lr: number) => g.map((x) => -lr * Math.sign(x));
  const close = (a: ArrayLike<number>, b: number[]) => b.forEach((x, i) => assert.ok(Math.abs(a[i]! - x) < 1e-9, `[${i}] ${a[i]} vs ${x}`));
  close(unet.dataSync(), expect([2, -3, 0.5, -1], 1e-3));
  close(text.dataSync(), expect([-4, 1, 0.25], 2.5e-4));
  opt.dispose();
  tf.dispose([unet, text, ...grads.values()]);
  // the same schedule shape at both peaks (warm-up, cosine); no textEncoderLr → the text group at lr
  const cos = { ...spec, lrScheduler: 'cosine', warmupSteps: 3 } as const;
  for (const d of [0, 1, 3, 5, 9]) assert.ok(Math.abs(finetuneLrSchedule(cos, 2.5e-4).getLr(d) * 4 - finetuneLrSchedule(cos, 1e-3).getLr(d)) < 1e-15, `step ${d}`);
  const same = makeFinetuneOptimizer({ ...spec, textEncoderLr: undefined }, new Map([['text.w', tf.variable(tf.zeros([1]))]]), new Set(['text.w']));
  assert.equal(same.textLr!.getLr(0), 1e-3);
  same.dispose();
});

test('textEncoderLr in a run: after one step every weight moved by its group\'s rate (or not at all)', async () => {
  await onGradBackend(async () => {
    const lr = 1e-3, textLr = 1e-4, wd = 1e-2; // wd: dreambooth-optim.ts makeGroupOptimizer
    const result = await runFinetune(jobSpec({ name: 'lrs', steps: 1, lr, textEncoderLr: textLr, trainTextEncoder: true, lrScheduler: 'constant', warmupSteps: 0, validationSplit: 0 }), context());
    const out = await tensorsOf(result.outputs[0]!, '');
    const src = await tensorsOf(MODEL, '');
    // AdamW step 1: p' = p·(1 − lr·wd) − lr·g/(|g| + eps), so |p' − p + lr·wd·p| is lr (or 0 where g = 0)
    const steps = (prefix: string, rate: number) => {
      const sizes: number[] = [];
      for (const [key, before] of src) {
        if (!key.startsWith(prefix) || key.endsWith('position_ids')) continue;
        const after = out.get(key)!;
        for (let i = 0; i < before.length; i++) sizes.push(Math.abs(after[i]! - before[i]! * (1 - rate * wd)) / rate);
      }
      return sizes;
    };
    for (const [prefix, rate] of [['model.diffusion_model.', lr], ['cond_stage_model.', textLr]] as const) {
      const sizes = steps(prefix, rate);
      const max = sizes.reduce((a, x) => Math.max(a, x), 0);
      assert.ok(max < 1.01, `${prefix}: no step over its rate (max ${max} × rate)`);
      // weights without a gradient (token embeddings of unused tokens) stay; the others move by the rate
      const moved = sizes.filter((x) => x > 0.01);
      const atRate = moved.filter((x) => Math.abs(x - 1) < 0.01).length;
      assert.ok(moved.length > 10000 && atRate > 0.95 * moved.length, `${prefix}: ${atRate} of ${moved.length} moved weights moved by its rate`);
    }
  });
});

test('random crops: the first run encodes its own latents (the crop is in the key), the same seed reuses them', async () => {
  await onGradBackend(async () => {
    const encoded = async (name: string, seed: number) => {
      const ctx = context();
      await runFinetune(jobSpec({ name, seed, steps: 1, crop: 'random', validationSplit: 0, validateEvery: 0, overwrite: true }), ctx);
      return logs(ctx.events).includes('encoding latents (VAE loaded)');
    };
    assert.equal(await encoded('crop', 11), true, 'random crops are not the centre crops cached before');
    assert.equal(await encoded('crop', 11), false, 'same seed → same crops → cached');
    assert.equal(await encoded('crop', 12), true, 'another seed → other crops');
  });
});

test('dry run: bucket table, held-out and skipped images, steps per epoch; no model loaded', async () => {
  const report = await finetuneDryRun(jobSpec({ model: 'no/such/model.safetensors', batchSize: 2 }));
  assert.match(report, /^Data set .*: 6 training image\(s\) \(8 with repeats\), 1 held out for validation, 1 skipped/);
  assert.match(report, /1 image\(s\) skipped:\n  square\/broken\.png/);
  assert.match(report, /^bucket +aspect +images$/m);
  assert.match(report, /center crops; batch 2 × gradient accumulation 1: \d+ step\(s\) per epoch/);
});
