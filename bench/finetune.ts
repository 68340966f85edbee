/**
 * @file The fine-tune benchmarks of issue 9, on the tiny fixture model and on an SD1.5-shaped model
 * (random F16 weights, bench/sd15-checkpoint.ts), every row in its own child process so that its
 * peak RSS (VmHWM) is its own:
 * - `finetune.cache`: latent caching throughput — N synthetic images of mixed aspect ratios put in
 *   their buckets and VAE-encoded into the disk cache exactly as a fine-tune does
 *   (trainers/methods/finetune/data.ts latentJob + trainers/train/latent-disk-cache.ts); images/s of the encode
 *   (VAE load timed apart), and of a second pass that finds every latent cached (no VAE);
 * - `finetune.step`: s/step of a real fine-tune job (trainers/methods/finetune/finetune.ts, batch 1, AdamW, UNet only,
 *   2 steps, the second timed) per bucket size: 256×256, 320×192, 192×320 at the 256-px area and
 *   512×512, 640×384, 384×640 at 512. The one image of each row is exactly its bucket's size, and
 *   its latent is pre-written to the cache (random values: a step's time does not depend on them),
 *   so the row times training, not a VAE encode. The job runs through bench/steps.ts `--child`
 *   (s/step from its step events, peak RSS reset when training starts).
 *
 * Run alone: `node --import tsx --expose-gc bench/finetune.ts [--json]`; `npm run bench` calls
 * benchFinetune(). Env: SIDETRAIN_BENCH_SD15=0 skips the SD1.5 rows (tens of seconds to minutes each);
 * SIDETRAIN_BENCH_FT_OPTIMIZER=adamw8bit|adafactor times the step rows with that optimizer (SD1.5 with
 * AdamW keeps ~14 GB of weights, gradients and moments).
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { writeRandomSd15 } from './sd15-checkpoint.ts';
import { runBenchChild, statusKb, type Row } from './child.ts';

const TINY = 'test/fixtures/sd-tiny/model.safetensors';
const SELF = fileURLToPath(import.meta.url);
const STEPS_CHILD = fileURLToPath(new URL('./steps.ts', import.meta.url));
const ROW_TIMEOUT_MS = 20 * 60_000;
const OPTIMIZER = process.env.SIDETRAIN_BENCH_FT_OPTIMIZER ?? 'adamw';

type ModelName = 'sd-tiny' | 'sd15-shaped';

/** Aspect ratios of the caching set (w:h), cycled: square, 3:2, 2:3, 5:2, 2:5, 4:3. */
const ASPECTS: [number, number][] = [[1, 1], [3, 2], [2, 3], [5, 2], [2, 5], [4, 3]];
/** The step rows' bucket sizes per target resolution (all buckets of finetuneBuckets). */
const STEP_BUCKETS: Record<number, [number, number][]> = { 256: [[256, 256], [320, 192], [192, 320]], 512: [[512, 512], [640, 384], [384, 640]] };

/** Pseudo-random RGB PNG of w × h (noise: the encoder's cost does not depend on content). */
async function writeNoisePng(path: string, width: number, height: number, seed: number): Promise<void> {
  const sharp = (await import('sharp')).default;
  const pixels = Buffer.alloc(width * height * 3);
  let s = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < pixels.length; i++) pixels[i] = (s = (s * 1103515245 + 12345) >>> 0) >>> 24;
  await sharp(pixels, { raw: { width, height, channels: 3 } }).png({ compressionLevel: 1 }).toFile(path);
}

/** N captioned images of mixed aspect ratios, each about `px`² pixels. */
async function makeMixedSet(dir: string, count: number, px: number): Promise<string> {
  mkdirSync(dir, { recursive: true });
  for (let i = 0; i < count; i++) {
    const [a, b] = ASPECTS[i % ASPECTS.length]!;
    const scale = px / Math.sqrt(a * b);
    await writeNoisePng(join(dir, `img${i}.png`), Math.round(a * scale * 1.1), Math.round(b * scale * 1.1), i + 1);
    writeFileSync(join(dir, `img${i}.txt`), `a picture, number ${i}`);
  }
  return dir;
}

const runRowChild = (script: string, args: string[], backend: string) => runBenchChild(script, args, backend, ROW_TIMEOUT_MS);

