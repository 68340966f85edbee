/**
 * @file Textual Inversion end to end, in-process (issue 5, Proof): the loss and vector gradient
 * through the trainer's own `textualInversionLoss` against golden.json, webui create_embedding
 * initialisation, a 30-step run that lowers the loss and is bit-identical for the same seed,
 * the written .pt in the webui's layout, no tensor leaks, and bad inputs that write nothing.
 * Signals, kill and resume run the CLI as a subprocess: test/ti-cli.test.ts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { copyFile, mkdir, mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { currentBackend, tf, initBackend, type Tensor } from '../trainers/backend/index.ts';
import { validate } from '../schemas/index.ts';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import { openTorchZip } from '../trainers/io/torchzip.ts';
import { embeddingChecksum, readEmbedding } from '../trainers/io/pt-embedding.ts';
import { readOptim } from '../trainers/io/optim-file.ts';
import { loadSdModel, paddingFor } from '../trainers/nets/sd.ts';
import { param } from '../trainers/nets/params.ts';
import { textKeyNames } from '../trainers/nets/clip.ts';
import { ClipTokenizer, tokenizeWithEmbeddings } from '../trainers/text/tokenizer.ts';
import { initialVectors, runTextualInversion, textualInversionLoss, type TiModel, type TiSpec } from '../trainers/methods/textual-inversion.ts';
import { diffusionBatch, prepareRun, releaseRun, type PreparedRun } from '../trainers/train/prepare.ts';
import { NonFiniteError } from '../trainers/train/loop.ts';
import { runJobInProcess } from '../bridge/commands/train.ts';
import type { JobContext, JobEvent } from '../trainers/job.ts';

await initBackend();

const FIX = 'test/fixtures';
const MODEL = `${FIX}/sd-tiny/model.safetensors`;
const IMAGES = 'assets/demo-images';
/** The member names and pickle globals the webui's safe unpickler allows (as in test/io-*.test.ts). */
const WEBUI_MEMBER = /^([^/]+)\/((data\/\d+)|version|(data\.pkl))$/;
const WEBUI_GLOBALS = new Set(['collections.OrderedDict', 'torch._utils._rebuild_tensor_v2', 'torch.FloatStorage']);

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

const tmp = () => mkdtemp(join(tmpdir(), 'sidetrain-ti-'));

/** A validated spec (schema defaults filled) writing into `dir`; 64 px, no previews or snapshots. */
function tiSpec(dir: string, over: Record<string, unknown> = {}): TiSpec {
  const spec: Record<string, unknown> = {
    model: MODEL, images: IMAGES, name: 'ti_test', initText: 'cat', vectors: 2, steps: 30, width: 64, height: 64,
    previewEvery: 0, saveEvery: 0, seed: 7, embeddingsDir: join(dir, 'emb'), logDir: join(dir, 'log'), ...over,
  };
  assert.deepEqual(validate('textual-inversion', spec), []);
  return spec as unknown as TiSpec;
}

function stubCtx(): { ctx: JobContext; events: JobEvent[] } {
  const events: JobEvent[] = [];
  return { events, ctx: { emit: (e) => events.push(e), signal: new AbortController().signal } };
}

const maxAbsDiff = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
};

