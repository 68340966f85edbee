/**
 * @file Textual Inversion seconds per step and peak RSS (issue 5): a real TI job
 * (runTextualInversion: load, cache latents, release the VAE, train, save) on a one-image
 * dataset, batch 1, previews off, on the tiny fixture model (64 and 256 px) and on an
 * SD1.5-shaped model at 256 px (random F16 weights for every key of keys-sd15.json, ~2 GB,
 * written to os.tmpdir() and deleted after; the noise schedule is then computed). Each row runs
 * in its own child process, so its peak RSS (getrusage maxRSS: loading included) is its own.
 * s/step is the median of the steps after the first (the first pays warm-up); a step slower
 * than 60 s stops the row after 2 steps.
 *
 * Run alone: `node --import tsx --expose-gc bench/ti.ts`. SIDETRAIN_BENCH_SD15=0 skips SD1.5.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { writeSafetensors, type TensorToWrite } from '../trainers/io/safetensors.ts';
import { floatToHalfBits } from '../trainers/io/half.ts';

const TINY = 'test/fixtures/sd-tiny/model.safetensors';
const SD15_KEYS = 'test/fixtures/sd-tiny/keys-sd15.json';
const SELF = fileURLToPath(import.meta.url);
const SLOW_STEP_SEC = 60;

type Row = Record<string, unknown>;

interface ChildJob {
  model: string;
  images: string;
  out: string;
  px: number;
  steps: number;
}

/** F16 bits of U(±1/√fan_in) from a 4096-level table (a billion values in seconds); 1-D: norms 1, biases 0. */
function randomF16(name: string, shape: number[], seed: number): TensorToWrite {
  const count = shape.reduce((a, b) => a * b, 1);
  if (name.endsWith('position_ids')) {
    return { name, dtype: 'I64', shape, data: new Uint8Array(BigInt64Array.from({ length: count }, (_, i) => BigInt(i)).buffer) };
  }
  if (shape.length === 1) return { name, dtype: 'F16', shape, data: new Uint8Array(new Uint16Array(count).fill(floatToHalfBits(name.endsWith('.weight') ? 1 : 0)).buffer) };
  const bound = 1 / Math.sqrt(count / shape[0]!);
  return {
    name, dtype: 'F16', shape,
    data: async () => {
      const levels = Uint16Array.from({ length: 4096 }, (_, i) => floatToHalfBits(((i + 0.5) / 2048 - 1) * bound));
      const bits = new Uint16Array(count);
      let s = (seed * 2654435761) >>> 0 || 1;
      for (let i = 0; i < count; i++) {
        s ^= s << 13; s ^= s >>> 17; s ^= s << 5; // xorshift32
        bits[i] = levels[(s >>> 0) & 4095]!;
      }
      return new Uint8Array(bits.buffer);
    },
  };
}

/** Every key and shape of keys-sd15.json except the schedule buffers (then computed, as ldm's). */
async function writeRandomSd15(dir: string): Promise<string> {
  const shapes = JSON.parse(readFileSync(SD15_KEYS, 'utf8')) as Record<string, number[]>;
  const path = join(dir, 'sd15-random.safetensors');
  const weights = Object.entries(shapes).filter(([k]) => /^(model|first_stage_model|cond_stage_model)\./.test(k));
  await writeSafetensors(path, weights.map(([name, shape], i) => randomF16(name, shape, i + 1)));
  return path;
}

