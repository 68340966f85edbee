import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, writeFile, rm, readdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { LatentDiskCache, vaeHash, vaeLatentEncoder, type LatentEncoder, type LatentJob } from '../trainers/train/latent-disk-cache.ts';
import { loadBucketImage } from '../trainers/data/buckets.ts';
import { openCheckpoint } from '../trainers/io/checkpoint.ts';
import { loadVae } from '../trainers/nets/vae.ts';
import { initBackend } from '../trainers/backend/index.ts';

let tmp: string;
const images: string[] = [];

before(async () => {
  await initBackend();
  tmp = await mkdtemp(join(tmpdir(), 'latent-disk-'));
  for (const [i, [w, h]] of [[64, 32], [32, 64], [48, 48]].entries()) {
    const path = join(tmp, `img${i}.png`);
    await sharp({ create: { width: w!, height: h!, channels: 3, background: { r: 40 * i, g: 100, b: 200 } } }).png().toFile(path);
    images.push(path);
  }
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

function jobsFor(paths: string[], size: number): LatentJob[] {
  return paths.map((path) => ({
    path,
    variant: `${size}x${size}`,
    pixels: () => loadBucketImage(path, { index: 0, width: size, height: size }),
  }));
}

function countingEncoder(counts: { loads: number; calls: number }): () => Promise<LatentEncoder> {
  return async () => {
    counts.loads++;
    return async (pixels, width, height) => {
      counts.calls++;
      const n = (width / 8) * (height / 8) * 4;
      const mean = Float32Array.from({ length: n }, (_, i) => pixels[i % pixels.length]! + i * 1e-3);
      return { mean, std: new Float32Array(n).fill(0.5), shape: [1, height / 8, width / 8, 4] };
    };
  };
}

test('first run encodes every image; the second never loads or calls the encoder', async () => {
  const dir = join(tmp, 'cache');
  const counts = { loads: 0, calls: 0 };
  const first = await new LatentDiskCache(dir, 'vae-a').ensure(jobsFor(images, 32), countingEncoder(counts));
  assert.deepEqual(counts, { loads: 1, calls: 3 });
  assert.ok(first.every((e) => e.encoded));
  const again = { loads: 0, calls: 0 };
  const second = await new LatentDiskCache(dir, 'vae-a').ensure(jobsFor(images, 32), countingEncoder(again));
  assert.deepEqual(again, { loads: 0, calls: 0 });
  assert.deepEqual(second.map((e) => e.key), first.map((e) => e.key));
  const latent = await new LatentDiskCache(dir, 'vae-a').read(second[0]!.key);
  assert.deepEqual(latent.shape, [1, 4, 4, 4]);
  assert.equal(latent.std[0], 0.5);
  // same bytes under another name hit the cache; another bucket or another VAE miss
  const copy = join(tmp, 'renamed.png');
  await writeFile(copy, await sharp(images[0]!).png().toBuffer());
  const c3 = { loads: 0, calls: 0 };
  await new LatentDiskCache(dir, 'vae-a').ensure(jobsFor([images[0]!], 32), countingEncoder(c3));
  assert.deepEqual(c3, { loads: 0, calls: 0 });
  const c4 = { loads: 0, calls: 0 };
  await new LatentDiskCache(dir, 'vae-a').ensure(jobsFor(images.slice(0, 1), 64), countingEncoder(c4));
  await new LatentDiskCache(dir, 'vae-b').ensure(jobsFor(images.slice(0, 1), 32), countingEncoder(c4));
  assert.deepEqual(c4, { loads: 2, calls: 2 });
  assert.equal((await readdir(dir)).length, 5);
});

test('an image whose pixels fail is marked with its error, not fatal; it is retried next run', async () => {
  const dir = join(tmp, 'cache-broken');
  const broken = join(tmp, 'broken.png');
  await writeFile(broken, 'not a png');
  const counts = { loads: 0, calls: 0 };
  const entries = await new LatentDiskCache(dir, 'vae-a').ensure(jobsFor([broken, images[1]!], 32), countingEncoder(counts));
  assert.match(entries[0]!.error ?? '', /./);
  assert.equal(entries[0]!.encoded, false);
  assert.equal(entries[1]!.error, undefined);
  assert.deepEqual(counts, { loads: 1, calls: 1 });
  const again = await new LatentDiskCache(dir, 'vae-a').ensure(jobsFor([broken, images[1]!], 32), countingEncoder(counts));
  assert.match(again[0]!.error ?? '', /./);
  assert.deepEqual(counts, { loads: 1, calls: 1 }, 'only the broken image is missing: the encoder is not loaded');
});

test('the real tiny VAE: hash is stable and the encoder gives scaled latents', async () => {
  const ckpt = await openCheckpoint('test/fixtures/sd-tiny/model.safetensors');
  const h1 = await vaeHash(ckpt.source, 'first_stage_model.');
  assert.equal(h1, await vaeHash(ckpt.source, 'first_stage_model.'));
  assert.notEqual(h1, await vaeHash(ckpt.source, 'model.diffusion_model.'));
  const vae = await loadVae(ckpt.source, { parts: ['encoder'] });
  const counts = { loads: 0, calls: 0 };
  const cache = new LatentDiskCache(join(tmp, 'real'), h1);
  const [entry] = await cache.ensure(jobsFor(images.slice(0, 1), 32), async () => {
    counts.loads++;
    return vaeLatentEncoder(vae);
  });
  const latent = await cache.read(entry!.key);
  assert.equal(latent.shape[1], 32 / 2 ** (vae.cfg.chMult.length - 1));
  assert.ok(latent.mean.every(Number.isFinite) && latent.std.every((v) => v > 0));
  await ckpt.source.close();
});
