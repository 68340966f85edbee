/**
 * @file `sidetrain train ti` as a user runs it, in a subprocess (issue 5, Proof): SIGKILL after a
 * snapshot and `--resume` continues from it (bit-identical to an uninterrupted run), SIGTERM and
 * SIGINT stop after the current step and save, `--dry-run` reports the dataset without touching
 * the model, and a bad flag exits 1 with a field-named message, writing nothing.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { initBackend } from '../trainers/backend/index.ts';
import { validate } from '../schemas/index.ts';
import { readEmbedding } from '../trainers/io/pt-embedding.ts';
import { runTextualInversion, type TiSpec } from '../trainers/methods/textual-inversion.ts';

const MODEL = 'test/fixtures/sd-tiny/model.safetensors';
const IMAGES = 'assets/demo-images';

const tmp = () => mkdtemp(join(tmpdir(), 'sidetrain-ti-cli-'));

interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Start `sidetrain <args>`; `exit` resolves when it ends (killed after `timeoutMs`). */
function cli(args: string[], timeoutMs = 60_000) {
  const child = spawn(process.execPath, ['bin/sidetrain.mjs', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
  const exit = new Promise<Exit>((done) =>
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      done({ code, signal, stdout, stderr });
    }),
  );
  return { child, exit };
}

