/**
 * @file The check for the first machine with a real GPU (run through bench/gpu-check.sh): installs
 * nothing, downloads nothing. One JSON line per row, printed as it finishes:
 *  1. the adapter webgpu would use (or why none);
 *  2. the goldens of sd-tiny, sd2-tiny and sdxl-tiny on webgpu (pass/fail counts), and sidetrain's webgpu
 *     kernels beside the stock ones at SD shapes (bench/webgpu-kernels.ts);
 *  3. real jobs on random-weight full-size checkpoints (bench/sd15-checkpoint.ts), webgpu beside
 *     cpu-native: SD1.5-shaped TI and LoRA at 512 px, SDXL-shaped LoRA at 1024 px (only once this
 *     build trains SDXL: until then the row says why not). s/step is the median after the warm-up.
 * Every row has a time cap and the whole check a budget (default 540 s, `--budget S`), so it ends
 * well inside ten minutes; a row that runs out says so instead of a number.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { webgpuStatus } from '../trainers/backend/webgpu/adapter.ts';
import { detectFamily, shapeOnlySource } from '../trainers/io/checkpoint.ts';
import { runBenchChild, type Row } from './child.ts';
import { writeRandomCheckpoint, SD15_KEYS } from './sd15-checkpoint.ts';
import { jobSpec, makeImages, type StepRowSpec } from './steps.ts';

const STEPS_SCRIPT = fileURLToPath(new URL('./steps.ts', import.meta.url));
const SDXL_KEYS = 'test/fixtures/sdxl-tiny/keys-sdxl.json';
const BACKENDS = ['webgpu', 'cpu-native'];

const budgetAt = process.argv.indexOf('--budget');
const deadline = Date.now() + 1000 * (budgetAt >= 0 ? Number(process.argv[budgetAt + 1]) : 540);
const left = () => Math.max(0, deadline - Date.now());
const print = (row: Row) => console.log(JSON.stringify({ bench: 'gpu-check', ...row }));

/** `sidetrain golden --backend webgpu DIR` in a child: pass/fail counts and seconds. */
function golden(dir: string): Promise<Row> {
  const t0 = performance.now();
  const child = spawn(process.execPath, ['bin/sidetrain.mjs', 'golden', '--backend', 'webgpu', dir], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d));
  child.stderr.on('data', (d: Buffer) => (out += d));
  const timer = setTimeout(() => child.kill('SIGKILL'), Math.min(180_000, left()));
  return new Promise((done) => child.on('close', (code) => {
    clearTimeout(timer);
    const m = /(\d+) passed, (\d+) failed/.exec(out);
    const sec = +((performance.now() - t0) / 1000).toFixed(1);
    done(m ? { row: 'golden', fixture: dir, backend: 'webgpu', passed: Number(m[1]), failed: Number(m[2]), sec }
      : { row: 'golden', fixture: dir, backend: 'webgpu', error: out.trim().split('\n').slice(-3).join(' | ').slice(0, 300), code, sec });
  }));
}

/** bench/webgpu-kernels.ts with sidetrain's kernels or the stock ones (its rows, as one row's `rows`). */
async function kernelRows(stock: boolean): Promise<Row> {
  const env = { ...process.env, ...(stock ? { SIDETRAIN_WEBGPU_KERNELS: '0' } : {}) };
  const child = spawn(process.execPath, ['--import', 'tsx', 'bench/webgpu-kernels.ts'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d));
  const timer = setTimeout(() => child.kill('SIGKILL'), Math.min(90_000, left()));
  const code = await new Promise<number | null>((done) => child.on('close', done));
  clearTimeout(timer);
  const rows = out.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Row);
  return { row: 'kernels', kernels: stock ? 'stock' : 'sidetrain', rows, ...(code === 0 ? {} : { error: `exit ${code}` }) };
}

/** Whether this build trains checkpoints with these keys (SDXL: not yet), before writing gigabytes. */
function supported(keysFile: string): string | undefined {
  try {
    detectFamily(shapeOnlySource(keysFile, JSON.parse(readFileSync(keysFile, 'utf8')) as Record<string, number[]>));
    return undefined;
  } catch (err) {
    return String(err instanceof Error ? err.message : err).split('\n')[0];
  }
}

async function jobRows(model: string, keysFile: string, rows: { method: string; px: number }[], dir: string): Promise<void> {
  const refused = supported(keysFile);
  if (refused) {
    for (const r of rows) print({ row: 'step', model, method: r.method, px: r.px, skipped: refused });
    return;
  }
  const t0 = performance.now();
  const checkpoint = await writeRandomCheckpoint(keysFile);
  print({ row: 'checkpoint', model, writeSec: +((performance.now() - t0) / 1000).toFixed(1) });
  try {
    for (const r of rows) {
      const images = await makeImages(dir, r.px);
      for (const backend of BACKENDS) {
        const spec: StepRowSpec = { model: 'sd15-shaped', method: r.method, px: r.px, steps: 3, backend };
        const cap = Math.min(r.px >= 1024 ? 200_000 : 120_000, left());
        const base = { row: 'step', model, method: r.method, px: r.px, batch: 1, backend };
        if (cap < 20_000) {
          print({ ...base, skipped: 'out of the check budget' });
          continue;
        }
        const measured = await runBenchChild(STEPS_SCRIPT, ['--child', JSON.stringify({ method: r.method, spec: jobSpec(spec, checkpoint.path, images, join(dir, 'out')) })], backend, cap);
        print({ ...base, ...measured });
      }
    }
  } finally {
    await checkpoint.remove();
  }
}

async function main(): Promise<void> {
  print({ row: 'adapter', webgpu: await webgpuStatus(true), cpu: cpus()[0]?.model ?? 'unknown', cores: cpus().length });
  for (const fixture of ['test/fixtures/sd-tiny', 'test/fixtures/sd2-tiny', 'test/fixtures/sdxl-tiny']) print(await golden(fixture));
  for (const stock of [false, true]) print(await kernelRows(stock));
  const dir = mkdtempSync(join(tmpdir(), 'sidetrain-gpu-check-'));
  try {
    await jobRows('sd15-shaped', SD15_KEYS, [{ method: 'textual_inversion', px: 512 }, { method: 'lora', px: 512 }], dir);
    await jobRows('sdxl-shaped', SDXL_KEYS, [{ method: 'lora', px: 1024 }], dir);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
