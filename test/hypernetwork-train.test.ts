/**
 * @file Hypernetwork training end to end on the tiny fixtures at 64 px: a short run lowers the
 * loss at fixed batches; the written `.pt` reads back with the webui's module keys and every
 * metadata key for several structures, its `.optim` with the webui's hash rule; snapshots,
 * resume from the newest snapshot, cancel; continuing the webui-written `real-hypernetwork.pt`
 * of both fixtures; bad inputs fail with clear errors before anything is written.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, unlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { currentBackend, initBackend, tf } from '../trainers/backend/index.ts';
import { validate } from '../schemas/index.ts';
import { runHypernetwork, hypernetworkLoss, hypernetSpecFromJob, type HnSpec } from '../trainers/methods/hypernetwork.ts';
import { createHypernetwork, type HypernetworkSpec } from '../trainers/nets/hypernet.ts';
import { disposeParams, type Params } from '../trainers/nets/params.ts';
import { encodeText } from '../trainers/nets/clip.ts';
import { diffusionBatch, prepareRun, releaseRun } from '../trainers/train/prepare.ts';
import { readHypernetwork } from '../trainers/io/pt-hypernet.ts';
import { readOptim } from '../trainers/io/optim-file.ts';
import { modelHash } from '../trainers/io/checkpoint.ts';
import type { JobContext, JobEvent } from '../trainers/job.ts';

const SD1 = 'test/fixtures/sd-tiny';
const SD2 = 'test/fixtures/sd2-tiny';
let tmp: string;
let images: string;
let counter = 0;

before(async () => {
  await initBackend();
  tmp = mkdtempSync(join(tmpdir(), 'sidetrain-hn-'));
  images = join(tmp, 'images');
  mkdirSync(images);
  for (const f of ['01-orange cat.png', 'green_triangle.png', 'green_triangle.txt']) copyFileSync(join('test/fixtures/images', f), join(images, f));
});

after(() => rmSync(tmp, { recursive: true, force: true }));

/** A job spec with the schema's defaults, its own output folders, 64 px, no previews. */
function jobSpec(overrides: Record<string, unknown> = {}, fixture = SD1): HnSpec & { dir: string } {
  const dir = join(tmp, `run${counter++}`);
  const spec: Record<string, unknown> = {
    model: join(fixture, 'model.safetensors'), images, name: 'hn', sizes: [32, 64], width: 64, height: 64, steps: 1,
    previewEvery: 0, saveEvery: 0, hypernetworkDir: join(dir, 'hn'), logDir: join(dir, 'logs'), ...overrides,
  };
  assert.deepEqual(validate('hypernetwork', spec), []);
  return { ...(spec as unknown as HnSpec), dir };
}

function context(abortAfterStep?: number): JobContext & { events: JobEvent[] } {
  const events: JobEvent[] = [];
  const abort = new AbortController();
  return {
    events, signal: abort.signal,
    emit: (e) => {
      events.push(e);
      if (e.type === 'step' && e.step === abortAfterStep) abort.abort();
    },
  };
}

const logs = (events: JobEvent[], level: string) => events.flatMap((e) => (e.type === 'log' && e.level === level ? [e.message] : []));

/** Every file under a folder (recursively); [] when it does not exist. */
function filesUnder(dir: string): string[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { recursive: true, withFileTypes: true }).filter((d) => d.isFile()).map((d) => d.name);
}

function paramsFromFile(hn: Awaited<ReturnType<typeof readHypernetwork>>): Params {
  const params: Params = new Map();
  for (const [size, pair] of hn.modules) {
    pair.forEach((mod, i) => {
      for (const [key, t] of mod) params.set(`${size}.${'kv'[i]}.${key}`, tf.tensor(t.values, t.shape));
    });
  }
  return params;
}

/** The file's .optim: webui hash rule (first 10 hex of the .pt's sha256), AdamW, torch's weight decay. */
async function checkOptim(path: string, tensors: number, step: number): Promise<void> {
  const optim = await readOptim(`${path}.optim`);
  assert.equal(optim.hash, await modelHash(path));
  assert.equal(optim.optimizerName, 'AdamW');
  assert.equal(optim.group.weightDecay, 0.01);
  assert.equal(optim.states.length, tensors);
  assert.ok(optim.states.every((s) => s.step === step), `optimizer steps ${optim.states.map((s) => s.step)} ≠ ${step}`);
}