async function until(what: string, ready: () => boolean, timeoutMs = 60_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!ready()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

/** `train ti` flags for a small run writing into `dir`. */
function tiArgs(dir: string, name: string, extra: string[] = []): string[] {
  return [
    'train', 'ti', '--model', MODEL, '--images', IMAGES, '--name', name, '--init-text', 'cat', '--vectors', '2',
    '--width', '64', '--height', '64', '--preview-every', '0', '--seed', '3',
    '--embeddings-dir', join(dir, 'emb'), '--log-dir', join(dir, 'log'), ...extra,
  ];
}

const csvSteps = (path: string) => (existsSync(path) ? readFileSync(path, 'utf8').trim().split('\n').slice(1).map((l) => Number(l.split(',')[0])) : []);
const csvRows = (path: string) => readFileSync(path, 'utf8').trim().split('\n').slice(1);

test('SIGKILL after a snapshot, then --resume: continues from the snapshot to step 40, as if never killed', async () => {
  const dir = await tmp();
  const args = tiArgs(dir, 'kr', ['--steps', '40', '--save-every', '5']);
  const snapshots = join(dir, 'log', 'kr', 'embeddings');
  const csv = join(dir, 'log', 'kr', 'loss.csv');
  const first = cli(args);
  await until('the first snapshot', () => existsSync(join(snapshots, 'kr-5.pt')));
  first.child.kill('SIGKILL');
  assert.equal((await first.exit).signal, 'SIGKILL');
  assert.equal(existsSync(join(dir, 'emb', 'kr.pt')), false, 'a killed run must not have written the output');
  // .optim is written before .pt: every snapshot .pt has its optimizer state
  const steps = readdirSync(snapshots).filter((f) => /^kr-\d+\.pt$/.test(f)).map((f) => Number(/\d+/.exec(f)![0]));
  const from = Math.max(...steps);
  assert.ok(existsSync(join(snapshots, `kr-${from}.pt.optim`)));
  assert.equal((await readEmbedding(join(snapshots, `kr-${from}.pt`))).step, from);
  const rowsBefore = csvRows(csv);
  assert.ok(rowsBefore.length >= from);

  const resumed = await cli([...args, '--resume']).exit;
  assert.equal(resumed.code, 0, resumed.stderr);
  assert.match(resumed.stdout, /finished at step 40: .*kr\.pt/);
  const out = await readEmbedding(join(dir, 'emb', 'kr.pt'));
  assert.equal(out.step, 40);
  // loss.csv continues: rows up to the snapshot kept, each step once
  assert.deepEqual(csvSteps(csv), Array.from({ length: 40 }, (_, i) => i + 1));
  assert.deepEqual(csvRows(csv).slice(0, from), rowsBefore.slice(0, from));

  // the optimizer state came back: the same vectors as a run that was never interrupted
  await initBackend();
  const ref = await tmp();
  const spec: Record<string, unknown> = {
    model: MODEL, images: IMAGES, name: 'kr', initText: 'cat', vectors: 2, width: 64, height: 64, previewEvery: 0, seed: 3,
    steps: 40, saveEvery: 5, embeddingsDir: join(ref, 'emb'), logDir: join(ref, 'log'),
  };
  assert.deepEqual(validate('textual-inversion', spec), []);
  const whole = await runTextualInversion(spec as unknown as TiSpec, { emit: () => {}, signal: new AbortController().signal });
  assert.deepEqual((await readEmbedding(whole.output)).vectors['*']!.values, out.vectors['*']!.values);
  assert.deepEqual(csvRows(join(ref, 'log', 'kr', 'loss.csv')), csvRows(csv));
});

for (const signal of ['SIGTERM', 'SIGINT'] as const) {
  test(`${signal} stops after the current step and saves <name>.pt with that step`, async () => {
    const dir = await tmp();
    const csv = join(dir, 'log', 'sig', 'loss.csv');
    const run = cli(tiArgs(dir, 'sig', ['--steps', '1000', '--save-every', '0']));
    await until('three steps', () => csvSteps(csv).length >= 3);
    run.child.kill(signal);
    const exit = await run.exit;
    assert.equal(exit.code, 0, exit.stderr);
    assert.match(exit.stderr, /stopping after the current step and saving/);
    const stopped = Number(/stopped at step (\d+): .*sig\.pt/.exec(exit.stdout)?.[1]);
    assert.ok(stopped >= 3 && stopped < 1000, exit.stdout);
    assert.equal((await readEmbedding(join(dir, 'emb', 'sig.pt'))).step, stopped);
    assert.ok(existsSync(join(dir, 'emb', 'sig.pt.optim')));
    assert.equal(csvSteps(csv).at(-1), stopped);
  });
}

test('--dry-run prints the dataset report and never opens the model (a FIFO would block)', async () => {
  const dir = await tmp();
  const fifo = join(dir, 'model.safetensors');
  execFileSync('mkfifo', [fifo]);
  const exit = await cli(['train', 'ti', '--dry-run', '--model', fifo, '--images', IMAGES, '--name', 'dry', '--width', '64', '--height', '64',
    '--embeddings-dir', join(dir, 'emb'), '--log-dir', join(dir, 'log')], 30_000).exit;
  assert.equal(exit.code, 0, exit.stderr);
  assert.match(exit.stdout, /5 image\(s\) used, 1 skipped\n[^]*skipped README\.md: not an image file/);
  assert.match(exit.stdout, /01-orange cat sitting\.png .*caption \(file name\): "orange cat sitting"/);
  assert.match(exit.stdout, /5 step\(s\) per epoch/);
  assert.match(exit.stdout, /example prompts:\n {2}.+\n {2}.+\n {2}.+/);
  assert.deepEqual(readdirSync(dir), ['model.safetensors']);
});

test('--dry-run --shuffle-tags --tag-drop-out 0.5: the example prompts have their tags shuffled and dropped', async () => {
  const dir = await tmp();
  const images = join(dir, 'tagged');
  mkdirSync(images);
  const tags = ['t0', 't1', 't2', 't3', 't4', 't5', 't6', 't7'];
  for (const k of [1, 2, 3]) {
    copyFileSync(join(IMAGES, '01-orange cat sitting.png'), join(images, `${k}.png`));
    writeFileSync(join(images, `${k}.txt`), tags.join(','));
  }
  const run = (extra: string[]) => cli(['train', 'ti', '--dry-run', '--model', MODEL, '--images', images, '--name', 'dry', '--width', '64', '--height', '64',
    '--template', 'subject_filewords', '--embeddings-dir', join(dir, 'emb'), '--log-dir', join(dir, 'log'), ...extra], 30_000).exit;
  const prompts = (stdout: string) => stdout.split('example prompts:\n')[1]!.trim().split('\n').map((l) => l.trim().split(', ').slice(1).join(', ').split(','));
  const plain = await run([]);
  assert.equal(plain.code, 0, plain.stderr);
  assert.deepEqual(prompts(plain.stdout), [tags, tags, tags]);
  const shuffled = await run(['--shuffle-tags', '--tag-drop-out', '0.5']);
  assert.equal(shuffled.code, 0, shuffled.stderr);
  const got = prompts(shuffled.stdout);
  assert.equal(got.length, 3, shuffled.stdout);
  assert.ok(got.some((p) => p.length < tags.length), `no tag dropped:\n${shuffled.stdout}`);
  assert.ok(got.some((p) => p.join() !== [...p].sort().join()), `no tags shuffled:\n${shuffled.stdout}`);
  assert.ok(got.every((p) => p.every((t) => tags.includes(t))), shuffled.stdout);
});

test('a bad flag exits 1 with a field-named message and writes nothing', async () => {
  const dir = await tmp();
  for (const [flags, message] of [
    [['--vectors', '76'], /^sidetrain: --vectors must be <= 75$/m],
    [['--lr', 'fast'], /^sidetrain: --lr: bad learn rate schedule "fast": .*Syntax: RATE\[:STEP\]/m],
    [['--model', join(dir, 'none.safetensors')], /^sidetrain: --model '.*none\.safetensors' is not a readable file$/m],
  ] as const) {
    const exit = await cli([...tiArgs(dir, 'bad', ['--steps', '200']), ...flags]).exit;
    assert.equal(exit.code, 1, flags.join(' '));
    assert.match(exit.stderr, message);
    assert.deepEqual(readdirSync(dir), [], flags.join(' '));
  }
});