/**
 * A step row's one image (exactly the bucket's size) with its latent pre-written to the cache the
 * job will use (`<cacheDir>/latent-cache`, keyed as the job keys it).
 */
export async function prepareStepImage(dir: string, modelPath: string, cacheDir: string, width: number, height: number): Promise<string> {
  const { openTensorFile } = await import('../trainers/io/checkpoint.ts');
  const { LatentDiskCache, vaeHash, fileDigest } = await import('../trainers/train/latent-disk-cache.ts');
  const { latentJob } = await import('../trainers/methods/finetune/data.ts');
  const images = join(dir, `images-${width}x${height}`);
  mkdirSync(images, { recursive: true });
  const path = join(images, 'picture.png');
  await writeNoisePng(path, width, height, width * height);
  writeFileSync(join(images, 'picture.txt'), 'a picture of a cat');
  const source = await openTensorFile(modelPath);
  try {
    const cache = new LatentDiskCache(join(cacheDir, 'latent-cache'), await vaeHash(source, 'first_stage_model.'));
    const channels = source.info('first_stage_model.quant_conv.weight').shape[0]! / 2; // quant_conv: [2z, 2z, 1, 1]
    const job = latentJob({ image: { file: 'picture.png', path, caption: '', repeats: 1, width, height }, bucket: { index: 0, width, height } }, 'center', 1);
    const shape = [1, height / 8, width / 8, channels];
    const n = shape.reduce((a, b) => a * b, 1);
    const mean = Float32Array.from({ length: n }, (_, i) => Math.sin(i * 12.9898) * 0.8);
    await cache.write(cache.keyOf(await fileDigest(path), job.variant), { mean, std: new Float32Array(n).fill(0.05), shape });
  } finally {
    await source.close();
  }
  return images;
}

/** The fine-tune job of a step row (the schema fills every other default). */
function stepSpec(modelPath: string, images: string, resolution: number, out: string): Record<string, unknown> {
  return {
    model: modelPath, images, name: 'bench_finetune', resolution, steps: 2, batchSize: 1, optimizer: OPTIMIZER, saveEvery: 0, validateEvery: 0,
    checkpointDir: join(out, 'ckpt'), logDir: join(out, 'logs'), latentCacheDir: join(out, 'cache'), half: true, overwrite: true, seed: 1,
  };
}

async function stepRows(dir: string, [model, modelPath]: [ModelName, string], resolutions: number[], backend: string): Promise<Row[]> {
  const rows: Row[] = [];
  for (const resolution of resolutions) {
    for (const [width, height] of STEP_BUCKETS[resolution]!) {
      const out = join(dir, `out-${model}-${width}x${height}`);
      const images = await prepareStepImage(dir, modelPath, join(out, 'cache'), width, height);
      const spec = stepSpec(modelPath, images, resolution, out);
      const measured = await runRowChild(STEPS_CHILD, ['--child', JSON.stringify({ method: 'finetune', spec })], backend);
      rows.push({ bench: 'finetune.step', model, case: `${width}x${height}`, px: resolution, batch: 1, backend, optimizer: OPTIMIZER, ...measured });
      rmSync(out, { recursive: true, force: true }); // the SD1.5 output checkpoint is 2 GB
    }
  }
  return rows;
}

async function cacheRows(dir: string, models: [ModelName, string][], backend: string): Promise<Row[]> {
  const rows: Row[] = [];
  const plan: Record<ModelName, { px: number; count: number }[]> = {
    'sd-tiny': [{ px: 256, count: 24 }, { px: 512, count: 12 }],
    'sd15-shaped': [{ px: 256, count: 4 }], // ~1 min per image on 2 cores
  };
  for (const [model, modelPath] of models) {
    for (const { px, count } of plan[model]) {
      const images = await makeMixedSet(join(dir, `mixed-${px}-${count}`), count, px);
      const args = { modelPath, images, resolution: px, cacheDir: join(dir, `cache-${model}-${px}`) };
      const measured = await runRowChild(SELF, ['--cache-child', JSON.stringify(args)], backend);
      rows.push({ bench: 'finetune.cache', model, px, backend, images: count, ...measured });
    }
  }
  return rows;
}