for (const fixture of ['sd-tiny', 'sd2-tiny']) {
  test(`${fixture}: textualInversionLoss and its vector gradient equal golden ti.loss / ti.grad_vectors`, async () => {
    const dir = `${FIX}/${fixture}`;
    const g = JSON.parse(readFileSync(`${dir}/golden.json`, 'utf8')) as Json;
    const ti = g.textual_inversion;
    const model = await loadSdModel(`${dir}/model.safetensors`, ['text', 'unet']);
    const gs = await openSafetensors(`${dir}/golden.safetensors`);
    const read = async (n: string) => tf.tensor(await gs.read(n), gs.info(n).shape);
    // the trainer's tokenisation of the prompts gives the golden ids and vector positions
    const tokenizer = await ClipTokenizer.load();
    const prompts = (ti.prompts as string[]).map((p) => tokenizeWithEmbeddings(tokenizer, p, new Map([[ti.name, ti.num_vectors]]), paddingFor(model.family)));
    assert.deepEqual(prompts.map((p) => p.ids), ti.ids);
    assert.deepEqual(prompts.map((p) => p.embeddings), ti.vector_positions.map((positions: number[]) => [{ name: ti.name, positions }]));
    const nhwc = (t: Tensor) => t.transpose([0, 2, 3, 1]);
    const vectors = tf.variable(await read('ti.vectors'), true, `test/ti/${fixture}`);
    const batch = { latents: nhwc(await read(g.train_batch.x0)), noise: nhwc(await read(g.train_batch.noise)), timesteps: g.train_batch.timesteps, prompts };
    const { value, grads } = tf.variableGrads(() => textualInversionLoss(model as TiModel, new Map([[ti.name, vectors]]), batch), [vectors]);
    for (const [name, got] of [['ti.loss', value], ['ti.grad_vectors', grads[vectors.name]!]] as const) {
      const diff = maxAbsDiff(await got.data(), await gs.read(name));
      assert.ok(diff <= g.tensors[name].atol, `${name}: max |diff| ${diff} > atol ${g.tensors[name].atol}`);
    }
    tf.dispose([value, ...Object.values(grads), vectors, batch.latents, batch.noise]);
    await gs.close();
    await model.source.close();
  });
}

/** webui create_embedding's rows for `text` (token embedding rows by BPE id). */
function tokenRows(run: PreparedRun, ids: number[]): Float32Array {
  const { params, cfg } = run.model.text;
  return tf.tidy(() => tf.gather(param(params, textKeyNames(cfg.family, cfg.prefix).tokenEmbedding), ids)).dataSync() as Float32Array;
}

test('initialVectors follows webui create_embedding (spread, SD1 truncation to the vector count, empty → zeros)', async () => {
  const tokenizer = await ClipTokenizer.load();
  const textRun = async (fixture: string) => {
    const model = await loadSdModel(`${FIX}/${fixture}/model.safetensors`, ['text']);
    return { run: { model, tokenizer } as unknown as PreparedRun, close: () => model.source.close() };
  };
  const sd1 = await textRun('sd-tiny');
  const sd2 = await textRun('sd2-tiny');
  const init = (r: PreparedRun, text: string, n: number) => {
    const t = initialVectors(r, text, n);
    const out = { shape: t.shape, values: t.dataSync() as Float32Array };
    t.dispose();
    return out;
  };
  const [fluffy, cat] = tokenizer.bpe('fluffy cat');
  // golden ti.vectors = create_embedding('fluffy cat', 2) + N(0, 0.01²)
  const gs = await openSafetensors(`${FIX}/sd-tiny/golden.safetensors`);
  assert.ok(maxAbsDiff(init(sd1.run, 'fluffy cat', 2).values, await gs.read('ti.vectors')) < 0.06);
  await gs.close();
  assert.deepEqual(init(sd1.run, 'fluffy cat', 2).values, tokenRows(sd1.run, [fluffy!, cat!]));
  // vec[i] = embedded[i * n // numVectors]: 2 tokens over 5 vectors → 0,0,0,1,1
  for (const r of [sd1.run, sd2.run]) assert.deepEqual(init(r, 'fluffy cat', 5).values, tokenRows(r, [fluffy!, fluffy!, fluffy!, cat!, cat!]));
  // SD1's HF tokenizer call has max_length=nvpt (truncates); SD2's open_clip encode does not
  const four = tokenizer.bpe('a fluffy orange cat');
  assert.equal(four.length, 4);
  assert.deepEqual(init(sd1.run, 'a fluffy orange cat', 2).values, tokenRows(sd1.run, [four[0]!, four[1]!]));
  assert.deepEqual(init(sd2.run, 'a fluffy orange cat', 2).values, tokenRows(sd2.run, [four[0]!, four[2]!]));
  const zeros = init(sd1.run, '', 3);
  assert.deepEqual(zeros.shape, [3, sd1.run.model.text.cfg.width]);
  assert.ok(zeros.values.every((x) => x === 0));
  await sd1.close();
  await sd2.close();
});

