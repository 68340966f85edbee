/**
 * @file The webgpu backend (issue 21, Proof) on a software GPU: Mesa's lavapipe, unpacked into
 * .cache/lavapipe by scripts/fetch-lavapipe.sh (.ci/run does it). Everything runs in child
 * processes, since Dawn reads VK_ICD_FILENAMES and the loader path when a process starts:
 * the goldens of both SD fixtures, a short TI and LoRA whose loss curves and files match
 * cpu-native's, the WGSL attention core and GroupNorm against the TF-ops versions, a binding over the
 * adapter's limit that fails with an error naming the op (both before dispatch and, with that
 * check off, from the GPU's error scope), and the choice — a software adapter only when forced,
 * none at all leaves cpu-native with one skip line.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { openSafetensors } from '../trainers/io/safetensors.ts';
import { readEmbedding } from '../trainers/io/pt-embedding.ts';

const run = promisify(execFile);
const LAVAPIPE = resolve('.cache/lavapipe');
const lavapipeEnv = existsSync(join(LAVAPIPE, 'icd.json'))
  ? { VK_ICD_FILENAMES: join(LAVAPIPE, 'icd.json'), LD_LIBRARY_PATH: [join(LAVAPIPE, 'root/usr/lib/x86_64-linux-gnu'), process.env.LD_LIBRARY_PATH].filter(Boolean).join(':') }
  : undefined;
const skip = lavapipeEnv ? false : 'no software GPU: run scripts/fetch-lavapipe.sh (Debian/Ubuntu) to test the webgpu backend on lavapipe';

async function node(args: string[], env: Record<string, string | undefined>, timeout = 300_000) {
  try {
    return await run(process.execPath, args, { env: { ...process.env, ...env }, timeout, maxBuffer: 16 << 20 });
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string; message: string };
    throw new Error(`${args.join(' ')} failed: ${e.message}\n${e.stdout ?? ''}\n${e.stderr ?? ''}`);
  }
}
const child = async (mode: string, env: Record<string, string | undefined>) =>
  JSON.parse((await node(['--import', 'tsx', 'test/webgpu/child.ts', mode], env)).stdout.trim().split('\n').pop()!) as Record<string, unknown>;

test('no GPU driver at all: cpu-native is chosen, and webgpu is skipped with one line (also in health)', async () => {
  const r = await child('probe', { VK_ICD_FILENAMES: '/nonexistent/icd.json', SIDETRAIN_BACKEND: undefined });
  assert.equal(r.name, 'cpu-native');
  const lines = (r.skipped as string[]).filter((l) => l.startsWith('webgpu:'));
  assert.equal(lines.length, 1, JSON.stringify(r.skipped));
  assert.doesNotMatch(lines[0]!, /\n/);
  assert.match(String(r.health), /^skipped: [^\n]+$/);
});

test('a software adapter is not chosen on its own, only when forced; health and the choice name it', { skip }, async () => {
  const auto = await child('probe', { ...lavapipeEnv, SIDETRAIN_BACKEND: undefined });
  assert.equal(auto.name, 'cpu-native');
  assert.ok((auto.skipped as string[]).some((l) => /^webgpu: only a software adapter/.test(l)), JSON.stringify(auto.skipped));
  const forced = await child('probe', { ...lavapipeEnv, SIDETRAIN_BACKEND: 'webgpu' });
  assert.equal(forced.name, 'webgpu');
  assert.match(String(forced.adapter), /software\/fallback.*binding ≤ \d+ MiB/);
  assert.equal(forced.health, forced.adapter);
});

test('a binding over the adapter limit: refused before dispatch naming the op, or caught by the error scope — never zeros', { skip }, async () => {
  const refused = await child('oversize', { ...lavapipeEnv });
  assert.match(String(refused.error), /^webgpu: Fill \(FillProgram\) output \[\d+\] float32 is [\d.]+ MiB, over this adapter's storage binding limit/);
  assert.deepEqual(refused.small, [2, 3]);
  const scoped = await child('oversize', { ...lavapipeEnv, SIDETRAIN_WEBGPU_BINDING_CHECK: '0' });
  assert.match(String(scoped.error), /^webgpu: Fill \(FillProgram.*maximum storage buffer binding size/);
  assert.deepEqual(scoped.small, [2, 3]);
});

test('a gather or matmul input over the binding limit is refused before dispatch, naming the op and the input', { skip }, async () => {
  const r = await child('oversize-inputs', { ...lavapipeEnv });
  const over = String.raw`float32 is [\d.]+ MiB, over this adapter's storage binding limit of [\d.]+ MiB`;
  assert.match(String((r.gather as { error?: string }).error), new RegExp(String.raw`^webgpu: GatherV2 \(\w+\) input 0 \[(?:\d+, )*256\] ${over}`));
  assert.match(String((r.matmul as { error?: string }).error), new RegExp(String.raw`^webgpu: BatchMatMul \(\w+\) input 0 \[1, \d+, 256\] ${over}`));
  assert.deepEqual(r.small, [2, 3]);
});

test('the WGSL attention core (flash-style tiles) agrees with the TF-ops slices: output and the three gradients', { skip }, async () => {
  const r = (await child('attention', { ...lavapipeEnv })) as { native: boolean; adapter: string; cases: Record<string, number>[] };
  assert.doesNotMatch(r.adapter, /float16/);
  assert.equal(r.native, true, 'the webgpu backend should run attention in its own kernels');
  assert.equal(r.cases.length, 5);
  for (const [i, errs] of r.cases.entries()) {
    for (const [name, e] of Object.entries(errs)) assert.ok(e < 1e-5, `case ${i} ${name}: relative error ${e}`);
  }
});

test("float16 attention: used where the device has 'shader-f16' (within float16's rounding), refused with the reason where it has not", { skip }, async () => {
  type R = { adapter: string; cases: Record<string, number>[] };
  const half = (await child('attention-quick', { ...lavapipeEnv, SIDETRAIN_WEBGPU_F16: '1' })) as R;
  if (/shader-f16/.test(half.adapter)) {
    assert.match(half.adapter, /; float16 attention \(shader-f16\)$/);
    const errors = half.cases.flatMap((c) => Object.values(c));
    for (const e of errors) assert.ok(e < 5e-3, `float16 error ${e}`);
    assert.ok(Math.max(...errors) > 1e-5, 'float16 rounding should show: the float32 shaders ran');
  }
  // the guard: an adapter without the feature keeps float32 and says why
  const hidden = (await child('attention-quick', { ...lavapipeEnv, SIDETRAIN_WEBGPU_F16: '1', SIDETRAIN_WEBGPU_HIDE_FEATURES: 'shader-f16' })) as R;
  assert.match(hidden.adapter, /float16 attention asked for \(SIDETRAIN_WEBGPU_F16=1\), but this adapter has no 'shader-f16': float32$/);
  for (const e of hidden.cases.flatMap((c) => Object.values(c))) assert.ok(e < 1e-5, `float32 error ${e}`);
});

test('the WGSL GroupNorm(+SiLU) agrees with the TF-ops version: output and the gradients of x, weight and bias', { skip }, async () => {
  const r = (await child('group-norm', { ...lavapipeEnv })) as { kernel: boolean; cases: Record<string, number>[] };
  assert.equal(r.kernel, true);
  assert.equal(r.cases.length, 4);
  for (const [i, errs] of r.cases.entries()) {
    for (const [name, e] of Object.entries(errs)) assert.ok(e < 1e-5, `case ${i} ${name}: relative error ${e}`);
  }
});

test("sidetrain's Conv2DBackpropFilter (a product per filter tap) agrees with a float64 loop", { skip }, async () => {
  const errors = (await child('conv-filter-grad', { ...lavapipeEnv })) as unknown as number[];
  assert.equal(errors.length, 5);
  for (const e of errors) assert.ok(e < 1e-5, `max error ${e}`);
});

test('goldens of sd-tiny and sd2-tiny pass on webgpu', { skip }, async () => {
  const { stdout } = await node(['bin/sidetrain.mjs', 'golden', 'test/fixtures/sd-tiny', 'test/fixtures/sd2-tiny'], { ...lavapipeEnv, SIDETRAIN_BACKEND: 'webgpu' }, 600_000);
  assert.match(stdout, /^backend: webgpu on /m);
  assert.equal([...stdout.matchAll(/^\d+ passed, 0 failed$/gm)].length, 2, stdout);
});

const FLAGS = ['--model', 'test/fixtures/sd-tiny/model.safetensors', '--images', 'assets/demo-images', '--width', '64', '--height', '64', '--preview-every', '0', '--seed', '3'];

/** Trains on both backends; returns the two run folders. */
async function trainBoth(method: string, extra: (dir: string) => string[]): Promise<Record<'webgpu' | 'cpu-native', string>> {
  const dirs = { webgpu: '', 'cpu-native': '' };
  for (const backend of ['webgpu', 'cpu-native'] as const) {
    const dir = await mkdtemp(join(tmpdir(), `sidetrain-webgpu-${method}-`));
    await node(['bin/sidetrain.mjs', 'train', method, ...FLAGS, '--name', 'w', '--log-dir', join(dir, 'log'), ...extra(dir)], { ...lavapipeEnv, SIDETRAIN_BACKEND: backend });
    dirs[backend] = dir;
  }
  return dirs;
}