test('a short run lowers the loss at fixed batches; CSV, events and usage', async (t) => {
  const spec = jobSpec({ activation: 'relu', lr: '0.01', steps: 16, name: 'fit' });
  const ctx = context();
  const result = await runHypernetwork(spec, ctx);
  assert.equal(result.step, 16);
  assert.equal(result.kind, 'hypernetwork');
  assert.equal(result.usage, '<hypernet:fit:1>');
  assert.ok(logs(ctx.events, 'warn').some((m) => /learn rate 0\.01 is above 0\.0001/.test(m)), 'lr warning');
  assert.equal(ctx.events.filter((e) => e.type === 'step').length, 16);
  assert.equal(readFileSync(join(spec.logDir, 'fit', 'loss.csv'), 'utf8').trim().split('\n').length, 17);

  // the same batches (seeded latents, noise, timesteps) before and after training
  const hn: HypernetworkSpec = hypernetSpecFromJob(spec);
  const initial = createHypernetwork(hn, spec.seed);
  const trained = paramsFromFile(await readHypernetwork(result.output));
  const run = await prepareRun(spec, context(), 'hypernetwork', currentBackend()!.name);
  try {
    const losses = { initial: 0, trained: 0 };
    for (let step = 1; step <= 16; step++) {
      const { prompts, ...batch } = diffusionBatch(run, spec, step, 0, new Map());
      const ctxt = encodeText(run.model.text.params, run.model.text.cfg, prompts.map((p) => p.ids));
      for (const [which, params] of [['initial', initial], ['trained', trained]] as const) {
        const loss = hypernetworkLoss({ ...run.model, hypernetwork: { params, spec: hn } }, batch, ctxt);
        losses[which] += (await loss.data())[0]! / 16;
        loss.dispose();
      }
      tf.dispose([batch.latents, batch.noise, ctxt]);
    }
    t.diagnostic(`mean loss at the 16 training batches: ${losses.initial} → ${losses.trained}`);
    assert.ok(losses.trained < losses.initial * 0.98, `loss ${losses.initial} → ${losses.trained}`);
  } finally {
    releaseRun(run);
    await run.model.source.close();
    disposeParams(initial);
    disposeParams(trained);
  }
});

const STRUCTURES: { what: string; opts: Record<string, unknown>; keys: string[]; hidden: number }[] = [
  { what: 'linear', opts: {}, keys: ['linear.0.weight', 'linear.0.bias', 'linear.1.weight', 'linear.1.bias'], hidden: 64 },
  {
    what: 'relu + layer norm', opts: { activation: 'relu', layerNorm: true },
    keys: ['linear.0.weight', 'linear.0.bias', 'linear.2.weight', 'linear.2.bias', 'linear.3.weight', 'linear.3.bias', 'linear.4.weight', 'linear.4.bias'],
    hidden: 64,
  },
  {
    // webui default dropout for [1, 2, 2, 1]: [0, 0.3, 0, 0] → Linear, Act, Dropout, Linear, Act, Linear
    what: 'dropout', opts: { activation: 'swish', layerStructure: [1, 2, 2, 1], dropout: true },
    keys: ['linear.0.weight', 'linear.0.bias', 'linear.3.weight', 'linear.3.bias', 'linear.5.weight', 'linear.5.bias'], hidden: 64,
  },
  {
    what: '1.5 multiplier + activate output + prelu', opts: { activation: 'prelu', layerStructure: [1, 1.5, 1], activateOutput: true },
    keys: ['linear.0.weight', 'linear.0.bias', 'linear.1.weight', 'linear.2.weight', 'linear.2.bias', 'linear.3.weight'], hidden: 48,
  },
];

for (const s of STRUCTURES) {
  test(`written file reads back with the webui's module keys: ${s.what}`, async () => {
    const spec = jobSpec({ sizes: [32], ...s.opts });
    const tensorsBefore = tf.memory().numTensors;
    const result = await runHypernetwork(spec, context());
    assert.equal(tf.memory().numTensors, tensorsBefore, 'the run frees every tensor it made');
    const hn = await readHypernetwork(result.output);
    assert.deepEqual(hn.missing, [], 'every metadata key written explicitly');
    assert.deepEqual([...hn.modules.keys()], [32]);
    for (const mod of hn.modules.get(32)!) assert.deepEqual([...mod.keys()], s.keys);
    assert.deepEqual(hn.modules.get(32)![0].get('linear.0.weight')!.shape, [s.hidden, 32]);
    const ls = (s.opts.layerStructure as number[] | undefined) ?? [1, 2, 1];
    assert.deepEqual(hn.meta.layer_structure, ls);
    assert.equal(hn.meta.activation_func, (s.opts.activation as string | undefined) ?? 'linear');
    assert.equal(hn.meta.activate_output, Boolean(s.opts.activateOutput));
    assert.equal(hn.meta.is_layer_norm, Boolean(s.opts.layerNorm));
    assert.equal(hn.meta.use_dropout, Boolean(s.opts.dropout));
    assert.deepEqual(hn.meta.dropout_structure, s.opts.dropout ? [0, 0.3, 0, 0] : ls.map(() => 0));
    assert.equal(hn.meta.step, 1);
    assert.equal(hn.meta.name, 'hn');
    assert.equal(hn.meta.weight_initialization, 'Normal');
    assert.equal(hn.meta.sd_checkpoint, await modelHash(spec.model));
    assert.equal(hn.meta.sd_checkpoint_name, 'model');
    await checkOptim(result.output, 2 * s.keys.length, 1);
  });
}