/** Mean TI loss over the batches of steps 1…n (fixed seeds and timesteps) with the given vectors. */
async function meanLoss(run: PreparedRun, spec: TiSpec, vectors: Tensor, n: number): Promise<number> {
  const embeddings = new Map([[spec.name, vectors.shape[0]!]]);
  let sum = 0;
  for (let step = 1; step <= n; step++) {
    const batch = diffusionBatch(run, spec, step, 0, embeddings);
    const loss = textualInversionLoss(run.model, new Map([[spec.name, vectors]]), batch);
    sum += (await loss.data())[0]!;
    tf.dispose([loss, batch.latents, batch.noise]);
  }
  return sum / n;
}

test('30 steps on sd-tiny: loss goes down, same seed → bit-identical .pt, webui layout, no tensor leaks', async () => {
  const [dirA, dirB] = [await tmp(), await tmp()];
  const specA = tiSpec(dirA, { saveEvery: 10, previewEvery: 30, lr: '0.02' });
  const before = tf.memory().numTensors;
  const a = stubCtx();
  const resultA = await runTextualInversion(specA, a.ctx);
  assert.equal(tf.memory().numTensors, before, 'tensors left behind by runTextualInversion');
  assert.equal(a.events.filter((e) => e.type === 'step').length, 30);
  assert.equal(resultA.step, 30);
  assert.equal(resultA.cancelled, false);
  assert.deepEqual(resultA.outputs, [join(dirA, 'emb', 'ti_test.pt'), join(dirA, 'emb', 'ti_test.pt.optim')]);
  for (const s of [10, 20]) assert.ok(existsSync(join(dirA, 'log', 'ti_test', 'embeddings', `ti_test-${s}.pt`)), `snapshot ${s}`);
  assert.ok(existsSync(join(dirA, 'log', 'ti_test', 'images', 'ti_test-30.png')), 'preview');

  // the same seed again: the same bytes (the zip writer stores a fixed date, nothing variable)
  const resultB = await runTextualInversion(tiSpec(dirB, { saveEvery: 10, previewEvery: 30, lr: '0.02' }), stubCtx().ctx);
  const [eA, eB] = [await readEmbedding(resultA.output), await readEmbedding(resultB.output)];
  assert.deepEqual(Buffer.from(eA.vectors['*']!.values.buffer), Buffer.from(eB.vectors['*']!.values.buffer));
  assert.deepEqual(await readFile(resultA.output), await readFile(resultB.output));
  const csv = (d: string) => readFileSync(join(d, 'log', 'ti_test', 'loss.csv'), 'utf8');
  assert.equal(csv(dirA), csv(dirB));
  assert.equal(csv(dirA).trim().split('\n').length, 31);

  // the .pt as the webui reads it
  const sha = createHash('sha256').update(readFileSync(MODEL)).digest('hex');
  assert.equal(eA.layout, 'string_to_param');
  assert.equal(eA.name, 'ti_test');
  assert.equal(eA.step, 30);
  assert.equal(eA.sdCheckpoint, sha.slice(0, 10));
  assert.equal(eA.sdCheckpointName, 'model');
  assert.deepEqual(eA.vectors['*']!.shape, [2, 32]);
  const zip = await openTorchZip(resultA.output);
  assert.deepEqual([...(zip.value as Map<string, unknown>).keys()], ['string_to_token', 'string_to_param', 'name', 'step', 'sd_checkpoint', 'sd_checkpoint_name']);
  for (const m of zip.members) assert.match(m, WEBUI_MEMBER);
  for (const gl of zip.globals) assert.ok(WEBUI_GLOBALS.has(gl), gl);
  await zip.close();
  const optim = await readOptim(`${resultA.output}.optim`);
  assert.equal(optim.hash, embeddingChecksum(eA.vectors['*']!.values));
  assert.equal(optim.states[0]!.step, 30);

  // the loss on the training batches (same seeds and timesteps) before and after training
  const run = await prepareRun(tiSpec(dirA, { overwrite: true }), stubCtx().ctx, 'textual_inversion', currentBackend()!.name);
  const v0 = initialVectors(run, 'cat', 2);
  const v30 = tf.tensor(eA.vectors['*']!.values, eA.vectors['*']!.shape);
  const [loss0, loss30] = [await meanLoss(run, specA, v0, 30), await meanLoss(run, specA, v30, 30)];
  tf.dispose([v0, v30]);
  releaseRun(run);
  await run.model.source.close();
  assert.ok(loss30 < loss0 - 1e-3, `mean loss over the training batches did not go down: ${loss0} → ${loss30}`);
  assert.equal(tf.memory().numTensors, before);
});