/** A one-image dataset: a px × px random RGB PNG with a caption. */
async function oneImage(dir: string, px: number): Promise<string> {
  const sharp = (await import('sharp')).default;
  const pixels = Buffer.alloc(px * px * 3);
  let s = 12345;
  for (let i = 0; i < pixels.length; i++) pixels[i] = (s = (Math.imul(s, 1103515245) + 12345) >>> 0) >>> 24;
  const images = join(dir, `images-${px}`);
  mkdirSync(images, { recursive: true });
  await sharp(pixels, { raw: { width: px, height: px, channels: 3 } }).png().toFile(join(images, 'picture.png'));
  writeFileSync(join(images, 'picture.txt'), 'a picture of a cat');
  return images;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

/** In the child: run the job, time its steps, print one JSON line. */
async function child(job: ChildJob): Promise<void> {
  const { validate } = await import('../schemas/index.ts');
  const { runTextualInversion } = await import('../trainers/methods/textual-inversion.ts');
  const spec: Record<string, unknown> = {
    model: job.model, images: job.images, name: 'bench_ti', initText: 'cat', vectors: 1, steps: job.steps, width: job.px, height: job.px,
    previewEvery: 0, saveEvery: 0, seed: 1, overwrite: true, embeddingsDir: join(job.out, 'emb'), logDir: join(job.out, 'log'),
  };
  const errors = validate('textual-inversion', spec);
  if (errors.length) throw new Error(errors.map((e) => e.text).join('; '));
  const abort = new AbortController();
  const t0 = performance.now();
  let backend = '';
  let loaded = 0;
  const stamps: number[] = [];
  await runTextualInversion(spec as never, {
    signal: abort.signal,
    emit: (e) => {
      if (e.type === 'started') [backend, loaded] = [e.backend, performance.now()];
      if (e.type !== 'step') return;
      stamps.push(performance.now());
      const last = (stamps.at(-1)! - (stamps.at(-2) ?? loaded)) / 1000;
      if (stamps.length >= 2 && last > SLOW_STEP_SEC) abort.abort();
    },
  });
  const steps = stamps.map((t, i) => (t - (i ? stamps[i - 1]! : loaded)) / 1000);
  console.log(JSON.stringify({
    backend, loadSec: +((loaded - t0) / 1000).toFixed(1), firstStepSec: +steps[0]!.toPrecision(3),
    secPerStep: +median(steps.length > 1 ? steps.slice(1) : steps).toPrecision(3), stepsTimed: steps.length,
    peakRssMB: Math.round(process.resourceUsage().maxRSS / 1024),
  }));
}

function runChild(job: ChildJob): Row {
  const r = spawnSync(process.execPath, ['--import', 'tsx', '--expose-gc', SELF, '--child', JSON.stringify(job)], {
    encoding: 'utf8', maxBuffer: 64 << 20, timeout: 30 * 60_000,
  });
  const line = r.stdout?.split('\n').reverse().find((l) => l.startsWith('{'));
  if (r.status === 0 && line) return JSON.parse(line) as Row;
  const why = r.signal ? `killed by ${r.signal}` : (r.stderr ?? '').split('\n').find((l) => /Error|out of memory/i.test(l)) ?? `exit ${r.status}`;
  return { error: why.slice(0, 200) };
}

export async function benchTi(): Promise<Record<string, unknown>[]> {
  const dir = mkdtempSync(join(tmpdir(), 'sidetrain-bench-ti-'));
  const rows: Row[] = [];
  try {
    const cases: { model: string; path: () => Promise<string>; px: number; steps: number }[] = [
      { model: 'sd-tiny', path: async () => TINY, px: 64, steps: 12 },
      { model: 'sd-tiny', path: async () => TINY, px: 256, steps: 6 },
    ];
    if (process.env.SIDETRAIN_BENCH_SD15 !== '0') cases.push({ model: 'sd15-shaped (random F16)', path: () => writeRandomSd15(dir), px: 256, steps: 3 });
    for (const c of cases) {
      const job: ChildJob = { model: await c.path(), images: await oneImage(dir, c.px), out: join(dir, 'out'), px: c.px, steps: c.steps };
      rows.push({ bench: 'ti.step', model: c.model, px: c.px, batch: 1, ...runChild(job) });
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  return rows;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const at = process.argv.indexOf('--child');
  if (at > 0) await child(JSON.parse(process.argv[at + 1]!) as ChildJob);
  else console.table(await benchTi());
}