test('snapshots, resume from the newest snapshot, cancel after a step', async () => {
  const spec = jobSpec({ steps: 3, saveEvery: 1, previewEvery: 3, previewSteps: 2, sizes: [32] });
  const first = await runHypernetwork(spec, context());
  const snapshots = join(spec.logDir, 'hn', 'hypernetworks');
  assert.deepEqual(readdirSync(snapshots).sort(), ['hn-1.pt', 'hn-1.pt.optim', 'hn-2.pt', 'hn-2.pt.optim']);
  assert.ok(existsSync(join(spec.logDir, 'hn', 'images', 'hn-3.png')), 'preview');
  assert.equal(first.step, 3);
  // a killed run leaves snapshots only: resume continues the newest one
  unlinkSync(first.output);
  unlinkSync(`${first.output}.optim`);
  const ctx = context(4);
  const resumed = await runHypernetwork({ ...spec, resume: true, steps: 6, saveEvery: 0, previewEvery: 0 }, ctx);
  assert.ok(logs(ctx.events, 'info').some((m) => m.includes(`continuing ${join(snapshots, 'hn-2.pt')} from step 2`)));
  assert.equal(resumed.cancelled, true);
  assert.equal(resumed.step, 4);
  assert.equal((await readHypernetwork(resumed.output)).meta.step, 4);
  await checkOptim(resumed.output, 8, 4);
});

for (const [fixture, size, name] of [[SD1, 32, 'sd-tiny'], [SD2, 48, 'sd2-tiny']] as const) {
  test(`continues the webui's real-hypernetwork.pt (${name}, size ${size})`, async () => {
    const real = await readHypernetwork(join(fixture, 'real-hypernetwork.pt'));
    // structure flags that differ from the file: ignored, with a note
    const spec = jobSpec({ resume: true, steps: real.meta.step + 2, sizes: [64], activation: 'relu', name: 'cont' }, fixture);
    mkdirSync(spec.hypernetworkDir, { recursive: true });
    for (const ext of ['', '.optim']) copyFileSync(join(fixture, `real-hypernetwork.pt${ext}`), join(spec.hypernetworkDir, `cont.pt${ext}`));
    const ctx = context();
    const result = await runHypernetwork(spec, ctx);
    assert.ok(logs(ctx.events, 'info').some((m) => /from step \d+; its structure is kept and these options are ignored.*sizes \[/.test(m)));
    assert.deepEqual(logs(ctx.events, 'warn').filter((m) => m.includes('.optim')), [], 'the webui .optim matches and loads');
    const hn = await readHypernetwork(result.output);
    assert.equal(hn.meta.step, real.meta.step + 2);
    assert.equal(hn.meta.name, 'cont');
    assert.equal(hn.meta.activation_func, real.meta.activation_func);
    assert.deepEqual([...hn.modules.keys()], [size]);
    for (const [i, mod] of hn.modules.get(size)!.entries()) {
      const before = real.modules.get(size)![i];
      assert.deepEqual([...mod.keys()], [...before.keys()]);
      assert.notDeepEqual(mod.get('linear.0.weight')!.values, before.get('linear.0.weight')!.values, 'weights trained');
    }
    // the webui's state had 1 step: 2 more
    await checkOptim(result.output, 8, 3);
  });
}

test('bad inputs fail with a clear error and write nothing', async (t) => {
  const cases: [string, Record<string, unknown>, RegExp][] = [
    ['structure not starting with 1', { layerStructure: [2, 2, 1] }, /must start and end with 1/],
    ['structure not ending with 1', { layerStructure: [1, 2, 2] }, /must start and end with 1/],
    ['unknown activation', { activation: 'swishy' }, /unknown activation 'swishy'/],
    ['size not in the model', { sizes: [32, 768], lr: '0.005' }, /size 768 is not a context width of .*: its attentions take 32, 64/],
    ['dropout 1', { dropout: true, dropoutStructure: [0, 1, 0] }, /dropout must be in \[0, 1\)/],
    ['bad schedule', { lr: '0.001:abc' }, /learn rate/],
  ];
  for (const [what, opts, error] of cases) {
    await t.test(what, async () => {
      const spec = jobSpec();
      const ctx = context();
      await assert.rejects(runHypernetwork({ ...spec, ...opts } as HnSpec, ctx), error);
      assert.deepEqual(filesUnder(spec.dir), [], 'nothing written');
      if (opts.lr === '0.005') assert.ok(logs(ctx.events, 'warn').some((m) => /above 0\.0001/.test(m)), 'lr warning');
    });
  }
  // the schema refuses the same values before a job starts
  assert.match(validate('hypernetwork', { model: 'm', images: 'i', name: 'n', activation: 'swishy' }).map((e) => e.text).join(), /activation/);
  assert.match(validate('hypernetwork', { model: 'm', images: 'i', name: 'n', dropoutStructure: [0, 1, 0] }).map((e) => e.text).join(), /dropoutStructure/);
  // an existing output is never replaced without --resume / --overwrite
  const spec = jobSpec();
  mkdirSync(spec.hypernetworkDir, { recursive: true });
  copyFileSync(join(SD1, 'real-hypernetwork.pt'), join(spec.hypernetworkDir, 'hn.pt'));
  await assert.rejects(runHypernetwork(spec, context()), /already exists: pass --resume/);
});