test('per-step tensor count is flat across a run (no leak per step)', async () => {
  const dir = await tmp();
  const counts: number[] = [];
  const ctx: JobContext = { emit: (e) => e.type === 'step' && counts.push(tf.memory().numTensors), signal: new AbortController().signal };
  await runTextualInversion(tiSpec(dir, { steps: 8, batchSize: 2, gradAccum: 2 }), ctx);
  assert.equal(counts.length, 8);
  assert.ok(counts.every((c) => c === counts[0]), `tensors per step: ${counts.join(', ')}`);
});

test('an existing <name>.pt is not replaced without --overwrite / --resume', async () => {
  const dir = await tmp();
  await mkdir(join(dir, 'emb'));
  const existing = join(dir, 'emb', 'ti_test.pt');
  await writeFile(existing, 'not yours to replace');
  await assert.rejects(runTextualInversion(tiSpec(dir), stubCtx().ctx), /ti_test\.pt already exists: pass --resume .* or --overwrite/);
  assert.equal(await readFile(existing, 'utf8'), 'not yours to replace');
  assert.equal(existsSync(join(dir, 'log')), false);
});

test('bad inputs: a clear error naming the flag or file, and nothing written', async () => {
  const dir = await tmp();
  await mkdir(join(dir, 'empty'));
  await mkdir(join(dir, 'corrupt-only'));
  await writeFile(join(dir, 'corrupt-only', 'broken.png'), 'not a png');
  const cases: [Record<string, unknown>, RegExp][] = [
    [{ model: join(dir, 'missing.safetensors') }, /--model .*missing\.safetensors' is not a readable file/],
    [{ images: join(dir, 'empty') }, /images folder .*empty is empty/],
    [{ images: join(dir, 'nowhere') }, /--images .*nowhere' is not a readable folder/],
    [{ images: join(dir, 'corrupt-only') }, /has no usable images: broken\.png \(/],
    [{ lr: '0.005:abc' }, /--lr: bad learn rate schedule "0\.005:abc".*Syntax: RATE\[:STEP\]/],
    [{ lr: '0.005:10, 0.001:5' }, /learn rate schedule.*Syntax: RATE\[:STEP\]/],
    [{ vectors: 0 }, /--vectors must be >= 1/],
    [{ vectors: 76 }, /--vectors must be <= 75/],
    [{ name: 'a/b' }, /--name may only have letters, digits/],
  ];
  for (const [over, message] of cases) {
    const spec = { model: MODEL, images: IMAGES, name: 'bad', steps: 2, width: 64, height: 64, embeddingsDir: join(dir, 'emb'), logDir: join(dir, 'log'), ...over };
    await assert.rejects(runJobInProcess('textual_inversion', spec, () => {}), message, JSON.stringify(over));
    assert.equal(existsSync(join(dir, 'emb')), false, `${JSON.stringify(over)} wrote an embeddings folder`);
    assert.equal(existsSync(join(dir, 'log')), false, `${JSON.stringify(over)} wrote a log folder`);
  }
});

test('a corrupt image is skipped with a warning naming it; training goes on with the others', async () => {
  const dir = await tmp();
  const images = join(dir, 'images');
  await mkdir(images);
  for (const f of ['01-orange cat sitting.png', '02-gray cat on grass.png']) await copyFile(join(IMAGES, f), join(images, f));
  await writeFile(join(images, '03-broken.png'), Buffer.from('\x89PNG\r\n\x1a\n truncated'));
  const { ctx, events } = stubCtx();
  const result = await runTextualInversion(tiSpec(dir, { images, steps: 3 }), ctx);
  assert.equal(result.step, 3);
  const warnings = events.filter((e) => e.type === 'log' && e.level === 'warn').map((e) => (e as { message: string }).message);
  assert.ok(warnings.some((w) => w.includes('03-broken.png')), warnings.join('\n'));
  assert.equal((await readEmbedding(result.output)).step, 3);
});

test('NaN/Inf: the run stops with NonFiniteError, the last good snapshot stays, no output is written', async () => {
  const dir = await tmp();
  // 0.005 for 4 steps (snapshots at 2 and 4), then a rate whose first Adam step overflows float32
  const spec = tiSpec(dir, { lr: '0.005:4, 1e38', steps: 10, saveEvery: 2 });
  const before = tf.memory().numTensors;
  await assert.rejects(runTextualInversion(spec, stubCtx().ctx), (err: Error) => {
    assert.ok(err instanceof NonFiniteError, String(err));
    assert.match(err.message, /^step 5: the loss or a trained weight became (NaN|non-finite).*ti_test-4\.pt.*lower the learn rate/);
    return true;
  });
  assert.equal(tf.memory().numTensors, before, 'tensors left behind after a NaN stop');
  const snap = await readEmbedding(join(dir, 'log', 'ti_test', 'embeddings', 'ti_test-4.pt'));
  assert.equal(snap.step, 4);
  assert.ok(snap.vectors['*']!.values.every(Number.isFinite));
  assert.equal(existsSync(join(dir, 'log', 'ti_test', 'embeddings', 'ti_test-6.pt')), false);
  assert.equal(existsSync(join(dir, 'emb', 'ti_test.pt')), false);
});

test('sidetrain demo: its job is a valid TI job on the bundled tiny model and sample photos', async () => {
  const { demoSpec, DEMO_NAME } = await import('../bridge/commands/demo.ts');
  const spec = demoSpec();
  assert.deepEqual(validate('textual-inversion', spec), []);
  assert.ok(existsSync(spec.model as string) && existsSync(spec.images as string));
  assert.match(spec.embeddingsDir as string, /[/\\]embeddings$/);
  assert.equal(spec.name, DEMO_NAME);
});

test('--resume from a finished <name>.pt: counts on from its step with its optimizer state; steps not above it is an error', async () => {
  const dir = await tmp();
  const first = await runTextualInversion(tiSpec(dir, { steps: 6 }), stubCtx().ctx);
  assert.equal(first.step, 6);
  const { ctx, events } = stubCtx();
  const resumed = await runTextualInversion(tiSpec(dir, { steps: 9, resume: true }), ctx);
  assert.equal(resumed.step, 9);
  assert.ok(events.some((e) => e.type === 'started' && e.startStep === 6));
  assert.equal(events.filter((e) => e.type === 'log' && e.level === 'warn').length, 0, 'the .optim hash matched');
  const csv = readFileSync(join(dir, 'log', 'ti_test', 'loss.csv'), 'utf8').trim().split('\n').slice(1).map((l) => Number(l.split(',')[0]));
  assert.deepEqual(csv, [1, 2, 3, 4, 5, 6, 7, 8, 9]);
  const whole = await runTextualInversion(tiSpec(await tmp(), { steps: 9 }), stubCtx().ctx);
  assert.deepEqual((await readEmbedding(whole.output)).vectors, (await readEmbedding(resumed.output)).vectors);
  const before = await readFile(resumed.output);
  await assert.rejects(runTextualInversion(tiSpec(dir, { steps: 9, resume: true }), stubCtx().ctx), /already trained to step 9.*raise the steps/);
  assert.deepEqual(await readFile(resumed.output), before);
});

test('cancelled before the first step (Ctrl-C while loading): nothing written to the embeddings folder', async () => {
  const dir = await tmp();
  const abort = new AbortController();
  abort.abort();
  const result = await runTextualInversion(tiSpec(dir), { emit: () => {}, signal: abort.signal });
  assert.equal(result.cancelled, true);
  assert.equal(result.step, 0);
  assert.deepEqual(result.outputs, []);
  assert.equal(existsSync(join(dir, 'emb')), false);
});