/** Every fine-tune row: caching throughput, then s/step per bucket size. */
export async function benchFinetune(opts: { sd15?: boolean; backend?: string } = {}): Promise<Row[]> {
  const { nativeStatus } = await import('../trainers/backend/native/index.ts');
  const backend = opts.backend ?? (nativeStatus().available ? 'cpu-native' : 'wasm');
  const sd15 = opts.sd15 ?? process.env.SIDETRAIN_BENCH_SD15 !== '0';
  const dir = mkdtempSync(join(tmpdir(), 'sidetrain-bench-finetune-'));
  const checkpoint = sd15 ? await writeRandomSd15() : undefined;
  try {
    const models: [ModelName, string][] = [['sd-tiny', TINY], ...(checkpoint ? [['sd15-shaped', checkpoint.path] as [ModelName, string]] : [])];
    const rows = await cacheRows(dir, models, backend);
    rows.push(...(await stepRows(dir, ['sd-tiny', TINY], [256], backend))); // tiny: the 256 area is enough to compare shapes
    if (checkpoint) rows.push(...(await stepRows(dir, ['sd15-shaped', checkpoint.path], [256, 512], backend)));
    return rows;
  } finally {
    await checkpoint?.remove();
    rmSync(dir, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------------------------
// In the child


/** Cache every image's latent as a fine-tune does; then a second, fully cached pass. */
async function cacheChild(args: { modelPath: string; images: string; resolution: number; cacheDir: string }): Promise<Row> {
  const { initBackend } = await import('../trainers/backend/index.ts');
  const { loadCaptionedSet } = await import('../trainers/data/captioned.ts');
  const { nearestBucket } = await import('../trainers/data/buckets.ts');
  const { finetuneBuckets, latentJob } = await import('../trainers/methods/finetune/data.ts');
  const { LatentDiskCache, vaeHash, vaeLatentEncoder } = await import('../trainers/train/latent-disk-cache.ts');
  const { openTensorFile } = await import('../trainers/io/checkpoint.ts');
  const { loadVae } = await import('../trainers/nets/vae.ts');
  const backend = (await initBackend()).name;
  const set = await loadCaptionedSet({ root: args.images, seed: 1 });
  const buckets = finetuneBuckets(args.resolution);
  const jobs = set.train.map((image) => latentJob({ image, bucket: nearestBucket(buckets, image.width, image.height) }, 'center', 1));
  const source = await openTensorFile(args.modelPath);
  const cache = new LatentDiskCache(args.cacheDir, await vaeHash(source, 'first_stage_model.'));
  let loadMs = 0;
  const t0 = performance.now();
  await cache.ensure(jobs, async () => {
    const l0 = performance.now();
    const vae = await loadVae(source, { parts: ['encoder'] });
    loadMs = performance.now() - l0;
    return vaeLatentEncoder(vae);
  });
  const encodeSec = (performance.now() - t0 - loadMs) / 1000;
  const t1 = performance.now();
  const again = await cache.ensure(jobs, async () => { throw new Error('second pass loaded the VAE'); });
  for (const e of again) await cache.read(e.key);
  const cachedSec = (performance.now() - t1) / 1000;
  await source.close();
  return {
    tfBackend: backend, buckets: new Set(jobs.map((j) => j.variant.split('@')[0])).size,
    msPerCall: Math.round((encodeSec * 1000) / jobs.length), // per image: read, resize, encode, write
    imagesPerSec: +(jobs.length / encodeSec).toPrecision(3), vaeLoadSec: +(loadMs / 1000).toFixed(2),
    cachedImagesPerSec: +(jobs.length / cachedSec).toPrecision(3), peakRssMB: Math.round(statusKb('VmHWM') / 1024),
  };
}

async function main(argv: string[]): Promise<void> {
  const at = argv.indexOf('--cache-child');
  if (at >= 0) {
    console.log(JSON.stringify(await cacheChild(JSON.parse(argv[at + 1]!) as Parameters<typeof cacheChild>[0])));
    return;
  }
  const rows = await benchFinetune();
  if (argv.includes('--json')) for (const r of rows) console.log(JSON.stringify(r));
  else console.table(rows);
}

if (process.argv[1] === SELF) await main(process.argv.slice(2));