function assertSameLoss(dirs: Record<string, string>): void {
  const loss = (dir: string) => readFileSync(join(dir, 'log', 'w', 'loss.csv'), 'utf8').trim().split('\n').slice(1).map((l) => Number(l.split(',')[3]));
  const [gpu, cpu] = [loss(dirs.webgpu!), loss(dirs['cpu-native']!)];
  assert.equal(gpu.length, cpu.length);
  for (const [i, l] of gpu.entries()) assert.ok(Math.abs(l - cpu[i]!) <= 1e-4 * Math.abs(cpu[i]!), `step ${i + 1}: webgpu ${l} vs cpu-native ${cpu[i]}`);
}

test('train ti on webgpu: the embedding and loss curve of cpu-native', { skip }, async () => {
  const dirs = await trainBoth('ti', (dir) => ['--init-text', 'cat', '--vectors', '2', '--steps', '4', '--embeddings-dir', join(dir, 'emb')]);
  assertSameLoss(dirs);
  const [gpu, cpu] = await Promise.all([dirs.webgpu, dirs['cpu-native']].map((d) => readEmbedding(join(d, 'emb', 'w.pt'))));
  assert.equal(gpu!.layout, cpu!.layout);
  assert.deepEqual(gpu!.vectors['*']!.shape, cpu!.vectors['*']!.shape);
  const diff = Math.max(...gpu!.vectors['*']!.values.map((v, i) => Math.abs(v - cpu!.vectors['*']!.values[i]!)));
  assert.ok(diff < 1e-4, `embedding differs by ${diff}`);
});

test('train lora on webgpu: the LoRA file (keys, shapes, metadata) and loss curve of cpu-native', { skip }, async () => {
  const dirs = await trainBoth('lora', (dir) => ['--instance-prompt', 'a photo of sks cat', '--rank', '4', '--alpha', '2', '--steps', '3', '--lora-dir', join(dir, 'lora')]);
  assertSameLoss(dirs);
  const [gpu, cpu] = await Promise.all([dirs.webgpu, dirs['cpu-native']].map((d) => openSafetensors(join(d, 'lora', 'w.safetensors'))));
  try {
    assert.deepEqual(gpu!.keys(), cpu!.keys());
    for (const k of cpu!.keys()) assert.deepEqual(gpu!.info(k), cpu!.info(k), k);
    assert.deepEqual(Object.keys(gpu!.metadata()).sort(), Object.keys(cpu!.metadata()).sort());
  } finally {
    await Promise.all([gpu!.close(), cpu!.close()]);
  }
});
